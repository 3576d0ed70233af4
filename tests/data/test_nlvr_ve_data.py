"""NLVR2 and SNLI-VE data: record checks and labels, the pair flip, both training loaders through both
backends (batch format, skipped images, reproducibility, flip-swap on/off against the image content) and the
evaluation sets."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from albef_ds.config import Config
from albef_ds.data import TextTokenizer, clean_caption, eval_transform, swap_left_right, train_wordpiece_vocab
from albef_ds.data.nlvr import (
    NLVRCollator,
    NLVREvalSet,
    NLVRText,
    build_nlvr_train_loader,
    load_nlvr_records,
    pair_flip,
)
from albef_ds.data.ve import (
    VE_LABELS,
    SentenceLabelCollator,
    SentenceLabelText,
    VEEvalSet,
    build_ve_train_loader,
    load_ve_records,
)

WORDS = "in the left right image black white side is on red and blue a dog there sky"
NLVR_KEYS = {"image0", "image1", "input_ids", "attention_mask", "label", "index", "num_skipped"}
VE_KEYS = {"image", "input_ids", "attention_mask", "label", "index", "num_skipped"}
S = 16  # loader image size


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    vocab = train_wordpiece_vocab(
        [WORDS] * 20, tmp_path_factory.mktemp("nv_vocab") / "vocab.txt", vocab_size=120
    )
    return TextTokenizer.from_path(vocab, max_tokens=25)


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _halves(path: Path, left: tuple, right: tuple, size: int = 32) -> None:
    a = np.zeros((size, size, 3), np.uint8)
    a[:, : size // 2] = left
    a[:, size // 2 :] = right
    Image.fromarray(a).save(path)


def _bad_images(root: Path) -> None:
    """corrupt.png: not an image (skipped before decoding); crc.png: valid headers, a corrupt stream (fails
    in the decoder: DALI retries its batch image by image)."""
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    png[png.index(b"IDAT") + 60] ^= 0xFF
    (root / "crc.png").write_bytes(bytes(png))


BLACK, WHITE, RED, BLUE = (0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 0, 255)


# ---------------------------------------------------------------------------------------------- records
def test_ve_records_labels_paths(tmp_path: Path) -> None:
    recs = [
        {"image": "flickr/1000092795", "sentence": "A dog.", "label": "entailment"},  # bare Flickr30K id
        {"image": "a.png", "sentence": "b", "label": "neutral", "hypothesis_type": "count"},
        {"image": "/abs/c.jpg", "sentence": "c", "label": "contradiction"},
        {"image": "d.jpg", "sentence": "d", "label": 2},
        {"image": "e.jpg", "sentence": "e", "label": 1},
        {"image": "f.jpg", "sentence": "f", "label": 0},
    ]
    f = _write(tmp_path / "ve.json", recs)
    out = load_ve_records(f)
    assert VE_LABELS == {"contradiction": 0, "neutral": 1, "entailment": 2}
    assert [r["label"] for r in out] == [2, 1, 0, 2, 1, 0]
    assert out[0]["image"] == str(tmp_path / "flickr/1000092795.jpg") and out[1]["image"] == str(
        tmp_path / "a.png"
    )
    assert out[2]["image"] == "/abs/c.jpg" and out[0]["sentence"] == "A dog."
    assert [r["type"] for r in out] == [None, "count", None, None, None, None]
    assert load_ve_records(f, image_root="/root")[0]["image"] == "/root/flickr/1000092795.jpg"


VE_GOOD = {"image": "a.jpg", "sentence": "a dog", "label": "neutral"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"label": "maybe"}, "field 'label' must be one of 'entailment', 'neutral', 'contradiction'"),
        ({"label": 3}, r"field 'label' must be one of .*\(or the ints 2, 1, 0\), got 3"),
        ({"label": True}, "field 'label' must be one of"),
        ({"image": ""}, "field 'image' must be a non-empty str"),
        ({"image": 5}, "field 'image' must be a non-empty str"),
        ({"sentence": None}, "field 'sentence' must be a str"),
        ({"hypothesis_type": 3}, "optional field 'hypothesis_type' must be a str"),
        ({"label": ...}, "has no field 'label'"),
        ({"image": ...}, "has no field 'image'"),
        ({"sentence": ...}, "has no field 'sentence'"),
    ],
)
def test_ve_record_errors_name_file_entry_field(tmp_path: Path, change: dict, message: str) -> None:
    bad = {k: v for k, v in {**VE_GOOD, **change}.items() if v is not ...}
    f = _write(tmp_path / "bad.json", [VE_GOOD, bad])
    with pytest.raises(ValueError, match=rf"SNLI-VE file {f}: entry 1.*{message}"):
        load_ve_records(f)


def test_nlvr_records_labels_paths(tmp_path: Path) -> None:
    recs = [
        {"images": ["l/0.png", "r/0.png"], "sentence": "S0", "label": "True"},
        {"images": ["1a.png", "/abs/1b.png"], "sentence": "S1", "label": "False", "truth_type": "both"},
        {"images": ["2a.png", "2b.png"], "sentence": "S2", "label": True},
        {"images": ["3a.png", "3b.png"], "sentence": "S3", "label": False},
    ]
    f = _write(tmp_path / "nlvr.json", recs)
    out = load_nlvr_records(f)
    assert [r["label"] for r in out] == [1, 0, 1, 0]
    assert out[0]["images"] == [str(tmp_path / "l/0.png"), str(tmp_path / "r/0.png")]
    assert out[1]["images"] == [str(tmp_path / "1a.png"), "/abs/1b.png"]
    assert [r["type"] for r in out] == [None, "both", None, None] and out[2]["sentence"] == "S2"
    assert load_nlvr_records(f, image_root="/r")[0]["images"] == ["/r/l/0.png", "/r/r/0.png"]


NLVR_GOOD = {"images": ["a.png", "b.png"], "sentence": "s", "label": "True"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"images": "a.png"}, "field 'images' must be a list of exactly 2 non-empty str"),
        ({"images": ["a.png"]}, "field 'images' must be a list of exactly 2"),
        ({"images": ["a", "b", "c"]}, "field 'images' must be a list of exactly 2"),
        ({"images": ["a.png", 3]}, "field 'images' must be a list of exactly 2 non-empty str"),
        ({"images": ["a.png", ""]}, "field 'images' must be a list of exactly 2 non-empty str"),
        ({"label": "yes"}, r"field 'label' must be 'True' or 'False' \(or a bool\), got 'yes'"),
        ({"label": 1}, "field 'label' must be 'True' or 'False'"),
        ({"sentence": 5}, "field 'sentence' must be a str"),
        ({"truth_type": ["x"]}, "optional field 'truth_type' must be a str"),
        ({"images": ...}, "has no field 'images'"),
        ({"label": ...}, "has no field 'label'"),
    ],
)
def test_nlvr_record_errors_name_file_entry_field(tmp_path: Path, change: dict, message: str) -> None:
    bad = {k: v for k, v in {**NLVR_GOOD, **change}.items() if v is not ...}
    f = _write(tmp_path / "bad.json", [NLVR_GOOD, NLVR_GOOD, bad])
    with pytest.raises(ValueError, match=rf"NLVR2 file {f}: entry 2.*{message}"):
        load_nlvr_records(f)


@pytest.mark.parametrize("load", [load_ve_records, load_nlvr_records])
def test_record_file_errors(tmp_path: Path, load) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load(tmp_path / "nope.json")
    with pytest.raises(ValueError, match=r"x\.json: entry 1 must be an object"):
        load(_write(tmp_path / "x.json", [VE_GOOD if load is load_ve_records else NLVR_GOOD, "no"]))
    with pytest.raises(ValueError, match="non-empty JSON list"):
        load(_write(tmp_path / "empty.json", []))
    with pytest.raises(ValueError, match="non-empty JSON list"):
        load(_write(tmp_path / "obj.json", {"a": 1}))


# ------------------------------------------------------------------------------------------- pair flip
class _Draws:
    """An rng stand-in that counts its draws."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)
        self.n = 0

    def random(self) -> float:
        self.n += 1
        return self.values.pop(0)


