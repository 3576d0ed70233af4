"""Single-process pre-training (CPU or one GPU): the step loop, metrics, evaluation and the checkpoint.

The DeepSpeed trainer (multi-rank, ZeRO-2, resume) builds on the same pieces: `build_model`,
`build_tokenizer`, the schedules and `train_step`'s order (EMA, forward, backward, optimizer, enqueue).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError, config_to_dict, save_config
from ..data import RetrievalEvalSet, TextTokenizer, build_pretrain_loader
from ..eval.retrieval import itc_retrieval
from ..model import ALBEFPretrain
from ..model.weights import OUR_FORMAT, load_pretrained
from .schedule import alpha_at, lr_at, param_groups

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA device is available")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_tokenizer(cfg: Config) -> TextTokenizer:
    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer is empty: give a vocab.txt or a bert-base-uncased folder")
    tok = TextTokenizer.from_path(
        cfg.data.tokenizer, max_tokens=cfg.data.max_tokens, mode=cfg.data.tokenizer_mode
    )
    if tok.vocab_size != cfg.model.text.vocab_size:
        raise ConfigError(
            f"model.text.vocab_size ({cfg.model.text.vocab_size}) differs from the vocabulary of "
            f"data.tokenizer ({cfg.data.tokenizer}: {tok.vocab_size} tokens)"
        )
    return tok


def build_model(cfg: Config, tokenizer: TextTokenizer, **kwargs) -> ALBEFPretrain:
    model = ALBEFPretrain(
        cfg.model,
        special_tokens={
            "pad": tokenizer.pad_token_id,
            "cls": tokenizer.cls_token_id,
            "mask": tokenizer.mask_token_id,
        },
        loss_weights=(cfg.loss.itc_weight, cfg.loss.itm_weight, cfg.loss.mlm_weight),
        **kwargs,
    )
    load_pretrained(model, vit=cfg.model.vit_init, bert=cfg.model.bert_init, albef=cfg.model.albef_init)
    return model


def save_checkpoint(path: str | Path, model: ALBEFPretrain, cfg: Config, **state) -> Path:
    """Atomic: written to a temp file in the same folder, fsynced, then renamed over the target."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    payload = {
        "albef_ds_format": OUR_FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": config_to_dict(cfg),
        **state,
    }
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


