"""`albef-ds finetune retrieval`: image-text retrieval fine-tuning (COCO / Flickr30K, Karpathy splits).

The recipe of ALBEF_SPEC.md: start from a pre-trained checkpoint (model.albef_init: ours, exported,
a DeepSpeed folder or a released ALBEF file; position embeddings resampled to model.vision.image_size,
384 px), ITC with same-image-id positives and momentum distillation, ITM with hard negatives that exclude
same-id items (`ALBEFRetrieval`), AdamW lr 1e-5 / wd 0.02, cosine to 1e-6, alpha ramped over the first epoch,
5 epochs (COCO) / 10 (Flickr). The torch engine (one process) or DeepSpeed ZeRO-2 on any number of ranks,
with the step loop's protocol: EMA, micro-batches, optimizer step, one enqueue per optimizer step.
After every finetune.eval_every epochs the validation split is evaluated (ITC top-k + ITM re-rank,
distributed over the ranks); the best r_mean is written to checkpoint_best.pt, and at the end the test
split is evaluated with the best weights (results.json, metrics.jsonl, TensorBoard).

Resumable like pre-training: every train.save_every steps (and at train.stop_at_step, which then exits with
EXIT_PREEMPTED) the engine writes checkpoints/<step tag> with the position in the epoch, each rank's RNG
state, the validation history and the best epoch so far; train.resume=auto|<tag> continues from it on the
same number of ranks (the best weights for the final test come back from checkpoint_best.pt).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from ..config import Config, ConfigError, config_to_dict, save_config
from ..data.karpathy import build_retrieval_train_loader, check_karpathy_eval
from ..eval.comm import LocalComm, ProcessGroupComm
from ..eval.itm import evaluate_retrieval
from ..eval.run import build_retrieval_model, load_eval_set
from .checkpoint import (
    read_client,
    set_rng_state,
    step_tag,
)
from .dist_env import world_info_from_env
from .ds_config import build_ds_config, global_batch, scaled_lr
from .engine import DeepSpeedEngine, TorchEngine
from .loop import (
    build_tokenizer,
    resolve_device,
    resume_tag,
    save_checkpoint,
    save_resumable_checkpoint,
    seed_everything,
)
from .monitor import LogWindow, Monitor
from .schedule import alpha_at, lr_at

log = logging.getLogger(__name__)

# What evaluation needs of the model (the best weights are kept in memory for the final test evaluation;
# momentum copies and queues are left out).
_ONLINE = ("visual_encoder.", "vision_proj.", "text_encoder.", "text_proj.", "itm_head.", "temp")


class RetrievalTorchEngine(TorchEngine):
    """TorchEngine whose forward passes the batch's image ids."""

    def forward(self, image, input_ids, attention_mask, *, alpha: float, idx: torch.Tensor):  # type: ignore[override]
        return self.module(image, input_ids, attention_mask, alpha=alpha, idx=idx)


class RetrievalDeepSpeedEngine(DeepSpeedEngine):
    """DeepSpeedEngine whose forward passes the batch's image ids."""

    def forward(self, image, input_ids, attention_mask, *, alpha: float, idx: torch.Tensor):  # type: ignore[override]
        return self.engine(image.to(self.input_dtype), input_ids, attention_mask, alpha=alpha, idx=idx)


def _check_inputs(cfg: Config) -> None:
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