def test_pair_flip() -> None:
    rng = _Draws([])
    assert pair_flip(rng, hflip=False, flip_swap=True) == ((0, 1), (False, False), False) and rng.n == 0
    assert pair_flip(rng, hflip=False, flip_swap=False) == ((0, 1), (False, False), False) and rng.n == 0
    rng = _Draws([0.2, 0.7])
    assert pair_flip(rng, hflip=True, flip_swap=True) == ((1, 0), (True, True), True)
    assert pair_flip(rng, hflip=True, flip_swap=True) == ((0, 1), (False, False), False) and rng.n == 2
    rng = _Draws([0.2, 0.7, 0.9, 0.1])
    assert pair_flip(rng, hflip=True, flip_swap=False) == ((0, 1), (True, False), False)
    assert pair_flip(rng, hflip=True, flip_swap=False) == ((0, 1), (False, True), False) and rng.n == 4
    r = random.Random(0)  # p = 0.5, and the same draw rule for a numpy Generator (DALI)
    swaps = sum(pair_flip(r, hflip=True, flip_swap=True)[2] for _ in range(2000))
    assert 900 < swaps < 1100
    g = np.random.default_rng(0)
    assert {pair_flip(g, hflip=True, flip_swap=False)[1] for _ in range(50)} == {
        (a, b) for a in (False, True) for b in (False, True)
    }


