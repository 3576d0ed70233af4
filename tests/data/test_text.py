from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from albef_ds.data import SPECIAL_TOKENS, TextTokenizer, clean_caption, train_wordpiece_vocab


# ------------------------------------------------------------------------------------------ clean_caption
def test_clean_caption_strips_punctuation_and_lowercases() -> None:
    raw = 'A Man\'s "dog" (big)! Is it? #yes: *really*; ~ok, sure.'
    assert clean_caption(raw, 30) == "a mans dog big is it yes really ok sure"


def test_clean_caption_hyphen_slash_person_whitespace() -> None:
    assert clean_caption("black-and-white cat/dog", 30) == "black and white cat dog"
    assert clean_caption("<person> rides a bike", 30) == "person rides a bike"
    assert clean_caption("  two \t spaces\n\nand   newlines  ", 30) == "two spaces and newlines"
    assert clean_caption("...", 30) == ""


def test_clean_caption_word_cap() -> None:
    words = [f"w{i}" for i in range(40)]
    assert clean_caption(" ".join(words), 30) == " ".join(words[:30])
    assert clean_caption("one two three", 2) == "one two"


def test_clean_caption_rejects_non_str() -> None:
    with pytest.raises(ValueError, match="str"):
        clean_caption(["a list"], 30)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ vocab
def test_vocab_special_tokens_first_and_exact_size(vocab_file: Path) -> None:
    lines = vocab_file.read_text().splitlines()
    assert lines[:5] == list(SPECIAL_TOKENS)
    assert len(lines) == 200  # padded with [unusedN] up to vocab_size
    assert len(set(lines)) == len(lines)
    for word in ("red", "circle", "striped"):
        assert word in lines


# -------------------------------------------------------------------------------------------- tokenizer
def test_albef_and_standard_modes(vocab_file: Path) -> None:
    albef = TextTokenizer.from_path(vocab_file, max_tokens=25, mode="albef")
    std = TextTokenizer.from_path(vocab_file, max_tokens=25, mode="standard")
    assert (
        albef.pad_token_id,
        albef.unk_token_id,
        albef.cls_token_id,
        albef.sep_token_id,
        albef.mask_token_id,
    ) == (
        0,
        1,
        2,
        3,
        4,
    )
    assert albef.vocab_size == 200 and albef.mode == "albef" and albef.max_tokens == 25
    texts = ["a red circle", "small blue square in the middle"]
    a, s = albef(texts), std(texts)
    for out in (a, s):
        assert out["input_ids"].dtype == torch.long and out["attention_mask"].dtype == torch.long
        assert (out["input_ids"][:, 0] == albef.cls_token_id).all()
    assert not (a["input_ids"] == albef.sep_token_id).any()
    lens_a = a["attention_mask"].sum(1)
    lens_s = s["attention_mask"].sum(1)
    assert torch.equal(lens_s, lens_a + 1)
    for i in range(2):
        # Same word pieces; standard ends each row's real tokens with [SEP].
        assert torch.equal(s["input_ids"][i, : lens_a[i]], a["input_ids"][i, : lens_a[i]])
        assert s["input_ids"][i, lens_s[i] - 1] == std.sep_token_id
        assert (s["input_ids"][i, : lens_s[i] - 1] != std.sep_token_id).all()
    assert "red circle" in albef.decode(a["input_ids"][0].tolist())


def test_padding_and_attention_mask(vocab_file: Path) -> None:
    tok = TextTokenizer.from_path(vocab_file, max_tokens=25)
    out = tok(["red", "a large red circle at the top of a striped background"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[1] == int(mask.sum(1).max())  # L = longest row
    assert mask[0].tolist() == [1] * int(mask[0].sum()) + [0] * (ids.shape[1] - int(mask[0].sum()))
    assert (ids[mask == 0] == tok.pad_token_id).all()
    assert (ids[mask == 1] != tok.pad_token_id).all()


@pytest.mark.parametrize("mode", ["albef", "standard"])
def test_truncation_keeps_max_tokens(vocab_file: Path, mode: str) -> None:
    tok = TextTokenizer.from_path(vocab_file, max_tokens=6, mode=mode)
    long = "a large red circle at the top of a striped background in the middle"
    out = tok([long, "red"])
    assert out["input_ids"].shape == (2, 6)
    row = out["input_ids"][0].tolist()
    assert row[0] == tok.cls_token_id
    if mode == "standard":
        assert row[-1] == tok.sep_token_id
    else:
        assert tok.sep_token_id not in row


def test_from_folder_layouts_match_vocab_file(vocab_file: Path, tmp_path: Path) -> None:
    from transformers import BertTokenizerFast

    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(vocab_file, plain / "vocab.txt")
    hf = tmp_path / "hf"
    BertTokenizerFast(vocab=str(vocab_file)).save_pretrained(str(hf))  # tokenizer.json layout
    assert (hf / "tokenizer.json").is_file()
    texts = ["there is a yellow triangle near the bottom", "purple cross"]
    ref = TextTokenizer.from_path(vocab_file, max_tokens=25)(texts)["input_ids"]
    for folder in (plain, hf):
        tok = TextTokenizer.from_path(folder, max_tokens=25)
        assert torch.equal(tok(texts)["input_ids"], ref), folder


def test_missing_and_invalid_paths(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        TextTokenizer.from_path(missing, max_tokens=25)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        TextTokenizer.from_path(empty, max_tokens=25)
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match="bad.txt"):
        TextTokenizer.from_path(bad, max_tokens=25)


def test_bad_mode_and_max_tokens(vocab_file: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        TextTokenizer.from_path(vocab_file, max_tokens=25, mode="bert")
    with pytest.raises(ValueError, match="max_tokens"):
        TextTokenizer.from_path(vocab_file, max_tokens=2, mode="standard")


def test_pickle_round_trip(vocab_file: Path) -> None:
    tok = TextTokenizer.from_path(vocab_file, max_tokens=12, mode="standard")
    clone = pickle.loads(pickle.dumps(tok))
    texts = ["a large red circle", "the cross is purple and small"]
    assert torch.equal(clone(texts)["input_ids"], tok(texts)["input_ids"])
    assert clone.mode == "standard" and clone.max_tokens == 12


def test_empty_batch(vocab_file: Path) -> None:
    out = TextTokenizer.from_path(vocab_file, max_tokens=25)([])
    assert out["input_ids"].shape == (0, 0)


def test_train_vocab_rejects_tiny_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_wordpiece_vocab(["a b"], tmp_path / "v.txt", vocab_size=5)
