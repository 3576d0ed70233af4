"""`albef-ds export`: consolidated fp32 weights in one safetensors file, from any checkpoint we write.

Sources:
- a DeepSpeed ZeRO-1/2 checkpoint folder (`checkpoints/step_XXXXXXXX/`): the fp32 *master* weights are
  reassembled from every rank's optimizer partition (so a bf16 run exports its fp32 weights, not upcast
  bf16 copies), buffers (momentum encoders, queues, pointer) come from the module state, and tied weights
  are restored. The result equals what DeepSpeed's own `zero_to_fp32.py` reconstructs from the same folder
  (tested), but every file is read with `weights_only=True` (DeepSpeed's three checkpoint classes are
  allow-listed by name instead of unpickling arbitrary objects).
- a torch-engine checkpoint folder (`state.pt`), a consolidated `checkpoint.pt`, or a run folder (its
  `checkpoints/latest`, else its `checkpoint.pt`).

The safetensors file carries `albef_ds_format` and the run's config in its metadata, so `load_albef`
(evaluation, fine-tuning) reads it as one of ours; DeepSpeed-free tools read it as a plain state dict.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

from ..model.weights import OUR_FORMAT
from .checkpoint import atomic_write_bytes, read_client, read_latest

log = logging.getLogger(__name__)

_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def _ds_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _load(path: Path, safe_globals: list | None = None):
    try:
        if safe_globals:
            with torch.serialization.safe_globals(safe_globals):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"{path} is not a loadable checkpoint file (weights_only=True): {e}") from e


def consolidate_deepspeed(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict (parameters from the fp32 master partitions, and buffers) of a ZeRO-1/2 folder."""
    model_file = folder / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise FileNotFoundError(f"{folder} is not a DeepSpeed checkpoint folder (no {model_file.name})")
    states = _load(model_file)
    for key in ("module", "buffer_names", "param_shapes"):
        if key not in states:
            raise ValueError(f"{model_file}: no {key!r} entry; not a DeepSpeed model-state file")
    optim = sorted(
        ((int(m.group(1)), p) for p in folder.iterdir() if (m := _OPTIM_FILE.match(p.name))),
        key=lambda x: x[0],
    )
    if not optim:
        raise FileNotFoundError(f"{folder}: no zero_pp_rank_*_optim_states.pt files (ZeRO-1/2 partitions)")
    ranks = [r for r, _ in optim]
    if ranks != list(range(len(ranks))):
        raise ValueError(f"{folder}: optimizer partitions of ranks {ranks}; expected 0..{len(ranks) - 1}")
    globs = _ds_safe_globals()
    partitions = []
    for _, path in optim:
        osd = _load(path, globs).get("optimizer_state_dict", {})
        stage = osd.get("zero_stage")
        if stage is None or int(stage) > 2 or "single_partition_of_fp32_groups" not in osd:
            raise ValueError(f"{path}: not a ZeRO stage 1/2 optimizer partition (zero_stage={stage})")
        count = osd["partition_count"]
        count = max(count) if isinstance(count, list) else count
        if count != len(optim):
            raise ValueError(
                f"{path}: written by {count} ranks but {len(optim)} partition files are in {folder} "
                "(an incomplete or mixed checkpoint)"
            )
        partitions.append((osd["single_partition_of_fp32_groups"], osd.get("param_alignment_paddings")))

    world = len(partitions)
    out: dict[str, torch.Tensor] = {}
    buffer_names = set(states["buffer_names"])
    for k, v in states["module"].items():
        if k in buffer_names:
            out[k] = v.float() if v.is_floating_point() else v
    for name, t in (states.get("frozen_param_fragments") or {}).items():
        out[name] = t.float()
    paddings = partitions[0][1]
    for g, shapes in enumerate(states["param_shapes"]):
        flat = torch.cat([groups[g] for groups, _ in partitions])
        pads = paddings[g] if paddings is not None else [0] * len(shapes)
        if len(pads) != len(shapes):
            raise ValueError(f"{folder}: group {g} has {len(shapes)} parameters but {len(pads)} paddings")
        offset = 0
        for (name, shape), pad in zip(shapes.items(), pads):
            n = math.prod(shape)
            if offset + n > flat.numel():
                raise ValueError(f"{folder}: group {g} ends before parameter {name} (a truncated partition)")
            out[name] = flat[offset : offset + n].view(tuple(shape)).clone()
            offset += n + pad
        # ZeRO-2 pads each group to a multiple of 2 x world size: anything else left over is a layout error.
        align = 2 * world
        if math.ceil(offset / align) * align != math.ceil(flat.numel() / align) * align:
            raise ValueError(f"{folder}: group {g} used {offset} of {flat.numel()} elements")
    for alias, source in (states.get("shared_params") or {}).items():
        if source in out:
            out[alias] = out[source]
    return out


def resolve_source(source: str | Path) -> tuple[Path, str]:
    """(path, kind) with kind in {"deepspeed", "torch", "file"} for any accepted source."""
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"export source {p} does not exist")
    if p.is_file():
        return p, "file"
    if (p / "mp_rank_00_model_states.pt").is_file():
        return p, "deepspeed"
    if (p / "state.pt").is_file():
        return p / "state.pt", "torch"
    if (p / "checkpoints").is_dir():
        tag = read_latest(p / "checkpoints")
        if tag:
            return resolve_source(p / "checkpoints" / tag)
    if (p / "checkpoint.pt").is_file():
        return p / "checkpoint.pt", "file"
    raise FileNotFoundError(
        f"{p}: neither a checkpoint folder (mp_rank_00_model_states.pt or state.pt), nor a run folder with "
        "checkpoints/latest or checkpoint.pt"
    )


def export_weights(source: str | Path, output: str | Path) -> dict:
    """Write the consolidated fp32 state dict of `source` to `output` (.safetensors), atomically.
    Returns a summary (source, tensors, parameters, step)."""
    from safetensors.torch import save

    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"export output {output} must end in .safetensors")
    path, kind = resolve_source(source)
    meta: dict[str, str] = {"albef_ds_format": str(OUR_FORMAT), "source": str(path)}
    if kind == "deepspeed":
        sd = consolidate_deepspeed(path)
        client = read_client(path)
        if client is None:
            client = _load(path / "mp_rank_00_model_states.pt").get("albef_ds", {})
    else:
        payload = _load(path)
        if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
            raise ValueError(f"{path} holds no 'model' state dict; not an albef-ds checkpoint")
        sd = payload["model"]
        client = payload.get("client", payload)
    if client.get("config") is not None:
        meta["config"] = json.dumps(client["config"])
    if "step" in client:
        meta["step"] = str(int(client["step"]))
    # safetensors wants contiguous tensors that share no storage (tied weights are written twice).
    tensors = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().clone()
        for k, v in sd.items()
    }
    data = save(tensors, metadata=meta)
    atomic_write_bytes(output, data)
    n = sum(v.numel() for v in tensors.values())
    log.info("exported %d tensors (%.2fM values) from %s to %s", len(tensors), n / 1e6, path, output)
    return {
        "source": str(path),
        "output": str(output),
        "tensors": len(tensors),
        "values": n,
        "step": meta.get("step"),
    }