# ------------------------------------------------------------------------------------------ the loaders
@pytest.fixture(scope="module")
def ve_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 usable records on black | white images (one as a bare id -> .jpg) and two unusable images: 16
    records, 2 batches of 8."""
    root = tmp_path_factory.mktemp("ve_data")
    (root / "img").mkdir()
    for k in range(4):
        _halves(root / "img" / f"{k}.png", BLACK, WHITE)
    _halves(root / "img" / "7.jpg", BLACK, WHITE)
    _bad_images(root / "img")
    labels = ["entailment", "neutral", "contradiction", 2, 1, 0, "neutral"]
    sentences = ["The sky is blue.", "A dog is on the left side!", "There is a red image"]
    recs = [
        {
            "image": f"img/{k % 4}.png" if k != 5 else "img/7",
            "sentence": sentences[k % 3],
            "label": labels[k % 7],
        }
        for k in range(14)
    ]
    recs.insert(3, {"image": "img/crc.png", "sentence": "bad", "label": 0})
    recs.insert(11, {"image": "img/corrupt.png", "sentence": "bad", "label": 1})
    return _write(root / "train.json", recs)


@pytest.fixture(scope="module")
def nlvr_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pairs of a black | white image (A) and a red | blue one (B), statements about sides; 14 usable
    pairs and two with an unusable image (the left one: decoder failure; the right one: not an image)."""
    root = tmp_path_factory.mktemp("nlvr_data")
    _halves(root / "a.png", BLACK, WHITE)
    _halves(root / "b.png", RED, BLUE)
    _bad_images(root)
    statements = [
        ("In the left image the black side is on the left.", "True"),
        ("In the right image the black side is on the left.", "False"),
        ("The right image is red and blue.", "True"),
        ("The left image is red and blue.", "False"),
        ("In the left image the white side is on the right.", True),
        ("In the left image the black side is on the right.", False),
        ("There is a dog in the image", False),  # no side: never changes
    ]
    recs = [{"images": ["a.png", "b.png"], "sentence": s, "label": y} for s, y in statements * 2]
    recs.insert(2, {"images": ["crc.png", "b.png"], "sentence": "bad left", "label": True})
    recs.insert(13, {"images": ["a.png", "corrupt.png"], "sentence": "bad right", "label": False})
    return _write(root / "train.json", recs)


def _cfg(loader: str, *, ve: Path | None = None, nlvr: Path | None = None, swap: bool = True) -> Config:
    cfg = Config()
    cfg.model.vision.image_size = S
    if ve is not None:
        cfg.ve.train_file = [str(ve)]
    if nlvr is not None:
        cfg.nlvr.train_file = [str(nlvr)]
    cfg.nlvr.flip_swap = swap
    cfg.data.loader = loader
    cfg.data.num_workers = 0 if loader == "torch" else 2
    cfg.data.randaug_n = 0  # only resized and flipped: the halves keep their colours
    cfg.data.crop_scale = [1.0, 1.0]
    return cfg


