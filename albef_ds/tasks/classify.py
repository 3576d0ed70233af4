"""The classification tasks: SNLI-VE, NLVR2 and NLVR2's text-assignment pre-training (DOWNSTREAM_SPEC.md
sections 2 and 3), on the one trainer.

- "ve": `ALBEFVE` from a pre-trained checkpoint (encoders and their momentum copies loaded, head random),
  distillation with a constant alpha (configs set loss.alpha_ramp_steps=0), accuracy on ve.val_file each
  ve.eval_every epochs, the best picks checkpoint_best.pt, test with it.
- "nlvr2-ta": `ALBEFTextAssignment` on the pre-training corpus (data.train_file, pre-training transform at
  model.vision.image_size, 256 px in the paper), 1 epoch, no momentum model; its checkpoint.pt is what
  "nlvr2" loads.
- "nlvr2": `ALBEFNLVR2` from the TA checkpoint (or any pre-trained one: the fusion layers are paired on
  load), the teacher copied from the loaded student, distillation, accuracy on nlvr.val_file (dev) and
  nlvr.test_file (test-P).
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from ..config import Config, ConfigError
from ..data import build_pretrain_loader
from ..data.nlvr import NLVREvalSet, build_nlvr_train_loader
from ..data.ve import VEEvalSet, build_ve_train_loader
from ..eval.classify import accuracy, predict_classes
from ..model.nlvr import ALBEFNLVR2, ALBEFTextAssignment
from ..model.ve import ALBEFVE
from ..train.task import StepOutput, Task, TaskContext
from .common import configured_init, image_text, make_comm
from .pretrain import PretrainTask

log = logging.getLogger(__name__)


def _check_files(section: str, files: list[tuple[str, str]], hint: str) -> None:
    for key, path in files:
        if path and not Path(path).is_file():
            raise ConfigError(f"{section}.{key}: {path} does not exist ({hint})")


class _ClassifyTask(Task):
    """What VE and NLVR2 share: the section's files, accuracy evaluation, the majority-class baseline."""

    log_names = ("loss", "train_acc")
    best_metric = "accuracy"
    section = ""  # "ve" | "nlvr"
    synth_command = ""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._sets: dict = {}
        self._comm = None

    @property
    def sec(self):
        return getattr(self.cfg, self.section)

    def check_inputs(self, cfg: Config) -> None:
        s = self.sec
        if not s.train_file:
            raise ConfigError(f"{self.section}.train_file is empty: give the training JSON list(s)")
        files = [("train_file", p) for p in s.train_file] + [
            ("val_file", s.val_file),
            ("test_file", s.test_file),
        ]
        _check_files(self.section, files, f"for the synthetic set: albef-ds data {self.synth_command}")

    def step_output(self, out, batch: dict) -> StepOutput:
        return StepOutput(out.loss, [out.loss, out.correct.mean()], samples=int(out.correct.shape[0]))

    def batch_len(self, batch: dict) -> int:
        return int(batch["label"].shape[0])

    def eval_every(self) -> int:
        return self.sec.eval_every

    def _split_file(self, split: str) -> str:
        return {"val": self.sec.val_file, "test": self.sec.test_file}.get(split, "")

    def has_split(self, split: str) -> bool:
        return bool(self._split_file(split))

    def default_eval_file(self) -> str:
        return self.sec.test_file or self.sec.val_file

    def eval_set(self, split: str):
        if split not in self._sets:
            self._sets[split] = self.open_split(self._split_file(split))
        return self._sets[split]

    @staticmethod
    def logits(model, *inputs):
        return model.logits(*inputs)

    def evaluate(self, model, split: str, ctx: TaskContext, *, step: int = 0, eval_set=None) -> dict:
        """Accuracy of `split` (or `eval_set`), every rank classifying its share; the same dict on every
        rank."""
        es = eval_set or self.eval_set(split)
        if self._comm is None:
            self._comm = make_comm(ctx)
        preds = predict_classes(
            model,
            es,
            ctx.tokenizer,
            self.logits,
            device=ctx.device,
            batch_size=ctx.cfg.eval.batch_size,
            comm=self._comm,
            num_workers=ctx.cfg.data.num_workers,
            progress=ctx.is_main,
        )
        m = accuracy(preds, list(es.labels))
        if ctx.is_main:
            log.info(
                "[%s] step %d: %s accuracy %.2f on %d examples",
                split,
                step,
                self.name,
                m["accuracy"],
                len(es),
            )
        return m

    def baseline(self, ctx: TaskContext, result: dict) -> dict:
        """The majority class of the val split, scored on val and test."""
        out: dict = {}
        if not self.has_split("val"):
            return out
        labels = list(self.eval_set("val").labels)
        major = max(sorted(set(labels)), key=labels.count)
        out["majority_class"] = major
        for split in ("val", "test"):
            if self.has_split(split):
                ys = list(self.eval_set(split).labels)
                out[f"{split}_majority_accuracy"] = 100.0 * ys.count(major) / len(ys)
        if "val_before" in result:
            out["before_finetuning"] = result["val_before"]
        return out


