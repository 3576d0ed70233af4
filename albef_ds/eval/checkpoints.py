"""Load any ALBEF weights we accept into a model for evaluation or fine-tuning.

Sources: a DeepSpeed checkpoint folder (fp32 master weights reassembled from every rank's partition), a
torch-engine checkpoint folder, a run folder (its newest complete checkpoint, else checkpoint.pt), our
checkpoint.pt / exported .safetensors, or a released ALBEF checkpoint (pre-training `ALBEF_4M.pth` /
`ALBEF.pth`, or a retrieval fine-tuned one such as `mscoco.pth` / `flickr30k.pth`).

Conversions on top of `albef_ds.model.weights.load_albef`'s key map, for every source:
- `*.pos_embed` of the vision encoders resampled to the model's grid (256 px pre-training -> 384 px);
- feature queues of another length than the model's, and their pointer, are dropped (the model keeps
  its own queue); a retrieval model's `idx_queue` only loads with its matching feature queues;
- released retrieval checkpoints name the text encoder `text_encoder.embeddings...` (a BertModel, no
  MLM head): `bert.` is inserted; their `idx_queue` (1, Q) becomes (Q,);
- MLM-head keys are dropped when the model has no MLM head (the retrieval model).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from ..model.vit import resample_pos_embed
from ..model.weights import OUR_FORMAT, LoadReport, _apply, _unwrap, read_state_file

log = logging.getLogger(__name__)

_REF_TEXT = re.compile(r"^(text_encoder(?:_m)?)\.(embeddings|encoder)\.")


def read_any_state(source: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict, ours) from any accepted source; `ours` is False for a released ALBEF checkpoint."""
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if p.is_dir():
        from ..train.export import consolidate_deepspeed, resolve_source

        path, kind = resolve_source(p)
        if kind == "deepspeed":
            return consolidate_deepspeed(path), True
        p = path
    raw = read_state_file(p)
    return _unwrap(raw, str(p)), raw.get("albef_ds_format") == OUR_FORMAT


def load_weights(model: nn.Module, source: str | Path) -> LoadReport:
    """Load `source` (see the module docstring) into `model`; returns and logs the LoadReport.
    A shape that still differs after conversion is a ValueError naming the key, both shapes and the file."""
    sd, ours = read_any_state(source)
    report = LoadReport(str(source))
    model_sd = model.state_dict()
    grid = model.visual_encoder.patch_embed.grid_size[0]
    has_mlm = any(k.startswith("text_encoder.cls.") for k in model_sd)
    q_model = model.image_queue.shape[0] if hasattr(model, "image_queue") else None
    mapped: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = _REF_TEXT.match(k)
        if m and not ours:
            k2 = f"{m.group(1)}.bert.{k[len(m.group(1)) + 1 :]}"
            report.converted.append(f"{k} -> {k2}")
            k = k2
        if k.endswith("cls.predictions.decoder.bias") or (".cls." in k and not has_mlm):
            report.dropped.append(k)
            continue
        if k in ("image_queue", "text_queue") and not ours:
            v = v.t()  # released: (D, Q) -> ours (Q, D)
            report.converted.append(f"{k} transposed")
        if k == "idx_queue" and v.dim() == 2:
            v = v.reshape(-1)
            report.converted.append("idx_queue (1, Q) -> (Q,)")
        if k == "temp" and v.dim() == 0:
            v = v.reshape(1)
            report.converted.append("temp () -> (1,)")
        if k.startswith("visual_encoder") and k.endswith("pos_embed"):
            new = resample_pos_embed(v, grid)
            if new.shape != v.shape:
                report.converted.append(f"{k} {tuple(v.shape)}->{tuple(new.shape)}")
            v = new
        mapped[k] = v
    # Queues of another length stay as the model initialised them (with their pointer and id queue).
    if q_model is not None and "image_queue" in mapped and mapped["image_queue"].shape[0] != q_model:
        q_file = mapped["image_queue"].shape[0]
        for k in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):
            if k in mapped:
                del mapped[k]
                report.dropped.append(f"{k} (queue of {q_file} entries, the model has {q_model})")
    if "idx_queue" in model_sd and "idx_queue" not in mapped and "image_queue" in mapped:
        # Feature queues without ids (a pre-training checkpoint): their ids stay "none" (-100), so none of
        # them counts as a positive; the pointer restarts at 0.
        mapped.pop("queue_ptr", None)
    return _apply(model, mapped, report, ("",))
