"""Training engines behind one small interface: plain torch (one process) and DeepSpeed ZeRO-2.

The step loop (`loop.py`) only calls `set_lr`, `forward`, `micro_step` and reads `module`, `rank`,
`world_size`; this file is the only place that imports deepspeed and torch.distributed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..model import ALBEFPretrain
from ..model.weights import OUR_FORMAT
from .checkpoint import atomic_torch_save
from .dist_env import DistInfo
from .ds_config import build_ds_config
from .schedule import param_groups

log = logging.getLogger(__name__)


def _adamw(model: ALBEFPretrain, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
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

    def __init__(self, model: ALBEFPretrain, cfg: Config, device: torch.device) -> None:
        self.module = model
        self.device = device
        self.accum = cfg.train.grad_accum
        self.grad_clip = cfg.optim.grad_clip
        self.optimizer = _adamw(model, cfg, device)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def forward(self, image, input_ids, attention_mask, *, alpha: float):
        return self.module(image, input_ids, attention_mask, alpha=alpha)

    def micro_step(self, loss: torch.Tensor, *, last: bool) -> None:
        (loss / self.accum).backward()
        if last:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state_numel(self) -> int:
        """Elements of AdamW state (exp_avg, exp_avg_sq) held by this process."""
        return _state_numel(self.optimizer)

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
        payload = torch.load(path, map_location="cpu", weights_only=True)
        self.module.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        return payload["client"]

    def barrier(self) -> None:
        pass

    def any_rank(self, flag: bool) -> bool:
        return flag


def _state_numel(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0
    )


def make_all_gather(max_rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """An all_gather for the queue that tolerates a different number of rows per rank.

    Ranks may hold fewer than `max_rows` rows (undecodable images are dropped from a batch), but
    all_gather needs equal shapes: each rank pads to max_rows with a validity column, one collective moves
    everything, and the valid rows are kept in rank order.
    """
    import torch.distributed as dist

    def gather(x: torch.Tensor) -> torch.Tensor:
        n, d = x.shape
        if n > max_rows:
            raise ValueError(f"queue gather got {n} rows, more than the {max_rows} a step can hold")
        padded = torch.zeros(max_rows, d + 1, dtype=x.dtype, device=x.device)
        padded[:n, :d] = x
        padded[:n, d] = 1
        out = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
        dist.all_gather(out, padded)
        allrows = torch.cat(out)
        return allrows[allrows[:, d] > 0, :d]  # boolean select: one host sync per optimizer step

    return gather


class DeepSpeedEngine:
    """DeepSpeed ZeRO-2 around the ALBEF module (gradients and AdamW states partitioned across ranks).

    Momentum encoders and queues are buffers of the module, so DeepSpeed neither optimises nor casts
    them (they stay fp32 under bf16); DeepSpeed broadcasts parameters but not buffers, so they are broadcast
    from rank 0 here.
    """

    def __init__(self, model: ALBEFPretrain, cfg: Config, device: torch.device, info: DistInfo) -> None:
        try:
            import deepspeed
        except ImportError as e:  # pragma: no cover - deepspeed is in requirements.txt
            raise ConfigError(
                "train.engine = deepspeed needs the deepspeed package (pip install deepspeed)"
            ) from e
        import torch.distributed as dist

        self.rank, self.world_size = info.rank, info.world_size
        self.device = device
        ds_cfg = build_ds_config(cfg, world_size=info.world_size)
        self.input_dtype = (
            torch.bfloat16
            if ds_cfg["bf16"]["enabled"]
            else torch.float16
            if ds_cfg["fp16"]["enabled"]
            else torch.float32
        )
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=_adamw(model, cfg, device), config=ds_cfg
        )
        self.engine = engine
        self.module: ALBEFPretrain = engine.module
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

    def forward(self, image, input_ids, attention_mask, *, alpha: float):
        return self.engine(image.to(self.input_dtype), input_ids, attention_mask, alpha=alpha)

    def micro_step(self, loss: torch.Tensor, *, last: bool) -> None:
        # DeepSpeed scales by 1/accumulation itself and applies the optimizer at the boundary only.
        self.engine.backward(loss)
        self.engine.step()

    def optimizer_state_numel(self) -> int:
        """Elements of AdamW state held by this rank (ZeRO-2 partitions them across ranks)."""
        return _state_numel(self.engine.optimizer.optimizer)  # the torch AdamW inside ZeRO's wrapper

    def save(self, root: Path, tag: str, client: dict) -> None:
        """DeepSpeed's checkpoint (module state with buffers, partitioned optimizer states) + client state.

        `latest` is written by the caller once every rank has finished (save_latest=False here)."""
        self.engine.save_checkpoint(str(root), tag=tag, client_state={"albef_ds": client}, save_latest=False)

    def load(self, root: Path, tag: str) -> dict:
        if not (root / tag).is_dir():
            raise FileNotFoundError(f"checkpoint folder {root / tag} does not exist")
        from deepspeed.runtime.zero.utils import ZeRORuntimeException

        try:
            path, client = self.engine.load_checkpoint(str(root), tag=tag)
        except ZeRORuntimeException as e:
            # A plain ZeRO-2 checkpoint cannot repartition AdamW state for another rank count (DeepSpeed's
            # universal-checkpoint conversion can; not wired in yet). Weights, momentum encoders and queues
            # (module state) still load; the optimizer moments restart.
            log.warning("%s -- loading the module state only: AdamW moments restart from zero", e)
            path, client = self.engine.load_checkpoint(
                str(root), tag=tag, load_optimizer_states=False, load_lr_scheduler_states=False
            )
        if path is None or "albef_ds" not in (client or {}):
            raise ValueError(
                f"{root / tag} is not an albef-ds DeepSpeed checkpoint (no albef_ds client state)"
            )
        return client["albef_ds"]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (ranks must stop at the same step)."""
        import torch.distributed as dist

        # On the group's device: NCCL reduces only CUDA tensors (gloo takes the CPU one).
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # 4 bytes; .item() below is one sync per step
        return bool(t.item())


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Form the process group (gloo on CPU, nccl on GPU) from the discovered rank variables."""
    import deepspeed

    info.export()
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False
    )
