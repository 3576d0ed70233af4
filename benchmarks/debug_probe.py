"""What the debug ALBEF sees: per-attribute probes of a pre-trained checkpoint and of the bare debug ViT.

Issue 16 asks why the debug recipe's ITM stays near chance and its re-rank loses to ITC. Two measurements:

``attributes`` (a pre-trained checkpoint, the synthetic set's held-out split, whose records carry the
generator's attributes). For every held-out image, a full caption "a {size} {colour} {shape} {at} on a {bg}
background" is scored against one counterfactual per attribute (that attribute changed, the rest kept):

* ITC: is the true caption's unit-feature similarity above the counterfactual's?
* ITM: is its ITM positive logit above?
* MLM: with that attribute's word masked, does the fusion encoder pick the right value among the
  attribute's values (with the image, and with another image: the text-only control)?

``vit`` (no checkpoint): the debug ViT trained from scratch as a plain classifier of one attribute (shape,
position or colour) on the synthetic training images with the pre-training transform, for --steps steps;
held-out accuracy with timm's position-embedding start (std 0.02) and with the 2-D sine-cosine start
(`model.vision.pos_embed_init`), beside a three-layer CNN as the reference that the images carry the
attribute.

Both need the one-object set (`data.synth.objects=1`; configs/debug.yaml is the two-object recipe now, which
they refuse by name), e.g. with `data.synth.out_dir=data/synth1 data.train_file=[data/synth1/train.json]
data.eval_file=data/synth1/eval.json data.tokenizer=data/synth1/vocab.txt` after each command below:

    python benchmarks/debug_probe.py attributes --config configs/debug.yaml \
        --checkpoint runs/debug/albef.safetensors --out benchmarks/results/debug_attributes.json
    python benchmarks/debug_probe.py vit --config configs/debug.yaml --steps 400 \
        --out benchmarks/results/debug_vit_probe.json

``ceiling`` (no checkpoint, no model): the R@1 an oracle reaches on the held-out split when it knows only
some attributes of each image, for the nested sets colour, + background, + size, + position, + texture,
+ shape. The oracle scores a caption by how many known attributes it names correctly, and rules it out when
it names one wrongly; ties are broken at random (the expected R@1 is reported). It says what knowing an
attribute is worth in the demo's retrieval, and how far a model that sees only some of them can get. On the
two-object set (`synth.objects=2`): the sets colour and colour + size.

``pairs`` (a checkpoint pre-trained on the two-object set, e.g. the demo's `runs/debug`): for every
held-out image, "a {size} {colour} shape and a {size} {colour} shape" against the same with one object's
colour changed, with one object's size flipped, and with the two sizes swapped (binding: the same words),
by ITC and by ITM.

    python benchmarks/debug_probe.py ceiling --config configs/debug.yaml \
        --out benchmarks/results/debug_ceiling.json
    python benchmarks/debug_probe.py pairs --config configs/debug.yaml \
        --checkpoint runs/debug/albef.safetensors --out benchmarks/results/debug_pairs.json

Each writes the JSON and a PNG beside it (bars per attribute, or per set of known attributes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from albef_ds.config import load_config  # noqa: E402
from albef_ds.data.evalset import RetrievalEvalSet  # noqa: E402
from albef_ds.data.synth import (  # noqa: E402
    _AT,
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    contrasting_backgrounds,
)
from albef_ds.data.text import clean_caption  # noqa: E402
from albef_ds.data.transforms import eval_transform, pretrain_transform  # noqa: E402
from albef_ds.model.albef import ALBEFPretrain  # noqa: E402
from albef_ds.model.vit import build_vit  # noqa: E402
from albef_ds.train.checkpoint.weights import load_weights  # noqa: E402
from albef_ds.train.runtime import build_tokenizer, special_tokens  # noqa: E402

log = logging.getLogger("debug_probe")

VALUES = {
    "colour": list(COLOURS),
    "shape": list(SHAPES),
    "size": list(SIZES),
    "position": list(POSITIONS),
    "background": list(BACKGROUNDS),
}


def probe_caption(a: dict) -> str:
    """The probe's full caption of an attribute record (every attribute named once, one word each)."""
    return f"a {a['size']} {a['colour']} {a['shape']} {_AT[a['position']]} on a {a['background']} background"


