"""Image-text retrieval fine-tuning (COCO / Flickr30K, Karpathy splits) as a task.

The recipe of ALBEF_SPEC.md: start from a pre-trained checkpoint (model.albef_init: ours, exported, a run or
DeepSpeed folder, or a released ALBEF file; position embeddings resampled to model.vision.image_size, 384 px),
ITC with same-image-id positives and momentum distillation, ITM with hard negatives that exclude same-id
items (`ALBEFRetrieval`), AdamW lr 1e-5 / wd 0.02, cosine to 1e-6, alpha ramped over the first epoch, 5 epochs
(COCO) / 10 (Flickr). Every finetune.eval_every epochs the validation split is evaluated (ITC top-k + ITM
re-rank, distributed over the ranks); the best r_mean picks checkpoint_best.pt, whose weights the test split
is evaluated with at the end.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from ..config import Config, ConfigError
from ..data import RetrievalEvalSet
from ..data.karpathy import build_retrieval_train_loader, check_karpathy_eval
from ..eval.itm import evaluate_retrieval
from ..model.retrieval import ALBEFRetrieval
from ..train.task import StepOutput, Task, TaskContext
from .common import configured_init, image_text, load_eval_set, make_comm

log = logging.getLogger(__name__)


class RetrievalTask(Task):
    name = "retrieval"
    log_names = ("loss", "loss_itc", "loss_itm")
    best_metric = "r_mean"
    min_batch = 2

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._sets: dict[str, RetrievalEvalSet] = {}
        self._comm = None

    def check_inputs(self, cfg: Config) -> None:
        f = cfg.finetune
        if not f.train_file:
            raise ConfigError("finetune.train_file is empty: give one or more Karpathy train JSON files")
        for name, path in [("finetune.train_file", p) for p in f.train_file] + [
            ("finetune.val_file", f.val_file),
            ("finetune.test_file", f.test_file),
        ]:
            if path and not Path(path).is_file():
                raise ConfigError(
                    f"{name}: {path} does not exist (for the synthetic set: albef-ds data synth-retrieval)"
                )
        for path in (f.val_file, f.test_file):
            if path:
                check_karpathy_eval(path)

    def build_model(self, ctx: TaskContext, *, init: str | None = None) -> nn.Module:
        cfg = ctx.cfg
        model = ALBEFRetrieval(
            cfg.model,
            special_tokens=ctx.special_tokens,
            loss_weights=(cfg.loss.itc_weight, cfg.loss.itm_weight, 0.0),
            all_gather=ctx.all_gather,
        )
        configured_init(model, cfg, init)
        log.info(
            "retrieval model at %d px, from %s",
            cfg.model.vision.image_size,
            (cfg.model.albef_init if init is None else init) or "the configured initialisation",
        )
        return model

    def train_loader(self, ctx: TaskContext):
        return build_retrieval_train_loader(ctx.cfg, ctx.tokenizer, **ctx.loader_args())

    def forward(self, call, batch: dict, *, alpha: float) -> StepOutput:
        out = call(**image_text(batch), alpha=alpha, idx=batch["idx"])
        return StepOutput(
            out.loss,
            [out.loss, out.loss_itc, out.loss_itm],
            samples=int(batch["image"].shape[0]),
            enqueue=(out.image_feat_m, out.text_feat_m, out.idx),
        )

    def after_step(self, model, image_feat_m, text_feat_m, idx) -> None:
        model.enqueue(image_feat_m, text_feat_m, idx)

    def batch_len(self, batch: dict) -> int:
        return int(batch["image"].shape[0])

    def log_extra(self, model) -> dict:
        return {"temp": float(model.clamped_temp().item())}

    def eval_every(self) -> int:
        return self.cfg.finetune.eval_every

    def _split_file(self, split: str) -> str:
        f = self.cfg.finetune
        return {"val": f.val_file, "test": f.test_file}.get(split, "")

    def has_split(self, split: str) -> bool:
        return bool(self._split_file(split))

    def default_eval_file(self) -> str:
        return self.cfg.data.eval_file

    def open_split(self, path: str) -> RetrievalEvalSet:
        """A Karpathy val/test file; the pre-training eval file (the default) under data.image_root, any
        other under finetune.image_root (or data.image_root)."""
        c = self.cfg
        root = c.data.image_root if path == c.data.eval_file else (c.finetune.image_root or c.data.image_root)
        return load_eval_set(c, path, root)

    def eval_set(self, split: str) -> RetrievalEvalSet:
        if split not in self._sets:
            self._sets[split] = load_eval_set(self.cfg, self._split_file(split), self.cfg.finetune.image_root)
        return self._sets[split]

    def evaluate(self, model, split: str, ctx: TaskContext, *, step: int = 0, eval_set=None, **kw) -> dict:
        """ITC top-k + ITM re-rank retrieval of `split`, every rank encoding its share; the same metrics on
        every rank. `eval_set` overrides the split's file; keywords go to `evaluate_retrieval`
        (k_test, return_scores)."""
        cfg = ctx.cfg
        if self._comm is None:
            self._comm = make_comm(ctx)
        kw.setdefault("k_test", cfg.eval.k_test)
        out = evaluate_retrieval(
            model,
            eval_set or self.eval_set(split),
            ctx.tokenizer,
            device=ctx.device,
            batch_size=cfg.eval.batch_size,
            itm_batch_size=cfg.eval.itm_batch_size,
            comm=self._comm,
            num_workers=cfg.data.num_workers,
            progress=ctx.is_main,
            **kw,
        )
        m = out[0] if isinstance(out, tuple) else out
        if ctx.is_main:
            log.info(
                "[%s] step %d: ITM re-rank of the ITC top-%d: TR R@1 %.2f  IR R@1 %.2f  r_mean %.2f "
                "(ITC only: TR R@1 %.2f  IR R@1 %.2f  r_mean %.2f)",
                split,
                step,
                m["k_test"],
                m["txt_r1"],
                m["img_r1"],
                m["r_mean"],
                m["itc_txt_r1"],
                m["itc_img_r1"],
                m["itc_r_mean"],
            )
        return out

    def baseline(self, ctx: TaskContext, result: dict) -> dict:
        out = {}
        if self.has_split("test"):
            out["chance_r1"] = 100.0 / self.eval_set("test").num_images
        if "val_before" in result:
            out["before_finetuning"] = result["val_before"]
        return out
