"""The standard VQA accuracy (the VQA challenge's evaluation semantics), per-type scores, and the EvalAI
result file.

Accuracy of one question with n human answers (10 in VQA v2): each annotator is left out in turn, the
prediction scores min(1, matches among the other n - 1 answers / 3), and the n scores are averaged. With k
of 10 answers matching, that is (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10: 0, 0.3, 0.6, 0.9
and 1.0 for k = 0..4.

Normalisation follows the official evaluation (`normalize_answer` lists the cases). As in the official code
the prediction and the human answers are compared *normalised only when the human answers disagree*; when
all n answers are the same string (after trimming whitespace) the comparison is exact. That changes a result
only when normalisation would have made a prediction equal to a unanimous answer it differs from as written
("Yes" or "two" against ten times "yes" or "2": official score 0). Predictions ranked from an answer list of
normalised answers are unaffected.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

# Punctuation the official code deletes or turns into a space (not "." nor "'" nor ":").
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA = re.compile(r"\d,\d")  # "1,000": then every punctuation character is deleted, never spaced
# A period not followed by a digit: the official pattern (?!<=\d)(\.)(?!\d) means to look behind too, but
# its "(?!<=" is a look-ahead for the text "<=", so the character before the period never matters.
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32  # the official call passes re.UNICODE (32) as `count`: at most 32 periods are removed
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# The official contractions map, inverted for reading: each contracted form, then the spellings that become
# it. Only lower-case spellings are listed: words are lower-cased first, so the official map's capitalised
# keys ("Im", "Ive", "Id've", "I'dve") never match, nor do its two identities ("let's", "she's").
_CONTRACTED = """
ain't: aint | aren't: arent | can't: cant | could've: couldve | couldn't: couldnt
couldn't've: couldnt've couldn'tve | didn't: didnt | doesn't: doesnt | don't: dont | hadn't: hadnt
hadn't've: hadnt've hadn'tve | hasn't: hasnt | haven't: havent | he'd: hed | he'd've: hed've he'dve
he's: hes | how'd: howd | how'll: howll | how's: hows | isn't: isnt | it'd: itd | it'd've: itd've it'dve
it'll: itll | ma'am: maam | mightn't: mightnt | mightn't've: mightnt've mightn'tve | might've: mightve
mustn't: mustnt | must've: mustve | needn't: neednt | not've: notve | o'clock: oclock | oughtn't: oughtnt
'ow's'at: ow's'at 'ows'at 'ow'sat | shan't: shant | she'd've: shed've she'dve | should've: shouldve
shouldn't: shouldnt | shouldn't've: shouldnt've shouldn'tve
somebodyd: somebody'd
somebody'd've: somebodyd've somebody'dve | somebody'll: somebodyll | somebody's: somebodys
someone'd: someoned | someone'd've: someoned've someone'dve | someone'll: someonell | someone's: someones
something'd: somethingd | something'd've: somethingd've something'dve | something'll: somethingll
that's: thats | there'd: thered | there'd've: thered've there'dve | there're: therere | there's: theres
they'd: theyd | they'd've: theyd've they'dve | they'll: theyll | they're: theyre | they've: theyve
'twas: twas | wasn't: wasnt | we'd've: wed've we'dve | we've: weve | weren't: werent | what'll: whatll
what're: whatre | what's: whats | what've: whatve | when's: whens | where'd: whered | where's: wheres
where've: whereve | who'd: whod | who'd've: whod've who'dve | who'll: wholl | who's: whos | who've: whove
why'll: whyll | why're: whyre | why's: whys | won't: wont | would've: wouldve | wouldn't: wouldnt
wouldn't've: wouldnt've wouldn'tve | y'all: yall | y'all'll: yall'll y'allll
y'all'd've: yall'd've y'alld've y'all'dve | you'd: youd | you'd've: youd've you'dve | you'll: youll
you're: youre | you've: youve
"""
# ("somebodyd: somebody'd" is the official map's one reversed entry, kept: it rewrites "somebody'd".)


def _parse_contracted(table: str) -> dict[str, str]:
    out = {}
    for entry in table.replace("\n", "|").split("|"):
        if entry.strip():
            form, spellings = entry.split(":")
            out.update(dict.fromkeys(spellings.split(), form.strip()))
    return out


CONTRACTIONS: dict[str, str] = _parse_contracted(_CONTRACTED)  # spelling -> contracted form


def _trim(ans: str) -> str:
    return ans.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str) -> str:
    # Each punctuation character is deleted when it touches a space anywhere in the text (or the text holds
    # a digit-comma-digit), otherwise replaced by a space: "yes, no" -> "yes no", "black/white" -> "black
    # white", "1,000" -> "1000". The decision looks at the input text, never at a partly processed one.
    digit_comma = _DIGIT_COMMA.search(text) is not None
    table = {}
    for p in _PUNCT:
        if p in text:
            table[ord(p)] = None if digit_comma or f"{p} " in text or f" {p}" in text else " "
    return _PERIOD.sub("", text.translate(table), count=_MAX_PERIODS)


def _words(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(ans: str) -> str:
    """An answer in the official VQA evaluation's normal form.

    In order: newlines and tabs become spaces and the ends are trimmed; each punctuation character of
    ``;/[]"{}()=+\\_-><@`,?!`` is deleted where it touches a space or the text holds a digit-comma-digit
    ("1,000" -> "1000", "yes, no" -> "yes no"), else replaced by a space ("black/white" -> "black white");
    a period not followed by a digit is deleted ("yes." -> "yes", "2.5" and ".5" kept, "2." -> "2");
    apostrophes and colons are kept. Then the text is lower-cased and split on whitespace; the number words
    none, zero, one ... ten become digits ("none" -> "0", "two dogs" -> "2 dogs"); the articles a, an, the
    are dropped ("a dog" -> "dog"); the official contractions map is applied word by word ("dont" ->
    "don't", "whats" -> "what's"); the words are joined by single spaces.
    """
    return _words(_punctuation(_trim(ans)))


def vqa_accuracy(pred: str, human_answers: list[str]) -> float:
    """The official per-question VQA accuracy of `pred` in [0, 1] (see the module docstring).

    Like the official code, answers are normalised only when the human answers disagree; a single human
    answer always scores 0 (leaving it out leaves nothing to match).
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    humans = [_trim(a) for a in human_answers]
    pred = _trim(pred)
    if len(set(humans)) > 1:
        humans = [_words(_punctuation(a)) for a in humans]
        pred = _words(_punctuation(pred))
    n = len(humans)
    k = humans.count(pred)
    # An annotator giving `pred` leaves k - 1 matches among the others; any other annotator leaves k.
    return (k * min(1.0, (k - 1) / 3) + (n - k) * min(1.0, k / 3)) / n


