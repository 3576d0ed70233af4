"""One `load_weights(model, source)` for every weight source users have, and `init_weights` for start-up.

Sources (`resolve_source` decides; `albef-ds export` uses the same rule):
- our files: an exported `.safetensors`, `checkpoint.pt`, `checkpoint_best.pt` (`{'albef_ds_format': 1}`);
- a run folder: its newest complete checkpoint (`checkpoints/latest`), else its `checkpoint.pt`;
- a checkpoints folder: the checkpoint its `latest` names;
- a DeepSpeed ZeRO-1/2 checkpoint folder: the fp32 master weights reassembled from every rank's partition
  (`consolidate_deepspeed`), buffers from the module state;
- a torch-engine checkpoint folder: its `state.pt`;
- a released ALBEF checkpoint (`ALBEF_4M.pth`, `ALBEF.pth`, `mscoco.pth`, `flickr30k.pth`);
- a DeiT / timm ViT file (`kind="deit"`: `{'model': ...}` .pth or .safetensors) and a bert-base-uncased folder
  or file (`kind="bert"`: `model.safetensors`, else `pytorch_model.bin`); `kind="auto"` recognises both by
  their keys.

Every file is read with `torch.load(weights_only=True)` (DeepSpeed's three checkpoint classes allow-listed by
name) or safetensors; a checkpoint folder with a manifest (integrity.py) is checked against it first. The
key maps and shape conversions are `albef_ds.model.weights`'.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...model.weights import LAYOUTS, OUR_FORMAT, LoadReport, detect_layout, load_state, state_tensors
from .files import read_client, read_latest
from .integrity import ds_safe_globals, verify_manifest

log = logging.getLogger(__name__)

KINDS = ("auto", *LAYOUTS)
_EXPECTED = (
    "a weights file (.safetensors, .pt, .pth, .bin), a run folder (checkpoints/latest or checkpoint.pt), a "
    "checkpoints folder (latest), a checkpoint folder (mp_rank_00_model_states.pt or state.pt) or a "
    "bert-base-uncased folder (model.safetensors or pytorch_model.bin)"
)


# ---------------------------------------------------------------------------------------------- reading
def torch_load(path: Path, safe_globals: list | None = None):
    """torch.load(weights_only=True) on the CPU; an unreadable file is a ValueError naming it."""
    try:
        if safe_globals:
            with torch.serialization.safe_globals(safe_globals):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"{path} is not a loadable checkpoint file (weights_only=True): {e}") from e


def read_file(path: str | Path) -> dict:
    """The dict a weights file holds: a safetensors file comes back as `{'model': tensors, **metadata}`
    (our exports carry `albef_ds_format`, `config` and `step` there), a torch file as saved."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
            tensors = load_file(str(p), device="cpu")
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise ValueError(f"{p} is not a readable safetensors file: {e}") from e
        out: dict = {"model": tensors}
        if meta.get("albef_ds_format") == str(OUR_FORMAT):  # written by `albef-ds export`
            out["albef_ds_format"] = OUR_FORMAT
            if "config" in meta:
                out["config"] = json.loads(meta["config"])
            if "step" in meta:
                out["step"] = int(meta["step"])
        return out
    obj = torch_load(p)
    if not isinstance(obj, dict):
        raise ValueError(f"{p} holds a {type(obj).__name__}, expected a dict / state dict")
    return obj


_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def consolidate_deepspeed(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict (parameters from the fp32 master partitions, and buffers) of a ZeRO-1/2 folder."""
    return _consolidate(folder)[0]


def _consolidate(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(consolidated state dict, the model-state file's contents)."""
    model_file = folder / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise FileNotFoundError(f"{folder} is not a DeepSpeed checkpoint folder (no {model_file.name})")
    states = torch_load(model_file)
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
    globs = ds_safe_globals()
    partitions = []
    for _, path in optim:
        osd = torch_load(path, globs).get("optimizer_state_dict", {})
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
    return out, states


# -------------------------------------------------------------------------------------------- resolving
def resolve_source(source: str | Path) -> tuple[Path, str]:
    """(path, kind) of one of our checkpoints, kind in {"deepspeed", "torch", "file"}: a file as it is, a
    DeepSpeed folder, a torch-engine folder (its state.pt), a checkpoints folder (the tag `latest` names), a
    run folder (its checkpoints/latest, else its checkpoint.pt). The one rule for load_weights and export."""
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"weights source {p} does not exist (expected {_EXPECTED})")
    if p.is_file():
        return p, "file"
    if (p / "mp_rank_00_model_states.pt").is_file():
        return p, "deepspeed"
    if (p / "state.pt").is_file():
        return p / "state.pt", "torch"
    if (p / "latest").is_file():  # a checkpoints folder
        tag = read_latest(p)
        if not tag:
            named = (p / "latest").read_text().strip()
            raise FileNotFoundError(f"{p}: its latest names checkpoint {named!r}, which is not in {p}")
        return resolve_source(p / tag)
    if (p / "checkpoints").is_dir():  # a run folder: its newest complete checkpoint ...
        tag = read_latest(p / "checkpoints")
        if tag:
            return resolve_source(p / "checkpoints" / tag)
    if (p / "checkpoint.pt").is_file():  # ... else its consolidated weights
        return p / "checkpoint.pt", "file"
    raise FileNotFoundError(
        f"{p}: neither a checkpoint folder (mp_rank_00_model_states.pt or state.pt), nor a checkpoints "
        "folder with latest, nor a run folder with checkpoints/latest or checkpoint.pt"
    )