def _epochs(build, cfg: Config, tok: TextTokenizer, epochs: int = 3, seed: int = 0) -> list[dict]:
    loader, sampler = build(cfg, tok, batch_size=8, seed=seed)
    out = []
    for e in range(epochs):
        sampler.set_epoch(e)
        out += list(loader)
    return out


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        set(x) == set(y) and all(x[k] == y[k] if k == "num_skipped" else torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b)
    )


def _ids(tok: TextTokenizer, row_ids: torch.Tensor, row_mask: torch.Tensor) -> list[int]:
    return row_ids[: int(row_mask.sum())].tolist()


def _looks(img: torch.Tensor) -> tuple[str, bool]:
    """("A" black | white or "B" red | blue, mirrored?) of a loader image [3, S, S]."""
    left, right = img[:, :, : S // 2 - 2], img[:, :, S // 2 + 2 :]
    if float((img[0] - img[2]).abs().mean()) > 1.0:  # red vs blue channel: B
        return "B", float(left[2].mean()) > float(right[2].mean())  # blue on the left: mirrored
    return "A", float(left.mean()) > float(right.mean())  # white on the left: mirrored


def _statement_true(sentence: str, looks: dict[str, tuple[str, bool]]) -> bool:
    """Truth of one of nlvr_set's (cleaned) statements given what each side shows."""
    words = sentence.split()
    if sentence == "there is a dog in the image":
        return False
    kind, mirrored = looks[words[1] if words[0] == "the" else words[2]]
    if words[-3:] == ["red", "and", "blue"]:
        return kind == "B"
    colour, where = words[5], words[-1]  # "in the <img> image the <colour> side is on the <where>"
    if kind != "A":
        return False
    black_on = "right" if mirrored else "left"
    return (where == black_on) == (colour == "black")


@pytest.mark.parametrize("loader", ["torch", "dali"])
@pytest.mark.parametrize("swap", [True, False])
def test_nlvr_loader_batches_and_flip(nlvr_set: Path, tok: TextTokenizer, loader: str, swap: bool) -> None:
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    records = load_nlvr_records(nlvr_set)
    batches = _epochs(build_nlvr_train_loader, _cfg(loader, nlvr=nlvr_set, swap=swap), tok)
    assert len(batches) == 6
    seen, changed, broken, n, skipped = set(), 0, 0, 0, 0
    for b in batches:
        assert set(b) == NLVR_KEYS
        B = b["index"].numel()
        n += B
        skipped += b["num_skipped"]
        for k in ("image0", "image1"):
            assert b[k].shape == (B, 3, S, S) and b[k].dtype == torch.float32 and b[k].is_contiguous()
        assert (
            b["input_ids"].dtype
            == b["attention_mask"].dtype
            == b["label"].dtype
            == b["index"].dtype
            == torch.long
        )
        assert b["input_ids"].shape[0] == B and b["label"].shape == (B,)
        for q in range(B):
            rec = records[int(b["index"][q])]
            assert int(b["label"][q]) == rec["label"]
            looks0, looks1 = _looks(b["image0"][q]), _looks(b["image1"][q])
            seen.add((looks0, looks1))
            text = clean_caption(rec["sentence"], 30)
            got = _ids(tok, b["input_ids"][q], b["attention_mask"][q])
            options = {
                tuple(tok.encode([text])[0]): text,
                tuple(tok.encode([swap_left_right(text)])[0]): "swapped",
            }
            assert tuple(got) in options
            sentence = swap_left_right(text) if options[tuple(got)] == "swapped" else text
            changed += sentence != text
            truth = _statement_true(sentence, {"left": looks0, "right": looks1})
            if swap:
                # The pair as it is, or its mirror: images swapped, both mirrored, left/right swapped.
                assert (looks0, looks1) in ((("A", False), ("B", False)), (("B", True), ("A", True)))
                if "left" in text or "right" in text:
                    assert (sentence != text) == (looks0[0] == "B")  # the text swapped with the images
                assert truth == bool(rec["label"]), (sentence, looks0, looks1)
            else:
                assert looks0[0] == "A" and looks1[0] == "B" and sentence == text  # never swapped
                broken += truth != bool(rec["label"])
    # Every epoch meets both unusable pairs (and may meet them again refilling its last batch); batches
    # are refilled to 8, so the 2 batches of an epoch hold 16 pairs.
    assert skipped >= 2 * 3 and n == 16 * 3
    if swap:
        assert seen == {(("A", False), ("B", False)), (("B", True), ("A", True))} and changed > 0
    else:  # each image flipped on its own; the text left as it is, so some statements turn false
        assert {(a[1], b[1]) for a, b in seen} == {(x, y) for x in (False, True) for y in (False, True)}
        assert changed == 0 and broken > 0


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_nlvr_loader_reproducible(nlvr_set: Path, tok: TextTokenizer, loader: str) -> None:
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = _cfg(loader, nlvr=nlvr_set)
    cfg.data.randaug_n, cfg.data.crop_scale = 2, [0.5, 1.0]  # the full augmentation, per image
    a = _epochs(build_nlvr_train_loader, cfg, tok, epochs=2)
    assert _same(a, _epochs(build_nlvr_train_loader, cfg, tok, epochs=2))
    other = _epochs(build_nlvr_train_loader, cfg, tok, epochs=1, seed=1)
    assert not torch.equal(other[0]["index"], a[0]["index"])
    if loader == "dali":  # the same samples in the same order as the reference backend
        ref = _epochs(build_nlvr_train_loader, _cfg("torch", nlvr=nlvr_set), tok, epochs=2)
        assert all(torch.equal(x["index"], y["index"]) for x, y in zip(ref, a, strict=True))


def test_empty_batches_have_the_keys(tok: TextTokenizer) -> None:
    b = NLVRCollator(NLVRText(tok, max_words=30, flip_swap=True))([None, None, None])
    assert set(b) == NLVR_KEYS and b["num_skipped"] == 3 and b["label"].shape == (0,)
    assert b["image0"].shape[0] == b["image1"].shape[0] == b["input_ids"].shape[0] == 0
    b = SentenceLabelCollator(SentenceLabelText(tok, max_words=30))([None])
    assert set(b) == VE_KEYS and b["num_skipped"] == 1 and b["label"].dtype == torch.long


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_ve_loader_batches(ve_set: Path, tok: TextTokenizer, loader: str) -> None:
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    records = load_ve_records(ve_set)
    cfg = _cfg(loader, ve=ve_set)
    batches = _epochs(build_ve_train_loader, cfg, tok)
    n, skipped, mirrored = 0, 0, set()
    for b in batches:
        assert set(b) == VE_KEYS
        B = b["index"].numel()
        n += B
        skipped += b["num_skipped"]
        assert b["image"].shape == (B, 3, S, S) and b["image"].dtype == torch.float32
        assert b["label"].dtype == b["input_ids"].dtype == torch.long and b["label"].shape == (B,)
        for q in range(B):
            rec = records[int(b["index"][q])]
            assert int(b["label"][q]) == rec["label"]
            want = tok.encode([clean_caption(rec["sentence"], 30)])[0]
            assert _ids(tok, b["input_ids"][q], b["attention_mask"][q]) == want  # the flip never touches it
            mirrored.add(_looks(b["image"][q])[1])
    assert skipped >= 2 * 3 and n == 16 * 3 and mirrored == {False, True}  # refilled batches, as above
    assert _same(batches[:2], _epochs(build_ve_train_loader, cfg, tok, epochs=1))  # reproducible
    if loader == "dali":
        ref = _epochs(build_ve_train_loader, _cfg("torch", ve=ve_set), tok)
        assert all(
            torch.equal(x["index"], y["index"]) and torch.equal(x["label"], y["label"])
            for x, y in zip(ref, batches, strict=True)
        )


def test_loaders_need_train_files(tok: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="ve.train_file is empty"):
        build_ve_train_loader(Config(), tok, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="nlvr.train_file is empty"):
        build_nlvr_train_loader(Config(), tok, batch_size=2, seed=0)


# -------------------------------------------------------------------------------------------- eval sets
@pytest.fixture(scope="module")
def eval_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nv_eval")
    for k, c in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]):
        Image.new("RGB", (24, 20), c).save(root / f"{k}.png")
    ve = [
        {"image": "0.png", "sentence": "The sky is Blue!", "label": "entailment", "hypothesis_type": "a"},
        {"image": "1.png", "sentence": "one two three four five", "label": 0, "hypothesis_type": "b"},
        {"image": "2.png", "sentence": "x", "label": "neutral", "hypothesis_type": "a"},
        {"image": "0.png", "sentence": "y", "label": 1, "hypothesis_type": "a"},
        {"image": "3.png", "sentence": "z", "label": "contradiction", "hypothesis_type": "c"},
    ]
    _write(root / "ve.json", ve)
    pairs = [(0, 1), (2, 3), (1, 1), (3, 0), (2, 0)]
    nlvr = [
        {"images": [f"{a}.png", f"{b}.png"], "sentence": f"Pair {k}, left.", "label": k % 2 == 0}
        for k, (a, b) in enumerate(pairs)
    ]
    _write(root / "nlvr.json", nlvr)
    return root


