"""Typed experiment configuration: defaults -> YAML -> `section.key=value` overrides.

Every field is a typed dataclass attribute with a comment. Loading is strict: an unknown key or a value of
the wrong type is a `ConfigError` that names the dotted key (and the file it came from). Cross-field checks
run in `validate()` before anything is built.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent."""


# --------------------------------------------------------------------------------------------- sections
@dataclass
class VisionConfig:
    image_size: int = 256  # input resolution; position embeddings are resampled to image_size // patch_size
    patch_size: int = 16
    width: int = 768  # embedding width of the ViT
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.0  # ALBEF pre-trains without drop-path
    # FLIP-style patch dropout in pre-training: each image's online ViT sees a random (1 - p) share of its
    # patch tokens (plus [CLS]); the same kept tokens feed ITC, ITM and MLM. Training mode only (evaluation
    # sees every patch); 0 = off, ALBEF's recipe. In [0, 1).
    patch_dropout: float = 0.0
    patch_dropout_momentum: bool = False  # the momentum ViT sees the same kept patches (default: all of them)
    # Start value of the (learnable) patch position embeddings of a randomly initialised ViT: "trunc_normal"
    # (timm's and DeiT's std 0.02) or "sincos" (2-D sine-cosine, MAE's). Weights loaded from a checkpoint
    # replace either. For small ViTs trained from scratch: with std 0.02 the debug ViT, even as a supervised
    # classifier, cannot tell where an object is after 400 steps; with "sincos" it can (benchmarks/README.md,
    # "What the debug model can learn").
    pos_embed_init: str = "trunc_normal"


@dataclass
class TextConfig:
    vocab_size: int = 30522  # must equal the tokenizer's vocabulary size (checked at start-up)
    hidden: int = 768
    layers: int = 12  # text layers + fusion layers
    fusion_layer: int = 6  # layers [0, fusion_layer) are text-only, the rest add cross-attention
    heads: int = 12
    intermediate: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1  # hidden and attention dropout, as in bert-base-uncased
    layer_norm_eps: float = 1e-12
    # std of the random initialisation of the text / fusion encoder's linear and embedding weights (BERT's
    # initializer_range, 0.02). Loaded weights replace it. For the 96-wide debug model, 0.1 lets the ITM
    # learn the background in the demo's 800 steps, which it does not at 0.02 (benchmarks/README.md, issue 16)
    init_std: float = 0.02


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # width of the contrastive projections
    temp: float = 0.07  # initial temperature (learnable, clamped to [temp_min, temp_max] in forward)
    temp_min: float = 0.001
    temp_max: float = 0.5
    # Temperature of the ITM hard-negative draw: negatives are sampled from softmax(ITC similarity / this).
    # 0 = the (clamped, learned) ITC temperature, as in ALBEF; a large value draws them uniformly from the
    # batch (issue 16 measurements in benchmarks/README.md)
    itm_neg_temp: float = 0.0
    # Temperature of NLVR2 text assignment's partner draw: partner images are sampled from
    # softmax(image-feature similarity / this); 0 = uniformly. With a pre-training whose image features
    # separate colour sets sharply, 0.07 draws partners the caption also describes (issue 16: 18% of the
    # debug TA examples) and TA stays at chance
    ta_partner_temp: float = 0.07
    momentum: float = 0.995  # EMA factor of the momentum encoders
    queue_size: int = 65536  # entries in each feature queue (any value >= 0; a ring buffer)
    mlm_probability: float = 0.15
    queue_seed: int = 42  # seed of the random unit vectors the queues start with (identical on every rank)
    vit_init: str = ""  # DeiT-B/16 checkpoint (.pth with {'model': ...} or timm .safetensors); "" = random
    bert_init: str = ""  # bert-base-uncased folder (HF layout); "" = random
    albef_init: str = ""  # released ALBEF checkpoint (ALBEF_4M.pth / ALBEF.pth) or one of ours; "" = none
    # Load vit_init / bert_init / albef_init even when they leave encoder tensors unfilled (by default an
    # error naming the parts; task heads, queues and momentum copies a source may always lack).
    allow_partial_init: bool = False