def counterfactual(a: dict, key: str, gen: torch.Generator) -> dict | None:
    """`a` with `key` changed to another value the generator could have drawn (backgrounds: one that
    contrasts with the object's colour); None when there is none."""
    pool = contrasting_backgrounds([a["colour"]]) if key == "background" else VALUES[key]
    others = [v for v in pool if v != a[key]]
    if not others:
        return None
    return {**a, key: others[int(torch.randint(len(others), (1,), generator=gen))]}


def _word_id(tok, word: str) -> int:
    ids = tok([word])["input_ids"][0].tolist()
    body = [i for i in ids if i not in (tok.cls_token_id, tok.pad_token_id, getattr(tok, "sep_token_id", -1))]
    if len(body) != 1:
        raise ValueError(f"the probe needs {word!r} to be one token of the vocabulary, got {body}")
    return body[0]


PAIR_CHANGES = ("colour", "size", "binding")


def pair_caption(objects: list[dict]) -> str:
    """The probe's caption of a two-object record: both colours with their sizes, in the record's order."""
    a, b = objects
    return f"a {a['size']} {a['colour']} shape and a {b['size']} {b['colour']} shape"


def pair_counterfactual(objects: list[dict], change: str, gen: torch.Generator) -> list[dict] | None:
    """The two objects with one change: "colour" gives the first another colour absent from the image,
    "size" flips the first one's size, "binding" swaps the two sizes (the same words, bound the other way;
    None when the sizes are equal)."""
    a, b = (dict(o) for o in objects)
    if change == "colour":
        others = [c for c in COLOURS if c not in (a["colour"], b["colour"])]
        a["colour"] = others[int(torch.randint(len(others), (1,), generator=gen))]
    elif change == "size":
        a["size"] = "large" if a["size"] == "small" else "small"
    elif change == "binding":
        if a["size"] == b["size"]:
            return None
        a["size"], b["size"] = b["size"], a["size"]
    else:
        raise ValueError(f"unknown change {change!r}; expected one of {PAIR_CHANGES}")
    return [a, b]


def _load_probe_model(cfg, checkpoint: str):
    tok = build_tokenizer(cfg)
    model = ALBEFPretrain(cfg.model, special_tokens=special_tokens(tok))
    load_weights(model, checkpoint, require="model")
    return tok, model.eval()


