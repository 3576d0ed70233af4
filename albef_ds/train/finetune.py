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

Not here (yet): mid-run resumable checkpoints (a fine-tuning run is hours, not days; rerun it).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from ..config import Config, ConfigError, save_config
from ..data.karpathy import build_retrieval_train_loader, check_karpathy_eval
from ..eval.comm import LocalComm, ProcessGroupComm
from ..eval.itm import evaluate_retrieval
from ..eval.run import build_retrieval_model, load_eval_set
from .dist_env import world_info_from_env
from .ds_config import build_ds_config, global_batch, scaled_lr
from .engine import DeepSpeedEngine, TorchEngine
from .loop import build_tokenizer, resolve_device, save_checkpoint, seed_everything
from .monitor import Monitor, peak_memory_gb
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

    monitor = Monitor(
        out_dir, enabled=is_main, tensorboard=cfg.train.tensorboard, total_steps=total_steps, start_step=0
    )
    monitor.write({"event": "start", "task": "retrieval", "time": time.time(), "total_steps": total_steps})
    result: dict = {"steps": 0, "world_size": info.world_size, "val": []}

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

    if cfg.train.eval_at_start and val_set is not None:
        result["val_before"] = evaluate(val_set, "val_before", 0)

    best = {"r_mean": -math.inf, "epoch": -1, "step": 0}
    best_state: dict[str, torch.Tensor] | None = None
    ckpt_path = out_dir / "checkpoint_best.pt"

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
    acc = torch.zeros(3, device=device)
    acc_n = samples_window = steps_window = 0
    t_window = t_start = time.perf_counter()
    epoch, batch_iter = 0, None
    with monitor.redirect_logging():
        for step in range(total_steps):
            epoch = step // steps_per_epoch
            if step % steps_per_epoch == 0:
                sampler.set_epoch(epoch)
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
                acc += torch.stack([out.loss, out.loss_itc, out.loss_itm]).detach().float()
                acc_n += 1
                samples_window += batch["image"].shape[0]
            model.enqueue(torch.cat(feats_i), torch.cat(feats_t), torch.cat(ids))
            done = step + 1
            result["steps"] = done
            steps_window += 1
            monitor.step()
            if done % cfg.train.log_every == 0 or done == total_steps:
                vals = (acc / acc_n).tolist()  # the one host sync per log window
                if not all(math.isfinite(v) for v in vals):
                    raise FloatingPointError(f"non-finite loss at step {done} on rank {info.rank}: {vals}")
                dt = time.perf_counter() - t_window
                rec = {
                    "event": "train",
                    "step": done,
                    "epoch": epoch,
                    "lr": lr,
                    "alpha": alpha,
                    "loss": vals[0],
                    "loss_itc": vals[1],
                    "loss_itm": vals[2],
                    "temp": float(model.clamped_temp().item()),
                    "samples_per_s": samples_window * info.world_size / dt,
                    "step_time_s": dt / steps_window,
                    "peak_mem_gb": peak_memory_gb(device),
                }
                result["last"] = rec
                monitor.train(rec)
                if is_main:
                    eta = (time.perf_counter() - t_start) / done * (total_steps - done)
                    log.info(
                        "step %d/%d  loss %.3f (itc %.3f itm %.3f)  lr %.2e  alpha %.2f  %.1f samples/s  "
                        "eta %.0fs",
                        done,
                        total_steps,
                        vals[0],
                        vals[1],
                        vals[2],
                        lr,
                        alpha,
                        rec["samples_per_s"],
                        eta,
                    )
                acc.zero_()
                acc_n = samples_window = steps_window = 0
                t_window = time.perf_counter()
            epoch_done = done % steps_per_epoch == 0
            if (epoch_done and (epoch + 1) % f.eval_every == 0) or done == total_steps:
                end_of_epoch(epoch, done)
    monitor.close_bar()

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
