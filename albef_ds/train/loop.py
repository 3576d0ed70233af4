"""Pre-training: the step loop, metrics, evaluation and the checkpoint, over a torch or DeepSpeed engine.

One optimizer step = momentum EMA, then `grad_accum` micro-batches (forward, backward), the optimizer step,
then one enqueue of every micro-batch's momentum features (one all-gather across ranks).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError, config_to_dict, save_config
from ..data import RetrievalEvalSet, TextTokenizer, build_pretrain_loader
from ..eval.retrieval import itc_retrieval
from ..model import ALBEFPretrain
from ..model.weights import OUR_FORMAT, load_pretrained
from .checkpoint import (
    atomic_torch_save,
    publish,
    read_client,
    read_latest,
    rng_state,
    set_rng_state,
    step_tag,
    write_client,
)
from .dist_env import DistInfo, world_info_from_env
from .ds_config import build_ds_config, global_batch, scaled_lr
from .monitor import LogWindow, Monitor
from .schedule import alpha_at, lr_at

log = logging.getLogger(__name__)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """ "auto" = this rank's GPU (cuda:local_rank) when CUDA is available, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
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


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], cfg: Config, **state) -> Path:
    """Consolidated fp32 weights (+ config) for evaluation; atomic (temp file, fsync, rename)."""
    payload = {
        "albef_ds_format": OUR_FORMAT,
        "model": {
            k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in state_dict.items()
        },
        "config": config_to_dict(cfg),
        **state,
    }
    return atomic_torch_save(payload, Path(path))


EXIT_PREEMPTED = 85  # exit status after a signal-triggered checkpoint: "requeue me" for the launcher


