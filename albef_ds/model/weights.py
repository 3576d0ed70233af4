"""Weight layouts -> our keys and shapes, for a given model: pure conversions of in-memory state dicts.

Reading files (ours, DeepSpeed folders, run folders, released .pth, DeiT, BERT) is the checkpoint package's
job (`albef_ds.train.checkpoint.load_weights`); this module never touches a path. Every conversion is
written once here and used by every loader.

Layouts (`LAYOUTS`) and their key maps (source key -> our key):

"deit": DeiT-B/16 / any timm ViT state dict
    K                                  -> visual_encoder.K   (pos_embed resampled bicubically to our grid)
    head.*, head_dist.*, dist_token    -> dropped (classifier / distillation token; reported)

"bert": bert-base-uncased (BertForPreTraining / BertForMaskedLM / bare BertModel keys)
    bert.K (or a bare K)               -> text_encoder.bert.K
    cls.predictions.K                  -> text_encoder.cls.predictions.K (dropped: model without MLM head)
    *.LayerNorm.gamma / .beta          -> *.LayerNorm.weight / .bias   (old TF-converted files)
    bert.pooler.*, cls.seq_relationship.*, *.position_ids, cls.predictions.decoder.bias -> dropped
    (cross-attention of the fusion layers has no BERT counterpart: it stays randomly initialised)

"albef": released ALBEF (pre-training `ALBEF_4M.pth` / `ALBEF.pth`, retrieval `mscoco.pth` / `flickr30k.pth`),
and "ours": what we write. Same names, except in the released layout:
    image_queue / text_queue  (D, Q)   -> transposed to (Q, D)
    text_encoder[_m].embeddings|encoder.* (retrieval: a BertModel) -> text_encoder[_m].bert.*
For both:
    temp  ()                           -> (1,)
    idx_queue (1, Q)                   -> (Q,)
    visual_encoder[_m].pos_embed       -> resampled to the model's grid (16x16 at 256 px -> 24x24 at 384 px)
    *.cls.predictions.decoder.bias     -> dropped (an alias of cls.predictions.bias)
    *.embeddings.position_ids          -> dropped (the reference's persistent arange buffer)
    text_encoder[_m].cls.*             -> dropped when the model has no MLM head (retrieval, VQA)
For a model with an answer decoder (VQA) and a source without one, the decoder comes from the encoder
(`derive_decoder`: embeddings, fusion layers, MLM head); a whole-model source that leaves a decoder tensor
missing is an error.
    queues of another length than the model's -> dropped with their pointer and id queue (the model keeps
                                          its own); feature queues without ids (a pre-training checkpoint
                                          into the retrieval model) leave the pointer at 0

`load_state` converts and applies (`load_state_dict` of the mapped keys); the `LoadReport` lists what was
loaded, missing, unexpected, converted and dropped. A shape that still differs after conversion is a
ValueError naming the key, both shapes and the source. Loading a partial layout (DeiT, BERT) refreshes the
momentum copies (`model.copy_params()`); a whole-model layout brings its own.

Coverage: the model's keys fall into named parts (`weight_group`: vision / text / fusion encoder, MLM head,
answer decoder, ITC projections, ITM head, classifier / text-assignment head, feature queues, id queue, and
each of these "(momentum)"). Before anything is copied, the parts the caller requires must be filled by the
source, every tensor of them (`check_fit`); else a ValueError names the source, each such part with how many
of its tensors are missing and a few of their keys, the source keys that found no place, and how to ask for
a partial load. `require`:
    "encoders" (start-up weights, fine-tuning init): the vision, text and fusion encoders, as far as the
               layout provides them (DeiT: the vision encoder; BERT: text and fusion encoders without the
               fusion layers' cross-attention); task heads, queues and momentum copies the source may lack.
    "model"    (evaluation): every part an evaluation reads, whatever the layout: all but the MLM head, the
               queues and the momentum copies (training state); source tensors of those required parts that
               the model has no place for (a deeper model) are an error too.
    "all"      (export): every part, and no source tensor left over.
`partial=True` loads what fits and lists the parts it left in `LoadReport.incomplete` (logged as a warning).
Source keys the model has no place for are reported: those of parts the model does not have (the ITM head of
a pre-training checkpoint loaded for VQA) in `unexpected`, those of parts it has or of no ALBEF part at all
also in `unmatched` (a warning).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .vit import resample_pos_embed

log = logging.getLogger(__name__)

OUR_FORMAT = 1  # value of 'albef_ds_format' in checkpoints we write
LAYOUTS = ("ours", "albef", "deit", "bert")
WHOLE_MODEL = ("ours", "albef")  # layouts that carry momentum copies and queues


@dataclass
class LoadReport:
    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # our keys the source did not provide
    unexpected: list[str] = field(default_factory=list)  # source keys we have no place for
    dropped: list[str] = field(default_factory=list)  # source keys dropped on purpose by the key map
    converted: list[str] = field(default_factory=list)  # keys resampled / transposed / reshaped / renamed
    layout: str = ""  # one of LAYOUTS
    # unexpected keys of parts the model has (another depth?) or of no ALBEF part: they match nothing
    unmatched: list[str] = field(default_factory=list)
    # required parts a partial load (partial=True) left unfilled: "fusion encoder: 26 of 52 tensors missing"
    incomplete: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def few(xs: list[str]) -> str:
            return ", ".join(xs[:6]) + (f", ... ({len(xs)} in all)" if len(xs) > 6 else "")

        parts = [f"loaded {self.loaded} tensors from {self.source}"]
        if self.converted:
            parts.append(f"converted: {few(self.converted)}")
        if self.dropped:
            parts.append(f"dropped: {few(self.dropped)}")
        if self.incomplete:
            parts.append(f"PARTIAL LOAD, left unfilled: {'; '.join(self.incomplete)}")
        if self.missing:
            parts.append(f"missing (left as initialised): {few(self.missing)}")
        absent = [k for k in self.unexpected if k not in set(self.unmatched)]
        if absent:
            parts.append(f"not in this model (ignored): {few(absent)}")
        if self.unmatched:
            parts.append(f"matching nothing in the model (ignored): {few(self.unmatched)}")
        return "; ".join(parts)


def state_tensors(obj: Mapping, source: str = "state dict") -> dict[str, torch.Tensor]:
    """The tensors of a state dict, or of the one a checkpoint dict holds under 'model' / 'state_dict' /
    'module' (released ALBEF, DeiT and our .pt files wrap it)."""
    for key in ("model", "state_dict", "module"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"{source} holds no tensors (expected a state dict or {{'model': state_dict}})")
    return sd


def detect_layout(sd: Mapping[str, torch.Tensor], *, ours: bool, source: str = "state dict") -> str:
    """The layout of a state dict: "ours" when its container says so (`albef_ds_format`), else from its
    keys: whole-model ALBEF ("albef"), a bare ViT ("deit") or BERT ("bert")."""
    if ours:
        return "ours"
    if any(k.startswith(("visual_encoder.", "text_encoder.")) for k in sd):
        return "albef"
    if "patch_embed.proj.weight" in sd:
        return "deit"
    if any(k.startswith(("bert.", "embeddings.word_embeddings.", "cls.predictions.")) for k in sd):
        return "bert"
    raise ValueError(
        f"{source}: not a layout we load (keys such as {', '.join(list(sd)[:3])}); expected ALBEF keys "
        "(visual_encoder.*, text_encoder.*), a DeiT/timm ViT (patch_embed.proj.weight, blocks.*) or "
        "bert-base-uncased (bert.*, cls.predictions.*)"
    )


def _grid(model: nn.Module) -> int:
    return model.visual_encoder.patch_embed.grid_size[0]


def _has_mlm(model: nn.Module) -> bool:
    return any(k.startswith("text_encoder.cls.") for k in model.state_dict())


def _resample(k: str, v: torch.Tensor, grid: int, report: LoadReport) -> torch.Tensor:
    new = resample_pos_embed(v, grid)
    if new.shape != v.shape:
        report.converted.append(f"{k} {tuple(v.shape)}->{tuple(new.shape)}")
    return new


def convert_deit(sd: Mapping[str, torch.Tensor], model: nn.Module, report: LoadReport) -> dict:
    mapped = {}
    grid = _grid(model)
    for k, v in sd.items():
        if k.startswith(("head.", "head_dist.")) or k == "dist_token":
            report.dropped.append(k)
            continue
        k2 = "visual_encoder." + k
        mapped[k2] = _resample(k2, v, grid, report) if k == "pos_embed" else v
    return mapped


_BERT_DROP = re.compile(
    r"(^|\.)(pooler\.|position_ids$)|^cls\.seq_relationship\.|^cls\.predictions\.decoder\.bias$"
)


def convert_bert(sd: Mapping[str, torch.Tensor], model: nn.Module, report: LoadReport) -> dict:
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
    return mapped


# Released retrieval checkpoints hold a BertModel as text encoder: `text_encoder.embeddings.*`.
_RELEASED_TEXT = re.compile(r"^(text_encoder(?:_m)?)\.(embeddings|encoder)\.")
_QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")


def convert_albef(
    sd: Mapping[str, torch.Tensor], model: nn.Module, report: LoadReport, *, released: bool
) -> dict:
    """A whole-model state dict (released ALBEF when `released`, else ours) -> our keys and shapes."""
    model_sd = model.state_dict()
    grid = _grid(model)
    mapped: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = _RELEASED_TEXT.match(k) if released else None
        if m:
            k2 = f"{m.group(1)}.bert.{k[len(m.group(1)) + 1 :]}"
            report.converted.append(f"{k} -> {k2}")
            k = k2
        if k.endswith(("cls.predictions.decoder.bias", "embeddings.position_ids")):
            report.dropped.append(k)  # an alias of cls.predictions.bias; the reference's arange buffer
            continue
        if released and k in ("image_queue", "text_queue"):
            v = v.t()  # released: (D, Q) -> ours (Q, D)
            report.converted.append(f"{k} transposed")
        if k == "idx_queue" and v.dim() == 2:
            v = v.reshape(-1)
            report.converted.append("idx_queue (1, Q) -> (Q,)")
        if k == "temp" and v.dim() == 0:
            v = v.reshape(1)
            report.converted.append("temp () -> (1,)")
        if k.startswith("visual_encoder") and k.endswith("pos_embed"):
            v = _resample(k, v, grid, report)
        mapped[k] = v
    # Queues of another length stay as the model initialised them (with their pointer and id queue).
    if "image_queue" in model_sd and "image_queue" in mapped:
        q_model, q_src = model_sd["image_queue"].shape[0], mapped["image_queue"].shape[0]
        if q_src != q_model:
            for k in _QUEUE_KEYS:
                if k in mapped:
                    del mapped[k]
                    report.dropped.append(f"{k} (queue of {q_src} entries, the model has {q_model})")
    if "idx_queue" in model_sd and "idx_queue" not in mapped and "image_queue" in mapped:
        # Feature queues without ids (a pre-training checkpoint): their ids stay "none" (-100), so none of
        # them counts as a positive; the pointer restarts at 0.
        mapped.pop("queue_ptr", None)
    return mapped


_ENCODER_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.(.+)$")


def derive_decoder(mapped: dict[str, torch.Tensor], model: nn.Module, report: LoadReport) -> None:
    """The VQA answer decoder from a pre-trained encoder, in place: for a model with `text_decoder` and a
    source without one (a pre-training checkpoint),

        text_encoder[_m].bert.embeddings.*           -> text_decoder[_m].bert.embeddings.*
        text_encoder[_m].bert.encoder.layer.{f+j}.*  -> text_decoder[_m].bert.encoder.layer.{j}.*
                                                        (f = fusion_layer, j < decoder depth: 6-11 -> 0-5)
        text_encoder[_m].cls.*                       -> text_decoder[_m].cls.*

    (self-attention, cross-attention and FFN of each fusion layer; the encoder keeps its own copy). A
    source that has decoder weights (a fine-tuned VQA checkpoint, ours or released) keeps them."""
    if not hasattr(model, "text_decoder") or any(k.startswith("text_decoder") for k in mapped):
        return
    f = model.text_encoder.bert.fusion_layer
    depth = len(model.text_decoder.bert.encoder.layer)
    derived = 0
    for k, v in list(mapped.items()):
        for suffix in ("", "_m"):
            src, dst = f"text_encoder{suffix}.", f"text_decoder{suffix}."
            if not k.startswith(src):
                continue
            rest = k[len(src) :]
            m = _ENCODER_LAYER.match(rest)
            if m:
                i = int(m.group(1))
                if not f <= i < f + depth:
                    continue
                rest = f"bert.encoder.layer.{i - f}.{m.group(2)}"
            elif not rest.startswith(("bert.embeddings.", "cls.")):
                continue
            mapped[dst + rest] = v
            derived += 1
    if derived:
        report.converted.append(
            f"text_decoder[_m] from text_encoder[_m]: embeddings, layers {f}-{f + depth - 1} -> "
            f"0-{depth - 1}, MLM head ({derived} tensors)"
        )


def derive_pairs(mapped: dict[str, torch.Tensor], model: nn.Module, report: LoadReport) -> None:
    """The NLVR2 paired fusion blocks from an unpaired encoder, in place: for a model whose text encoder
    pairs its fusion layers (`model.nlvr.PairedBertModel`) and a source with one block per fusion layer,

        text_encoder[_m].bert.encoder.layer.{f+k}.*  -> text_encoder[_m].bert.encoder.layer.{f+2k}.* and
                                                        text_encoder[_m].bert.encoder.layer.{f+2k+1}.*

    (both blocks of pair k from fusion layer k: self-attention, cross-attention, FFN; the pair's tied key and
    value get the same tensor twice). Text layers [0, f) keep their index. A paired source (a TA or NLVR2
    checkpoint) is left as it is."""
    bert = getattr(getattr(model, "text_encoder", None), "bert", None)
    pairs = getattr(bert, "pairs", None)
    if not pairs:
        return
    f = bert.fusion_layer
    for sfx in ("", "_m"):
        prefix = f"text_encoder{sfx}.bert."
        layers = {}
        for k in mapped:
            if k.startswith(prefix):
                m = _ENCODER_LAYER.match(k[len(prefix) - len("bert.") :])
                if m:
                    layers.setdefault(int(m.group(1)), []).append(k)
        if not layers or max(layers) >= f + pairs:
            continue  # nothing of this copy, or already paired
        moved = 0
        for i in sorted((i for i in layers if i >= f), reverse=True):
            for k in layers[i]:
                v = mapped.pop(k)
                rest = k.split(f".layer.{i}.", 1)[1]
                for j in (f + 2 * (i - f), f + 2 * (i - f) + 1):
                    mapped[f"{prefix}encoder.layer.{j}.{rest}"] = v
                moved += 1
        report.converted.append(
            f"text_encoder{sfx} fusion layers {f}-{f + pairs - 1} -> paired blocks {f}-{f + 2 * pairs - 1} "
            f"({moved} tensors, each into two blocks)"
        )


def _drop_unused_heads(mapped: dict[str, torch.Tensor], model: nn.Module, report: LoadReport) -> None:
    """The encoder's MLM head is dropped for a model without one (retrieval, VQA), once the decoder (which
    starts from it) has been derived."""
    if _has_mlm(model):
        return
    for k in [k for k in mapped if re.match(r"^text_encoder(_m)?\.cls\.", k)]:
        del mapped[k]
        report.dropped.append(k)


def convert_state(
    sd: Mapping[str, torch.Tensor], model: nn.Module, *, layout: str, report: LoadReport
) -> dict[str, torch.Tensor]:
    """`sd` in `layout` -> our keys and shapes for `model` (what was changed goes into `report`)."""
    if layout == "deit":
        return convert_deit(sd, model, report)
    if layout == "bert":
        mapped = convert_bert(sd, model, report)
    elif layout in WHOLE_MODEL:
        mapped = convert_albef(sd, model, report, released=layout == "albef")
    else:
        raise ValueError(f"unknown weight layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    derive_decoder(mapped, model, report)
    derive_pairs(mapped, model, report)
    _drop_unused_heads(mapped, model, report)
    return mapped


# Our keys a layout is expected to provide (a DeiT file is not expected to provide text weights).
_PREFIXES = {"deit": ("visual_encoder.",), "bert": ("text_encoder.",), "ours": ("",), "albef": ("",)}
# Tied aliases (the MLM decoder weight) count as loaded when their source was; the pointer may restart.
_NOT_MISSING = {
    "text_encoder.cls.predictions.decoder.weight",
    "text_encoder_m.cls.predictions.decoder.weight",
    "text_decoder.cls.predictions.decoder.weight",
    "text_decoder_m.cls.predictions.decoder.weight",
    "queue_ptr",
}

# ------------------------------------------------------------------------------------------- coverage
REQUIRE = ("encoders", "model", "all")
ENCODERS = ("vision encoder", "text encoder", "fusion encoder")
MOMENTUM = " (momentum)"
# Parts no evaluation reads (training state): an evaluation source may lack them.
TRAINING_ONLY = ("MLM head", "feature queues", "id queue")
_PARTS = {
    "visual_encoder": "vision encoder",
    "text_decoder": "answer decoder",
    "vision_proj": "ITC projections",
    "text_proj": "ITC projections",
    "temp": "ITC projections",
    "itm_head": "ITM head",
    "cls_head": "classifier head",
    "ta_head": "text-assignment head",
    "image_queue": "feature queues",
    "text_queue": "feature queues",
    "queue_ptr": "feature queues",
    "idx_queue": "id queue",
}
_KNOWN = {*_PARTS.values(), "text encoder", "fusion encoder", "MLM head"}
_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.")
PARTIAL_HINT = (
    "To load it anyway, ask for a partial load: --allow-partial (albef-ds evaluate / visualize / export), "
    "model.allow_partial_init=true (model.vit_init / bert_init / albef_init), partial=True (load_weights)"
)


def weight_group(key: str, fusion_layer: int) -> str:
    """The named part of an ALBEF model a state key belongs to (module docstring); text encoder layers from
    `fusion_layer` on are the fusion encoder. A key of no ALBEF part is its own part, named by its first
    component in quotes."""
    head, _, rest = key.partition(".")
    momentum = head.endswith("_m")
    base = head[:-2] if momentum else head
    if base == "text_encoder":
        if rest.startswith("cls."):
            name = "MLM head"
        else:
            m = _LAYER.match(rest)
            name = "fusion encoder" if m and int(m.group(1)) >= fusion_layer else "text encoder"
    else:
        name = _PARTS.get(base, f"'{base}'")
    return name + MOMENTUM if momentum else name


def _fusion_layer(model: nn.Module) -> int:
    bert = getattr(getattr(model, "text_encoder", None), "bert", None)
    return getattr(bert, "fusion_layer", 1 << 30)


def _known(group: str) -> bool:
    return group.removesuffix(MOMENTUM) in _KNOWN


def _required(group: str, require: str) -> bool:
    if require == "all":
        return True
    if require == "model":
        return not group.endswith(MOMENTUM) and group not in TRAINING_ONLY
    return group in ENCODERS


def _layout_provides(layout: str, key: str) -> bool:
    """Whether a source of `layout` is expected to fill our `key` (for require="encoders")."""
    if layout == "deit":
        return key.startswith("visual_encoder.")
    if layout == "bert":
        return key.startswith("text_encoder.") and ".crossattention." not in key
    return True


@dataclass
class Fit:
    """How a source (in our keys) fits a model: `check_fit`."""

    shapes: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, model shape, source shape)
    holes: dict[str, tuple[list[str], int]] = field(default_factory=dict)  # part -> (missing keys, its size)
    strays: list[str] = field(default_factory=list)  # source keys of required parts with no place here
    unmatched: list[str] = field(default_factory=list)  # source keys of parts it has, or of no ALBEF part
    unexpected: list[str] = field(default_factory=list)  # every source key the model has no place for

    def describe(self, source: str, fusion_layer: int, hint: str = PARTIAL_HINT) -> str:
        """The coverage error (holes and strays) for `source`, ending in `hint`."""
        parts = [
            f"{g}: {len(miss)} of {n} tensors missing (e.g. {', '.join(miss[:3])})"
            for g, (miss, n) in self.holes.items()
        ]
        msg = (
            (f"{source} does not cover the model: " + "; ".join(parts)) if parts else f"{source} does not fit"
        )
        if self.strays:
            where = ", ".join(dict.fromkeys(weight_group(k, fusion_layer) for k in self.strays))
            msg += (
                f"{'; and' if parts else ' the model:'} it holds {len(self.strays)} tensor(s) the model has "
                f"no place for ({where}; e.g. {', '.join(self.strays[:3])}): weights of another architecture?"
            )
        other = [k for k in self.unmatched if k not in set(self.strays)]
        if other:
            msg += f"; its keys that match nothing in the model: {', '.join(other[:4])}"
            msg += f" ({len(other)} in all)" if len(other) > 4 else ""
        return f"{msg}. {hint}" if hint else msg


def check_fit(
    model_state: Mapping[str, torch.Tensor],
    mapped: Mapping[str, torch.Tensor],
    *,
    fusion_layer: int,
    require: str = "encoders",
    layout: str = "ours",
) -> Fit:
    """How `mapped` (our keys, converted) fits a model whose state dict is `model_state` (meta tensors do):
    shape mismatches, the required parts (`require`, module docstring) it leaves unfilled, the source keys
    of required parts that find no place, and the keys that match nothing. Changes nothing."""
    if require not in REQUIRE:
        raise ValueError(f"unknown coverage requirement {require!r}; expected one of {', '.join(REQUIRE)}")
    fit = Fit()
    groups: dict[str, list[str]] = {}
    for k, t in model_state.items():
        groups.setdefault(weight_group(k, fusion_layer), []).append(k)
        if k in mapped and tuple(t.shape) != tuple(mapped[k].shape):
            fit.shapes.append((k, tuple(t.shape), tuple(mapped[k].shape)))
    for g, keys in groups.items():
        if not _required(g, require):
            continue
        expected = [
            k
            for k in keys
            if k not in _NOT_MISSING and (require != "encoders" or _layout_provides(layout, k))
        ]
        missing = [k for k in expected if k not in mapped]
        if missing:
            fit.holes[g] = (missing, len(expected))
    for k in mapped:
        if k in model_state:
            continue
        fit.unexpected.append(k)
        g = weight_group(k, fusion_layer)
        if g in groups or not _known(g):
            fit.unmatched.append(k)
        if require == "all" or (require == "model" and g in groups and _required(g, require)):
            fit.strays.append(k)
    return fit


def _shape_error(source: str, shapes: list[tuple[str, tuple, tuple]]) -> ValueError:
    lines = [f"{k}: ours {ours}, file {theirs}" for k, ours, theirs in shapes]
    return ValueError(f"shape mismatch loading {source}:\n  " + "\n  ".join(lines))


def apply_state(
    model: nn.Module, mapped: Mapping[str, torch.Tensor], report: LoadReport, *, prefixes: tuple[str, ...]
) -> LoadReport:
    """Copy `mapped` (our keys) into the model's parameters and buffers. `prefixes` limit which of our keys
    count as missing. Checks every shape before copying anything: a mismatch changes nothing."""
    ours = model.state_dict(keep_vars=True)
    fit = check_fit(ours, mapped, fusion_layer=_fusion_layer(model))
    if fit.shapes:
        raise _shape_error(report.source, fit.shapes)
    report.unexpected, report.unmatched = fit.unexpected, fit.unmatched
    with torch.no_grad():
        for k, v in mapped.items():
            if k in ours:
                ours[k].copy_(v.to(ours[k].dtype))
                report.loaded += 1
    report.missing = [k for k in ours if k.startswith(prefixes) and k not in mapped and k not in _NOT_MISSING]
    if report.incomplete or report.unmatched:
        log.warning(report.summary())
    else:
        log.info(report.summary())
    return report


def load_state(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    layout: str = "ours",
    source: str = "state dict",
    require: str = "encoders",
    partial: bool = False,
) -> LoadReport:
    """Convert `sd` (in `layout`, see the module docstring) for `model` and load it; returns the report.
    The parts `require` names must be filled (module docstring, "Coverage"), else a ValueError names them and
    nothing is copied; `partial=True` loads what fits and lists the rest in `report.incomplete`. After a
    partial layout (DeiT, BERT) the momentum copies follow the loaded weights."""
    report = LoadReport(source, layout=layout)
    mapped = convert_state(sd, model, layout=layout, report=report)
    model_state = model.state_dict()
    if layout in WHOLE_MODEL and not partial:
        # A whole-model source must fill the answer decoder (its own, or derived from the encoder): a
        # silently BERT- or randomly-initialised decoder answers nonsense (the reference's --evaluate did).
        gaps = [
            k
            for k in model_state
            if k.startswith("text_decoder") and k not in mapped and k not in _NOT_MISSING
        ]
        if gaps:
            raise ValueError(
                f"{source} leaves {len(gaps)} answer-decoder tensor(s) missing, e.g. {', '.join(gaps[:4])}: "
                "expected a pre-trained ALBEF checkpoint (text_encoder.bert.encoder.layer.* with the fusion "
                "layers, text_encoder.cls.*) or a VQA checkpoint (text_decoder.*)"
            )
    fit = check_fit(model_state, mapped, fusion_layer=_fusion_layer(model), require=require, layout=layout)
    if fit.shapes:
        raise _shape_error(source, fit.shapes)
    if fit.holes or fit.strays:
        if not partial:
            raise ValueError(fit.describe(source, _fusion_layer(model)))
        report.incomplete = [f"{g}: {len(miss)} of {n} tensors missing" for g, (miss, n) in fit.holes.items()]
        if fit.strays:
            report.incomplete.append(f"{len(fit.strays)} tensor(s) of those parts with no place in the model")
    apply_state(model, mapped, report, prefixes=_PREFIXES[layout])
    if layout not in WHOLE_MODEL and hasattr(model, "copy_params"):
        model.copy_params()
    return report