@dataclass
class SynthConfig:
    out_dir: str = "data/synth"  # where `albef-ds data synth` writes images, JSON lists and vocab.txt
    num_train: int = 4000  # training images
    num_eval: int = 200  # held-out images (several captions each) for retrieval
    image_size: int = 96  # side of the generated JPEGs
    seed: int = 0
    vocab_size: int = 256  # size of the WordPiece vocab trained on the synthetic captions
    # Objects per image. 1: one object, captions naming its shape, colour, size, position, texture and
    # background. 2 (configs/debug.yaml, the demo's set): two objects of distinct colours, each small or
    # large, one above the other; captions name both colours with their sizes and nothing else, all words
    # the debug ViT can see (issue 16; benchmarks/README.md, "The demo's two-object recipe")
    objects: int = 1


@dataclass
class DataConfig:
    train_file: list[str] = field(default_factory=list)  # JSON lists [{"image": path, "caption": str|[str]}]
    eval_file: str = ""  # held-out JSON list for retrieval (caption lists allowed)
    image_root: str = ""  # prefix for relative image paths; "" = relative to each JSON file's folder
    tokenizer: str = ""  # vocab.txt file or a folder with a HF tokenizer (bert-base-uncased layout)
    tokenizer_mode: str = "albef"  # "albef": [CLS] tokens (no trailing [SEP]); "standard": [CLS] tokens [SEP]
    max_words: int = 30  # caption cleaning keeps at most this many words
    max_tokens: int = 25  # tokenised length cap, special tokens included
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop area range
    hflip: bool = True
    randaug_n: int = 2  # RandAugment: ops per image
    randaug_m: int = 7  # RandAugment: magnitude (0-10)
    num_workers: int = 2  # torch loader: DataLoader worker processes; dali loader: pipeline threads
    loader: str = "torch"  # "torch": PIL + torchvision in DataLoader workers; "dali": NVIDIA DALI (GPU/CPU)
    max_image_pixels: int = 89_478_485  # larger images are skipped and counted (Pillow's bomb threshold)
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate at the reference global batch (see lr_ref_batch)
    min_lr: float = 1e-5  # cosine floor
    warmup_lr: float = 1e-5  # learning rate at step 0
    warmup_steps: int = 1000
    weight_decay: float = 0.02  # not applied to biases, norms and other 1-D parameters
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 0.0  # 0 = no clipping (the reference does not clip)
    # Linear LR scaling with the global batch: lr (and nothing else) is multiplied by
    # global_batch / lr_ref_batch, the maintainer's advice (1e-4 at 512 -> 2e-4 at 1024). 0 = no scaling.
    lr_ref_batch: int = 0


@dataclass
class LossConfig:
    alpha: float = 0.4  # weight of the momentum-distilled targets (ITC and MLM)
    alpha_ramp_steps: int = -1  # alpha ramps linearly from 0 over this many steps; -1 = the first epoch
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/debug"  # run folder: resolved config, metrics.jsonl, checkpoints
    batch_size: int = 64  # micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    global_batch_size: int = 0  # 0 = batch_size * grad_accum * world_size; otherwise it must equal that
    precision: str = "auto"  # auto | bf16 | fp16 | fp32; auto = what the DeepSpeed config enables
    ds_config: str = "ds_configs/zero2_bf16.json"  # DeepSpeed JSON (its "auto" values are filled from here)
    engine: str = "torch"  # "torch": one process, torch AdamW; "deepspeed": ZeRO-2 on any number of ranks
    record_samples: bool = False  # list each rank's (epoch, sample index) in its rank report (debugging)
    # torch.compile the ViT blocks and BERT layers (online and momentum) in place before the engine wraps the
    # model; the rest of the step and every evaluation stay eager (model/compile.py, README "Performance")
    compile: bool = False
    epochs: int = 30
    max_steps: int = -1  # stop after this many optimizer steps; -1 = epochs decide
    seed: int = 42
    device: str = "auto"  # "auto" = cuda if available, else cpu
    log_every: int = 50  # read metrics from the device every N steps (no host sync in between)
    tensorboard: bool = True  # TensorBoard event files under <output_dir>/tensorboard (rank 0)
    eval_at_start: bool = True  # ITC retrieval before the first step
    eval_at_end: bool = True
    save_every: int = 0  # optimizer steps between resumable checkpoints (checkpoints/<tag>); 0 = none
    keep_last: int = 2  # resumable checkpoints kept (older ones are deleted once a newer one is complete)
    resume: str = (
        ""  # "" = start fresh; "auto" = the newest complete checkpoint if any; or a tag (step_00000100)
    )
    stop_at_step: int = -1  # behave as if preempted after this step (checkpoint, exit 85); -1 = never