def _expected(paths: list[str]) -> torch.Tensor:
    t = eval_transform(8)
    return torch.stack([t(Image.open(p).convert("RGB")) for p in paths])


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_ve_eval_set(eval_root: Path, loader: str, tmp_path: Path) -> None:
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    ev = VEEvalSet(eval_root / "ve.json", image_size=8, max_words=4, loader=loader)
    assert len(ev) == 5 and ev.labels == [2, 0, 1, 1, 0] and ev.types == ["a", "b", "a", "a", "c"]
    assert ev.sentences == ["the sky is blue", "one two three four", "x", "y", "z"]
    assert ev.images == [str(eval_root / f"{k}.png") for k in (0, 1, 2, 0, 3)]
    got = list(ev.image_batches(1, 5, batch_size=3))
    assert [i.tolist() for _, i in got] == [[1, 2, 3], [4]]
    x = torch.cat([b for b, _ in got])
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x, _expected(ev.images[1:5]), atol=0.02)
    assert list(ev.image_batches(2, 2, batch_size=2)) == []
    missing = _write(tmp_path / "m.json", [{"image": "gone", "sentence": "s", "label": 1}])
    with pytest.raises(FileNotFoundError, match=r"m\.json: 1 image\(s\) missing.*gone\.jpg"):
        VEEvalSet(missing, image_root=str(eval_root), image_size=8, max_words=4)
    with pytest.raises(ValueError, match="loader must be"):
        VEEvalSet(eval_root / "ve.json", image_size=8, max_words=4, loader="pil")


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_nlvr_eval_set(eval_root: Path, loader: str, tmp_path: Path) -> None:
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    ev = NLVREvalSet(eval_root / "nlvr.json", image_size=8, max_words=30, loader=loader)
    assert len(ev) == 5 and ev.labels == [1, 0, 1, 0, 1] and ev.types is None
    assert ev.sentences[1] == "pair 1 left"
    assert ev.images0 == [str(eval_root / f"{a}.png") for a in (0, 2, 1, 3, 2)]
    assert ev.images1 == [str(eval_root / f"{b}.png") for b in (1, 3, 1, 0, 0)]
    got = list(ev.image_batches(1, 5, batch_size=3))
    assert [i.tolist() for _, _, i in got] == [[1, 2, 3], [4]]
    x0, x1 = torch.cat([a for a, _, _ in got]), torch.cat([b for _, b, _ in got])
    assert x0.shape == x1.shape == (4, 3, 8, 8) and x0.dtype == torch.float32
    assert torch.allclose(x0, _expected(ev.images0[1:5]), atol=0.02)
    assert torch.allclose(x1, _expected(ev.images1[1:5]), atol=0.02)
    assert list(ev.image_batches(0, 0, batch_size=2)) == []
    recs = json.loads((eval_root / "nlvr.json").read_text())
    missing = _write(tmp_path / "m.json", [{**recs[0], "images": ["0.png", "gone.png"]}])
    with pytest.raises(FileNotFoundError, match="gone.png"):
        NLVREvalSet(missing, image_root=str(eval_root), image_size=8, max_words=30)
