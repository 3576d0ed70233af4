"""VQA data: record and answer-list checks, answer targets and tokens, question cleaning, the left/right swap,
the training loader through both backends (flip-swap consistency with the image content) and the eval set."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from albef_ds.config import Config
from albef_ds.data import TextTokenizer, clean_caption, eval_transform, train_wordpiece_vocab
from albef_ds.data.vqa import (
    VQACollator,
    VQAEvalSet,
    VQAText,
    answer_targets,
    build_vqa_train_loader,
    clean_question,
    load_answer_list,
    load_vqa_records,
    swap_left_right,
    tokenize_answers,
)

WORDS = "what colour is the left right side which black white dark grey red orange yes no a dog there"
BATCH_KEYS = {
    "image",
    "input_ids",
    "attention_mask",
    "answer_ids",
    "answer_mask",
    "answer_weight",
    "answer_count",
    "index",
    "num_skipped",
}


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_wordpiece_vocab(
        [WORDS] * 20, tmp_path_factory.mktemp("vqa_vocab") / "vocab.txt", vocab_size=120
    )


@pytest.fixture(scope="module")
def ids(vocab: Path) -> dict[str, int]:
    """Token -> id (a vocab.txt's ids are its line numbers); every word of WORDS is one token."""
    table = {t: i for i, t in enumerate(vocab.read_text().splitlines())}
    assert all(w in table for w in WORDS.split())
    return table


def _tok(vocab: Path, mode: str = "albef", max_tokens: int = 25) -> TextTokenizer:
    return TextTokenizer.from_path(vocab, max_tokens=max_tokens, mode=mode)


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------------------------------- records
def test_records_resolve_images_and_normalise_answers(tmp_path: Path) -> None:
    recs = [
        {
            "image": "coco/1.jpg",
            "question": "Q1?",
            "answer": ["red ", "red"],
            "dataset": "vqa",
            "question_id": 7,
        },
        {"image": "vg/2.jpg", "question": "Q2?", "answer": " left", "dataset": "vg", "question_id": "vg_2"},
        {"image": "/abs/3.jpg", "question": "Q3?", "answer": ["no"], "dataset": "vqa"},
    ]
    f = _write(tmp_path / "train.json", recs)
    out = load_vqa_records(f, need_answers=True)  # "" roots: relative to the file's folder
    assert [r["image"] for r in out] == [
        str(tmp_path / "coco/1.jpg"),
        str(tmp_path / "vg/2.jpg"),
        "/abs/3.jpg",
    ]
    assert [r["answer"] for r in out] == [["red", "red"], ["left"], ["no"]]
    assert [r["question_id"] for r in out] == [7, "vg_2", None]
    assert [r["dataset"] for r in out] == ["vqa", "vg", "vqa"] and out[0]["question"] == "Q1?"
    out = load_vqa_records(f, vqa_root="/v", vg_root="/g", need_answers=True)
    assert [r["image"] for r in out] == ["/v/coco/1.jpg", "/g/vg/2.jpg", "/abs/3.jpg"]
    # A test record has no answers: allowed for evaluation (answer None), an error for training.
    test = _write(
        tmp_path / "test.json", [{"image": "a.jpg", "question": "Q?", "dataset": "vqa", "question_id": 1}]
    )
    assert load_vqa_records(test, need_answers=False)[0]["answer"] is None
    with pytest.raises(ValueError, match=r"test\.json: entry 0 has no field 'answer'"):
        load_vqa_records(test, need_answers=True)


GOOD = {"image": "a.jpg", "question": "what?", "answer": ["x"], "dataset": "vqa", "question_id": 1}


@pytest.mark.parametrize(
    "change, need_answers, message",
    [
        ({"question": None}, True, "field 'question' must be a str"),
        ({"answer": "x"}, True, "field 'answer' of a 'vqa' record must be a non-empty list of str"),
        ({"answer": []}, True, "field 'answer' of a 'vqa' record must be a non-empty list of str"),
        ({"answer": ["x", 3]}, True, "field 'answer' of a 'vqa' record"),
        ({"dataset": "vg", "answer": ["x"]}, True, "field 'answer' of a 'vg' record must be one str"),
        ({"dataset": "coco"}, True, "field 'dataset' must be one of"),
        ({"image": ""}, True, "field 'image' must be a non-empty str"),
        ({"question_id": True}, False, "field 'question_id' must be an int or a str"),
        ({"question_id": 1.5}, True, "field 'question_id' must be an int or a str"),
        ({"question_id": ...}, False, "has no field 'question_id'"),
        ({"dataset": ...}, True, "has no field 'dataset'"),
        ({"image": ...}, False, "has no field 'image'"),
    ],
)
def test_record_errors_name_file_entry_field(
    tmp_path: Path, change: dict, need_answers: bool, message: str
) -> None:
    bad = {k: v for k, v in {**GOOD, **change}.items() if v is not ...}
    f = _write(tmp_path / "bad.json", [GOOD, bad])
    with pytest.raises(ValueError, match=rf"VQA file {f}: entry 1.*{message}"):
        load_vqa_records(f, need_answers=need_answers)


def test_record_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_vqa_records(tmp_path / "nope.json", need_answers=True)
    f = _write(tmp_path / "x.json", [GOOD, "not an object"])
    with pytest.raises(ValueError, match=r"x\.json: entry 1 must be an object"):
        load_vqa_records(f, need_answers=True)
    with pytest.raises(ValueError, match="non-empty JSON list"):
        load_vqa_records(_write(tmp_path / "empty.json", []), need_answers=True)


def test_answer_list(tmp_path: Path) -> None:
    assert load_answer_list(_write(tmp_path / "a.json", ["yes", "no", "2"])) == ["yes", "no", "2"]
    with pytest.raises(ValueError, match=r"answer 'no' appears twice \(entries 1 and 3\)"):
        load_answer_list(_write(tmp_path / "b.json", ["yes", "no", "2", "no"]))
    with pytest.raises(ValueError, match=r"c\.json: entry 1 must be a non-empty str"):
        load_answer_list(_write(tmp_path / "c.json", ["yes", " "]))
    with pytest.raises(ValueError, match=r"d\.json: entry 0 must be a non-empty str"):
        load_answer_list(_write(tmp_path / "d.json", [3]))


# ---------------------------------------------------------------------------------------------- answers
def test_answer_targets() -> None:
    answers = ["red"] * 3 + ["orange", "dark red"] + ["red"] * 4 + ["orange"]  # 7 red, 2 orange, 1 dark red
    uniq, w = answer_targets(answers, "vqa", 0.5)
    assert uniq == ["red", "orange", "dark red"]  # first appearance
    assert w == pytest.approx([0.7, 0.2, 0.1])
    assert answer_targets(["left"], "vg", 0.5) == (["left"], [0.5])
    assert answer_targets(["left"], "vg", 1.0) == (["left"], [1.0])
    with pytest.raises(ValueError, match="dataset"):
        answer_targets(["x"], "gqa", 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        answer_targets(["x", "y"], "vg", 0.5)


@pytest.mark.parametrize("mode", ["albef", "standard"])
def test_tokenize_answers(vocab: Path, ids: dict[str, int], mode: str) -> None:
    cls, sep = ids["[CLS]"], ids["[SEP]"]
    out = tokenize_answers(_tok(vocab, mode), ["red", " dark red ", "dark red orange white"], max_tokens=4)
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.long
    assert out["input_ids"].tolist() == [
        [cls, ids["red"], sep, 0],  # right-padded with [PAD] (id 0)
        [cls, ids["dark"], ids["red"], sep],  # surrounding whitespace stripped
        [cls, ids["dark"], ids["red"], sep],  # cut to 4 tokens, [SEP] kept
    ]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    # A tokenizer capped below the answer cap does not cut the answers shorter.
    short = tokenize_answers(_tok(vocab, mode, max_tokens=3), ["dark red orange white"], max_tokens=5)
    assert short["input_ids"].tolist() == [[cls, ids["dark"], ids["red"], ids["orange"], sep]]
    empty = tokenize_answers(_tok(vocab, mode), [], max_tokens=4)
    assert empty["input_ids"].shape == (0, 0)


# ------------------------------------------------------------------------------------------------- text
def test_clean_question() -> None:
    assert clean_question("What's the man's (left) hand holding?", 30) == "whats the mans left hand holding"
    assert clean_question("Is this a T-shirt/top?", 30) == "is this a t shirt top"
    assert clean_question("  How   many\tdogs ?  ", 30) == "how many dogs"
    assert clean_question("one two three four five", 3) == "one two three"
    # clean_caption's "<person>" rewrite is caption-only: pre_question keeps the token.
    assert clean_caption("Is <Person> here?", 30) == "is person here"
    assert clean_question("Is <Person> here? <a>", 30) == "is <person> here <a>"
    assert clean_question("Is <person>, \ue000 here?", 30) == "is <person> \ue000 here"


def test_swap_left_right() -> None:
    assert swap_left_right("what is on the left side") == "what is on the right side"
    assert swap_left_right("the leftmost or the rightmost one") == "the rightmost or the leftmost one"
    assert swap_left_right("Left, RIGHT and left-right") == "Right, LEFT and right-left"
    assert swap_left_right("a bright lefty leftover rightly") == "a bright lefty leftover rightly"
    text = "left right leftmost right"
    assert swap_left_right(swap_left_right(text)) == text


# ------------------------------------------------------------------------------------------ the loaders
def _half_image(path: Path, size: int = 32) -> None:
    """Black on the left half, white on the right half."""
    a = np.zeros((size, size, 3), np.uint8)
    a[:, size // 2 :] = 255
    Image.fromarray(a).save(path)


@pytest.fixture(scope="module")
def flip_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 half black / half white images, three questions each, plus two unusable images: 32 records (4
    batches of 8). One is not an image (skipped before decoding); the other passes the header checks and
    fails in the decoder (DALI retries its batch sample by sample)."""
    root = tmp_path_factory.mktemp("vqa_flip")
    (root / "img").mkdir()
    recs = []
    for k in range(10):
        _half_image(root / "img" / f"{k}.png")
        image = f"img/{k}.png"
        recs += [
            {
                "image": image,
                "question": "What colour is the left side?",
                "answer": ["black"] * 7 + ["dark"] * 2 + ["grey"],
                "dataset": "vqa",
                "question_id": 3 * k,
            },
            {
                "image": image,
                "question": "Which side is black?",
                "answer": ["left"] * 8 + ["left side"] * 2,
                "dataset": "vqa",
                "question_id": 3 * k + 1,
            },
            {"image": image, "question": "Which side is white?", "answer": "right", "dataset": "vg"},
        ]
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    png[png.index(b"IDAT") + 60] ^= 0xFF  # a corrupt stream behind valid headers
    (root / "img" / "crc.png").write_bytes(bytes(png))
    recs.insert(17, {"image": "img/corrupt.png", "question": "What?", "answer": ["x"], "dataset": "vqa"})
    recs.insert(4, {"image": "img/crc.png", "question": "What?", "answer": "x", "dataset": "vg"})
    return _write(root / "train.json", recs)


def _cfg(train: Path, loader: str, swap: bool = True) -> Config:
    cfg = Config()
    cfg.model.vision.image_size = 16
    cfg.vqa.train_file = [str(train)]
    cfg.vqa.flip_swaps_left_right = swap
    cfg.data.loader = loader
    cfg.data.num_workers = 0 if loader == "torch" else 2
    cfg.data.randaug_n = 0  # only resized and flipped: the halves stay black and white
    cfg.data.crop_scale = [1.0, 1.0]
    return cfg


def _epochs(cfg: Config, vocab: Path, epochs: int = 3, seed: int = 0) -> list[dict]:
    loader, sampler = build_vqa_train_loader(cfg, _tok(vocab), batch_size=8, seed=seed)
    out = []
    for e in range(epochs):
        sampler.set_epoch(e)
        out += list(loader)
    return out


def _side(row: torch.Tensor, ids: dict[str, int]) -> str:
    has = {w for w in ("left", "right") if (row == ids[w]).any()}
    assert len(has) == 1, row
    return has.pop()


def _check_batches(batches: list[dict], records: list[dict], ids: dict[str, int], swap: bool) -> None:
    """Format, answer targets and the consistency of the (possibly swapped) text with the image."""
    seen_black, changed, skipped, n = set(), 0, 0, 0
    for b in batches:
        assert set(b) == BATCH_KEYS
        B, N = b["index"].numel(), b["answer_ids"].shape[0]
        n += B
        skipped += b["num_skipped"]
        assert b["image"].shape == (B, 3, 16, 16) and b["image"].dtype == torch.float32
        assert b["input_ids"].dtype == b["attention_mask"].dtype == torch.long
        assert b["input_ids"].shape[0] == B and b["answer_mask"].shape == b["answer_ids"].shape
        assert b["answer_ids"].dtype == b["answer_mask"].dtype == b["answer_count"].dtype == torch.long
        assert b["answer_weight"].dtype == torch.float32 and b["answer_weight"].shape == (N,)
        assert b["answer_count"].shape == (B,) and int(b["answer_count"].sum()) == N
        assert (b["answer_ids"][:, 0] == ids["[CLS]"]).all()
        last = b["answer_mask"].sum(1) - 1  # [N] position of each answer's final token
        assert (b["answer_ids"][torch.arange(N), last] == ids["[SEP]"]).all()
        starts = (
            torch.cumsum(b["answer_count"], 0) - b["answer_count"]
        )  # [B] first answer row of each question
        for q in range(B):
            rec = records[int(b["index"][q])]
            _, want = answer_targets(rec["answer"], rec["dataset"], 0.5)
            rows = slice(int(starts[q]), int(starts[q] + b["answer_count"][q]))
            assert b["answer_weight"][rows].tolist() == pytest.approx(want)
            img = b["image"][q]
            black = "left" if img[:, :, :6].mean() < img[:, :, 10:].mean() else "right"
            assert abs(float(img[:, :, :6].mean() - img[:, :, 10:].mean())) > 2.0  # one black, one white half
            seen_black.add(black)
            if (
                "colour" in rec["question"]
            ):  # "what colour is the <side> side" -> black: <side> is the black half
                side, orig = _side(b["input_ids"][q], ids), "left"
            else:  # "which side is black / white" -> <side> (the black / the white half)
                side, orig = _side(b["answer_ids"][int(starts[q])], ids), rec["answer"][0]
            changed += side != orig
            if swap:
                assert (side == black) == ("white" not in rec["question"]), (rec, side, black)
    assert seen_black == {"left", "right"}  # both flipped and unflipped views occurred
    assert (changed > 0) == swap  # with the option off the text never changes
    epochs = len(batches) // 4
    # Every epoch meets both unusable images (and may meet them again refilling its last batch); batches
    # are refilled to 8, so the 4 batches of an epoch hold 32 questions.
    assert skipped >= 2 * epochs and n == 32 * epochs


@pytest.mark.parametrize("swap", [True, False])
def test_torch_loader_batches_and_flip_swap(
    flip_set: Path, vocab: Path, ids: dict[str, int], swap: bool
) -> None:
    records = load_vqa_records(flip_set, need_answers=True)
    batches = _epochs(_cfg(flip_set, "torch", swap), vocab)
    _check_batches(batches, records, ids, swap)
    if swap:  # reproducible for a seed; another seed gives other views
        again = _epochs(_cfg(flip_set, "torch", swap), vocab, epochs=1)
        for a, b in zip(batches[:4], again, strict=True):
            assert all(torch.equal(a[k], b[k]) for k in BATCH_KEYS - {"num_skipped"})
        other = _epochs(_cfg(flip_set, "torch", swap), vocab, epochs=1, seed=1)
        assert not torch.equal(other[0]["index"], batches[0]["index"])


def test_empty_batch_has_the_vqa_keys(vocab: Path) -> None:
    text = VQAText(_tok(vocab), max_question_words=30, max_answer_tokens=10, vg_weight=0.5, swap_on_flip=True)
    b = VQACollator(text)([None, None])
    assert set(b) == BATCH_KEYS and b["num_skipped"] == 2
    assert b["index"].numel() == b["answer_ids"].shape[0] == b["answer_weight"].numel() == 0


@pytest.mark.parametrize("swap", [True, False])
def test_dali_loader_batches_and_flip_swap(
    flip_set: Path, vocab: Path, ids: dict[str, int], swap: bool
) -> None:
    pytest.importorskip("nvidia.dali")
    from albef_ds.data.dali import DaliImageTextLoader

    records = load_vqa_records(flip_set, need_answers=True)
    cfg = _cfg(flip_set, "dali", swap)
    loader, _ = build_vqa_train_loader(cfg, _tok(vocab), batch_size=8, seed=0)
    assert isinstance(loader, DaliImageTextLoader)
    batches = _epochs(cfg, vocab)
    _check_batches(batches, records, ids, swap)
    # Same sampler as the torch backend: the same questions in the same order; unswapped, the same text.
    ref = _epochs(_cfg(flip_set, "torch", swap), vocab)
    for a, b in zip(ref, batches, strict=True):
        assert torch.equal(a["index"], b["index"])
        if not swap:
            keys = (
                "input_ids",
                "attention_mask",
                "answer_ids",
                "answer_mask",
                "answer_weight",
                "answer_count",
            )
            assert all(torch.equal(a[k], b[k]) for k in keys)


# --------------------------------------------------------------------------------------------- eval set
@pytest.fixture(scope="module")
def eval_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vqa_eval")
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for k, c in enumerate(colours):
        Image.new("RGB", (24, 20), c).save(root / f"{k}.png")
    recs = [
        {
            "image": "0.png",
            "question": "What colour is it?",
            "answer": ["red"] * 10,
            "dataset": "vqa",
            "question_id": 10,
        },
        {"image": "1.png", "question": "Is the T-shirt green?", "dataset": "vqa", "question_id": 11},
        {"image": "0.png", "question": "One two three four five six", "dataset": "vqa", "question_id": "x12"},
        {"image": "2.png", "question": "Blue?", "answer": ["yes"], "dataset": "vqa", "question_id": 13},
        {
            "image": "1.png",
            "question": "Left or right?",
            "answer": ["left"],
            "dataset": "vqa",
            "question_id": 14,
        },
    ]
    return _write(root / "test.json", recs)


def test_eval_set_order_cleaning_answers(eval_file: Path, tmp_path: Path) -> None:
    ev = VQAEvalSet(eval_file, image_size=8, max_words=4)
    assert len(ev) == 5 and ev.question_ids == [10, 11, "x12", 13, 14]
    assert ev.questions == [
        "what colour is it",
        "is the t shirt",
        "one two three four",
        "blue",
        "left or right",
    ]
    assert ev.answers == [["red"] * 10, None, None, ["yes"], ["left"]] and not ev.has_answers
    assert ev.images == [str(eval_file.parent / f"{k}.png") for k in (0, 1, 0, 2, 1)]
    recs = json.loads(eval_file.read_text())
    answered = _write(tmp_path / "val.json", [r for r in recs if "answer" in r])
    assert VQAEvalSet(answered, vqa_root=str(eval_file.parent), image_size=8, max_words=4).has_answers
    missing = _write(tmp_path / "missing.json", [{**recs[0], "image": "gone.png"}])
    with pytest.raises(FileNotFoundError, match="gone.png"):
        VQAEvalSet(missing, vqa_root=str(eval_file.parent), image_size=8, max_words=4)
    dup = _write(tmp_path / "dup.json", [recs[0], {**recs[3], "question_id": 10}])
    with pytest.raises(ValueError, match="entries 0 and 1 share question_id 10"):
        VQAEvalSet(dup, vqa_root=str(eval_file.parent), image_size=8, max_words=4)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_eval_set_image_batches(eval_file: Path, loader: str) -> None:
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    ev = VQAEvalSet(eval_file, image_size=8, max_words=30, loader=loader)
    got = list(ev.image_batches(1, 5, batch_size=3))
    assert [i.tolist() for _, i in got] == [[1, 2, 3], [4]]
    x = torch.cat([b for b, _ in got])
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    t = eval_transform(8)
    want = torch.stack([t(Image.open(ev.images[q]).convert("RGB")) for q in range(1, 5)])
    assert torch.allclose(x, want, atol=0.02)  # solid colours: resampling leaves them (almost) as they are
    assert list(ev.image_batches(3, 3, batch_size=2)) == []