@dataclass
class EvalConfig:
    batch_size: int = 128  # images / texts per encoder batch (each rank encodes only its share)
    k_test: int = 128  # ITM re-rank depth: top-k texts per image and images per text (COCO 256, Flickr 128)
    itm_batch_size: int = 256  # image-text pairs per fusion pass when re-ranking (rounded to whole queries)


@dataclass
class FinetuneConfig:
    """Retrieval fine-tuning on Karpathy-split JSON files (train: image, caption, image_id; val/test: image,
    caption list). The starting weights come from model.albef_init (a file, a checkpoint or run folder)."""

    train_file: list[str] = field(default_factory=list)  # Karpathy train JSON(s): one entry per caption
    val_file: str = ""  # validation JSON (picks the best epoch by r_mean); "" = keep the last epoch
    test_file: str = ""  # test JSON, evaluated with the best weights at the end; "" = none
    image_root: str = ""  # prefix for relative image paths; "" = relative to each JSON file's folder
    eval_every: int = 1  # validate every N epochs (and after the last)
    synth_num_val: int = 0  # `albef-ds data synth-retrieval`: held-out images for val (the rest are test);
    #                         0 = half of them


@dataclass
class VQASynthConfig:
    """`albef-ds data synth-vqa`: questions about generated images of one to three objects."""

    out_dir: str = "data/synth_vqa"  # images, train/val/test JSON (VQA v2 layout) and answer_list.json
    num_train: int = 1500  # training images (several questions each)
    num_val: int = 150  # local-split images (10 human answers per question: VQA accuracy)
    num_test: int = 150  # test images (the EvalAI-style answer file; answers kept for a local check)
    questions_per_image: int = 3
    image_size: int = 80  # side of the generated JPEGs
    seed: int = 0


@dataclass
class VQAConfig:
    """VQA fine-tuning on the ALBEF/LAVIS JSON layout: [{"image", "question", "answer": [str] (vqa: the 10
    human answers) | str (vg), "dataset": "vqa" | "vg", "question_id"}]. Starts from model.albef_init."""

    train_file: list[str] = field(default_factory=list)  # vqa_train, vqa_val, vg_qa JSON lists
    val_file: str = ""  # local split with human answers: VQA accuracy, picks the best epoch; "" = none
    test_file: str = ""  # questions answered into <output_dir>/vqa_test_answers.json (EvalAI); "" = none
    vqa_root: str = ""  # folder of the 'vqa' records' images; "" = relative to each JSON file's folder
    vg_root: str = ""  # folder of the 'vg' records' images; "" = relative to each JSON file's folder
    answer_list: str = ""  # JSON list of the candidate answers ranked at inference (3,128 for VQA v2)
    vg_weight: float = 0.5  # loss weight of a Visual Genome answer (the reference 0.5; LAVIS 1.0)
    k_test: int = 128  # answers re-scored per question (top-k by first-token probability)
    first_token_double_count: bool = False  # the reference's score: sequence log-likelihood + log p(first)
    flip_swaps_left_right: bool = True  # a horizontally flipped image swaps left/right in its question
    max_question_words: int = 30  # training questions keep at most this many words (data.max_tokens caps)
    eval_max_question_words: int = 50  # evaluation questions: words kept ...
    eval_max_tokens: int = 40  # ... and tokens (special tokens included)
    max_answer_tokens: int = 10  # answer tokens kept, [CLS] and [SEP] included
    eval_every: int = 1  # evaluate the val split every N epochs (and after the last)
    rank_batch: int = 2048  # candidate answers scored per decoder pass at inference
    synth: VQASynthConfig = field(default_factory=VQASynthConfig)


