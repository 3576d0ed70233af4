"""`albef-ds evaluate retrieval`: ITC top-k + ITM re-rank retrieval of a checkpoint, on one or more ranks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..data import RetrievalEvalSet
from ..data.karpathy import check_karpathy_eval
from ..model.retrieval import ALBEFRetrieval
from ..model.weights import load_pretrained
from .checkpoints import load_weights
from .comm import LocalComm, ProcessGroupComm
from .itm import evaluate_retrieval

log = logging.getLogger(__name__)


def build_retrieval_model(cfg: Config, tokenizer, *, init: str = "", **kwargs) -> ALBEFRetrieval:
    """The retrieval module with the configured DeiT/BERT initialisation, then `init` (any source that
    `load_weights` accepts: file, checkpoint folder, run folder, released ALBEF checkpoint)."""
    model = ALBEFRetrieval(
        cfg.model,
        special_tokens={
            "pad": tokenizer.pad_token_id,
            "cls": tokenizer.cls_token_id,
            "mask": tokenizer.mask_token_id,
        },
        loss_weights=(cfg.loss.itc_weight, cfg.loss.itm_weight, 0.0),
        **kwargs,
    )
    load_pretrained(model, vit=cfg.model.vit_init, bert=cfg.model.bert_init)
    if init:
        load_weights(model, init)
    return model


def load_eval_set(cfg: Config, path: str, image_root: str = "") -> RetrievalEvalSet:
    if not path:
        raise ConfigError("no evaluation file: set data.eval_file (or pass --split-file)")
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


def _tensorboard(log_dir: Path, tag: str, metrics: dict, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(log_dir)) as tb:
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                tb.add_scalar(f"{tag}/{k}", v, step)


def evaluate_retrieval_checkpoint(
    cfg: Config,
    checkpoint: str,
    *,
    split_file: str = "",
    k_test: int = 0,
    output: str = "",
    tensorboard: str = "",
    save_scores: str = "",
    step: int = 0,
) -> dict:
    """Evaluate `checkpoint` (empty = the configured initialisation) on split_file (default data.eval_file)
    with ITC top-k + ITM re-ranking, on every rank a launcher started (each encodes its share). Rank 0 writes
    the JSON (`output`), TensorBoard scalars `eval_retrieval/<split>/*` (`tensorboard`, default
    <train.output_dir>/tensorboard when train.tensorboard) and, with `save_scores`, the score matrices."""
    from ..train.dist_env import world_info_from_env
    from ..train.loop import build_tokenizer, resolve_device, seed_everything

    cfg.validate()
    info = world_info_from_env()
    device = resolve_device(cfg.train.device, info.local_rank)
    path = split_file or cfg.data.eval_file
    image_root = (cfg.finetune.image_root or cfg.data.image_root) if split_file else cfg.data.image_root
    eval_set = load_eval_set(cfg, path, image_root)
    if info.world_size > 1:
        from ..train.engine import init_distributed

        init_distributed(info, device)
        comm = ProcessGroupComm()
    else:
        comm = LocalComm()
    tokenizer = build_tokenizer(cfg)
    seed_everything(cfg.train.seed)
    model = build_retrieval_model(cfg, tokenizer, init=checkpoint or cfg.model.albef_init).to(device)
    k = k_test or cfg.eval.k_test
    metrics, scores = evaluate_retrieval(
        model,
        eval_set,
        tokenizer,
        device=device,
        k_test=k,
        batch_size=cfg.eval.batch_size,
        itm_batch_size=cfg.eval.itm_batch_size,
        comm=comm,
        num_workers=cfg.data.num_workers,
        return_scores=True,
    )
    metrics = {**metrics, "world_size": comm.world_size, "checkpoint": str(checkpoint), "split": str(path)}
    if comm.rank == 0:
        log.info(
            "retrieval (ITM re-rank of top-%d) on %s: TR R@1 %.2f  IR R@1 %.2f  r_mean %.2f "
            "(ITC only: TR R@1 %.2f  IR R@1 %.2f  r_mean %.2f)",
            k,
            path,
            metrics["txt_r1"],
            metrics["img_r1"],
            metrics["r_mean"],
            metrics["itc_txt_r1"],
            metrics["itc_img_r1"],
            metrics["itc_r_mean"],
        )
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(metrics, indent=2) + "\n")
        tb_dir = tensorboard or (
            str(Path(cfg.train.output_dir) / "tensorboard") if cfg.train.tensorboard else ""
        )
        if tb_dir:
            _tensorboard(Path(tb_dir), f"eval_retrieval/{Path(path).stem}", metrics, step)
        if save_scores:
            torch.save(
                {"itc": scores.itc, "i2t": scores.i2t, "t2i": scores.t2i},
                Path(save_scores),
            )
    comm.barrier()
    return metrics
