"""Training engines behind one small interface: plain torch (one process) and DeepSpeed ZeRO-2.

The trainer (`trainer.py`) only calls `set_lr`, `forward(**inputs)`, `backward`, `step`, `save`/`load`,
`full_state_dict`, `stop_vote`, `barrier` and reads `module`, `rank`, `world_size`, `input_dtype`. Batches are
dicts passed as keyword arguments, so one engine serves every task. This file (with `comm.py`) is the only
place that imports deepspeed and torch.distributed.
"""

from __future__ import annotations

import collections
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..config import Config, ConfigError
from ..model.weights import OUR_FORMAT
from .checkpoint import atomic_torch_save
from .checkpoint.integrity import (
    CheckpointError,
    safe_load,
    scan_files,
    verify_manifest,
    weights_only_loads,
    write_manifest,
)
from .dist_env import DistInfo
from .ds_config import build_ds_config
from .schedule import param_groups

log = logging.getLogger(__name__)

STOP_VOTE_LAG = 2  # steps between a stop request and the step after which every rank stops


def _adamw(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=o.warmup_lr,
        betas=tuple(o.betas),
        eps=o.eps,
        fused=device.type == "cuda",
    )


class TorchEngine:
    """One process, torch AdamW; gradient accumulation by scaling each micro-batch loss."""

    rank = 0
    world_size = 1
    input_dtype = torch.float32

    def __init__(self, model: nn.Module, cfg: Config, device: torch.device) -> None:
        self.module = model
        self.device = device
        self.accum = cfg.train.grad_accum
        self.grad_clip = cfg.optim.grad_clip
        self.optimizer = _adamw(model, cfg, device)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def forward(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self, *, last: bool) -> None:
        """The optimizer step at the end of an accumulation window (nothing before it)."""
        if last:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state_numel(self) -> int:
        """Elements of AdamW state (exp_avg, exp_avg_sq) held by this process."""
        return _state_numel(self.optimizer)

    def optimizer_state_abs_sum(self) -> float:
        return _state_abs_sum(self.optimizer)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict in fp32 on the CPU (buffers in their own dtype)."""
        return _cpu_fp32(self.module.state_dict())

    def save(self, root: Path, tag: str, client: dict) -> None:
        """Model (with momentum copies and queues), optimizer and client state into root/tag/state.pt."""
        payload = {
            "albef_ds_format": OUR_FORMAT,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "client": client,
        }
        atomic_torch_save(payload, root / tag / "state.pt")

    def load(self, root: Path, tag: str) -> dict:
        path = root / tag / "state.pt"
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint {path} does not exist (a DeepSpeed checkpoint needs train.engine=deepspeed)"
            )
        payload = safe_load(path)
        try:
            self.module.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            return payload["client"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            why = f"{type(e).__name__}: {e}"
            raise CheckpointError(f"{path} does not fit this model and optimizer: {why}") from e

    def barrier(self) -> None:
        pass

    def stop_vote(self, flag: bool) -> bool:
        return flag

    def drain(self) -> None:
        pass


def _cpu_fp32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in sd.items()}


def _state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0]


def _state_numel(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() for t in _state_tensors(opt))


def _state_abs_sum(opt: torch.optim.Optimizer) -> float:
    """Sum of |x| over every AdamW moment held here (float64): partitions over ranks add up to the whole."""
    return float(sum(t.detach().double().abs().sum().item() for t in _state_tensors(opt)))


def build_engine(
    cfg: Config, model: nn.Module, device: torch.device, info: DistInfo, *, load_universal: bool = False
):
    """The engine train.engine names, around `model`."""
    if cfg.train.engine == "deepspeed":
        return DeepSpeedEngine(model, cfg, device, info, load_universal=load_universal)
    return TorchEngine(model, cfg, device)


class DeepSpeedEngine:
    """DeepSpeed ZeRO-2 around the ALBEF module (gradients and AdamW states partitioned across ranks).

    Momentum encoders and queues are buffers of the module, so DeepSpeed neither optimises nor casts
    them (they stay fp32 under bf16); DeepSpeed broadcasts parameters but not buffers, so they are broadcast
    from rank 0 here.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        device: torch.device,
        info: DistInfo,
        *,
        load_universal: bool = False,
    ) -> None:
        """`load_universal`: the checkpoint to resume was written by another number of ranks; `load` then
        converts it to DeepSpeed's universal format, which repartitions the AdamW state for this run."""
        try:
            import deepspeed
        except ImportError as e:  # pragma: no cover - deepspeed is in requirements.txt
            raise ConfigError(
                "train.engine = deepspeed needs the deepspeed package (pip install deepspeed)"
            ) from e
        import torch.distributed as dist

        self.rank, self.world_size = info.rank, info.world_size
        self.device = device
        self._votes: collections.deque = collections.deque()
        ds_cfg = build_ds_config(cfg, world_size=info.world_size)
        self.load_universal = load_universal
        if load_universal:
            ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
        self.input_dtype = (
            torch.bfloat16
            if ds_cfg["bf16"]["enabled"]
            else torch.float16
            if ds_cfg["fp16"]["enabled"]
            else torch.float32
        )
        # ZeRO-2's parameter all-gather after each optimizer step (deepspeed/runtime/zero/stage_1_and_2.py in
        # 0.19.8) calls torch.distributed.all_gather_into_tensor, which torch 2.14 marks deprecated: one
        # FutureWarning per rank per run that is DeepSpeed's to fix, not ours (none of our calls use it).
        warnings.filterwarnings(
            "ignore",
            message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
            category=FutureWarning,
        )
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=_adamw(model, cfg, device), config=ds_cfg
        )
        self.engine = engine
        self.module: nn.Module = engine.module
        with torch.no_grad():
            for buf in self.module.buffers():
                dist.broadcast(buf, src=0)
        log.info(
            "DeepSpeed ZeRO-%d on %d ranks, %s, micro-batch %d x accumulation %d x %d ranks = %d",
            ds_cfg["zero_optimization"]["stage"],
            info.world_size,
            self.input_dtype,
            ds_cfg["train_micro_batch_size_per_gpu"],
            ds_cfg["gradient_accumulation_steps"],
            info.world_size,
            ds_cfg["train_batch_size"],
        )

    def set_lr(self, lr: float) -> None:
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr

    def forward(self, **inputs):
        """The task's inputs as keywords; images arrive in `input_dtype` (the loaders produce it)."""
        return self.engine(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # ZeRO-2 reduces gradient buckets (all_reduce in 0.19.8) as they fill

    def step(self, *, last: bool) -> None:
        self.engine.step()  # DeepSpeed knows the accumulation boundary itself

    def optimizer_state_numel(self) -> int:
        """Elements of AdamW state held by this rank (ZeRO-2 partitions them across ranks)."""
        return _state_numel(self.engine.optimizer.optimizer)  # the torch AdamW inside ZeRO's wrapper

    def optimizer_state_abs_sum(self) -> float:
        return _state_abs_sum(self.engine.optimizer.optimizer)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with every parameter taken from ZeRO's fp32 master copy (gathered from all ranks'
        partitions: a collective, call it on every rank), so a bf16 run saves its fp32 weights rather than
        upcast bf16 ones; buffers (already fp32) as they are."""
        from deepspeed.utils import safe_get_full_fp32_param

        sd = self.module.state_dict()
        full: dict[int, torch.Tensor] = {}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if id(p) not in full:
                t = safe_get_full_fp32_param(p)
                full[id(p)] = p.detach().float() if t is None else t
            sd[name] = full[id(p)]
        return _cpu_fp32(sd)

    def save(self, root: Path, tag: str, client: dict) -> None:
        """DeepSpeed's checkpoint (module state with buffers, partitioned optimizer states) + client state.

        `latest` is written by the caller once every rank has finished (save_latest=False here)."""
        self.engine.save_checkpoint(str(root), tag=tag, client_state={"albef_ds": client}, save_latest=False)

    def load(self, root: Path, tag: str) -> dict:
        if not (root / tag).is_dir():
            raise FileNotFoundError(f"checkpoint folder {root / tag} does not exist")
        if self.load_universal:
            return self._load_universal(root, tag)
        from deepspeed.runtime.zero.utils import ZeRORuntimeException

        # DeepSpeed reads every file with torch.load(weights_only=False): forced to weights_only=True here.
        with weights_only_loads():
            try:
                path, client = self.engine.load_checkpoint(str(root), tag=tag)
            except ZeRORuntimeException as e:
                # Another rank count without the universal path (a checkpoint without albef_ds.json, so the
                # trainer could not know in advance): the module state (weights, momentum encoders, queues)
                # still loads; the AdamW moments restart.
                log.warning("%s -- loading the module state only: AdamW moments restart from zero", e)
                path, client = self.engine.load_checkpoint(
                    str(root), tag=tag, load_optimizer_states=False, load_lr_scheduler_states=False
                )
        return self._client(root / tag, path, client)

    @staticmethod
    def _client(folder: Path, path, client) -> dict:
        if path is None or "albef_ds" not in (client or {}):
            raise ValueError(f"{folder} is not an albef-ds DeepSpeed checkpoint (no albef_ds client state)")
        return client["albef_ds"]

    def _load_universal(self, root: Path, tag: str) -> dict:
        """Resume on another rank count: rank 0 converts root/tag into root/universal/tag (once; DeepSpeed's
        ds_to_universal with --inject_missing_state, since our checkpoints carry no universal-checkpoint
        info), every rank loads its new partition of the fp32 weights and AdamW moments from it, and the
        buffers (momentum encoders, queues, pointer), which a universal load leaves alone, come from the
        original checkpoint's module state."""
        import torch.distributed as dist

        uroot = root / "universal"
        error = None
        if self.rank == 0:
            try:
                _universal_folder(root / tag, uroot / tag)
            except Exception as e:  # noqa: BLE001 - every rank raises it below, none waits for rank 0
                error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None:
            raise CheckpointError(f"converting {root / tag} to a universal checkpoint failed: {shared[0]}")
        with weights_only_loads():
            path, client = self.engine.load_checkpoint(str(uroot), tag=tag)
        client = self._client(uroot / tag, path, client)
        states = safe_load(root / tag / "mp_rank_00_model_states.pt")
        module_state = states["module"]
        with torch.no_grad():
            for name, buf in self.module.named_buffers():
                if name not in module_state:
                    raise ValueError(f"{root / tag}: the module state has no buffer {name!r}")
                buf.copy_(module_state[name].to(buf.dtype))
        log.info(
            "loaded the universal checkpoint %s (AdamW state repartitioned over %d ranks)",
            uroot / tag,
            self.world_size,
        )
        return client

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def stop_vote(self, flag: bool) -> bool:
        """Whether any rank asked to stop, agreed by all ranks without stalling the step.

        Each call starts an asynchronous MAX all-reduce of this rank's flag and returns the outcome of the
        vote from STOP_VOTE_LAG calls earlier, so every rank stops after the same step, at most that many
        steps after a signal. On a GPU the result travels to pinned host memory behind a CUDA event, so
        reading it waits for that old collective only, never for the steps queued since (no per-step sync);
        on the CPU (gloo) the old request has long finished.
        """
        import torch.distributed as dist

        # A fill, not torch.tensor([flag], device=...): that one is a pageable host-to-device copy, which
        # waits for the GPU stream to drain (a full sync per step).
        t = torch.full((1,), 1.0 if flag else 0.0, device=self.device)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True)
        if self.device.type == "cuda":
            work.wait()  # orders the current stream after the collective; does not block the host
            host = torch.empty(1, pin_memory=True)
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._votes.append((None, host, event))
        else:
            self._votes.append((work, t, None))
        if len(self._votes) <= STOP_VOTE_LAG:
            return False
        return self._read_vote(*self._votes.popleft())

    @staticmethod
    def _read_vote(work, value: torch.Tensor, event) -> bool:
        if work is not None:
            work.wait()
        if event is not None:
            event.synchronize()
        return bool(value.item())

    def drain(self) -> None:
        """Finish the votes still in flight (before other collectives and at the end of a run)."""
        while self._votes:
            self._read_vote(*self._votes.popleft())


