"""`albef-ds export`: consolidated fp32 weights in one safetensors file, from any checkpoint we write.

Sources:
- a DeepSpeed ZeRO-1/2 checkpoint folder (`checkpoints/step_XXXXXXXX/`): the fp32 *master* weights are
  reassembled from every rank's optimizer partition (so a bf16 run exports its fp32 weights, not upcast
  bf16 copies), buffers (momentum encoders, queues, pointer) come from the module state, and tied weights
  are restored. The result equals what DeepSpeed's own `zero_to_fp32.py` reconstructs from the same folder
  (tested), but every file is read with `weights_only=True` (DeepSpeed's three checkpoint classes are
  allow-listed by name instead of unpickling arbitrary objects).
- a torch-engine checkpoint folder (`state.pt`), a consolidated `checkpoint.pt`, a checkpoints folder (its
  `latest`), or a run folder (its `checkpoints/latest`, else its `checkpoint.pt`).

Sources are resolved and read by `weights.resolve_source` / `weights.read_source`, the same rule and reader
`load_weights` uses. Only our own checkpoints are exported (a released ALBEF / DeiT / BERT file is loaded
with `load_weights`, which converts it). The safetensors file carries `albef_ds_format`, the step and the
run's config in its metadata, so `load_weights` reads it as one of ours; DeepSpeed-free tools read it as a
plain state dict.

What is written must fit the model the checkpoint's config describes (`check_export`): the task models
(pre-training, retrieval, VQA, NLVR2, text assignment, SNLI-VE) are built from its `model` section on the
meta device (no memory), the one whose keys the checkpoint matches best is the model, and every tensor must
have that model's shape (else a ValueError names the key and both shapes), every model tensor must be there
and no other (else the parts missing or extra are named; `allow_partial` exports them anyway). A checkpoint
without a config cannot be checked: an error, or with `allow_partial` a warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ...config import ConfigError, model_config_from_dict
from ...model.weights import OUR_FORMAT, check_fit
from .files import atomic_write_bytes
from .weights import SourceState, consolidate_deepspeed, read_source, resolve_source

__all__ = ["check_export", "consolidate_deepspeed", "export_weights", "resolve_source"]

log = logging.getLogger(__name__)

# Token ids the models want at construction; no shape depends on them.
_SPECIAL = {"pad": 0, "cls": 1, "mask": 2}


def _task_models(model_cfg) -> list[tuple[str, nn.Module]]:
    """Every task model of `model_cfg`, on the meta device (shapes only)."""
    from ...model.albef import ALBEFPretrain
    from ...model.nlvr import ALBEFNLVR2, ALBEFTextAssignment
    from ...model.retrieval import ALBEFRetrieval
    from ...model.ve import ALBEFVE
    from ...model.vqa import ALBEFVQA

    builders = {
        "pre-training": lambda: ALBEFPretrain(model_cfg, special_tokens=_SPECIAL),
        "retrieval / grounding": lambda: ALBEFRetrieval(model_cfg, special_tokens=_SPECIAL),
        "VQA": lambda: ALBEFVQA(model_cfg, special_tokens=_SPECIAL),
        "NLVR2": lambda: ALBEFNLVR2(model_cfg),
        "NLVR2 text assignment": lambda: ALBEFTextAssignment(model_cfg),
        "SNLI-VE": lambda: ALBEFVE(model_cfg),
    }
    out = []
    with torch.device("meta"):
        for name, build in builders.items():
            try:
                out.append((name, build()))
            except ValueError:  # a config this task's model refuses (VQA: text width != vision width)
                continue
    return out


def check_export(st: SourceState, *, allow_partial: bool = False) -> str:
    """Check that `st`'s tensors fit the model of its config (module docstring); returns that model's name
    ("" when unchecked)."""
    cfg = st.client.get("config")
    if not cfg or not isinstance(cfg, dict) or "model" not in cfg:
        if not allow_partial:
            raise ValueError(
                f"{st.path} has no config to check its tensors against (our runs store it); "
                "--allow-partial exports it unchecked"
            )
        log.warning("%s has no config: exporting its tensors unchecked", st.path)
        return ""
    try:
        model_cfg = model_config_from_dict(cfg["model"], source=f"{st.path} (its config)")
    except ConfigError as e:
        raise ValueError(f"cannot check {st.path} against its config: {e}") from e
    fits = []
    for name, model in _task_models(model_cfg):
        fl = model_cfg.text.fusion_layer
        fit = check_fit(model.state_dict(), st.tensors, fusion_layer=fl, require="all")
        fits.append((sum(len(m) for m, _ in fit.holes.values()) + len(fit.strays), name, fit))
    _, name, fit = min(fits, key=lambda x: x[0])
    if fit.shapes:
        lines = [f"{k}: config {ours}, file {theirs}" for k, ours, theirs in fit.shapes]
        raise ValueError(
            f"{st.path}: {len(lines)} tensor(s) do not fit the {name} model of its config:\n  "
            + "\n  ".join(lines)
        )
    if fit.holes or fit.strays:
        what = fit.describe(str(st.path), model_cfg.text.fusion_layer, hint="")
        what += f" (checked against the {name} model of its config)"
        if not allow_partial:
            raise ValueError(f"{what}. To export it anyway: --allow-partial")
        log.warning("partial export: %s", what)
    return name


def export_weights(source: str | Path, output: str | Path, *, allow_partial: bool = False) -> dict:
    """Write the consolidated fp32 state dict of `source` to `output` (.safetensors), atomically, once its
    tensors are checked against the model of its config (`check_export`; `allow_partial` lets tensors be
    missing or extra, never of another shape). Returns a summary (source, output, model, tensors, values,
    step)."""
    from safetensors.torch import save

    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"export output {output} must end in .safetensors")
    st = read_source(source)
    if st.layout != "ours":
        raise ValueError(
            f"{st.path} is not an albef-ds checkpoint (it holds the {st.layout!r} layout); nothing to "
            "export: load it with load_weights, which converts it"
        )
    model = check_export(st, allow_partial=allow_partial)
    meta: dict[str, str] = {"albef_ds_format": str(OUR_FORMAT), "source": str(st.path)}
    if st.client.get("config") is not None:
        meta["config"] = json.dumps(st.client["config"])
    if "step" in st.client:
        meta["step"] = str(int(st.client["step"]))
    # safetensors wants contiguous tensors that share no storage (tied weights are written twice).
    tensors = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().clone()
        for k, v in st.tensors.items()
    }
    data = save(tensors, metadata=meta)
    atomic_write_bytes(output, data)
    n = sum(v.numel() for v in tensors.values())
    log.info("exported %d tensors (%.2fM values) from %s to %s", len(tensors), n / 1e6, st.path, output)
    return {
        "source": str(st.path),
        "output": str(output),
        "model": model,
        "tensors": len(tensors),
        "values": n,
        "step": meta.get("step"),
    }