@dataclass
class PairSynthConfig:
    """`albef-ds data synth-nlvr2` / `synth-ve`: statements about generated images of one to three objects."""

    out_dir: str = ""  # images, train/val/test JSON in the task's layout
    num_train: int = 1500  # training examples
    num_val: int = 150
    num_test: int = 150
    image_size: int = 80  # side of the generated JPEGs
    seed: int = 0
    # Statement kinds to draw (NLVR2: synth_pairs.NLVR_TYPES; SNLI-VE: VE_TYPES, the entailment and
    # contradiction kinds, neutral always included); empty = all of them.
    kinds: list[str] = field(default_factory=list)
    # How statements name objects: "shape" ("the circle") or "colour" ("the red shape"; synth_pairs.REFER_BY)
    refer_by: str = "shape"


@dataclass
class NLVRConfig:
    """NLVR2 fine-tuning (and its text-assignment pre-training): [{"images": [left, right], "sentence",
    "label": "True" | "False" (or a bool)}]. Starts from model.albef_init (the TA checkpoint)."""

    train_file: list[str] = field(default_factory=list)  # NLVR2 train JSON(s)
    val_file: str = ""  # dev JSON: accuracy, picks the best epoch; "" = keep the last
    test_file: str = ""  # test-P JSON, evaluated with the best weights at the end; "" = none
    image_root: str = ""  # prefix of relative image paths; "" = relative to each JSON file's folder
    flip_swap: bool = True  # with p = 0.5 mirror the pair: images swapped, each mirrored, left/right swapped
    eval_every: int = 1
    synth: PairSynthConfig = field(default_factory=lambda: PairSynthConfig(out_dir="data/synth_nlvr2"))
    # `albef-ds data synth-ta`: captions of the NLVR2 scenes for the debug text-assignment pre-training
    # (configs/nlvr2_ta_debug.yaml reads its train.json as data.train_file). No val/test by default (TA has no
    # evaluation); kinds and refer_by do not apply.
    ta_synth: PairSynthConfig = field(
        default_factory=lambda: PairSynthConfig(
            out_dir="data/synth_ta", num_train=4000, num_val=0, num_test=0
        )
    )


@dataclass
class VEConfig:
    """SNLI-VE fine-tuning: [{"image": path or Flickr30K id (root/<id>.jpg), "sentence", "label":
    "entailment" | "neutral" | "contradiction"}] (classes 2 / 1 / 0). Starts from model.albef_init."""

    train_file: list[str] = field(default_factory=list)
    val_file: str = ""  # accuracy, picks the best epoch; "" = keep the last
    test_file: str = ""  # evaluated with the best weights at the end; "" = none
    image_root: str = ""  # prefix of relative image paths; "" = relative to each JSON file's folder
    eval_every: int = 1
    synth: PairSynthConfig = field(default_factory=lambda: PairSynthConfig(out_dir="data/synth_ve"))


@dataclass
class GroundingSynthConfig:
    """`albef-ds data synth-grounding`: referring expressions about generated images of two or three objects
    (layout and splits: `data.synth_grounding`)."""

    out_dir: str = "data/synth_grounding"  # images, train/val/test JSON (ALBEF layout), refs.json, proposals
    num_train_images: int = 1000  # training images (refs_per_image x expressions_per_ref expressions each)
    num_val_images: int = 100  # split "val" (scenes of two or three objects)
    num_test_images: int = 200  # test.json: the first half "testA" (three objects), the rest "testB" (two)
    refs_per_image: int = 2  # objects referred to per image (at most the scene's object count)
    expressions_per_ref: int = 2  # referring expressions per referred object
    num_proposals: int = 10  # boxes per image in proposals.json: every object's box, jittered copies, random
    position_words: bool = True  # expressions may name the object's third (left / middle / right); false =
    #                              RefCOCO+'s rule (no location words; safe under a horizontal flip)
    shape_words: bool = True  # expressions may name the object's shape; false (with position_words false:
    #                           colour and size only) = what the debug ViT sees (configs/grounding_debug.yaml)
    image_size: int = 96  # side of the generated JPEGs
    seed: int = 0


GRADCAM_KINDS = ("itm", "itc")


