"""Loading the weights users already have into `ALBEFPretrain` (local paths only, `weights_only=True`).

Key maps (source key -> our key):

DeiT-B/16 (`{'model': ...}` .pth or timm .safetensors):
    K                                  -> visual_encoder.K   (pos_embed resampled bicubically to our grid)
    head.*, head_dist.*, dist_token    -> dropped (classifier / distillation token; reported)

bert-base-uncased (HF folder: model.safetensors or pytorch_model.bin):
    bert.K                             -> text_encoder.bert.K
    cls.predictions.K                  -> text_encoder.cls.predictions.K
    *.LayerNorm.gamma / .beta          -> *.LayerNorm.weight / .bias   (old TF-converted files)
    bert.pooler.*, cls.seq_relationship.*, *.position_ids, cls.predictions.decoder.bias -> dropped
    (cross-attention of the fusion layers has no BERT counterpart: it stays randomly initialised)

Released ALBEF (`ALBEF_4M.pth`, `ALBEF.pth`: `{'model': state_dict, ...}`), same names as ours except:
    image_queue / text_queue  (D, Q)   -> transposed to (Q, D); skipped with a warning if Q differs from ours
    temp  ()                           -> (1,)
    *.pos_embed                        -> resampled to our grid (e.g. 16x16 at 256 px -> 24x24 at 384 px)
    text_encoder[_m].cls.predictions.decoder.bias -> dropped (an alias of cls.predictions.bias)

Our own checkpoints (`{'albef_ds_format': 1, 'model': ...}`) load with no conversion. Every load returns a
`LoadReport` (missing and unexpected keys, what was converted) and logs it; a shape that still differs after
conversion is a ValueError naming the key, both shapes and the file.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .vit import resample_pos_embed

log = logging.getLogger(__name__)

OUR_FORMAT = 1  # value of 'albef_ds_format' in checkpoints we write


@dataclass
class LoadReport:
    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # our keys the file did not provide
    unexpected: list[str] = field(default_factory=list)  # file keys we have no place for
    dropped: list[str] = field(default_factory=list)  # file keys dropped on purpose by the key map
    converted: list[str] = field(default_factory=list)  # keys resampled / transposed / reshaped

    def summary(self) -> str:
        def few(xs: list[str]) -> str:
            return ", ".join(xs[:6]) + (f", ... ({len(xs)} in all)" if len(xs) > 6 else "")

        parts = [f"loaded {self.loaded} tensors from {self.source}"]
        if self.converted:
            parts.append(f"converted: {few(self.converted)}")
        if self.dropped:
            parts.append(f"dropped: {few(self.dropped)}")
        if self.missing:
            parts.append(f"missing (left as initialised): {few(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected (ignored): {few(self.unexpected)}")
        return "; ".join(parts)


def read_state_file(path: str | Path) -> dict:
    """A state dict (or a dict holding one) from .safetensors / .pth / .bin / .pt (weights_only=True)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(p), device="cpu")
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise ValueError(f"{p} is not a readable safetensors file: {e}") from e
        if meta.get("albef_ds_format") == str(OUR_FORMAT):  # written by `albef-ds export`
            return {"albef_ds_format": OUR_FORMAT, "model": tensors}
        return tensors
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"{p} is not a loadable torch checkpoint (weights_only=True): {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{p} holds a {type(obj).__name__}, expected a dict / state dict")
    return obj


def _unwrap(obj: dict, path: str) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "module"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"{path} holds no tensors (expected a state dict or {{'model': state_dict}})")
    return sd


def _apply(model: nn.Module, mapped: dict[str, torch.Tensor], report: LoadReport, prefixes: tuple[str, ...]):
    """Copy `mapped` into the model's parameters and buffers; `prefixes` limit which of our keys count as
    missing (a DeiT file is not expected to provide text weights)."""
    ours = model.state_dict(keep_vars=True)
    shape_errors = []
    for k, v in mapped.items():
        if k not in ours:
            report.unexpected.append(k)
            continue
        if tuple(ours[k].shape) != tuple(v.shape):
            shape_errors.append(f"{k}: ours {tuple(ours[k].shape)}, file {tuple(v.shape)}")
    if shape_errors:
        raise ValueError(f"shape mismatch loading {report.source}:\n  " + "\n  ".join(shape_errors))
    with torch.no_grad():
        for k, v in mapped.items():
            if k in ours:
                ours[k].copy_(v.to(ours[k].dtype))
                report.loaded += 1
    # Tied aliases (the MLM decoder weight) count as loaded when their source was.
    tied = {"text_encoder.cls.predictions.decoder.weight", "text_encoder_m.cls.predictions.decoder.weight"}
    report.missing = [
        k for k in ours if k.startswith(prefixes) and k not in mapped and k not in tied and k != "queue_ptr"
    ]
    log.info(report.summary())
    return report


