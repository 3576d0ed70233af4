"""vqa_metric.py: the official VQA normalisation and accuracy, per-type scores, the EvalAI file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from albef_ds.eval.vqa_metric import (
    CONTRACTIONS,
    majority_answer,
    normalize_answer,
    vqa_accuracy,
    vqa_scores,
    write_evalai,
)


def _by_hand(k: int, n: int = 10) -> float:
    # k of n annotators gave the prediction: leaving one of them out leaves k - 1 matches, any other k.
    return (k * min(1, (k - 1) / 3) + (n - k) * min(1, k / 3)) / n


@pytest.mark.parametrize(("k", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_accuracy(k: int, expected: float) -> None:
    humans = ["cat"] * k + ["dog", "bird"] * 5
    humans = humans[:10]
    assert humans.count("cat") == k
    assert vqa_accuracy("cat", humans) == pytest.approx(expected)
    assert vqa_accuracy("cat", humans) == pytest.approx(_by_hand(k))
    assert vqa_accuracy("cat", list(reversed(humans))) == pytest.approx(expected)  # order never matters


def test_accuracy_other_answer_counts() -> None:
    assert vqa_accuracy("x", ["x", "y", "z"]) == pytest.approx(_by_hand(1, 3))  # (0 + 2/3 + 2/3) / 3
    assert vqa_accuracy("x", ["x"]) == 0.0  # one answer: leaving it out leaves nothing to match
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("yes.", "yes"),
        ("Yes", "yes"),
        ("  yes\n", "yes"),
        ("yes\tno", "yes no"),
        ("2.5", "2.5"),
        ("2.", "2"),
        (".5", ".5"),
        ("ten", "10"),
        ("none", "0"),
        ("Zero", "0"),
        ("a dog", "dog"),
        ("The dog", "dog"),
        ("an apple tree", "apple tree"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("whats up", "what's up"),
        ("two dogs", "2 dogs"),
        ("1,000", "1000"),
        ("1,000 red, blue", "1000 red blue"),  # a digit-comma-digit: every punctuation mark is deleted
        ("red,blue", "red blue"),  # a comma touching no space becomes one
        ("red, blue", "red blue"),
        ("black/white", "black white"),
        ("black / white", "black white"),
        ("t-shirt", "t shirt"),
        ("yes!", "yes"),
        ("(yes)", "yes"),
        ("3:00", "3:00"),  # colons are kept
        ("don't", "don't"),  # apostrophes are kept
        ("o'clock", "o'clock"),
        ("a.b", "ab"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, normal: str) -> None:
    assert normalize_answer(raw) == normal


def test_contractions_table() -> None:
    assert len(CONTRACTIONS) == 114
    assert CONTRACTIONS["couldnt've"] == CONTRACTIONS["couldn'tve"] == "couldn't've"
    assert CONTRACTIONS["yall'd've"] == "y'all'd've" and CONTRACTIONS["twas"] == "'twas"
    assert CONTRACTIONS["somebody'd"] == "somebodyd"  # the official map's reversed entry, kept
    assert all(k == k.lower() and k != v for k, v in CONTRACTIONS.items())


def test_normalised_only_when_humans_disagree() -> None:
    # Disagreeing humans: the prediction and the answers are normalised before matching.
    assert vqa_accuracy("Two", ["2"] * 9 + ["3"]) == pytest.approx(1.0)
    assert vqa_accuracy("yes.", ["yes"] * 3 + ["Yes"] * 3 + ["no"] * 4) == pytest.approx(1.0)
    assert vqa_accuracy("a dog", ["dog", "dogs", "dogs"]) == pytest.approx(_by_hand(1, 3))
    # Unanimous humans: the official code compares the trimmed strings as they are.
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0  # whitespace is trimmed either way
    assert vqa_accuracy("yes", ["yes "] * 10) == 1.0


def test_vqa_scores_per_type() -> None:
    preds = ["yes", "2", "red", "no"]
    answers = [["yes"] * 10, ["two"] * 2 + ["3"] * 8, ["red"] * 3 + ["blue"] * 7, ["yes"] * 10]
    out = vqa_scores(preds, answers, ["yes/no", "number", "other", "yes/no"])
    assert out["questions"] == 4
    assert out["accuracy"] == pytest.approx(100 * (1.0 + 0.6 + 0.9 + 0.0) / 4)
    assert out["accuracy_yes/no"] == pytest.approx(50.0)
    assert out["accuracy_number"] == pytest.approx(60.0)
    assert out["accuracy_other"] == pytest.approx(90.0)
    assert set(vqa_scores(preds, answers)) == {"accuracy", "questions"}
    with pytest.raises(ValueError, match="answer lists"):
        vqa_scores(preds, answers[:3])
    with pytest.raises(ValueError, match="question types"):
        vqa_scores(preds, answers, ["a"])


def test_majority_answer() -> None:
    # Each question weighs 1 in total: "no" leads (0.6 + 1 against 1 + 0.4), although "yes" is given 14 times.
    train = [["yes"] * 10, ["No"] * 6 + ["yes"] * 4, ["no"] * 3, ["two", "2"]]
    assert majority_answer(train) == "no"
    assert majority_answer([["red"], ["blue"]]) == "blue"  # a tie goes to the alphabetically first
    assert majority_answer([["two"], ["2", "Two."]]) == "2"  # pooled after normalisation


def test_write_evalai_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out" / "vqa_test_answers.json"
    qids = [262148000, np.int64(7), "q3"]
    written = write_evalai(path, qids, ["yes", "2", "red"])
    assert written == path
    data = json.loads(path.read_text())
    assert data == [
        {"question_id": 262148000, "answer": "yes"},
        {"question_id": 7, "answer": "2"},
        {"question_id": "q3", "answer": "red"},
    ]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    write_evalai(path, [1], ["no"])  # replaces the file
    assert json.loads(path.read_text()) == [{"question_id": 1, "answer": "no"}]


def test_write_evalai_rejects_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "answers.json"
    with pytest.raises(ValueError, match="question_id 5 appears more than once"):
        write_evalai(path, [4, 5, 6, 5], ["a", "b", "c", "d"])
    assert not path.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="2 question ids but 1 answers"):
        write_evalai(path, [1, 2], ["a"])
    with pytest.raises(ValueError, match="must be an int or a str"):
        write_evalai(path, [1.5], ["a"])
    with pytest.raises(ValueError, match="must be a str"):
        write_evalai(path, [1], [3])