def default_gradcam_fusion_layer(fusion_layer: int, num_layers: int) -> int:
    """The ITM Grad-CAM layer by default: ALBEF's relative depth, a third of the way into the fusion layers,
    fusion_layer + (num_layers - fusion_layer) // 3 (8 for ALBEF-base: the third of its fusion layers 6..11;
    the first of a model with two)."""
    if num_layers <= fusion_layer:
        raise ValueError(
            f"the text encoder has no fusion layer ({num_layers} layers, fusion_layer {fusion_layer})"
        )
    return fusion_layer + (num_layers - fusion_layer) // 3


@dataclass
class GroundingConfig:
    """Weakly-supervised grounding (RefCOCO+): trained as retrieval on the ALBEF JSON layout (train:
    [{"image", "text"}]; val/test: [{"image", "text", "ref_id"}]), scored by Grad-CAM over box proposals.
    refs.json and proposals.json: our layout (`data.grounding`); `data.refer.convert_refer` writes refs.json
    from the REFER API's refs(unc).p + instances.json. Starts from model.albef_init."""

    train_file: list[str] = field(default_factory=list)  # ALBEF grounding train JSON(s): [{"image", "text"}]
    val_file: str = ""  # [{"image", "text", "ref_id"}]: accuracy per split, picks the best epoch; "" = none
    test_file: str = ""  # the same layout, evaluated with the best weights at the end; "" = none
    refs_file: str = ""  # refs.json: ref_id -> image_id, split, ground-truth box; image_id -> width, height
    proposals_file: str = ""  # proposals.json: image_id -> candidate boxes [x, y, w, h] (MAttNet dets.json)
    image_root: str = ""  # prefix of relative image paths; "" = relative to each JSON file's folder
    gradcam_kind: str = "itm"  # "itm": fusion cross-attention, d(positive ITM logit); "itc": ViT [CLS] row
    # Layer of the Grad-CAM: itm = a text-encoder layer index in [text.fusion_layer, text.layers) (the
    # reference's 8 = the 3rd fusion layer of ALBEF-base), itc = a ViT block in [0, vision.depth). null = a
    # third of the way into the fusion layers (itm: 8 for ALBEF-base, `default_gradcam_fusion_layer`) or
    # block 8 (itc; the last block of a smaller ViT) (`resolved_gradcam_layer`).
    gradcam_layer: int | None = None
    iou_threshold: float = 0.5  # a predicted box is a hit when its IoU with the ground truth is >= this
    eval_every: int = 1  # evaluate val every N epochs (and after the last)
    num_pictures: int = 8  # expressions drawn (heat map, chosen and true box) per evaluation; 0 = none
    synth: GroundingSynthConfig = field(default_factory=GroundingSynthConfig)

    def resolved_gradcam_layer(self, model: ModelConfig) -> int:
        """The Grad-CAM layer index for `model` (gradcam_layer, or its default when null)."""
        if self.gradcam_layer is not None:
            return self.gradcam_layer
        if self.gradcam_kind == "itc":
            return min(8, model.vision.depth - 1)
        return default_gradcam_fusion_layer(model.text.fusion_layer, model.text.layers)


def _ge(bound: float):
    return lambda v: v >= bound


def _gt(bound: float):
    return lambda v: v > bound


def _lt(bound: float):
    return lambda v: v < bound


def _le(bound: float):
    return lambda v: v <= bound


