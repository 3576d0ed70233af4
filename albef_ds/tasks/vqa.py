"""VQA fine-tuning as a task: the answer decoder trained on (image, question, weighted answers), evaluated by
ranking a fixed answer list.

The recipe of DOWNSTREAM_SPEC.md section 1: start from a pre-trained checkpoint (model.albef_init; the
decoder is initialised from its fusion layers, embeddings and MLM head, `model.weights.derive_decoder`),
384 px with the fine-tuning augmentation (random resized crop 0.5-1, flip with left/right swapped in the
text, RandAugment), AdamW lr 2e-5, 8 epochs, alpha 0.4 ramped over the first epoch (the reference's
distillation was silently off). Every vqa.eval_every epochs the local split (vqa.val_file, human answers)
is answered and scored with the VQA accuracy; the best picks checkpoint_best.pt, whose weights answer
vqa.test_file at the end into `<output_dir>/vqa_test_answers.json`, the EvalAI result file (every question
of the file, each once).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..config import Config, ConfigError
from ..data.vqa import (
    VQAEvalSet,
    build_vqa_train_loader,
    load_answer_list,
    load_vqa_records,
    tokenize_answers,
)
from ..eval.vqa import predict_answers
from ..eval.vqa_metric import majority_answer, vqa_scores, write_evalai
from ..model.vqa import ALBEFVQA
from ..train.task import StepOutput, Task, TaskContext
from .common import configured_init, make_comm

log = logging.getLogger(__name__)

VQA_INPUTS = (
    "image",
    "input_ids",
    "attention_mask",
    "answer_ids",
    "answer_mask",
    "answer_weight",
    "answer_count",
)


class VQATask(Task):
    name = "vqa"
    log_names = ("loss",)
    best_metric = "accuracy"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._sets: dict[str, VQAEvalSet] = {}
        self._answers: tuple[list[str], torch.Tensor, torch.Tensor] | None = None
        self._comm = None

    # ------------------------------------------------------------------ inputs
    def check_inputs(self, cfg: Config) -> None:
        q = cfg.vqa
        if not q.train_file:
            raise ConfigError("vqa.train_file is empty: give the VQA JSON lists (vqa_train, vqa_val, vg_qa)")
        if not q.answer_list:
            raise ConfigError("vqa.answer_list is empty: give the JSON list of candidate answers")
        files = [("vqa.train_file", p) for p in q.train_file] + [
            ("vqa.val_file", q.val_file),
            ("vqa.test_file", q.test_file),
            ("vqa.answer_list", q.answer_list),
        ]
        for key, path in files:
            if path and not Path(path).is_file():
                raise ConfigError(
                    f"{key}: {path} does not exist (for the synthetic set: albef-ds data synth-vqa)"
                )
        load_answer_list(q.answer_list)  # its format errors name the file before anything is built

    def build_model(self, ctx: TaskContext, *, init: str | None = None) -> nn.Module:
        cfg = ctx.cfg
        model = ALBEFVQA(cfg.model, special_tokens=ctx.special_tokens)
        source = cfg.model.albef_init if init is None else init
        configured_init(model, cfg, source)
        log.info(
            "VQA model at %d px, from %s", cfg.model.vision.image_size, source or "random initialisation"
        )
        return model

    def train_loader(self, ctx: TaskContext):
        return build_vqa_train_loader(ctx.cfg, ctx.tokenizer, **ctx.loader_args())

    # ------------------------------------------------------------------ training
    def forward(self, call, batch: dict, *, alpha: float) -> StepOutput:
        out = call(**{k: batch[k] for k in VQA_INPUTS}, alpha=alpha)
        return StepOutput(out.loss, [out.loss], samples=int(batch["image"].shape[0]))

    def batch_len(self, batch: dict) -> int:
        return int(batch["image"].shape[0])

    # ------------------------------------------------------------------ evaluation
    def eval_every(self) -> int:
        return self.cfg.vqa.eval_every

    def _split_file(self, split: str) -> str:
        return {"val": self.cfg.vqa.val_file, "test": self.cfg.vqa.test_file}.get(split, "")

    def has_split(self, split: str) -> bool:
        return bool(self._split_file(split))

    def default_eval_file(self) -> str:
        """`albef-ds evaluate vqa` answers the test split (the EvalAI file), else the local split."""
        return self.cfg.vqa.test_file or self.cfg.vqa.val_file

    def open_split(self, path: str) -> VQAEvalSet:
        q = self.cfg.vqa
        return VQAEvalSet(
            path,
            vqa_root=q.vqa_root,
            vg_root=q.vg_root,
            image_size=self.cfg.model.vision.image_size,
            max_words=q.eval_max_question_words,
            loader=self.cfg.data.loader,
        )

    def eval_set(self, split: str) -> VQAEvalSet:
        if split not in self._sets:
            path = self._split_file(split)
            if not path:
                raise ConfigError(f"no VQA {split} split: set vqa.{split}_file")
            self._sets[split] = self.open_split(path)
        return self._sets[split]

    def answer_list(self, ctx: TaskContext) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(answers, ids (A, La), mask) of vqa.answer_list, tokenised as [CLS] answer [SEP]."""
        if self._answers is None:
            answers = load_answer_list(self.cfg.vqa.answer_list)
            tok = tokenize_answers(ctx.tokenizer, answers, self.cfg.vqa.max_answer_tokens)
            self._answers = (answers, tok["input_ids"], tok["attention_mask"])
        return self._answers

    def evaluate(
        self,
        model,
        split: str,
        ctx: TaskContext,
        *,
        step: int = 0,
        eval_set: VQAEvalSet | None = None,
        k: int = 0,
        answers_file: str = "",
    ) -> dict:
        """Answer every question of `split` (or `eval_set`) on all ranks (each rank its share); rank 0 writes
        the EvalAI file (`answers_file`, default <output_dir>/vqa_<split>_answers.json). Metrics (the same on
        every rank): VQA accuracy (and per question type) when the split has human answers."""
        cfg, q = ctx.cfg, ctx.cfg.vqa
        es = eval_set or self.eval_set(split)
        if self._comm is None:
            self._comm = make_comm(ctx)
        answers, a_ids, a_mask = self.answer_list(ctx)
        preds = predict_answers(
            model,
            es,
            ctx.tokenizer.with_max_tokens(q.eval_max_tokens),
            a_ids,
            a_mask,
            device=ctx.device,
            batch_size=cfg.eval.batch_size,
            k=k or q.k_test,
            double_count=q.first_token_double_count,
            chunk=q.rank_batch,
            comm=self._comm,
            num_workers=cfg.data.num_workers,
            progress=ctx.is_main,
        )
        predicted = [answers[i] for i in preds]
        path = Path(answers_file) if answers_file else ctx.out_dir / f"vqa_{split}_answers.json"
        if ctx.is_main:
            write_evalai(path, list(es.question_ids), predicted)
        m: dict = {"questions": len(es), "answers_file": str(path)}
        if es.has_answers:
            m.update(vqa_scores(predicted, es.answers, getattr(es, "question_types", None)))
            if ctx.is_main:
                log.info(
                    "[%s] step %d: VQA accuracy %.2f on %d questions", split, step, m["accuracy"], len(es)
                )
        return m

    def baseline(self, ctx: TaskContext, result: dict) -> dict:
        """The majority answer of the training set, given to every question, scored on val and test."""
        q = self.cfg.vqa
        train = [
            r
            for f in q.train_file
            for r in load_vqa_records(f, vqa_root=q.vqa_root, vg_root=q.vg_root, need_answers=True)
        ]
        answer = majority_answer([r["answer"] for r in train])
        out: dict = {"majority_answer": answer}
        for split in ("val", "test"):
            if self.has_split(split) and self.eval_set(split).has_answers:
                es = self.eval_set(split)
                out[f"{split}_majority_accuracy"] = vqa_scores([answer] * len(es), es.answers)["accuracy"]
        if "val_before" in result:
            out["before_finetuning"] = result["val_before"]
        return out
