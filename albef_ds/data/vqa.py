"""VQA data in the ALBEF/LAVIS JSON layout: records, the answer list, answer targets, the training loader
(both backends) and the evaluation set.

Records: a JSON list of ::

    {"image": str, "question": str,
     "answer": [str] (dataset "vqa": the human answers, usually 10) | str ("vg"),
     "dataset": "vqa" | "vg", "question_id": int | str}

"image" is relative to `vqa_root` or `vg_root` by the record's dataset ("" = the JSON file's folder); an
absolute path is kept. Training records need "answer"; evaluation (test) records need "question_id" and may
lack "answer". Every format error names the file, the entry and the field.

The VQA batch format (`build_vqa_train_loader`, both backends)::

    {"image": float [B, 3, S, S]   (the training dtype; DALI: on the training device),
     "input_ids": long [B, Lq], "attention_mask": long [B, Lq]   the cleaned questions, tokenised,
     "answer_ids": long [N, La], "answer_mask": long [N, La]     each unique answer as [CLS] pieces [SEP],
                                                                 right-padded with the pad id,
     "answer_weight": float32 [N]                                its loss weight (`answer_targets`),
     "answer_count": long [B]                                    answers of each question (sum = N),
     "index": long [B]                                           record numbers (train files concatenated),
     "num_skipped": int}                                         samples dropped for an unusable image

The answer rows are grouped by question, in question order: question b owns the answer_count[b] rows after
those of questions 0..b-1, so `repeat_interleave(answer_count)` lines the question states up with them. A
batch whose images were all skipped has B = N = 0 and the same keys.

Training transform: the fine-tuning augmentation (random resized crop with data.crop_scale, horizontal flip
with p = 0.5 when data.hflip, RandAugment, CLIP normalisation). The flip is drawn from the sample's own RNG
(seeded by seed, epoch and index, as every other draw) rather than inside the transform, so the text side
knows it: with vqa.flip_swaps_left_right a flipped sample's question and answers swap "left" and "right"
(`swap_left_right`); the reference leaves them pointing at the wrong side.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torchvision.transforms import v2

from .annotations import read_json_list
from .batch import empty_batch
from .datasets import ImageTextDataset, load_image
from .evalset import EvalImages
from .loaders import TextSideSamples, build_train_loader
from .sources import DEFAULT_MAX_PIXELS, ImageTextSource, JsonListSource
from .text import TextTokenizer, clean_caption
from .transforms import split_at_crop

logger = logging.getLogger(__name__)

DATASETS = ("vqa", "vg")  # the record kinds: VQA v2 (human answer lists) and Visual Genome QA (one answer)


# ------------------------------------------------------------------------------------------------- text
def clean_question(question: str, max_words: int) -> str:
    """ALBEF's `pre_question`: `text.clean_caption`'s rules (lower-case; delete ``,.'!?"()*#:;~``; ``-`` and
    ``/`` become spaces; whitespace collapsed; at most `max_words` words) without its caption-only
    ``<person>`` -> ``person`` rewrite."""
    if not isinstance(question, str):
        raise ValueError(f"question must be a str, got {type(question).__name__} {question!r}")
    return clean_caption(question, max_words, person_tag=False)


_LEFT_RIGHT = re.compile(r"\b(left|right)(most)?\b", re.IGNORECASE)
_OTHER_SIDE = {"left": "right", "right": "left"}


def _other_side(m: re.Match) -> str:
    word, most = m.group(1), m.group(2) or ""
    new = _OTHER_SIDE[word.lower()]
    if word.isupper():
        new = new.upper()
    elif word[0].isupper():
        new = new.capitalize()
    return new + most


def swap_left_right(text: str) -> str:
    """`text` with the whole words "left" <-> "right" and "leftmost" <-> "rightmost" swapped (the text of a
    horizontally flipped image); capitalisation is kept, other words ("lefty", "bright") are left alone."""
    return _LEFT_RIGHT.sub(_other_side, text)


# ---------------------------------------------------------------------------------------------- records
def _check_record(e: Any, where: str, need_answers: bool) -> None:
    if not isinstance(e, dict):
        raise ValueError(
            f"{where} must be an object with image, question, answer, dataset, question_id; got "
            f"{type(e).__name__}"
        )
    required = ("image", "question", "dataset", "answer" if need_answers else "question_id")
    for key in required:
        if key not in e:
            kind = "training records need" if need_answers else "evaluation records need"
            raise ValueError(f"{where} has no field '{key}' ({kind} {', '.join(required)})")
    if not isinstance(e["image"], str) or not e["image"]:
        raise ValueError(f"{where}: field 'image' must be a non-empty str, got {e['image']!r}")
    if not isinstance(e["question"], str):
        raise ValueError(f"{where}: field 'question' must be a str, got {type(e['question']).__name__}")
    if e["dataset"] not in DATASETS:
        raise ValueError(f"{where}: field 'dataset' must be one of {DATASETS}, got {e['dataset']!r}")
    qid = e.get("question_id")
    if "question_id" in e and (isinstance(qid, bool) or not isinstance(qid, (int, str))):
        raise ValueError(f"{where}: field 'question_id' must be an int or a str, got {qid!r}")
    if "answer" not in e:
        return
    ans = e["answer"]
    if e["dataset"] == "vqa":
        if not isinstance(ans, list) or not ans or not all(isinstance(a, str) for a in ans):
            raise ValueError(
                f"{where}: field 'answer' of a 'vqa' record must be a non-empty list of str (the human "
                f"answers), got {ans!r:.80}"
            )
    elif not isinstance(ans, str):
        raise ValueError(f"{where}: field 'answer' of a 'vg' record must be one str, got {ans!r:.80}")


def load_vqa_records(
    path: str | Path, *, vqa_root: str = "", vg_root: str = "", need_answers: bool
) -> list[dict]:
    """Read and check a VQA JSON list. Returns one dict per record: "image" (absolute path), "question" (as
    given), "answer" (list of str, each stripped of surrounding whitespace; a 'vg' record's one answer as a
    one-item list; None when the record has none), "dataset", "question_id" (as given, None when absent),
    "question_type" (an optional str field, None when absent).

    `need_answers`: every record must have "answer" (training); otherwise every record must have
    "question_id" (evaluation) and "answer" is optional.
    """
    p = Path(path)
    data = read_json_list(p, what="VQA file", non_empty=True)
    here = os.path.dirname(os.path.abspath(p))
    roots = {
        "vqa": os.path.abspath(vqa_root) if vqa_root else here,
        "vg": os.path.abspath(vg_root) if vg_root else here,
    }
    out = []
    for i, e in enumerate(data):
        _check_record(e, f"VQA file {p}: entry {i}", need_answers)
        ans = e.get("answer")
        if ans is not None:
            ans = [a.strip() for a in ([ans] if isinstance(ans, str) else ans)]
        image = os.path.join(roots[e["dataset"]], e["image"])  # join keeps an absolute path as it is
        out.append(
            {
                "image": image,
                "question": e["question"],
                "answer": ans,
                "dataset": e["dataset"],
                "question_id": e.get("question_id"),
                # optional: a question type (the synthetic set has them) for per-type scores
                "question_type": e.get("question_type") if isinstance(e.get("question_type"), str) else None,
            }
        )
    return out


def load_answer_list(path: str | Path) -> list[str]:
    """The candidate answers ranked at inference: a JSON list of distinct non-empty str, kept as given (they
    are the strings written for EvalAI)."""
    data = read_json_list(path, what="VQA answer list", non_empty=True)
    seen: dict[str, int] = {}
    for i, a in enumerate(data):
        if not isinstance(a, str) or not a.strip():
            raise ValueError(f"VQA answer list {path}: entry {i} must be a non-empty str, got {a!r}")
        if a in seen:
            raise ValueError(
                f"VQA answer list {path}: answer {a!r} appears twice (entries {seen[a]} and {i})"
            )
        seen[a] = i
    return list(data)


def answer_targets(answers: list[str], dataset: str, vg_weight: float) -> tuple[list[str], list[float]]:
    """A question's training targets: (unique answers in order of first appearance, their loss weights).
    'vqa': each unique answer weighs count / len(answers) (the share of annotators who gave it); 'vg': the
    one answer weighs `vg_weight`."""
    if dataset == "vqa":
        if not answers:
            raise ValueError("a 'vqa' question needs at least one answer")
        counts = Counter(answers)  # insertion-ordered: first appearance
        return list(counts), [c / len(answers) for c in counts.values()]
    if dataset == "vg":
        if len(answers) != 1:
            raise ValueError(f"a 'vg' question has exactly one answer, got {answers!r}")
        return list(answers), [float(vg_weight)]
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def _padded(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    if not rows:
        empty = torch.zeros((0, 0), dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone()}
    ids = [torch.tensor(r, dtype=torch.long) for r in rows]
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id),  # [N, La]
        "attention_mask": pad_sequence([torch.ones_like(t) for t in ids], batch_first=True),  # [N, La]
    }


def tokenize_answers(
    tokenizer: TextTokenizer, answers: list[str], max_tokens: int
) -> dict[str, torch.Tensor]:
    """Answers -> input_ids / attention_mask LongTensor [N, La]: each row ``[CLS] pieces [SEP]`` (the [SEP]
    ends the answer the decoder generates), the pieces cut so a row holds at most `max_tokens` tokens, La the
    longest row, right-padded with the pad id. The same in both tokenizer modes. Answers are not cleaned
    (they must stay the answer list's strings) beyond stripping surrounding whitespace."""
    if max_tokens < 3:
        raise ValueError(f"max_tokens must be >= 3 ([CLS] answer [SEP]), got {max_tokens}")
    if tokenizer.max_tokens < max_tokens:  # the tokenizer's own cap would cut the pieces shorter
        tokenizer = tokenizer.with_max_tokens(max_tokens)
    rows = tokenizer.encode([a.strip() for a in answers])
    tail = 1 if tokenizer.mode == "standard" else 0  # "standard" rows already end in [SEP]
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    rows = [[cls_id, *r[1 : len(r) - tail][: max_tokens - 2], sep_id] for r in rows]
    return _padded(rows, tokenizer.pad_token_id)


# --------------------------------------------------------------------------------------------- training
class VQASource(JsonListSource):
    """Training records as an image source, so the sampler and both backends serve them like image-text
    pairs: `caption(i)` is the raw question, `qa(i)` the (question, answers, dataset) of record i."""

    def __init__(self, records: list[dict]) -> None:
        # JsonListSource stores its entries packed (cheap to share with forked workers); the dataset and the
        # answers travel in the caption tuple after the question.
        entries = [
            {"image": r["image"], "caption": [r["question"], r["dataset"], *r["answer"]]} for r in records
        ]
        super().__init__(entries)

    def qa(self, i: int) -> tuple[str, list[str], str]:
        question, dataset, *answers = super().caption(i)
        return question, answers, dataset

    def caption(self, i: int) -> str:
        return super().caption(i)[0]


class VQAText:
    """The text side of a VQA training sample, for both backends: the DALI loader's hook object (the protocol
    of `dali.CaptionText`), and what `VQATrainDataset` and `VQACollator` call.

    `draw` reads the record (nothing random: one question per record); `finish` cleans the question, swaps
    left/right in the question and answers of a flipped sample when `swap_on_flip`, and computes the answer
    targets -> (question, unique answers, weights); `batch` turns finished texts into the text tensors of the
    batch format.
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        max_question_words: int,
        max_answer_tokens: int,
        vg_weight: float,
        swap_on_flip: bool,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_question_words = max_question_words
        self.max_answer_tokens = max_answer_tokens
        self.vg_weight = vg_weight
        self.swap_on_flip = swap_on_flip
        # Derived once here, not per batch in tokenize_answers, when data.max_tokens is below the answer cap.
        self.answer_tokenizer = (
            tokenizer
            if tokenizer.max_tokens >= max_answer_tokens
            else tokenizer.with_max_tokens(max_answer_tokens)
        )

    @classmethod
    def from_config(cls, vqa_cfg, tokenizer: TextTokenizer) -> VQAText:
        return cls(
            tokenizer,
            max_question_words=vqa_cfg.max_question_words,
            max_answer_tokens=vqa_cfg.max_answer_tokens,
            vg_weight=vqa_cfg.vg_weight,
            swap_on_flip=vqa_cfg.flip_swaps_left_right,
        )

    def draw(self, source: VQASource, i: int, rng: Any) -> tuple[str, list[str], str]:
        return source.qa(i)

    def finish(self, qa: tuple[str, list[str], str], flipped: bool) -> tuple[str, list[str], list[float]]:
        question, answers, dataset = qa
        question = clean_question(question, self.max_question_words)
        if flipped and self.swap_on_flip:
            question = swap_left_right(question)
            answers = [swap_left_right(a) for a in answers]
        return (question, *answer_targets(answers, dataset, self.vg_weight))

    def batch(self, texts: list[tuple[str, list[str], list[float]]]) -> dict[str, torch.Tensor]:
        q = self.tokenizer([t[0] for t in texts])  # [B, Lq]
        a = tokenize_answers(self.answer_tokenizer, [x for t in texts for x in t[1]], self.max_answer_tokens)
        return {
            "input_ids": q["input_ids"],
            "attention_mask": q["attention_mask"],
            "answer_ids": a["input_ids"],  # [N, La]
            "answer_mask": a["attention_mask"],
            "answer_weight": torch.tensor([w for t in texts for w in t[2]], dtype=torch.float32),  # [N]
            "answer_count": torch.tensor([len(t[1]) for t in texts], dtype=torch.long),  # [B]
        }

    # -- the rest of the DALI hook protocol --
    def encode(self, texts: list) -> tuple[list, dict[str, torch.Tensor]]:
        return texts, self.batch(texts)

    def tensors(
        self, encoded: tuple[list, dict[str, torch.Tensor]], rows: list[int]
    ) -> dict[str, torch.Tensor]:
        texts, full = encoded
        if len(rows) == len(texts):
            return full
        return self.batch([texts[r] for r in rows])  # the decoder dropped samples: rare, re-tokenise the rest

    def empty(self) -> dict[str, torch.Tensor]:
        """The answer keys of a batch with no sample (`batch.empty_batch` holds the others)."""
        return {
            "answer_ids": torch.zeros((0, 0), dtype=torch.long),
            "answer_mask": torch.zeros((0, 0), dtype=torch.long),
            "answer_weight": torch.zeros(0, dtype=torch.float32),
            "answer_count": torch.zeros(0, dtype=torch.long),
        }


class VQATrainDataset(ImageTextDataset):
    """The torch backend: `__getitem__(i)` -> ``{"image": FloatTensor [3, S, S], "text": (question, answers,
    weights) of `VQAText.finish`, "index": i}``, or None when the image cannot be used. Seeded per sample as
    `ImageTextDataset`; the flip is drawn from the sample's `random.Random` between the crop and RandAugment.
    `aug`: `transforms.pretrain_transform`'s keywords (crop_scale, hflip, randaug_n, randaug_m)."""

    def __init__(
        self,
        source: VQASource,
        *,
        text: VQAText,
        image_size: int,
        aug: dict,
        seed: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        # The pre-training transform without its flip, cut after its crop: the flip goes in between.
        transform, crop, after_flip = split_at_crop(image_size, aug)
        super().__init__(
            source, transform=transform, max_words=text.max_question_words, seed=seed, max_pixels=max_pixels
        )
        self.crop = crop
        self.after_flip = after_flip
        self.hflip = bool(aug["hflip"])
        self.text = text

    def _load(self, index: int, rng: random.Random | Any) -> dict | None:
        img = load_image(self.source, index, self.max_pixels)
        if img is None:
            return None
        draft = self.text.draw(self.source, index, rng)
        img = self.crop(img)  # draws from torch's (per-sample seeded) generator
        flipped = self.hflip and rng.random() < 0.5
        if flipped:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {"image": self.after_flip(img), "text": self.text.finish(draft, flipped), "index": index}


class VQACollator:
    """Samples of `VQATrainDataset` (None = unusable image) -> the VQA batch format; tokenises in the
    worker."""

    def __init__(self, text: VQAText) -> None:
        self.text = text

    def __call__(self, samples: list[dict | None]) -> dict:
        kept = [s for s in samples if s is not None]
        skipped = len(samples) - len(kept)
        if not kept:
            return {**empty_batch(skipped), **self.text.empty()}
        return {
            "image": torch.stack([s["image"] for s in kept]),  # [B, 3, S, S]
            **self.text.batch([s["text"] for s in kept]),
            "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),  # [B]
            "num_skipped": skipped,
        }


class VQASamples(TextSideSamples):
    """VQA questions for `loaders.build_train_loader`: `VQATrainDataset` + `VQACollator` (torch) or the DALI
    loader with `VQAText` as its text side; `vqa_cfg` is the config's `vqa` section."""

    noun = "questions"
    dataset_cls = VQATrainDataset
    collator_cls = VQACollator

    what = "VQA"

    def __init__(self, vqa_cfg) -> None:
        self.vqa_cfg = vqa_cfg

    def text(self, tokenizer: TextTokenizer) -> VQAText:
        return VQAText.from_config(self.vqa_cfg, tokenizer)



def build_vqa_train_loader(
    cfg,
    tokenizer: TextTokenizer,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """(loader, sampler) over all of cfg.vqa.train_file concatenated (record i of the concatenation is the
    batches' "index" i), at model.vision.image_size with the fine-tuning augmentation of cfg.data, through
    DALI when data.loader = dali (images on `device` in `dtype`), else PIL + torchvision in DataLoader
    workers; sharded over ranks, drop_last. Batches in the VQA batch format (module docstring). Questions
    keep vqa.max_question_words words and at most data.max_tokens tokens (`tokenizer`'s cap); answers
    vqa.max_answer_tokens tokens. Call `sampler.set_epoch(epoch)` before each epoch."""
    files = list(cfg.vqa.train_file)
    if not files:
        raise ValueError(
            "vqa.train_file is empty: give the VQA training JSON files (vqa_train, vqa_val, vg_qa)"
        )
    records = []
    for f in files:
        records += load_vqa_records(f, vqa_root=cfg.vqa.vqa_root, vg_root=cfg.vqa.vg_root, need_answers=True)
    counts = Counter(r["dataset"] for r in records)
    logger.info("VQA train set: %d questions (%s) from %s", len(records), dict(counts), files)
    return build_train_loader(
        VQASource(records),
        cfg.data,
        tokenizer,
        image_size=cfg.model.vision.image_size,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        device=device,
        dtype=dtype,
        kind=VQASamples(cfg.vqa),
    )


# ------------------------------------------------------------------------------------------- evaluation
class VQAEvalSet(EvalImages):
    """A VQA evaluation split (local val with answers, or test without), in file order.

    questions: [Q] cleaned with clean_question(q, max_words); question_ids: [Q] as given (distinct);
    answers: [Q] the human answers (list of str) or None for a record without; images: [Q] absolute paths
    (one per question: questions about one image repeat it); question_types: [Q] the records'
    "question_type" when every record has one, else None. A missing image is an error at construction.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        vqa_root: str = "",
        vg_root: str = "",
        image_size: int,
        max_words: int,
        loader: str = "torch",
    ) -> None:
        if loader not in ("torch", "dali"):
            raise ValueError(f"loader must be 'torch' or 'dali', got {loader!r}")
        records = load_vqa_records(path, vqa_root=vqa_root, vg_root=vg_root, need_answers=False)
        self.path = str(path)
        self.loader = loader
        self.image_size = image_size
        self.questions = [clean_question(r["question"], max_words) for r in records]
        self.question_ids = [r["question_id"] for r in records]
        self.answers: list[list[str] | None] = [r["answer"] for r in records]
        self.images = [r["image"] for r in records]
        types = [r["question_type"] for r in records]
        # [Q] question types when every record has one (per-type accuracy), else None
        self.question_types: list[str] | None = types if all(t is not None for t in types) else None
        seen: dict[Any, int] = {}
        for i, qid in enumerate(self.question_ids):
            if qid in seen:
                raise ValueError(f"VQA file {path}: entries {seen[qid]} and {i} share question_id {qid!r}")
            seen[qid] = i
        missing = sorted({p for p in self.images if not os.path.isfile(p)})
        if missing:
            raise FileNotFoundError(f"VQA file {path}: {len(missing)} image(s) missing, e.g. {missing[:3]}")
        logger.info(
            "VQA eval set %s: %d questions on %d images%s",
            path,
            len(self.questions),
            len(set(self.images)),
            "" if self.has_answers else " (no answers)",
        )

    @property
    def has_answers(self) -> bool:
        return all(a is not None for a in self.answers)

    def __len__(self) -> int:
        return len(self.questions)