def _hf_weights_file(folder: Path) -> Path | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


@dataclass
class SourceState:
    """What a source holds: its tensors, their layout (model.weights.LAYOUTS), the file or folder read,
    and our client state (step, config) where the source is one of ours."""

    tensors: dict[str, torch.Tensor]
    layout: str
    path: Path
    client: dict = field(default_factory=dict)


def read_source(source: str | Path, *, kind: str = "auto") -> SourceState:
    """Resolve and read `source` (module docstring); a `kind` other than "auto" forces the layout."""
    if kind not in KINDS:
        raise ValueError(f"unknown weights kind {kind!r}; expected one of {', '.join(KINDS)}")
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"weights source {p} does not exist (expected {_EXPECTED})")
    if p.is_dir() and kind in ("auto", "bert") and not _ours_folder(p):
        hf = _hf_weights_file(p)
        if hf is None and kind == "bert":
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in BERT folder {p}")
        if hf is not None:
            p = hf
    if p.is_dir():
        try:
            p, how = resolve_source(p)
        except FileNotFoundError as e:
            if kind != "auto" or not str(e).startswith(f"{p}: neither"):
                raise
            raise FileNotFoundError(
                f"{e}, nor a bert-base-uncased folder (model.safetensors or pytorch_model.bin)"
            ) from None
        if how in ("deepspeed", "torch"):  # a checkpoint folder: its manifest's checksums, if it has one
            verify_manifest(p if how == "deepspeed" else p.parent)
        if how == "deepspeed":
            tensors, states = _consolidate(p)
            client = read_client(p)
            if client is None:  # a folder written before albef_ds.json existed: the DeepSpeed client state
                client = states.get("albef_ds", {})
            return SourceState(tensors, "ours" if kind == "auto" else kind, p, _client_fields(client))
    raw = read_file(p)
    ours = raw.get("albef_ds_format") == OUR_FORMAT
    tensors = state_tensors(raw, str(p))
    layout = detect_layout(tensors, ours=ours, source=str(p)) if kind == "auto" else kind
    client = raw.get("client", raw) if ours else {}
    return SourceState(tensors, layout, p, _client_fields(client))


def _client_fields(client: dict | None) -> dict:
    return {k: v for k, v in (client or {}).items() if k in ("step", "config")}


def _ours_folder(p: Path) -> bool:
    return any((p / n).exists() for n in ("mp_rank_00_model_states.pt", "state.pt", "latest", "checkpoints"))


# -------------------------------------------------------------------------------------------- loading
def load_weights(
    model: nn.Module,
    source: str | Path,
    *,
    kind: str = "auto",
    require: str = "encoders",
    partial: bool = False,
) -> LoadReport:
    """Load any weight source (module docstring) into `model`: read, convert to our keys and shapes for this
    model (`albef_ds.model.weights`), apply. Returns the LoadReport (also logged). `kind` = "auto" (detect),
    or force "ours", "albef" (released), "deit", "bert". A shape that still differs after conversion is a
    ValueError naming the key, both shapes and the source. The parts `require` names must be filled:
    "encoders" (the default: start-up and fine-tuning weights), "model" (evaluation: every part an
    evaluation reads) or "all"; else a ValueError names the source and the parts it leaves missing, and
    nothing is loaded. `partial=True` loads what fits (`report.incomplete` lists what it left)."""
    st = read_source(source, kind=kind)
    return load_state(
        model, st.tensors, layout=st.layout, source=str(st.path), require=require, partial=partial
    )


def init_weights(
    model: nn.Module, *, vit: str = "", bert: str = "", albef: str = "", partial: bool = False
) -> list[LoadReport]:
    """The configured start-up initialisation, in order: a DeiT checkpoint into the vision encoder, then
    bert-base-uncased into the text and fusion encoders (each followed by momentum := online), then a
    whole-model source (any `load_weights` accepts; it brings its own momentum copies and queues). Each must
    fill the encoders it provides (`load_weights`' require="encoders"), unless `partial`."""
    reports = []
    if vit:
        reports.append(load_weights(model, vit, kind="deit", partial=partial))
    if bert:
        reports.append(load_weights(model, bert, kind="bert", partial=partial))
    if albef:
        reports.append(load_weights(model, albef, partial=partial))
    return reports