class _MetricsFile:
    """JSON lines under the run folder (rank 0 only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def pretrain(cfg: Config) -> dict:
    """Pre-train on one process. Returns the final metrics (losses averaged over the last log window,
    retrieval before and after)."""
    cfg.validate()
    if not cfg.data.train_file:
        raise ConfigError("data.train_file is empty: give at least one JSON list")
    for f in cfg.data.train_file + ([cfg.data.eval_file] if cfg.data.eval_file else []):
        if not Path(f).is_file():
            raise ConfigError(
                f"data file {f} does not exist (generate the synthetic set: albef-ds data synth)"
            )
    out_dir = Path(cfg.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    log.info("device %s, run folder %s", device, out_dir)

    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("ALBEF: %.2fM trainable parameters", n_params / 1e6)

    loader, sampler = build_pretrain_loader(
        cfg.data,
        tokenizer,
        image_size=cfg.model.vision.image_size,
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
    )
    steps_per_epoch = sampler.batches_per_epoch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) is larger than the training set: no full batch"
        )
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps > 0:
        total_steps = min(total_steps, cfg.train.max_steps)
    ramp = cfg.loss.alpha_ramp_steps if cfg.loss.alpha_ramp_steps >= 0 else steps_per_epoch
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=o.warmup_lr,
        betas=tuple(o.betas),
        eps=o.eps,
        fused=device.type == "cuda",
    )

    eval_set = None
    if cfg.data.eval_file:
        eval_set = RetrievalEvalSet(
            cfg.data.eval_file,
            image_root=cfg.data.image_root,
            image_size=cfg.model.vision.image_size,
            max_words=cfg.data.max_words,
        )
    metrics_file = _MetricsFile(out_dir / "metrics.jsonl")
    # Records are appended (an earlier run's are kept); each run starts with a "start" record.
    metrics_file.write({"event": "start", "time": time.time(), "total_steps": total_steps})
    result: dict = {"steps": 0}

    def evaluate(tag: str) -> None:
        if eval_set is None:
            return
        r = itc_retrieval(model, eval_set, tokenizer, device=device, batch_size=cfg.eval.batch_size)
        n_img = len(eval_set.images)
        log.info(
            "[%s] ITC retrieval on %d held-out images / %d texts: TR R@1 %.1f  IR R@1 %.1f  r_mean %.1f "
            "(chance R@1 about %.1f)",
            tag,
            n_img,
            len(eval_set.texts),
            r["txt_r1"],
            r["img_r1"],
            r["r_mean"],
            100.0 / n_img,
        )
        result[f"retrieval_{tag}"] = r
        metrics_file.write({"event": f"eval_{tag}", "step": result["steps"], **r})

    if cfg.train.eval_at_start:
        evaluate("before")

    model.train()
    step = 0
    # Metrics accumulate on the device and are read every log_every steps: no host sync in between.
    acc = torch.zeros(4, device=device)
    acc_n = 0
    skipped = 0
    t_window = time.perf_counter()
    samples_window = 0
    t_start = time.perf_counter()
    epoch = 0
    done = total_steps == 0
    while not done:
        sampler.set_epoch(epoch)
        for batch in loader:
            skipped += int(batch["num_skipped"])
            if batch["image"].shape[0] < 2:
                log.warning("step %d: batch with fewer than 2 decodable images skipped", step)
                continue
            lr = lr_at(
                step,
                total_steps=total_steps,
                lr=o.lr,
                min_lr=o.min_lr,
                warmup_lr=o.warmup_lr,
                warmup_steps=o.warmup_steps,
            )
            for g in optimizer.param_groups:
                g["lr"] = lr
            alpha = alpha_at(step, alpha=cfg.loss.alpha, ramp_steps=ramp)
            image = batch["image"].to(device, non_blocking=True)
            ids = batch["input_ids"].to(device, non_blocking=True)
            mask = batch["attention_mask"].to(device, non_blocking=True)

            model.momentum_update()
            out = model(image, ids, mask, alpha=alpha)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            optimizer.step()
            model.enqueue(out.image_feat_m, out.text_feat_m)

            acc += torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_mlm]).detach()
            acc_n += 1
            samples_window += image.shape[0]
            step += 1
            result["steps"] = step
            if step % cfg.train.log_every == 0 or step == total_steps:
                vals = (acc / acc_n).tolist()  # the one host sync per log window
                if not all(math.isfinite(v) for v in vals):
                    raise FloatingPointError(f"non-finite loss at step {step}: {vals}")
                dt = time.perf_counter() - t_window
                rec = {
                    "event": "train",
                    "step": step,
                    "epoch": epoch,
                    "lr": lr,
                    "alpha": alpha,
                    "loss": vals[0],
                    "loss_itc": vals[1],
                    "loss_itm": vals[2],
                    "loss_mlm": vals[3],
                    "temp": float(model.clamped_temp().item()),
                    "samples_per_s": samples_window / dt,
                    "skipped_images": skipped,
                }
                metrics_file.write(rec)
                eta = (time.perf_counter() - t_start) / step * (total_steps - step)
                log.info(
                    "step %d/%d  loss %.3f (itc %.3f itm %.3f mlm %.3f)  lr %.2e  alpha %.2f  "
                    "%.1f samples/s  "
                    "eta %.0fs",
                    step,
                    total_steps,
                    vals[0],
                    vals[1],
                    vals[2],
                    vals[3],
                    lr,
                    alpha,
                    rec["samples_per_s"],
                    eta,
                )
                result["last"] = rec
                acc.zero_()
                acc_n = 0
                samples_window = 0
                t_window = time.perf_counter()
            if cfg.train.save_every > 0 and step % cfg.train.save_every == 0:
                save_checkpoint(out_dir / "checkpoint.pt", model, cfg, step=step, epoch=epoch)
            if step >= total_steps:
                done = True
                break
        epoch += 1
        if epoch >= cfg.train.epochs:
            done = True

    ckpt = save_checkpoint(out_dir / "checkpoint.pt", model, cfg, step=step, epoch=epoch)
    log.info("saved %s (step %d, %d images skipped as undecodable)", ckpt, step, skipped)
    result["checkpoint"] = str(ckpt)
    result["skipped_images"] = skipped
    if cfg.train.eval_at_end:
        evaluate("after")
    return result


def evaluate_checkpoint(cfg: Config, checkpoint: str) -> dict:
    """ITC retrieval of a checkpoint (ours, released ALBEF, or empty = random init) on data.eval_file."""
    if not cfg.data.eval_file:
        raise ConfigError("data.eval_file is empty: nothing to evaluate on")
    device = resolve_device(cfg.train.device)
    tokenizer = build_tokenizer(cfg)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, tokenizer)
    if checkpoint:
        load_pretrained(model, albef=checkpoint)
    model.to(device)
    eval_set = RetrievalEvalSet(
        cfg.data.eval_file,
        image_root=cfg.data.image_root,
        image_size=cfg.model.vision.image_size,
        max_words=cfg.data.max_words,
    )
    return itc_retrieval(model, eval_set, tokenizer, device=device, batch_size=cfg.eval.batch_size)