def vqa_scores(
    preds: list[str], answers: list[list[str]], question_types: list[str] | None = None
) -> dict[str, float]:
    """{"accuracy": mean VQA accuracy in percent, "questions": n} plus "accuracy_<type>" (percent) for each
    question type when `question_types` gives one per question."""
    if len(preds) != len(answers):
        raise ValueError(f"{len(preds)} predictions but {len(answers)} answer lists")
    if question_types is not None and len(question_types) != len(preds):
        raise ValueError(f"{len(preds)} predictions but {len(question_types)} question types")
    if not preds:
        raise ValueError("vqa_scores needs at least one question")
    accs = [vqa_accuracy(p, a) for p, a in zip(preds, answers)]
    out: dict[str, float] = {"accuracy": 100.0 * math.fsum(accs) / len(accs), "questions": len(accs)}
    if question_types is not None:
        by_type: dict[str, list[float]] = defaultdict(list)
        for t, acc in zip(question_types, accs):
            by_type[t].append(acc)
        for t in sorted(by_type):
            out[f"accuracy_{t}"] = 100.0 * math.fsum(by_type[t]) / len(by_type[t])
    return out


def majority_answer(train_answers: list[list[str]]) -> str:
    """The "majority answer" baseline: the normalised answer with the largest summed weight over the
    training questions, a question's answer weighing count / len(answers) (ALBEF's training weights, so
    every question counts once); ties go to the alphabetically first answer."""
    weight: Counter[str] = Counter()
    for answers in train_answers:
        for ans, count in Counter(normalize_answer(a) for a in answers).items():
            weight[ans] += count / len(answers)
    if not weight:
        raise ValueError("majority_answer needs at least one answered training question")
    best = max(weight.values())
    return min(a for a, w in weight.items() if w == best)


def write_evalai(path: str | Path, question_ids: list, answers: list[str]) -> Path:
    """Write the EvalAI result file [{"question_id": qid, "answer": str}, ...] atomically and return its path.

    Question ids are kept as given (int or str; numpy integers become ints); a repeated id is a ValueError.
    """
    if len(question_ids) != len(answers):
        raise ValueError(f"{len(question_ids)} question ids but {len(answers)} answers")
    results = []
    seen = set()
    for qid, ans in zip(question_ids, answers):
        if isinstance(qid, numbers.Integral) and not isinstance(qid, bool):
            qid = int(qid)
        elif not isinstance(qid, str):
            raise ValueError(f"question_id must be an int or a str, got {type(qid).__name__} {qid!r}")
        if qid in seen:
            raise ValueError(f"question_id {qid!r} appears more than once")
        if not isinstance(ans, str):
            raise ValueError(f"answer of question {qid!r} must be a str, got {type(ans).__name__}")
        seen.add(qid)
        results.append({"question_id": qid, "answer": ans})
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # same folder: os.replace is an atomic rename
    try:
        tmp.write_text(json.dumps(results))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