class _StopSignals:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes the current step, checkpoints and exits."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> _StopSignals:
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum
        log.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def _sha256(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def write_rank_report(out_dir: Path, rank: int, model: ALBEFPretrain, engine, seen, *, steps: int) -> dict:
    """`rank<N>.json` in the run folder: what this rank holds, to check that ranks agree where they must
    (momentum weights, queues: identical checksums) and split what they should (optimizer state, samples)."""
    moms, _ = model.momentum_pairs()
    report = {
        "rank": rank,
        "world_size": engine.world_size,
        "steps": steps,
        "trainable_params": sum(p.numel() for p in model.parameters()),
        "optimizer_state_numel": engine.optimizer_state_numel(),
        "optimizer_state_abs_sum": engine.optimizer_state_abs_sum(),
        "momentum_sha256": _sha256(moms),
        "queue_sha256": _sha256([model.image_queue, model.text_queue]),
        "queue_ptr": int(model.queue_ptr.item()),
        "samples": [[e, i] for e, idx in seen for i in idx.tolist()],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    return report


def _batches(loader, sampler, start_epoch: int = 0, start_batch: int = 0):
    """(epoch, batches done in that epoch, batch) forever, from a position in an epoch (resume): a new
    epoch (re-seeded order and augmentation) when one runs out."""
    epoch, done = start_epoch, start_batch
    while True:
        sampler.set_epoch(epoch)
        sampler.set_start(done)
        for batch in loader:
            done += 1
            yield epoch, done, batch
        epoch, done = epoch + 1, 0


def save_resumable_checkpoint(
    engine, root: Path, tag: str, client: dict, *, rank: int, keep_last: int
) -> None:
    """Every rank: the engine's state, its RNG state; rank 0: the client file, then (after a barrier, once
    every rank has written its part) `latest` moves to `tag` and old checkpoints beyond keep_last go."""
    engine.save(root, tag, client)
    atomic_torch_save(rng_state(), root / tag / f"rng_rank{rank}.pt")
    if rank == 0:
        write_client(root / tag, client)
    engine.barrier()
    if rank == 0:
        publish(root, tag, keep_last)
        log.info("checkpoint %s complete", root / tag)


def resume_tag(resume: str, root: Path) -> str | None:
    if not resume:
        return None
    if resume == "auto":
        return read_latest(root)  # None: nothing to resume from yet, start fresh
    tag = Path(resume).name
    if not (root / tag).is_dir():
        raise ConfigError(f"train.resume = {resume!r}: no checkpoint folder {root / tag}")
    return tag


def _make_engine(
    cfg: Config, model: ALBEFPretrain, device: torch.device, info: DistInfo, *, load_universal: bool = False
):
    if cfg.train.engine == "deepspeed":
        from .engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, device, info, load_universal=load_universal)
    from .engine import TorchEngine

    return TorchEngine(model, cfg, device)


def pretrain(cfg: Config) -> dict:
    """Pre-train ALBEF: one process with torch AdamW (`train.engine=torch`) or any number of ranks with
    DeepSpeed ZeRO-2 (`train.engine=deepspeed`, launched by deepspeed / torchrun / srun / mpirun).
    Returns the final metrics (losses of the last log window, retrieval before and after) on rank 0."""
    cfg.validate()
    info = world_info_from_env()
    if cfg.train.engine == "torch" and info.world_size > 1:
        raise ConfigError(
            f"{info.world_size} ranks were launched ({info.source}) but train.engine = torch runs one "
            "process; "
            "set train.engine=deepspeed"
        )
    global_batch(
        cfg, world_size=info.world_size
    )  # a batch-layout contradiction fails before anything is built
    if cfg.train.engine == "deepspeed":
        build_ds_config(cfg, world_size=info.world_size)
    if not cfg.data.train_file:
        raise ConfigError("data.train_file is empty: give at least one JSON list")
    for f in cfg.data.train_file + ([cfg.data.eval_file] if cfg.data.eval_file else []):
        if not Path(f).is_file():
            raise ConfigError(
                f"data file {f} does not exist (generate the synthetic set: albef-ds data synth)"
            )
    device = resolve_device(cfg.train.device, info.local_rank)
    if cfg.train.engine == "deepspeed":
        from .engine import init_distributed

        init_distributed(info, device)
    is_main = info.rank == 0
    out_dir = Path(cfg.train.output_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    # The same seed on every rank: identical initial weights, momentum copies and queues.
    seed_everything(cfg.train.seed)
    log.info("rank %d/%d on %s, run folder %s", info.rank, info.world_size, device, out_dir)

    tokenizer = build_tokenizer(cfg)
    accum = cfg.train.grad_accum
    gather_kwargs = {}
    if info.world_size > 1:
        from .engine import make_all_gather

        gather_kwargs["all_gather"] = make_all_gather(cfg.train.batch_size * accum)
    model = build_model(cfg, tokenizer, **gather_kwargs).to(device)
    log.info("ALBEF: %.2fM trainable parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    ckpt_root = out_dir / "checkpoints"
    tag = resume_tag(cfg.train.resume, ckpt_root)
    saved = read_client(ckpt_root / tag) if tag else None
    # A checkpoint from another rank count goes through DeepSpeed's universal format (decided before the
    # engine exists: it is an engine setting).
    other_ranks = saved is not None and saved["world_size"] != info.world_size
    engine = _make_engine(cfg, model, device, info, load_universal=other_ranks)
    model = engine.module
    # Each rank draws its own augmentation and masking randomness from here on.
    seed_everything(cfg.train.seed + 1000 * info.rank)

    loader, sampler = build_pretrain_loader(
        cfg.data,
        tokenizer,
        image_size=cfg.model.vision.image_size,
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        rank=info.rank,
        world_size=info.world_size,
        device=device,
        dtype=getattr(engine, "input_dtype", torch.float32),
    )
    steps_per_epoch = sampler.batches_per_epoch // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) x train.grad_accum ({accum}) is larger than "
            "this rank's "
            "share of the training set: no full optimizer step per epoch"
        )
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps > 0:
        total_steps = min(total_steps, cfg.train.max_steps)
    ramp = cfg.loss.alpha_ramp_steps if cfg.loss.alpha_ramp_steps >= 0 else steps_per_epoch
    o = cfg.optim
    peak_lr = scaled_lr(cfg, world_size=info.world_size)

    eval_set = None
    if cfg.data.eval_file and is_main:
        eval_set = RetrievalEvalSet(
            cfg.data.eval_file,
            image_root=cfg.data.image_root,
            image_size=cfg.model.vision.image_size,
            max_words=cfg.data.max_words,
            loader=cfg.data.loader,
        )
    result: dict = {"steps": 0, "world_size": info.world_size}

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
        monitor.eval(tag, result["steps"], r)

    start_step, start_epoch, start_batch = 0, 0, 0
    rng_to_restore = None
    if tag:
        client = engine.load(ckpt_root, tag)
        start_step, start_epoch, start_batch = client["step"], client["epoch"], client["batches_in_epoch"]
        rng_file = ckpt_root / tag / f"rng_rank{info.rank}.pt"
        if client["world_size"] != info.world_size:
            # Another rank count: weights, AdamW moments (repartitioned by the universal checkpoint),
            # momentum encoders and queues carry over; the epoch is re-split across the new ranks and
            # resumes at the same fraction of it.
            log.warning(
                "resuming a %d-rank checkpoint on %d ranks: the data order and random streams differ from "
                "an uninterrupted run",
                client["world_size"],
                info.world_size,
            )
            start_batch = min(
                start_batch * client["world_size"] // info.world_size, sampler.batches_per_epoch
            )
        elif rng_file.is_file():
            rng_to_restore = torch.load(rng_file, weights_only=True)
        log.info(
            "resumed from %s: step %d, epoch %d, batch %d of the epoch",
            ckpt_root / tag,
            start_step,
            start_epoch,
            start_batch,
        )
        result["resumed_from"] = tag
    result["steps"] = start_step
    # metrics.jsonl (appended: an earlier run's records are kept; each run starts with a "start" record),
    # TensorBoard and the progress bar, on rank 0.
    monitor = Monitor(
        out_dir,
        enabled=is_main,
        tensorboard=cfg.train.tensorboard,
        total_steps=total_steps,
        start_step=start_step,
    )
    monitor.write(
        {
            "event": "start",
            "time": time.time(),
            "start_step": start_step,
            "total_steps": total_steps,
            "world_size": info.world_size,
        }
    )

    def save_resumable(step_done: int, epoch_now: int, batches_in_epoch: int) -> None:
        tag_now = step_tag(step_done)
        client = {
            "step": step_done,
            "epoch": epoch_now,
            "batches_in_epoch": batches_in_epoch,
            "world_size": info.world_size,
            "data_seed": cfg.train.seed,
            "config": config_to_dict(cfg),
        }
        save_resumable_checkpoint(
            engine, ckpt_root, tag_now, client, rank=info.rank, keep_last=cfg.train.keep_last
        )

    if cfg.train.eval_at_start and not tag:
        evaluate("before")

    model.train()
    # Metrics accumulate on the device and are read every log_every steps: no host sync in between.
    window = LogWindow(
        ("loss", "loss_itc", "loss_itm", "loss_mlm"),
        device,
        world_size=info.world_size,
        start_step=start_step,
    )
    skipped = 0
    seen: list[tuple[int, torch.Tensor]] = []  # (epoch, sample indices) this rank trained on
    batches = _batches(loader, sampler, start_epoch, start_batch)
    if rng_to_restore is not None:
        set_rng_state(rng_to_restore)  # after the loader exists: the run continues the saved random streams
    epoch, batches_in_epoch = start_epoch, start_batch
    with _StopSignals() as stop, monitor.redirect_logging():
        for step in range(start_step, total_steps):
            lr = lr_at(
                step,
                total_steps=total_steps,
                lr=peak_lr,
                min_lr=o.min_lr,
                warmup_lr=o.warmup_lr,
                warmup_steps=o.warmup_steps,
            )
            engine.set_lr(lr)
            alpha = alpha_at(step, alpha=cfg.loss.alpha, ramp_steps=ramp)
            model.momentum_update()  # once per optimizer step, before the momentum forward
            feats_i, feats_t = [], []
            for micro in range(accum):
                epoch, batches_in_epoch, batch = next(batches)
                skipped += int(batch["num_skipped"])
                if batch["image"].shape[0] < 2:
                    raise RuntimeError(
                        f"rank {info.rank}, step {step}: fewer than 2 decodable images in a batch of "
                        f"{cfg.train.batch_size} ({batch['num_skipped']} skipped); check the data or use a "
                        "larger batch"
                    )
                image = batch["image"].to(device, non_blocking=True)
                out = engine.forward(
                    image,
                    batch["input_ids"].to(device, non_blocking=True),
                    batch["attention_mask"].to(device, non_blocking=True),
                    alpha=alpha,
                )
                engine.micro_step(out.loss, last=micro == accum - 1)
                feats_i.append(out.image_feat_m)
                feats_t.append(out.text_feat_m)
                window.add([out.loss, out.loss_itc, out.loss_itm, out.loss_mlm], image.shape[0])
                if cfg.train.record_samples:
                    seen.append((epoch, batch["index"]))
            # One enqueue (one all-gather) per optimizer step, of every micro-batch's momentum features.
            model.enqueue(torch.cat(feats_i), torch.cat(feats_t))
            done = step + 1
            result["steps"] = done
            window.step()
            monitor.step()
            if done % cfg.train.log_every == 0 or done == total_steps:
                stats = window.read(done, total_steps, info.rank)  # the one host sync per log window
                eta = stats.pop("eta_s")
                rec = {
                    "event": "train",
                    "step": done,
                    "epoch": epoch,
                    "lr": lr,
                    "alpha": alpha,
                    **stats,
                    "temp": float(model.clamped_temp().item()),
                    "skipped_images": skipped,
                }
                result["last"] = rec
                monitor.train(rec)
                if is_main:
                    log.info(
                        "step %d/%d  loss %.3f (itc %.3f itm %.3f mlm %.3f)  lr %.2e  alpha %.2f  "
                        "%.1f samples/s  eta %.0fs",
                        done,
                        total_steps,
                        rec["loss"],
                        rec["loss_itc"],
                        rec["loss_itm"],
                        rec["loss_mlm"],
                        lr,
                        alpha,
                        rec["samples_per_s"],
                        eta,
                    )
            # The signal vote is read STOP_VOTE_LAG steps late (no per-step stall); a planned stop is known
            # to every rank at once.
            preempt = engine.stop_vote(stop.received is not None) or done == cfg.train.stop_at_step
            if preempt or (cfg.train.save_every > 0 and done % cfg.train.save_every == 0):
                save_resumable(done, epoch, batches_in_epoch)
            if preempt:
                log.warning(
                    "stopped after step %d with a checkpoint; exit status %d asks for a requeue",
                    done,
                    EXIT_PREEMPTED,
                )
                result["preempted"] = True
                break
    engine.drain()
    monitor.close_bar()
    if result.get("preempted"):
        write_rank_report(out_dir, info.rank, model, engine, seen, steps=result["steps"])
        monitor.close()
        engine.barrier()
        return result

    result["skipped_images"] = skipped
    write_rank_report(out_dir, info.rank, model, engine, seen, steps=result["steps"])
    final_state = engine.full_state_dict()  # a collective under DeepSpeed: every rank takes part
    if is_main:
        ckpt = save_checkpoint(out_dir / "checkpoint.pt", final_state, cfg, step=result["steps"], epoch=epoch)
        log.info("saved %s (step %d, %d images skipped as undecodable)", ckpt, result["steps"], skipped)
        result["checkpoint"] = str(ckpt)
        if cfg.train.eval_at_end:
            evaluate("after")
    monitor.close()
    engine.barrier()
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
        loader=cfg.data.loader,
    )
    return itc_retrieval(model, eval_set, tokenizer, device=device, batch_size=cfg.eval.batch_size)
