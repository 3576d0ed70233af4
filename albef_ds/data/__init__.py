"""Data layer: sources (JSON lists, webdataset shards) and image checks, caption cleaning and tokenisation,
image transforms, image-text datasets, the resumable distributed sampler, the training loaders (torch
reference; DALI in `dali`; batch format in `datasets`) and the synthetic debug set."""

from .datasets import (
    EvalImageDataset,
    ImageTextCollator,
    ImageTextDataset,
    RetrievalEvalSet,
    ShardedEpochSampler,
    build_pretrain_loader,
    build_train_loader,
    load_annotations,
)
from .sources import ImageTextSource, open_source, validate_source, write_shards
from .synth import generate_synthetic, synthetic_ready
from .text import SPECIAL_TOKENS, TextTokenizer, clean_caption, train_wordpiece_vocab
from .transforms import CLIP_MEAN, CLIP_STD, RandomAugment, apply_op, eval_transform, pretrain_transform

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "SPECIAL_TOKENS",
    "EvalImageDataset",
    "ImageTextCollator",
    "ImageTextDataset",
    "RandomAugment",
    "RetrievalEvalSet",
    "ShardedEpochSampler",
    "TextTokenizer",
    "apply_op",
    "build_pretrain_loader",
    "build_train_loader",
    "ImageTextSource",
    "open_source",
    "validate_source",
    "write_shards",
    "clean_caption",
    "eval_transform",
    "generate_synthetic",
    "load_annotations",
    "pretrain_transform",
    "synthetic_ready",
    "train_wordpiece_vocab",
]