def _grid(model: nn.Module) -> int:
    ve = model.visual_encoder
    return ve.patch_embed.grid_size[0]


def load_deit(model: nn.Module, path: str | Path) -> LoadReport:
    """A DeiT-B/16 (or any timm ViT) checkpoint into `visual_encoder`; the momentum copy follows."""
    sd = _unwrap(read_state_file(path), str(path))
    report = LoadReport(str(path))
    mapped = {}
    for k, v in sd.items():
        if k.startswith(("head.", "head_dist.")) or k == "dist_token":
            report.dropped.append(k)
            continue
        if k == "pos_embed":
            new = resample_pos_embed(v, _grid(model))
            if new.shape != v.shape:
                report.converted.append(f"visual_encoder.pos_embed {tuple(v.shape)}->{tuple(new.shape)}")
            v = new
        mapped["visual_encoder." + k] = v
    _apply(model, mapped, report, ("visual_encoder.",))
    model.copy_params()
    return report


_BERT_DROP = re.compile(
    r"(^|\.)(pooler\.|position_ids$)|^cls\.seq_relationship\.|^cls\.predictions\.decoder\.bias$"
)


def bert_weights_file(folder: str | Path) -> Path:
    f = Path(folder)
    if f.is_file():
        return f
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (f / name).is_file():
            return f / name
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in BERT folder {f}")


def load_bert(model: nn.Module, folder: str | Path) -> LoadReport:
    """bert-base-uncased (HF layout) into the text + fusion encoder; the momentum copy follows."""
    path = bert_weights_file(folder)
    sd = _unwrap(read_state_file(path), str(path))
    report = LoadReport(str(path))
    mapped = {}
    for k, v in sd.items():
        k2 = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if not k2.startswith(("bert.", "cls.")):
            k2 = "bert." + k2  # a bare BertModel state dict
        if _BERT_DROP.search(k2):
            report.dropped.append(k)
            continue
        if k2 != k:
            report.converted.append(f"{k} -> {k2}")
        mapped["text_encoder." + k2] = v
    _apply(model, mapped, report, ("text_encoder.",))
    model.copy_params()
    return report


def load_albef(model: nn.Module, path: str | Path) -> LoadReport:
    """A released ALBEF checkpoint or one of ours (the whole model, momentum copies and queues included)."""
    raw = read_state_file(path)
    ours_format = raw.get("albef_ds_format") == OUR_FORMAT
    sd = _unwrap(raw, str(path))
    report = LoadReport(str(path))
    if ours_format:
        return _apply(model, sd, report, ("",))
    grid = _grid(model)
    qsize = model.image_queue.shape[0]
    mapped = {}
    for k, v in sd.items():
        if k.endswith("cls.predictions.decoder.bias"):
            report.dropped.append(k)
            continue
        if k in ("image_queue", "text_queue"):
            v = v.t()  # (D, Q) -> (Q, D)
            if v.shape[0] != qsize:
                report.dropped.append(f"{k} (queue of {v.shape[0]} entries, ours has {qsize})")
                continue
            report.converted.append(f"{k} transposed")
        elif k == "queue_ptr" and sd["image_queue"].shape[1] != qsize:
            report.dropped.append(k)
            continue
        elif k == "temp" and v.dim() == 0:
            v = v.reshape(1)
            report.converted.append("temp () -> (1,)")
        elif k.endswith("pos_embed") and k.startswith("visual_encoder"):
            new = resample_pos_embed(v, grid)
            if new.shape != v.shape:
                report.converted.append(f"{k} {tuple(v.shape)}->{tuple(new.shape)}")
            v = new
        mapped[k] = v
    return _apply(model, mapped, report, ("",))


def load_pretrained(model: nn.Module, *, vit: str = "", bert: str = "", albef: str = "") -> list[LoadReport]:
    """Apply the configured initialisations in order: DeiT, BERT, then a whole-model ALBEF checkpoint."""
    reports = []
    if vit:
        reports.append(load_deit(model, vit))
    if bert:
        reports.append(load_bert(model, bert))
    if albef:
        reports.append(load_albef(model, albef))
    return reports