class VETask(_ClassifyTask):
    name = "ve"
    section = "ve"
    synth_command = "synth-ve"

    def build_model(self, ctx: TaskContext, *, init: str | None = None) -> nn.Module:
        cfg = ctx.cfg
        model = ALBEFVE(cfg.model)
        configured_init(model, cfg, init)
        return model

    def train_loader(self, ctx: TaskContext):
        return build_ve_train_loader(ctx.cfg, ctx.tokenizer, **ctx.loader_args())

    def forward(self, call, batch: dict, *, alpha: float) -> StepOutput:
        return self.step_output(call(**image_text(batch), label=batch["label"], alpha=alpha), batch)

    def open_split(self, path: str) -> VEEvalSet:
        c = self.cfg
        return VEEvalSet(
            path,
            image_root=c.ve.image_root,
            image_size=c.model.vision.image_size,
            max_words=c.data.max_words,
            loader=c.data.loader,
        )


class NLVRTask(_ClassifyTask):
    name = "nlvr2"
    section = "nlvr"
    synth_command = "synth-nlvr2"

    def build_model(self, ctx: TaskContext, *, init: str | None = None) -> nn.Module:
        cfg = ctx.cfg
        model = ALBEFNLVR2(cfg.model)
        source = cfg.model.albef_init if init is None else init
        configured_init(model, cfg, source)
        # The teacher starts as the loaded student (a TA checkpoint has no momentum weights; the reference
        # copied before loading, so its teacher was random).
        model.copy_params()
        return model

    def train_loader(self, ctx: TaskContext):
        return build_nlvr_train_loader(ctx.cfg, ctx.tokenizer, **ctx.loader_args())

    def forward(self, call, batch: dict, *, alpha: float) -> StepOutput:
        inputs = {k: batch[k] for k in ("image0", "image1", "input_ids", "attention_mask", "label")}
        return self.step_output(call(**inputs, alpha=alpha), batch)

    def open_split(self, path: str) -> NLVREvalSet:
        c = self.cfg
        return NLVREvalSet(
            path,
            image_root=c.nlvr.image_root,
            image_size=c.model.vision.image_size,
            max_words=c.data.max_words,
            loader=c.data.loader,
        )


class TextAssignmentTask(Task):
    """NLVR2's text-assignment pre-training on the pre-training corpus; no validation (its result is the
    checkpoint NLVR2 fine-tuning starts from)."""

    name = "nlvr2-ta"
    log_names = ("loss", "train_acc")
    min_batch = 3  # two distinct partner images per caption

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def check_inputs(self, cfg: Config) -> None:
        PretrainTask(cfg).check_inputs(cfg)

    def build_model(self, ctx: TaskContext, *, init: str | None = None) -> nn.Module:
        cfg = ctx.cfg
        model = ALBEFTextAssignment(cfg.model)
        configured_init(model, cfg, init)
        return model

    def train_loader(self, ctx: TaskContext):
        cfg = ctx.cfg
        return build_pretrain_loader(
            cfg.data, ctx.tokenizer, image_size=cfg.model.vision.image_size, **ctx.loader_args()
        )

    def forward(self, call, batch: dict, *, alpha: float) -> StepOutput:
        out = call(**image_text(batch))
        return StepOutput(out.loss, [out.loss, out.correct.mean()], samples=int(out.correct.shape[0]))

    def batch_len(self, batch: dict) -> int:
        return int(batch["image"].shape[0])

    def baseline(self, ctx: TaskContext, result: dict) -> dict:
        """Chance: each of the three labels is drawn with p = 1/3 (`losses.text_assignment`). results.json's
        "train" holds the last log window's train_acc; in TA's single epoch every caption is scored before
        the step that trains on it, with partners drawn afresh, so that accuracy is on unseen examples."""
        return {"chance_train_acc": 1.0 / 3.0}  # the unit of train_acc: a fraction
