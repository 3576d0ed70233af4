"""What several tasks share: the model inputs of an image-text batch, the Karpathy-layout evaluation
split reader and the evaluation collective."""

from __future__ import annotations

from pathlib import Path

from ..config import Config, ConfigError
from ..data import RetrievalEvalSet
from ..data.karpathy import check_karpathy_eval
from ..eval.comm import LocalComm, ProcessGroupComm
from ..train.checkpoint import init_weights
from ..train.task import TaskContext


def image_text(batch: dict) -> dict:
    """The model inputs of an image-text batch."""
    return {k: batch[k] for k in ("image", "input_ids", "attention_mask")}


def load_eval_set(cfg: Config, path: str, image_root: str = "") -> RetrievalEvalSet:
    """A Karpathy-layout evaluation split ({image, caption: [str]}), checked, at model.vision.image_size."""
    if not path:
        raise ConfigError("no evaluation file: set finetune.val_file / test_file (or pass --split-file)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"evaluation file {path} does not exist")
    check_karpathy_eval(path)
    return RetrievalEvalSet(
        path,
        image_root=image_root,
        image_size=cfg.model.vision.image_size,
        max_words=cfg.data.max_words,
        loader=cfg.data.loader,
    )


def make_comm(ctx: TaskContext):
    return ProcessGroupComm() if ctx.info.world_size > 1 else LocalComm()


def configured_init(model, cfg: Config, init: str | None = None):
    """`model` with the configured start-up weights (model.vit_init, bert_init, then the whole-model
    model.albef_init, which `init` overrides when given); each must fill the encoders it provides unless
    model.allow_partial_init. Returns the model."""
    albef = cfg.model.albef_init if init is None else init
    m = cfg.model
    init_weights(model, vit=m.vit_init, bert=m.bert_init, albef=albef, partial=m.allow_partial_init)
    return model