def _universal_folder(src: Path, dst: Path) -> None:
    """Make sure `dst` holds a verified universal conversion of `src`: one converted earlier is reused if
    its manifest and files check out, else (missing, from before manifests, damaged) converted again."""
    if dst.is_dir():
        try:
            if verify_universal(dst):
                return
            log.warning("universal checkpoint %s has no manifest: converting %s again", dst, src)
        except CheckpointError as e:
            log.error("universal checkpoint %s is damaged (%s): converting %s again", dst, e, src)
    convert_to_universal(src, dst)


def verify_universal(folder: Path) -> bool:
    """A universal conversion's manifest checks out and each of its files unpickles safely."""
    if not verify_manifest(folder):
        return False
    scan_files(folder)
    return True


def convert_to_universal(src: Path, dst: Path) -> Path:
    """DeepSpeed's ds_to_universal (--inject_missing_state) from checkpoint folder `src` into `dst`, written
    to a temporary folder first (with a manifest of its files) and renamed, so an interrupted conversion is
    redone rather than half-used. Every file it reads is loaded with weights_only=True (weights_only_loads).
    """
    import argparse
    import shutil

    from deepspeed.checkpoint import ds_to_universal

    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(
        input_folder=str(src),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    log.info("converting %s to a universal checkpoint in %s", src, dst)
    with weights_only_loads():
        ds_to_universal.main(args)
    write_manifest(tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


# DeepSpeed's CPU backend gives each rank a POSIX shared-memory segment (about 66 MB) for its shared-memory
# all-reduce, named after MASTER_ADDR, MASTER_PORT and the rank, and never unlinks it: every CPU run used
# to leave /dev/shm/deepspeed_allreduce_buffer_* behind, holding RAM until reboot (a test suite's worth
# filled a 24 GiB machine), and a later run on the same port could map a peer's stale segment.
DS_SHM_PREFIX = "deepspeed_allreduce_buffer"
SHM_DIR = Path("/dev/shm")


def ds_shm_segment(rank: int) -> Path:
    """The path of `rank`'s DeepSpeed shared-memory segment for the rendezvous in os.environ."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"{DS_SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Form the process group (gloo on CPU, nccl on GPU) from the discovered rank variables.

    On CPU each rank unlinks its own DeepSpeed shared-memory segment twice: before the rendezvous (a stale
    one from an earlier run on this port, so no peer maps it) and after a barrier that follows DeepSpeed's
    set-up (every peer has mapped it by then; the mappings live on until the processes exit, and nothing
    is left in /dev/shm, even if the run is killed later)."""
    import deepspeed

    from .runtime import quiet_deepspeed

    quiet_deepspeed()  # its import set its logger to INFO
    if torch.distributed.is_initialized():  # a second job in the same processes (a benchmark's recipes)
        return
    info.export()
    segment = ds_shm_segment(info.rank)
    cpu = device.type != "cuda"
    if cpu:
        segment.unlink(missing_ok=True)
    else:  # before any collective: NCCL places object collectives (the resume decision) on this device
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", auto_mpi_discovery=False)
    if cpu:
        torch.distributed.barrier()
        segment.unlink(missing_ok=True)
