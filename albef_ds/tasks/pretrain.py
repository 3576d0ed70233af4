"""Pre-training as a task: ITC (over the feature queue) + ITM (hard negatives) + MLM, momentum distillation.

Model: `ALBEFPretrain` with the configured DeiT / BERT / whole-model initialisation (`model.vit_init`,
`model.bert_init`, `model.albef_init`: any weight source, a run folder included). Data: the JSON lists or
shards of `data.train_file`. Validation: ITC retrieval on `data.eval_file` on rank 0 (before training with
`train.eval_at_start`, after it with `train.eval_at_end`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from ..config import Config, ConfigError
from ..data import RetrievalEvalSet, build_pretrain_loader
from ..data.sources import expand_shards, is_shard_spec
from ..eval.retrieval import itc_retrieval
from ..model import ALBEFPretrain, identity_gather
from ..train.task import StepOutput, Task, TaskContext
from .common import configured_init, image_text, load_eval_set

log = logging.getLogger(__name__)


class PretrainTask(Task):
    name = "pretrain"
    log_names = ("loss", "loss_itc", "loss_itm", "loss_mlm")
    min_batch = 2  # ITM needs an in-batch negative

    def __init__(self, cfg: Config, *, ops=None) -> None:
        """ops: the model's swappable execution pieces (the benchmark's reference recipe); None = ours."""
        self.cfg = cfg
        self.ops = ops
        self._eval_set: RetrievalEvalSet | None = None

    def check_inputs(self, cfg: Config) -> None:
        if not cfg.data.train_file:
            raise ConfigError("data.train_file is empty: give at least one JSON list or shard spec")
        for spec in cfg.data.train_file:  # JSON lists, shard files, brace ranges and globs
            paths = expand_shards(spec) if is_shard_spec(spec) else [spec]
            missing = [p for p in paths if not Path(p).is_file()]
            if not paths or missing:
                what = f"{missing[0]} does not exist" if missing else "matches no file"
                raise ConfigError(
                    f"data.train_file {spec!r}: {what} (generate the synthetic set: albef-ds data synth)"
                )
        if cfg.data.eval_file and not Path(cfg.data.eval_file).is_file():
            raise ConfigError(
                f"data.eval_file: {cfg.data.eval_file} does not exist (generate the synthetic set: "
                "albef-ds data synth)"
            )

    def build_model(self, ctx: TaskContext, *, init: str | None = None) -> nn.Module:
        cfg = ctx.cfg
        model = ALBEFPretrain(
            cfg.model,
            special_tokens=ctx.special_tokens,
            loss_weights=(cfg.loss.itc_weight, cfg.loss.itm_weight, cfg.loss.mlm_weight),
            all_gather=ctx.all_gather or identity_gather,
        )
        if self.ops is not None:
            model.ops = self.ops
        configured_init(model, cfg, init)
        return model

    def train_loader(self, ctx: TaskContext):
        cfg = ctx.cfg
        return build_pretrain_loader(
            cfg.data, ctx.tokenizer, image_size=cfg.model.vision.image_size, **ctx.loader_args()
        )

    def forward(self, call, batch: dict, *, alpha: float) -> StepOutput:
        out = call(**image_text(batch), alpha=alpha)
        return StepOutput(
            out.loss,
            [out.loss, out.loss_itc, out.loss_itm, out.loss_mlm],
            samples=int(batch["image"].shape[0]),
            enqueue=(out.image_feat_m, out.text_feat_m),
        )

    def after_step(self, model, image_feat_m, text_feat_m) -> None:
        model.enqueue(image_feat_m, text_feat_m)  # one all-gather per optimizer step

    def batch_len(self, batch: dict) -> int:
        return int(batch["image"].shape[0])

    def log_extra(self, model) -> dict:
        return {"temp": float(model.clamped_temp().item())}

    def has_split(self, split: str) -> bool:
        return split == "val" and bool(self.cfg.data.eval_file)

    def default_eval_file(self) -> str:
        return self.cfg.data.eval_file

    def open_split(self, path: str) -> RetrievalEvalSet:
        return load_eval_set(self.cfg, path, self.cfg.data.image_root)

    def eval_set(self) -> RetrievalEvalSet:
        if self._eval_set is None:
            d = self.cfg.data
            self._eval_set = RetrievalEvalSet(
                d.eval_file,
                image_root=d.image_root,
                image_size=self.cfg.model.vision.image_size,
                max_words=d.max_words,
                loader=d.loader,
            )
        return self._eval_set

    def evaluate(self, model, split: str, ctx: TaskContext, *, step: int = 0, eval_set=None) -> dict | None:
        """ITC retrieval on data.eval_file (or `eval_set`), on rank 0 only (the other ranks go on to the next
        collective)."""
        if not ctx.is_main:
            return None
        es = eval_set or self.eval_set()
        r = itc_retrieval(model, es, ctx.tokenizer, device=ctx.device, batch_size=ctx.cfg.eval.batch_size)
        log.info(
            "[%s] ITC retrieval on %d held-out images / %d texts: TR R@1 %.1f  IR R@1 %.1f  r_mean %.1f "
            "(chance R@1 about %.1f)",
            ctx.extra.get("label") or ("before" if step == 0 else f"after step {step}"),
            len(es.images),
            len(es.texts),
            r["txt_r1"],
            r["img_r1"],
            r["r_mean"],
            100.0 / len(es.images),
        )
        return r

    def baseline(self, ctx: TaskContext, result: dict) -> dict:
        if not self.has_split("val"):
            return {}
        out = {"chance_r1": 100.0 / self.eval_set().num_images}
        if "val_before" in result:
            out["before_training"] = result["val_before"]
        return out