def finetune_retrieval(cfg: Config) -> dict:
    """Fine-tune for retrieval; returns (on rank 0) the validation history, the best epoch, its checkpoint
    and the test metrics."""
    cfg.validate()
    info = world_info_from_env()
    if cfg.train.engine == "torch" and info.world_size > 1:
        raise ConfigError(
            f"{info.world_size} ranks were launched ({info.source}) but train.engine = torch runs one "
            "process; set train.engine=deepspeed"
        )
    global_batch(cfg, world_size=info.world_size)
    if cfg.train.engine == "deepspeed":
        build_ds_config(cfg, world_size=info.world_size)
    _check_inputs(cfg)
    device = resolve_device(cfg.train.device, info.local_rank)
    if cfg.train.engine == "deepspeed":
        from .engine import init_distributed

        init_distributed(info, device)
    is_main = info.rank == 0
    out_dir = Path(cfg.train.output_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    seed_everything(cfg.train.seed)
    tokenizer = build_tokenizer(cfg)
    accum = cfg.train.grad_accum
    kwargs = {}
    if info.world_size > 1:
        from .engine import make_all_gather

        kwargs["all_gather"] = make_all_gather(cfg.train.batch_size * accum)
    model = build_retrieval_model(cfg, tokenizer, init=cfg.model.albef_init, **kwargs).to(device)
    log.info(
        "retrieval fine-tuning: %.2fM trainable parameters, %d px, from %s",
        sum(p.numel() for p in model.parameters()) / 1e6,
        cfg.model.vision.image_size,
        cfg.model.albef_init or "the configured initialisation",
    )
    if cfg.train.engine == "deepspeed":
        engine = RetrievalDeepSpeedEngine(model, cfg, device, info)
        comm = ProcessGroupComm()
    else:
        engine = RetrievalTorchEngine(model, cfg, device)
        comm = LocalComm()
    model = engine.module
    seed_everything(cfg.train.seed + 1000 * info.rank)

    loader, sampler = build_retrieval_train_loader(
        cfg,
        tokenizer,
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
            f"train.batch_size ({cfg.train.batch_size}) x train.grad_accum ({accum}) is larger than this "
            "rank's share of the training set"
        )
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps > 0:
        total_steps = min(total_steps, cfg.train.max_steps)
    ramp = cfg.loss.alpha_ramp_steps if cfg.loss.alpha_ramp_steps >= 0 else steps_per_epoch
    o = cfg.optim
    peak_lr = scaled_lr(cfg, world_size=info.world_size)
    f = cfg.finetune
    val_set = load_eval_set(cfg, f.val_file, f.image_root) if f.val_file else None
    test_set = load_eval_set(cfg, f.test_file, f.image_root) if f.test_file else None

    ckpt_root = out_dir / "checkpoints"
    tag = resume_tag(cfg.train.resume, ckpt_root)
    result: dict = {"steps": 0, "world_size": info.world_size, "val": []}
    best = {"r_mean": -math.inf, "epoch": -1, "step": 0}
    best_state: dict[str, torch.Tensor] | None = None
    ckpt_path = out_dir / "checkpoint_best.pt"
    start_step, rng_to_restore = 0, None
    if tag:
        saved = read_client(ckpt_root / tag)
        if saved["world_size"] != info.world_size:
            raise ConfigError(
                f"train.resume: {ckpt_root / tag} was written by {saved['world_size']} ranks, this run has "
                f"{info.world_size}; resume fine-tuning on the same number of ranks"
            )
        client = engine.load(ckpt_root, tag)
        start_step = client["step"]
        state = client["finetune"]
        best.update(state["best"])
        result["val"] = state["val"]
        if "val_before" in state:
            result["val_before"] = state["val_before"]
        if best["epoch"] >= 0:
            if not ckpt_path.is_file():
                raise FileNotFoundError(
                    f"resuming from {ckpt_root / tag}: its best checkpoint {ckpt_path} is gone"
                )
            kept = torch.load(ckpt_path, map_location="cpu", weights_only=True)["model"]
            best_state = {k: v for k, v in kept.items() if k.startswith(_ONLINE)}
        rng_file = ckpt_root / tag / f"rng_rank{info.rank}.pt"
        if rng_file.is_file():
            rng_to_restore = torch.load(rng_file, weights_only=True)
        log.info("resumed fine-tuning from %s at step %d", ckpt_root / tag, start_step)
        result["resumed_from"] = tag
    result["steps"] = start_step

    monitor = Monitor(
        out_dir,
        enabled=is_main,
        tensorboard=cfg.train.tensorboard,
        total_steps=total_steps,
        start_step=start_step,
        desc="finetune",
    )
    monitor.write(
        {
            "event": "start",
            "task": "retrieval",
            "time": time.time(),
            "start_step": start_step,
            "total_steps": total_steps,
        }
    )

    def evaluate(eval_set, tag: str, step: int) -> dict:
        m = evaluate_retrieval(
            model,
            eval_set,
            tokenizer,
            device=device,
            k_test=cfg.eval.k_test,
            batch_size=cfg.eval.batch_size,
            itm_batch_size=cfg.eval.itm_batch_size,
            comm=comm,
            num_workers=cfg.data.num_workers,
            progress=is_main,
        )
        if is_main:
            log.info(
                "[%s] step %d: TR R@1 %.2f  IR R@1 %.2f  r_mean %.2f (ITC only: r_mean %.2f)",
                tag,
                step,
                m["txt_r1"],
                m["img_r1"],
                m["r_mean"],
                m["itc_r_mean"],
            )
        monitor.eval(tag, step, m)
        return m

    if cfg.train.eval_at_start and val_set is not None and not tag:
        result["val_before"] = evaluate(val_set, "val_before", 0)

    def save_resumable(step_done: int) -> None:
        tag_now = step_tag(step_done)
        kept = {"best": best, "val": result["val"]}
        if "val_before" in result:
            kept["val_before"] = result["val_before"]
        client = {
            "step": step_done,
            "epoch": step_done // steps_per_epoch,
            "batches_in_epoch": step_done % steps_per_epoch * accum,
            "world_size": info.world_size,
            "data_seed": cfg.train.seed,
            "config": config_to_dict(cfg),
            "finetune": kept,
        }
        save_resumable_checkpoint(
            engine, ckpt_root, tag_now, client, rank=info.rank, keep_last=cfg.train.keep_last
        )

    def end_of_epoch(epoch: int, step: int) -> None:
        nonlocal best_state
        if val_set is not None:
            m = evaluate(val_set, "val", step)
            result["val"].append({"epoch": epoch, "step": step, **m})
            improved = m["r_mean"] > best["r_mean"]
        else:
            m, improved = {}, True  # no validation split: keep the latest weights
        if not improved:
            return
        best.update({"r_mean": m.get("r_mean", math.nan), "epoch": epoch, "step": step})
        state = engine.full_state_dict()  # a collective under DeepSpeed
        # clone: on the CPU the engine's state dict shares storage with the live parameters
        best_state = {k: v.clone() for k, v in state.items() if k.startswith(_ONLINE)}
        if is_main:
            save_checkpoint(ckpt_path, state, cfg, step=step, epoch=epoch, val=m)
            log.info("best so far (epoch %d, val r_mean %.2f): saved %s", epoch, best["r_mean"], ckpt_path)

    model.train()
    window = LogWindow(
        ("loss", "loss_itc", "loss_itm"), device, world_size=info.world_size, start_step=start_step
    )
    epoch, batch_iter = 0, None
    if rng_to_restore is not None:
        set_rng_state(rng_to_restore)  # the run continues the saved random streams (dropout, masking, ITM)
    with monitor.redirect_logging():
        for step in range(start_step, total_steps):
            epoch = step // steps_per_epoch
            if step % steps_per_epoch == 0 or batch_iter is None:
                sampler.set_epoch(epoch)
                sampler.set_start(step % steps_per_epoch * accum)  # resumed mid-epoch: skip what was trained
                batch_iter = iter(loader)
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
            model.momentum_update()
            feats_i, feats_t, ids = [], [], []
            for micro in range(accum):
                batch = next(batch_iter)
                if batch["image"].shape[0] < 2:
                    raise RuntimeError(
                        f"rank {info.rank}, step {step}: fewer than 2 decodable images in a batch "
                        f"({batch['num_skipped']} skipped)"
                    )
                out = engine.forward(
                    batch["image"].to(device, non_blocking=True),
                    batch["input_ids"].to(device, non_blocking=True),
                    batch["attention_mask"].to(device, non_blocking=True),
                    alpha=alpha,
                    idx=batch["idx"].to(device, non_blocking=True),
                )
                engine.micro_step(out.loss, last=micro == accum - 1)
                feats_i.append(out.image_feat_m)
                feats_t.append(out.text_feat_m)
                ids.append(out.idx)
                window.add([out.loss, out.loss_itc, out.loss_itm], batch["image"].shape[0])
            model.enqueue(torch.cat(feats_i), torch.cat(feats_t), torch.cat(ids))
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
                }
                result["last"] = rec
                monitor.train(rec)
                if is_main:
                    log.info(
                        "step %d/%d  loss %.3f (itc %.3f itm %.3f)  lr %.2e  alpha %.2f  %.1f samples/s  "
                        "eta %.0fs",
                        done,
                        total_steps,
                        rec["loss"],
                        rec["loss_itc"],
                        rec["loss_itm"],
                        lr,
                        alpha,
                        rec["samples_per_s"],
                        eta,
                    )
            epoch_done = done % steps_per_epoch == 0
            if (epoch_done and (epoch + 1) % f.eval_every == 0) or done == total_steps:
                end_of_epoch(epoch, done)
            stop = done == cfg.train.stop_at_step
            if done < total_steps and (
                stop or (cfg.train.save_every > 0 and done % cfg.train.save_every == 0)
            ):
                save_resumable(done)
            if stop and done < total_steps:
                log.warning("stopped after step %d with a checkpoint (train.stop_at_step)", done)
                result["preempted"] = True
                break
    monitor.close_bar()
    if result.get("preempted"):
        monitor.close()
        engine.barrier()
        return result

    result["best_epoch"], result["best_step"] = best["epoch"], best["step"]
    result["best_val_r_mean"] = best["r_mean"]
    result["checkpoint"] = str(ckpt_path)
    if test_set is not None:
        if best_state is not None:
            with torch.no_grad():
                module_state = model.state_dict()
                for k, v in best_state.items():
                    module_state[k].copy_(v.to(module_state[k].dtype))
        result["test"] = evaluate(test_set, "test", result["steps"])
    if is_main:
        summary = {k: v for k, v in result.items() if k != "last"}
        (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("fine-tuning done: best epoch %d, results in %s", best["epoch"], out_dir / "results.json")
    monitor.close()
    engine.barrier()
    return result
