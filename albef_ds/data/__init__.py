"""Data layer, bottom to top (a module imports only modules listed before it):

* `annotations` (JSON lists: read, check, resolve paths), `text` (caption cleaning, tokenisation),
  `transforms` (PIL/torchvision augmentation), `sampler` (the resumable distributed sampler and the per-sample
  seeds), `batch` (the batch format), `synth` (the synthetic debug set);
* `sources` (JSON lists and webdataset shards behind one interface, image checks), on `annotations`;
* `datasets` (image-text dataset and collator: the torch reference backend), `dali` (the DALI backend),
  `evalset` (retrieval eval images and captions);
* `loaders` (the training loader builders; imports `dali` only when data.loader = dali);
* the tasks' data on top: `karpathy` (retrieval data in the Karpathy layout), `vqa` (VQA records, answer
  targets, the VQA training loader and evaluation set), `ve` (SNLI-VE records, the (sentence, class) text
  side, its training loader and evaluation set), `nlvr` (NLVR2 records, the pair flip, the two-image training
  loader and evaluation set; on `ve` and `vqa`), `grounding` (RefCOCO+ files, our refs.json / proposals.json
  layout, the training set through the retrieval loader, the evaluation set; on `karpathy`), `refer` (REFER's
  refs pickle + instances.json -> refs.json without running code from the pickle; on `grounding`);
* the task generators beside them: `synth_vqa` (the synthetic VQA set, on `synth`), `synth_pairs` (the
  synthetic NLVR2 and SNLI-VE sets, on `synth_vqa`'s scenes), `synth_grounding` (the synthetic grounding
  set, on `synth_vqa`'s scenes).
"""

from .annotations import load_annotations
from .datasets import ImageTextCollator, ImageTextDataset
from .evalset import EvalImageDataset, RetrievalEvalSet
from .grounding import (
    GroundingEvalSet,
    build_grounding_train_loader,
    load_grounding_eval,
    load_grounding_train,
    load_proposals,
    load_refs,
    write_retrieval_train,
)
from .loaders import build_pretrain_loader, build_train_loader
from .nlvr import NLVREvalSet, build_nlvr_train_loader, load_nlvr_records, pair_flip
from .sampler import ShardedEpochSampler, refill_batches
from .sources import ImageTextSource, check_image, open_source, validate_source, write_shards
from .synth import generate_synthetic, synthetic_ready
from .text import SPECIAL_TOKENS, TextTokenizer, clean_caption, train_wordpiece_vocab
from .transforms import CLIP_MEAN, CLIP_STD, RandomAugment, apply_op, eval_transform, pretrain_transform
from .ve import VE_LABELS, VEEvalSet, build_ve_train_loader, load_ve_records
from .vqa import (
    VQAEvalSet,
    answer_targets,
    build_vqa_train_loader,
    clean_question,
    load_answer_list,
    load_vqa_records,
    swap_left_right,
    tokenize_answers,
)

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
    "refill_batches",
    "check_image",
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
    "VQAEvalSet",
    "answer_targets",
    "build_vqa_train_loader",
    "clean_question",
    "load_answer_list",
    "load_vqa_records",
    "swap_left_right",
    "tokenize_answers",
    "VE_LABELS",
    "VEEvalSet",
    "build_ve_train_loader",
    "load_ve_records",
    "NLVREvalSet",
    "build_nlvr_train_loader",
    "load_nlvr_records",
    "pair_flip",
    "GroundingEvalSet",
    "build_grounding_train_loader",
    "load_grounding_eval",
    "load_grounding_train",
    "load_proposals",
    "load_refs",
    "write_retrieval_train",
]