def _encode_split(model, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    ev = RetrievalEvalSet(cfg.data.eval_file, image_size=cfg.model.vision.image_size, max_words=30)
    tokens, feats = [], []
    cpu = torch.device("cpu")
    for images, _ in ev.image_batches(0, ev.num_images, batch_size=100, device=cpu, num_workers=0):
        t, f = model.encode_image(images)
        tokens.append(t)
        feats.append(f)
    return torch.cat(tokens), torch.cat(feats)


def _score_captions(model, tok, captions: list[str], feat: torch.Tensor, image_tokens: torch.Tensor):
    """ITC similarity and ITM positive logit of each caption with one image: (tokenized, itc, itm)."""
    t = tok(captions)
    states, tfeat = model.encode_text(t["input_ids"], t["attention_mask"])
    img = image_tokens[None].expand(len(captions), -1, -1)
    itm = model.itm_head(model.text_encoder.bert.fuse(states, t["attention_mask"], img)[:, 0])[:, 1]
    return t, feat @ tfeat.t(), itm


def _two_object(records: list[dict]) -> bool:
    """Whether a synthetic list is the two-object set (`synth.objects=2`): its attributes hold "objects"."""
    return bool(records) and "objects" in records[0].get("attributes", {})


@torch.no_grad()
def pair_probe(cfg, checkpoint: str, *, seed: int = 0) -> dict:
    """The two-object set (`synth.objects=2`): per change of PAIR_CHANGES, % of held-out images whose true
    caption ITC / ITM score above the changed one."""
    tok, model = _load_probe_model(cfg, checkpoint)
    records = json.loads(Path(cfg.data.eval_file).read_text())
    if not _two_object(records):
        raise ValueError(f"{cfg.data.eval_file}: not the two-object synthetic set (synth.objects=2)")
    tokens, feats = _encode_split(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    counts = {k: {"itc": 0, "itm": 0, "pairs": 0} for k in PAIR_CHANGES}
    for i, rec in enumerate(records):
        objs = rec["attributes"]["objects"]
        alts = {k: pair_counterfactual(objs, k, gen) for k in PAIR_CHANGES}
        keys = [k for k in PAIR_CHANGES if alts[k] is not None]
        caps = [pair_caption(objs)] + [pair_caption(alts[k]) for k in keys]
        _, itc, itm = _score_captions(model, tok, caps, feats[i], tokens[i])  # (1 + K,) each
        for j, k in enumerate(keys, start=1):
            counts[k]["pairs"] += 1
            counts[k]["itc"] += int(itc[0] > itc[j])
            counts[k]["itm"] += int(itm[0] > itm[j])
    p = {k: max(c["pairs"], 1) for k, c in counts.items()}
    return {
        k: {"itc": 100.0 * c["itc"] / p[k], "itm": 100.0 * c["itm"] / p[k], "pairs": c["pairs"]}
        for k, c in counts.items()
    }


@torch.no_grad()
def attribute_probe(cfg, checkpoint: str, *, seed: int = 0) -> dict:
    """Per attribute of VALUES: % of held-out images whose true caption ITC / ITM score above its
    counterfactual, and % whose masked attribute word MLM fills in right (with the image; with the image
    half the split away). Needs the one-object synthetic set's eval file (its records carry "attributes")."""
    records = json.loads(Path(cfg.data.eval_file).read_text())
    if not records or "attributes" not in records[0]:
        raise ValueError(f"{cfg.data.eval_file}: records without 'attributes' (not the synthetic set)")
    if _two_object(records):
        raise ValueError(f"{cfg.data.eval_file}: a two-object set (synth.objects=2): use the `pairs` probe")
    tok, model = _load_probe_model(cfg, checkpoint)
    tokens, feats = _encode_split(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    counts = {k: {"itc": 0, "itm": 0, "mlm": 0, "mlm_other_image": 0, "pairs": 0} for k in VALUES}
    word = {k: torch.tensor([_word_id(tok, v) for v in vals]) for k, vals in VALUES.items()}
    n = len(records)
    for i, rec in enumerate(records):
        a = rec["attributes"]
        alts = {k: counterfactual(a, k, gen) for k in VALUES}
        keys = [k for k in VALUES if alts[k] is not None]
        caps = [probe_caption(a)] + [probe_caption(alts[k]) for k in keys]
        t, itc, itm = _score_captions(model, tok, caps, feats[i], tokens[i])  # (1 + K,) each
        other = tokens[(i + n // 2) % n : (i + n // 2) % n + 1]  # an unrelated image: the text-only control
        for j, k in enumerate(keys, start=1):
            c = counts[k]
            c["pairs"] += 1
            c["itc"] += int(itc[0] > itc[j])
            c["itm"] += int(itm[0] > itm[j])
            ids = t["input_ids"][:1].clone()
            pos = int((ids[0] == word[k][VALUES[k].index(a[k])]).nonzero()[0, 0])
            ids[0, pos] = tok.mask_token_id
            for name, image in (("mlm", tokens[i : i + 1]), ("mlm_other_image", other)):
                h = model.text_encoder.bert(ids, t["attention_mask"][:1], image)[0, pos]
                pick = int(model.text_encoder.cls(h)[word[k]].argmax())
                c[name] += int(VALUES[k][pick] == a[k])
    out = {}
    for k, c in counts.items():
        p = max(c["pairs"], 1)
        out[k] = {
            "itc": 100.0 * c["itc"] / p,
            "itm": 100.0 * c["itm"] / p,
            "mlm": 100.0 * c["mlm"] / p,
            "mlm_other_image": 100.0 * c["mlm_other_image"] / p,
            "mlm_chance": 100.0 / len(VALUES[k]),
            "pairs": c["pairs"],
        }
    return out


def _conv_reference(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(64, classes),
    )


class _ViTClassifier(nn.Module):
    def __init__(self, vision_cfg, classes: int) -> None:
        super().__init__()
        self.vit = build_vit(vision_cfg)
        self.head = nn.Linear(vision_cfg.width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit.forward_features(x)[:, 0])


MODELS = ("vit_trunc_normal", "vit_sincos", "cnn_reference")


def vit_probe(
    cfg, attribute: str, *, steps: int, lr: float, batch: int, models=MODELS, seed: int = 0
) -> dict:
    """Held-out accuracy of a from-scratch classifier of `attribute`, per model, after `steps` steps."""
    folder = Path(cfg.data.synth.out_dir)
    train = json.loads((folder / "train.json").read_text())
    held = json.loads((folder / "eval.json").read_text())
    if _two_object(held):
        raise ValueError(
            f"{folder / 'eval.json'}: a two-object set (synth.objects=2); the ViT probe needs the one-object "
            "set (data.synth.objects=1)"
        )
    vals = VALUES[attribute]
    size = cfg.model.vision.image_size
    aug = pretrain_transform(
        size, crop_scale=cfg.data.crop_scale, randaug_n=cfg.data.randaug_n, randaug_m=cfg.data.randaug_m
    )
    plain = eval_transform(size)

    def load(recs, tf):
        x = torch.stack([tf(Image.open(folder / r["image"]).convert("RGB")) for r in recs])
        return x, torch.tensor([vals.index(r["attributes"][attribute]) for r in recs])

    xe, ye = load(held, plain)
    vc, n = cfg.model.vision, len(vals)
    makers = {
        "vit_trunc_normal": lambda: _ViTClassifier(dataclasses.replace(vc, pos_embed_init="trunc_normal"), n),
        "vit_sincos": lambda: _ViTClassifier(dataclasses.replace(vc, pos_embed_init="sincos"), n),
        "cnn_reference": lambda: _conv_reference(n),
    }
    out = {}
    for name, make in ((m, makers[m]) for m in models):
        torch.manual_seed(seed)
        net = make()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.02)
        order = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(len(train), (batch,), generator=order).tolist()
            x, y = load([train[i] for i in idx], aug)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = 100.0 * float((net(xe).argmax(1) == ye).float().mean())
        out[name] = {"accuracy": acc, "final_loss": loss.item(), "seconds": time.perf_counter() - t0}
        log.info("%s %s: %.1f%% after %d steps", attribute, name, acc, steps)
    out["chance"] = 100.0 / len(vals)
    return out


CEILING_ORDER = ("colour", "background", "size", "position", "texture", "shape")
_NAMED = {**VALUES, "texture": list(TEXTURES)}


def caption_mentions(caption: str) -> dict[str, str]:
    """The attribute values a synthetic caption names, by its (cleaned) words: {attribute: value}."""
    words = set(clean_caption(caption, 60).replace("(", " ").replace(")", " ").split())
    return {k: v for k, vals in _NAMED.items() for v in vals if v in words}


def recall_ceiling(records: list[dict], known: tuple[str, ...]) -> dict[str, float]:
    """Expected TR / IR R@1 (%) of the oracle that knows the `known` attributes of every image (records:
    the synthetic eval list, with "attributes"): a caption scores the number of known attributes it names
    correctly, and -inf if it names one wrongly; ties are broken uniformly at random."""
    caps = [(i, caption_mentions(c)) for i, r in enumerate(records) for c in r["caption"]]
    owner = torch.tensor([i for i, _ in caps])
    score = torch.empty(len(records), len(caps))
    for i, r in enumerate(records):
        a = r["attributes"]
        for j, (_, m) in enumerate(caps):
            named = [k for k in known if k in m]
            score[i, j] = float("-inf") if any(m[k] != a[k] for k in named) else float(len(named))
    top_t = score == score.max(dim=1, keepdim=True).values  # (I, T): the captions tied at each image's top
    own = owner[None, :] == torch.arange(len(records))[:, None]
    txt = ((top_t & own).sum(1) / top_t.sum(1)).mean()
    top_i = score == score.max(dim=0, keepdim=True).values  # (I, T): the images tied at each caption's top
    img = (top_i[owner, torch.arange(len(caps))].float() / top_i.sum(0)).mean()
    return {"txt_r1": 100.0 * float(txt), "img_r1": 100.0 * float(img)}


PAIR_CEILING_ORDER = ("colour", "size")


def pair_recall_ceiling(records: list[dict], known: tuple[str, ...]) -> dict[str, float]:
    """`recall_ceiling` for the two-object set, whose every caption names both objects' colour and size: a
    caption fits an image when the image's objects agree with its own image's on the `known` attributes."""
    keys = [frozenset(tuple(o[k] for k in known) for o in r["attributes"]["objects"]) for r in records]
    owner = [i for i, r in enumerate(records) for _ in r["caption"]]
    fits = torch.tensor([[keys[i] == keys[o] for o in owner] for i in range(len(records))])  # (I, T)
    own = torch.tensor(owner)[None, :] == torch.arange(len(records))[:, None]
    txt = ((fits & own).sum(1) / fits.sum(1)).mean()
    img = (1.0 / fits.sum(0)).mean()  # each caption fits its own image and those tied with it
    return {"txt_r1": 100.0 * float(txt), "img_r1": 100.0 * float(img)}


def _plot(
    groups: dict[str, dict[str, float]], title: str, path: Path, chance: dict[str, float], *, pairwise: bool
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    series = list(next(iter(groups.values())))
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(names), 3.6))
    w = 0.8 / len(series)
    for j, s in enumerate(series):
        ax.bar([i + j * w for i in range(len(names))], [groups[n][s] for n in names], w, label=s)
    for i, n in enumerate(names):
        ax.hlines(chance[n], i - w / 2, i + (len(series) - 0.5) * w, colors="k", linestyles="dotted")
    if pairwise:
        ax.axhline(50.0, color="grey", linestyle="dashed", linewidth=0.8)
    ax.set_xticks([i + (len(series) - 1) * w / 2 for i in range(len(names))], names)
    ax.set_ylabel("% correct (dotted: chance of a pick)")
    ax.set_ylim(0, 122)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=len(series), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("attributes", help="ITC / ITM / MLM per attribute of a pre-trained checkpoint")
    a.add_argument("--checkpoint", required=True)
    pr = sub.add_parser("pairs", help="ITC / ITM on the two-object set: colour, size and binding changes")
    pr.add_argument("--checkpoint", required=True)
    v = sub.add_parser("vit", help="the bare debug ViT as a supervised attribute classifier")
    v.add_argument("--attributes", nargs="+", default=["colour", "position", "shape"])
    v.add_argument("--steps", type=int, default=400)
    v.add_argument("--lr", type=float, default=5e-4)
    v.add_argument("--batch", type=int, default=32)
    v.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    c = sub.add_parser("ceiling", help="R@1 of an oracle that knows only some attributes")
    for s in (a, pr, v, c):
        s.add_argument("--config", default=str(ROOT / "configs/debug.yaml"))
        s.add_argument("--out", required=True)
        s.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.what == "attributes":
        res = attribute_probe(cfg, args.checkpoint)
        doc = {"checkpoint": args.checkpoint, "eval_file": cfg.data.eval_file, "attributes": res}
        groups = {k: {s: r[s] for s in ("itc", "itm", "mlm", "mlm_other_image")} for k, r in res.items()}
        chance = {k: r["mlm_chance"] for k, r in res.items()}
        title = (
            "ITC / ITM: true caption above a one-attribute change (chance 50, dashed); MLM: the masked value"
        )
    elif args.what == "pairs":
        res = pair_probe(cfg, args.checkpoint)
        doc = {"checkpoint": args.checkpoint, "eval_file": cfg.data.eval_file, "changes": res}
        groups = {k: {s: r[s] for s in ("itc", "itm")} for k, r in res.items()}
        chance = {k: 50.0 for k in res}
        title = "two objects: true caption above one change (ITC similarity, ITM logit; chance 50)"
    elif args.what == "ceiling":
        records = json.loads(Path(cfg.data.eval_file).read_text())
        if not records or "attributes" not in records[0]:
            raise ValueError(f"{cfg.data.eval_file}: records without 'attributes' (not the synthetic set)")
        pair = _two_object(records)
        order, fn = (PAIR_CEILING_ORDER, pair_recall_ceiling) if pair else (CEILING_ORDER, recall_ceiling)
        res = {"+".join(order[: n + 1]): fn(records, order[: n + 1]) for n in range(len(order))}
        doc = {"eval_file": cfg.data.eval_file, "images": len(records), "ceiling": res}
        # one bar pair per set, labelled by the attribute it adds to the set before it
        groups = {
            ("+" if "+" in k else "") + k.split("+")[-1]: {"TR": r["txt_r1"], "IR": r["img_r1"]}
            for k, r in res.items()
        }
        chance = {k: 100.0 / len(records) for k in groups}  # R@1 of a random ranking, either way
        title = "R@1 of an oracle that knows colour and each attribute added left to right (ties at random)"
    else:
        kw = dict(steps=args.steps, lr=args.lr, batch=args.batch, models=args.models)
        res = {k: vit_probe(cfg, k, **kw) for k in args.attributes}
        doc = {"steps": args.steps, "lr": args.lr, "batch": args.batch, "probes": res}
        groups = {k: {m: r[m]["accuracy"] for m in r if m != "chance"} for k, r in res.items()}
        chance = {k: r["chance"] for k, r in res.items()}
        title = f"supervised from scratch, {args.steps} steps of {args.batch}: held-out accuracy"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    _plot(groups, title, out.with_suffix(".png"), chance, pairwise=args.what in ("attributes", "pairs"))
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