# (dotted key, lower check, upper check, what the message says): the valid range of each numeric field whose
# value is not already tied to another by a cross-field check; `Config.validate` runs these first, so a zero
# divisor or a negative count never reaches the code that would divide by it or build with it.
NUMERIC_RANGES: tuple[tuple[str, Any, Any, str], ...] = (
    *(
        (f"model.vision.{k}", _ge(1), None, ">= 1")
        for k in ("image_size", "patch_size", "width", "depth", "heads")
    ),
    ("model.vision.mlp_ratio", _gt(0), None, "> 0"),
    ("model.text.init_std", _gt(0), None, "> 0"),
    ("model.itm_neg_temp", _ge(0), None, ">= 0 (0 = the ITC temperature)"),
    ("model.ta_partner_temp", _ge(0), None, ">= 0 (0 = uniform partners)"),
    ("model.vision.drop_path", _ge(0), _lt(1), "in [0, 1)"),
    ("model.vision.patch_dropout", _ge(0), _lt(1), "in [0, 1)"),
    *(
        (f"model.text.{k}", _ge(1), None, ">= 1")
        for k in (
            "vocab_size",
            "hidden",
            "layers",
            "heads",
            "intermediate",
            "max_position",
            "type_vocab_size",
        )
    ),
    ("model.text.dropout", _ge(0), _lt(1), "in [0, 1)"),
    ("model.text.layer_norm_eps", _gt(0), None, "> 0"),
    ("model.embed_dim", _ge(1), None, ">= 1"),
    ("data.max_words", _ge(1), None, ">= 1"),
    ("data.max_tokens", _ge(2), None, ">= 2 ([CLS] and one token)"),
    ("data.num_workers", _ge(0), None, ">= 0"),
    ("data.randaug_n", _ge(0), None, ">= 0"),
    ("data.randaug_m", _ge(0), _le(10), "in 0..10"),
    ("train.epochs", _ge(1), None, ">= 1 (train.max_steps caps the steps)"),
    ("train.max_steps", lambda v: v == -1 or v >= 1, None, "-1 (the epochs decide) or >= 1"),
    ("train.log_every", _ge(1), None, ">= 1"),
    ("train.save_every", _ge(0), None, ">= 0 (0 = no resumable checkpoints)"),
    ("train.keep_last", _ge(1), None, ">= 1"),
    ("train.global_batch_size", _ge(0), None, ">= 0 (0 = derived)"),
    ("train.stop_at_step", lambda v: v == -1 or v >= 1, None, "-1 (never) or >= 1"),
    ("optim.lr", _gt(0), None, "> 0"),
    ("optim.min_lr", _ge(0), None, ">= 0"),
    ("optim.warmup_lr", _ge(0), None, ">= 0"),
    ("optim.warmup_steps", _ge(0), None, ">= 0"),
    ("optim.weight_decay", _ge(0), None, ">= 0"),
    ("optim.eps", _gt(0), None, "> 0"),
    ("optim.grad_clip", _ge(0), None, ">= 0 (0 = no clipping)"),
    ("loss.alpha_ramp_steps", _ge(-1), None, ">= -1 (-1 = the first epoch)"),
    *((f"loss.{k}_weight", _ge(0), None, ">= 0") for k in ("itc", "itm", "mlm")),
)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    vqa: VQAConfig = field(default_factory=VQAConfig)
    nlvr: NLVRConfig = field(default_factory=NLVRConfig)
    ve: VEConfig = field(default_factory=VEConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)

    def validate(self) -> None:
        """Range checks of every numeric field (`NUMERIC_RANGES`), then cross-field checks; every message
        names the fields involved. Runs before anything is built."""
        self._validate_ranges()
        m, t, d = self.model, self.model.text, self.data
        v = m.vision
        if v.image_size % v.patch_size:
            raise ConfigError(
                f"model.vision.image_size ({v.image_size}) must be a multiple of "
                f"model.vision.patch_size ({v.patch_size})"
            )
        if v.width % v.heads:
            raise ConfigError(
                f"model.vision.width ({v.width}) must be divisible by model.vision.heads ({v.heads})"
            )
        if t.hidden % t.heads:
            raise ConfigError(
                f"model.text.hidden ({t.hidden}) must be divisible by model.text.heads ({t.heads})"
            )
        if not 0 < t.fusion_layer < t.layers:
            raise ConfigError(
                f"model.text.fusion_layer ({t.fusion_layer}) must lie in "
                f"1..model.text.layers-1 ({t.layers - 1})"
            )
        if m.vision.pos_embed_init not in ("trunc_normal", "sincos"):
            raise ConfigError(
                "model.vision.pos_embed_init must be 'trunc_normal' or 'sincos', got "
                f"{m.vision.pos_embed_init!r}"
            )
        if m.vision.pos_embed_init == "sincos" and m.vision.width % 4:
            raise ConfigError(
                f"model.vision.pos_embed_init 'sincos' needs model.vision.width divisible by 4, got "
                f"{m.vision.width}"
            )
        if m.queue_size < 0:
            raise ConfigError(f"model.queue_size must be >= 0, got {m.queue_size}")
        if not 0.0 <= m.momentum <= 1.0:
            raise ConfigError(f"model.momentum must lie in [0, 1], got {m.momentum}")
        if not 0.0 < m.temp_min <= m.temp <= m.temp_max:
            raise ConfigError("need 0 < model.temp_min <= model.temp <= model.temp_max")
        if not 0.0 < m.mlm_probability < 1.0:
            raise ConfigError(f"model.mlm_probability must lie in (0, 1), got {m.mlm_probability}")
        if d.max_tokens > t.max_position:
            raise ConfigError(
                f"data.max_tokens ({d.max_tokens}) exceeds model.text.max_position ({t.max_position})"
            )
        if d.tokenizer_mode not in ("albef", "standard"):
            raise ConfigError(f"data.tokenizer_mode must be 'albef' or 'standard', got {d.tokenizer_mode!r}")
        if d.loader not in ("torch", "dali"):
            raise ConfigError(f"data.loader must be 'torch' or 'dali', got {d.loader!r}")
        if d.max_image_pixels < 1:
            raise ConfigError(f"data.max_image_pixels must be >= 1, got {d.max_image_pixels}")
        if len(d.crop_scale) != 2 or not 0.0 < d.crop_scale[0] <= d.crop_scale[1] <= 1.0:
            raise ConfigError(f"data.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {d.crop_scale}")
        if len(self.optim.betas) != 2:
            raise ConfigError(f"optim.betas must have two values, got {self.optim.betas}")
        if self.train.batch_size < 2:
            raise ConfigError(
                f"train.batch_size must be >= 2 (ITM draws its negatives from the rest of the batch), "
                f"got {self.train.batch_size}"
            )
        if self.train.grad_accum < 1:
            raise ConfigError(f"train.grad_accum must be >= 1, got {self.train.grad_accum}")
        if self.train.engine not in ("torch", "deepspeed"):
            raise ConfigError(f"train.engine must be 'torch' or 'deepspeed', got {self.train.engine!r}")
        if self.train.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(
                f"train.precision must be auto, bf16, fp16 or fp32, got {self.train.precision!r}"
            )
        if self.optim.lr_ref_batch < 0:
            raise ConfigError(f"optim.lr_ref_batch must be >= 0, got {self.optim.lr_ref_batch}")
        if not 0.0 <= self.loss.alpha <= 1.0:
            raise ConfigError(f"loss.alpha must lie in [0, 1], got {self.loss.alpha}")
        if self.eval.k_test < 1 or self.eval.batch_size < 1 or self.eval.itm_batch_size < 1:
            raise ConfigError(
                f"eval.k_test ({self.eval.k_test}), eval.batch_size ({self.eval.batch_size}) and "
                f"eval.itm_batch_size ({self.eval.itm_batch_size}) must be >= 1"
            )
        if self.finetune.eval_every < 1:
            raise ConfigError(f"finetune.eval_every must be >= 1, got {self.finetune.eval_every}")
        q = self.vqa
        for name in ("k_test", "max_question_words", "eval_max_question_words", "eval_every", "rank_batch"):
            if getattr(q, name) < 1:
                raise ConfigError(f"vqa.{name} must be >= 1, got {getattr(q, name)}")
        if q.max_answer_tokens < 3:
            raise ConfigError(
                f"vqa.max_answer_tokens must be >= 3 ([CLS] answer [SEP]), got {q.max_answer_tokens}"
            )
        if q.eval_max_tokens < 2 or q.eval_max_tokens > t.max_position:
            raise ConfigError(
                f"vqa.eval_max_tokens ({q.eval_max_tokens}) must lie in 2..model.text.max_position "
                f"({t.max_position})"
            )
        for name in ("nlvr", "ve", "grounding"):
            if getattr(self, name).eval_every < 1:
                raise ConfigError(f"{name}.eval_every must be >= 1, got {getattr(self, name).eval_every}")
        if q.vg_weight < 0:
            raise ConfigError(f"vqa.vg_weight must be >= 0, got {q.vg_weight}")
        self._validate_grounding()

    def _validate_ranges(self) -> None:
        for key, lo, hi, what in NUMERIC_RANGES:
            obj = self
            for part in key.split("."):
                obj = getattr(obj, part)
            value = obj
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            bad = value != value or (lo is not None and not lo(value)) or (hi is not None and not hi(value))
            if bad:
                raise ConfigError(f"{key} must be {what}, got {value}")

    def _validate_grounding(self) -> None:
        g, t, v = self.grounding, self.model.text, self.model.vision
        if g.gradcam_kind not in GRADCAM_KINDS:
            raise ConfigError(f"grounding.gradcam_kind must be 'itm' or 'itc', got {g.gradcam_kind!r}")
        if g.gradcam_layer is not None:
            if g.gradcam_kind == "itm" and not t.fusion_layer <= g.gradcam_layer < t.layers:
                raise ConfigError(
                    f"grounding.gradcam_layer ({g.gradcam_layer}) must be a fusion layer for gradcam_kind "
                    f"'itm': model.text.fusion_layer ({t.fusion_layer}) .. model.text.layers - 1 "
                    f"({t.layers - 1})"
                )
            if g.gradcam_kind == "itc" and not 0 <= g.gradcam_layer < v.depth:
                raise ConfigError(
                    f"grounding.gradcam_layer ({g.gradcam_layer}) must be a ViT block for gradcam_kind "
                    f"'itc': 0 .. model.vision.depth - 1 ({v.depth - 1})"
                )
        if g.num_pictures < 0:
            raise ConfigError(f"grounding.num_pictures must be >= 0, got {g.num_pictures}")
        if not 0.0 < g.iou_threshold <= 1.0:
            raise ConfigError(f"grounding.iou_threshold must lie in (0, 1], got {g.iou_threshold}")


# ---------------------------------------------------------------------------------------- loading
_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp` (ints widen to floats, nothing else is converted)."""
    where = f" (in {source})" if source else ""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}'{where}: expected a mapping (section), got {value!r}")
        return _build(tp, value, key, source)
    origin = typing.get_origin(tp)
    if origin in (list, typing.List):  # noqa: UP006
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"config key '{key}'{where}: expected a list of {_type_name(item_tp)}, got {value!r}"
            )
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(tp):
            try:
                return _coerce(value, alt, key, source)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}'{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):  # the null of an optional field (`int | None`)
        if value is not None:
            raise ConfigError(f"config key '{key}'{where}: expected null, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-4 as a string; YAML 1.2 and users say float
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f"config key '{key}'{where}: expected float, got {type(value).__name__} {value!r}"
            )
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"config key '{key}'{where}: expected int, got {type(value).__name__} {value!r}"
            )
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(
                f"config key '{key}'{where}: expected bool (true/false), got {type(value).__name__} {value!r}"
            )
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(
                f"config key '{key}'{where}: expected str, got {type(value).__name__} {value!r}"
            )
        return value
    raise ConfigError(f"config key '{key}': unsupported annotation {tp!r}")  # a bug in this file


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            where = f" in {source}" if source else ""
            raise ConfigError(
                f"unknown config key '{dotted}'{where}; known keys here: {', '.join(sorted(fields))}"
            )
        default = _field_default(fields[key])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            # A section given in part keeps this field's own defaults for the rest (e.g. nlvr.synth.out_dir
            # "data/synth_nlvr2", not PairSynthConfig's "").
            value = _merge(dataclasses.asdict(default), value)
        kwargs[key] = _coerce(value, hints[key], dotted, source)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (['section', 'key'], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return parts, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then the overrides; validated."""
    raw: dict = {}
    source = ""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}: {e.reason})") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
        source = str(p)
    # Check the file on its own first, so that its errors name the file.
    _build(Config, raw, "", source)
    for ov in overrides:
        parts, value = parse_override(ov)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        _build(Config, nested, "", f"override {ov!r}")  # names the key if unknown / mistyped
        raw = _merge(raw, nested)
    cfg = _build(Config, raw, "", source)
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, source: str = "") -> Config:
    cfg = _build(Config, data, "", source)
    cfg.validate()
    return cfg


def model_config_from_dict(data: dict, source: str = "") -> ModelConfig:
    """The `model` section of a saved config (a checkpoint's), typed (unknown keys are errors) but not
    cross-checked against the other sections: what its weights' shapes follow from."""
    return _build(ModelConfig, data, "model", source)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every field, defaults included) as YAML, atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(p)
