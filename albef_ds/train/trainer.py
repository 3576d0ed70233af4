"""The one Trainer: every task (pre-training, retrieval, ...) runs on it.

It owns the engine (torch or DeepSpeed ZeRO-2), the loader, the schedules (LR, alpha), the monitor, the
checkpoint manager, stop signals with the lagged stop vote, resume (on the same or another rank count),
periodic and final evaluation, and the step:

    EMA -> grad_accum x (forward, backward) -> optimizer step -> task's after-step (enqueue)

A task (`task.py`) supplies only what differs. Epochs are whole optimizer steps: an epoch ends when the
rest of this rank's share cannot fill another step (those batches are left out, as a drop_last would), so a
step never spans two epochs and validation happens on step boundaries.

Hooks (`StepHooks`) let the benchmarks time the same step and find its boundaries: `section(name)` wraps the
parts of a step ("data", "ema", "backward", "optimizer", "queue_gather"; the model has its own sections),
`step_start(step)` runs before each optimizer step and `teardown()` once training ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from ..config import Config, ConfigError, config_to_dict, save_config
from ..model.compile import CompileCounters, compile_blocks, eager
from .checkpoint import rng_state, set_rng_state
from .checkpoint.manager import CheckpointManager, save_consolidated
from .dist_env import world_info_from_env
from .ds_config import build_ds_config, global_batch, scaled_lr
from .monitor import LogWindow, Monitor
from .runtime import (
    EXIT_PREEMPTED,
    StopSignals,
    build_tokenizer,
    resolve_device,
    seed_everything,
    special_tokens,
)
from .schedule import alpha_at, lr_at
from .task import StepOutput, Task, TaskContext

log = logging.getLogger(__name__)

__all__ = ["EXIT_PREEMPTED", "StepHooks", "Trainer"]


class StepHooks:
    """No-op hooks; subclass to time sections or mark step boundaries."""

    def section(self, name: str):
        return contextlib.nullcontext()

    def step_start(self, step: int) -> None:
        pass

    def teardown(self) -> None:
        pass


def _blocks_text(blocks: dict[str, int]) -> str:
    return " + ".join(f"{n} {name}" for name, n in blocks.items())


def _sha256(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Trainer:
    def __init__(self, cfg: Config, task: Task, *, hooks: StepHooks | None = None) -> None:
        self.cfg = cfg
        self.task = task
        self.hooks = hooks or StepHooks()

    # ------------------------------------------------------------------ set-up
    def setup(self, *, with_data: bool = True, tokens: dict[str, int] | None = None) -> TaskContext:
        """Ranks, device, process group, run folder, model, engine; with_data: also the tokenizer, the
        training loader and the schedule, and the checkpoint to resume. Without data (the benchmarks) the
        model is built from the configuration only, with `tokens` as its special token ids."""
        cfg, task = self.cfg, self.task
        cfg.validate()
        info = world_info_from_env()
        if cfg.train.engine == "torch" and info.world_size > 1:
            raise ConfigError(
                f"{info.world_size} ranks were launched ({info.source}) but train.engine = torch runs one "
                "process; set train.engine=deepspeed"
            )
        global_batch(cfg, world_size=info.world_size)  # a batch-layout contradiction fails before building
        if cfg.train.engine == "deepspeed":
            build_ds_config(cfg, world_size=info.world_size)
        if with_data:
            task.check_inputs(cfg)
        device = resolve_device(cfg.train.device, info.local_rank)
        if cfg.train.engine == "deepspeed":
            from .engine import init_distributed

            init_distributed(info, device)
        self.info, self.device = info, device
        self.out_dir = Path(cfg.train.output_dir)
        if with_data and info.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        # The same seed on every rank: identical initial weights, momentum copies and queues.
        seed_everything(cfg.train.seed)
        log.info("rank %d/%d on %s, run folder %s", info.rank, info.world_size, device, self.out_dir)
        tokenizer = build_tokenizer(cfg) if with_data else None
        gather = None
        if info.world_size > 1:
            from .comm import make_queue_gather

            gather = make_queue_gather(cfg.train.batch_size * cfg.train.grad_accum)
        ctx = TaskContext(
            cfg=cfg,
            info=info,
            device=device,
            out_dir=self.out_dir,
            tokenizer=tokenizer,
            special_tokens=special_tokens(tokenizer) if tokenizer is not None else dict(tokens or {}),
            all_gather=gather,
        )
        self.ctx = ctx
        model = task.build_model(ctx).to(device)
        log.info(
            "%s: %.2fM trainable parameters", task.name, sum(p.numel() for p in model.parameters()) / 1e6
        )
        # Regional compile on the complete model (momentum copies included), before an engine wraps it.
        self.compiled = compile_blocks(model) if cfg.train.compile else {}
        self.compile_counters = CompileCounters() if self.compiled else None
        self._compile_reported: dict | None = None  # the summary once logged
        if self.compiled:
            log.info("train.compile: compiling %s at their first call", _blocks_text(self.compiled))

        share = gather_all = None
        if cfg.train.engine == "deepspeed":  # one resume decision for all ranks (CheckpointManager)
            from .comm import all_gather_object, broadcast_object

            share, gather_all = broadcast_object, all_gather_object
        self.ckpt = CheckpointManager(
            self.out_dir / "checkpoints",
            rank=info.rank,
            world_size=info.world_size,
            keep_last=cfg.train.keep_last,
            share=share,
            gather=gather_all,
        )
        self.tag = self.ckpt.resolve(cfg.train.resume) if with_data else None
        saved = self.ckpt.client(self.tag) if self.tag else None
        # A checkpoint of another rank count goes through DeepSpeed's universal format, decided before the
        # engine exists (it is an engine setting).
        other_ranks = saved is not None and saved["world_size"] != info.world_size
        from .engine import build_engine

        self.engine = build_engine(cfg, model, device, info, load_universal=other_ranks)
        self.model = self.engine.module
        ctx.input_dtype = self.engine.input_dtype
        # Each rank draws its own augmentation, masking and sampling randomness from here on.
        seed_everything(cfg.train.seed + 1000 * info.rank)
        if with_data:
            self.loader, self.sampler = task.train_loader(ctx)
            accum = cfg.train.grad_accum
            self.steps_per_epoch = self.sampler.batches_per_epoch // accum
            if self.steps_per_epoch == 0:
                raise ConfigError(
                    f"train.batch_size ({cfg.train.batch_size}) x train.grad_accum ({accum}) is larger than "
                    "this rank's share of the training set: no full optimizer step per epoch"
                )
            total = cfg.train.epochs * self.steps_per_epoch
            self.total_steps = min(total, cfg.train.max_steps) if cfg.train.max_steps > 0 else total
        return ctx

    # ------------------------------------------------------------------ the step
    def train_step(self, *, lr: float, alpha: float, next_batch) -> list[StepOutput]:
        """One optimizer step: EMA, grad_accum micro-batches (forward, backward), the optimizer step, the
        task's after-step with every micro-batch's enqueue tensors. `next_batch()` gives a batch dict on the
        device. Returns the micro-batches' outputs (their values stay on the device)."""
        h, engine, model, task = self.hooks, self.engine, self.model, self.task
        accum = self.cfg.train.grad_accum
        engine.set_lr(lr)
        with h.section("ema"):
            model.momentum_update()  # once per optimizer step, before the momentum forward
        outs = []
        for micro in range(accum):
            with h.section("data"):
                batch = next_batch()
            out = task.forward(engine.forward, batch, alpha=alpha)
            with h.section("backward"):
                engine.backward(out.loss)
            with h.section("optimizer"):
                engine.step(last=micro == accum - 1)
            outs.append(out)
        if outs[0].enqueue:
            with h.section("queue_gather"):
                task.after_step(model, *(torch.cat(parts) for parts in zip(*(o.enqueue for o in outs))))
        return outs

    # ------------------------------------------------------------------ a whole run
    def fit(self) -> dict:
        """Train the task (resuming if asked), evaluate it, write checkpoint.pt, checkpoint_best.pt (when
        the task validates), results.json and the rank reports. Returns the result on every rank (complete
        on rank 0); result["preempted"] after a stop with a checkpoint (the CLI exits EXIT_PREEMPTED)."""
        ctx = self.setup()
        cfg, task, info, engine, model = self.cfg, self.task, self.info, self.engine, self.model
        is_main, accum, total_steps = ctx.is_main, cfg.train.grad_accum, self.total_steps
        result: dict = {"task": task.name, "steps": 0, "world_size": info.world_size}
        state = {"best": {"value": -math.inf, "epoch": -1, "step": 0}, "history": []}
        self.best_path = self.out_dir / "checkpoint_best.pt"
        self.best_state: dict[str, torch.Tensor] | None = None

        # epoch_skipped: unusable samples this rank's batches consumed this epoch (refilled batches read
        # batch_size + skipped samples each): with in_epoch, this rank's position in its order.
        start_step, epoch, in_epoch, epoch_skipped, resumed_skipped, rng = 0, 0, 0, 0, 0, None
        if self.tag:
            client, rng = self.ckpt.load(engine, self.tag)
            start_step, epoch, in_epoch = client["step"], client["epoch"], client["batches_in_epoch"]
            if rng is not None:  # same rank count: this rank's saved position and skip count
                saved_rank = rng.get("rank", {})
                epoch_skipped = int(saved_rank.get("epoch_skipped", 0))
                resumed_skipped = int(saved_rank.get("skipped", 0))
            if client["world_size"] != info.world_size:
                # Another rank count: weights, AdamW moments (repartitioned by the universal checkpoint),
                # momentum encoders and queues carry over; the epoch is re-split across the new ranks and
                # resumes at the same fraction of it.
                log.warning(
                    "resuming a %d-rank checkpoint on %d ranks: the data order and random streams differ "
                    "from an uninterrupted run",
                    client["world_size"],
                    info.world_size,
                )
                in_epoch = min(
                    in_epoch * client["world_size"] // info.world_size, self.sampler.batches_per_epoch
                )
                in_epoch -= in_epoch % accum
            state.update(client.get("eval", {}))
            if "before" in state:
                result["val_before"] = state["before"]
            if state["best"]["epoch"] >= 0 and task.best_metric:
                self.best_state = self._read_best(self.tag)
            log.info(
                "resumed from %s: step %d, epoch %d, batch %d of the epoch",
                self.ckpt.root / self.tag,
                start_step,
                epoch,
                in_epoch,
            )
            result["resumed_from"] = self.tag
        result["steps"] = start_step
        self.monitor = monitor = Monitor(
            self.out_dir,
            enabled=is_main,
            tensorboard=cfg.train.tensorboard,
            total_steps=total_steps,
            start_step=start_step,
            desc=task.name,
        )
        monitor.write(
            {
                "event": "start",
                "task": task.name,
                "time": time.time(),
                "start_step": start_step,
                "total_steps": total_steps,
                "world_size": info.world_size,
            }
        )
        if cfg.train.eval_at_start and not self.tag and task.has_split("val"):
            # The evaluation may draw random numbers (its loader, sampling in the task): the training that
            # follows must be the one a run without it trains, so every RNG is put back afterwards.
            before_eval = rng_state()
            m = self._evaluate("val", 0)
            set_rng_state(before_eval)
            if m is not None:
                monitor.eval("val_before", 0, m)
                state["before"] = result["val_before"] = m

        model.train()
        # Metrics accumulate on the device and are read every log_every steps: no host sync in between.
        window = LogWindow(task.log_names, self.device, world_size=info.world_size, start_step=start_step)
        skipped = resumed_skipped  # this rank's unusable images so far, the run's before a resume included
        seen: list[tuple[int, torch.Tensor]] = []  # (epoch, sample indices) this rank trained on
        batches = None

        def next_batch() -> dict:
            nonlocal skipped, epoch_skipped
            batch = next(batches)
            skipped += int(batch["num_skipped"])
            epoch_skipped += int(batch["num_skipped"])
            n = task.batch_len(batch)
            if n < task.min_batch:
                raise RuntimeError(
                    f"rank {info.rank}, step {result['steps']}: {n} decodable sample(s) in a batch of "
                    f"{cfg.train.batch_size} ({batch['num_skipped']} skipped), fewer than the "
                    f"{task.min_batch} this task needs; check the data or use a larger batch"
                )
            if cfg.train.record_samples:
                seen.append((epoch, batch["index"]))
            return {
                k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) and k != "index" else v
                for k, v in batch.items()
            }

        def save(step_done: int) -> None:
            client = {
                "step": step_done,
                "epoch": epoch,
                "batches_in_epoch": in_epoch,
                "world_size": info.world_size,
                "data_seed": cfg.train.seed,
                "task": task.name,
                "config": config_to_dict(cfg),
                "eval": state,
            }
            self.ckpt.save(
                engine, step_done, client, rank_state={"epoch_skipped": epoch_skipped, "skipped": skipped}
            )

        o = cfg.optim
        peak_lr = scaled_lr(cfg, world_size=info.world_size)
        ramp = cfg.loss.alpha_ramp_steps if cfg.loss.alpha_ramp_steps >= 0 else self.steps_per_epoch
        if rng is not None:
            set_rng_state(rng)  # after the loader exists: the run continues the saved random streams
        with StopSignals() as stop, monitor.redirect_logging():
            for step in range(start_step, total_steps):
                self.hooks.step_start(step)
                if batches is None:
                    self.sampler.set_epoch(epoch)
                    self.sampler.set_start(in_epoch, epoch_skipped)  # resumed mid-epoch: skip what was read
                    batches = iter(self.loader)
                lr = lr_at(
                    step,
                    total_steps=total_steps,
                    lr=peak_lr,
                    min_lr=o.min_lr,
                    warmup_lr=o.warmup_lr,
                    warmup_steps=o.warmup_steps,
                )
                alpha = alpha_at(step, alpha=cfg.loss.alpha, ramp_steps=ramp)
                for out in self.train_step(lr=lr, alpha=alpha, next_batch=next_batch):
                    window.add(out.logs, out.samples)
                done = step + 1
                result["steps"] = done
                in_epoch += accum
                window.step()
                monitor.step()
                if done % cfg.train.log_every == 0 or done == total_steps:
                    rec = self._log(window, done, epoch, lr, alpha, skipped)
                    result["last"] = rec
                ended = epoch
                epoch_done = in_epoch + accum > self.sampler.batches_per_epoch
                if epoch_done:
                    epoch, in_epoch, epoch_skipped, batches = epoch + 1, 0, 0, None
                every = task.eval_every()
                if task.has_split("val") and (
                    (epoch_done and every > 0 and (ended + 1) % every == 0)
                    or (done == total_steps and cfg.train.eval_at_end)
                ):
                    engine.drain()  # stop votes in flight finish before the evaluation's collectives
                    self._validate(state, ended, done)
                # The signal vote is read STOP_VOTE_LAG steps late (no per-step stall); a planned stop is
                # known to every rank at once.
                planned = done == cfg.train.stop_at_step and done < total_steps
                preempt = engine.stop_vote(stop.received is not None) or planned
                if preempt or (cfg.train.save_every > 0 and done % cfg.train.save_every == 0):
                    save(done)
                if preempt:
                    log.warning(
                        "stopped after step %d with a checkpoint; exit status %d asks for a requeue",
                        done,
                        EXIT_PREEMPTED,
                    )
                    result["preempted"] = True
                    break
        self.hooks.teardown()
        engine.drain()
        monitor.close_bar()
        result["skipped_images"] = skipped
        self._rank_report(seen, result["steps"])
        if result.get("preempted"):
            monitor.close()
            engine.barrier()
            return result

        final_state = engine.full_state_dict()  # a collective under DeepSpeed: every rank takes part
        if is_main:
            ckpt = save_consolidated(
                self.out_dir / "checkpoint.pt",
                final_state,
                config_to_dict(cfg),
                step=result["steps"],
                epoch=epoch,
            )
            log.info("saved %s (step %d, %d images skipped as undecodable)", ckpt, result["steps"], skipped)
            if task.best_metric and not task.has_split("val"):  # nothing to pick by: the last weights
                save_consolidated(self.best_path, final_state, config_to_dict(cfg), step=result["steps"])
        result["history"] = state["history"]
        if task.best_metric:
            best = state["best"]
            result.update(best_epoch=best["epoch"], best_step=best["step"])
            result[f"best_val_{task.best_metric}"] = best["value"]
            result["checkpoint"] = str(self.best_path)
        else:
            result["checkpoint"] = str(self.out_dir / "checkpoint.pt")
        if state["history"]:
            pick = state["best"]["step"] if task.best_metric else state["history"][-1]["step"]
            result["val"] = next(v for v in state["history"] if v["step"] == pick)
        if task.has_split("test"):
            if self.best_state is not None:
                self._load_params(self.best_state)
            m = self._evaluate("test", result["steps"])
            if m is not None:
                monitor.eval("test", result["steps"], m)
                result["test"] = m
        result["baseline"] = task.baseline(ctx, result)
        if is_main:
            summary = {k: v for k, v in result.items() if k != "last"}
            if "last" in result:  # the last training log window (all ranks), e.g. text assignment's accuracy
                summary["train"] = {k: v for k, v in result["last"].items() if k != "event"}
            (self.out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
            log.info("%s done: results in %s", task.name, self.out_dir / "results.json")
        monitor.close()
        engine.barrier()
        return result

    # ------------------------------------------------------------------ parts of fit
    def _log(self, window: LogWindow, done: int, epoch: int, lr: float, alpha: float, skipped: int) -> dict:
        stats = window.read(done, self.total_steps, self.info.rank)  # the one host sync per log window
        eta = stats.pop("eta_s")
        rec = {
            "event": "train",
            "step": done,
            "epoch": epoch,
            "lr": lr,
            "alpha": alpha,
            **stats,
            **self.task.log_extra(self.model),
            "skipped_images": skipped,
        }
        self.monitor.train(rec)
        if self.compile_counters is not None:
            self._report_compile(done)
        names = self.task.log_names
        parts = " ".join(f"{n.removeprefix('loss_')} {rec[n]:.3f}" for n in names[1:])
        log.info(
            "step %d/%d  loss %.3f%s  lr %.2e  alpha %.2f  %.1f samples/s  eta %.0fs",
            done,
            self.total_steps,
            rec[names[0]],
            f" ({parts})" if parts else "",
            lr,
            alpha,
            rec["samples_per_s"],
            eta,
        )
        return rec

    def _evaluate(self, split: str, step: int) -> dict | None:
        """The task's evaluation of `split`. Compiled blocks run eagerly there: eval mode, other batch sizes
        and Grad-CAM's explicit attention would each compile graphs that training never uses again."""
        with eager() if self.compiled else contextlib.nullcontext():
            return self.task.evaluate(self.model, split, self.ctx, step=step)

    def _report_compile(self, step: int) -> None:
        """The compile summary (graphs, graph breaks, recompilations, compile time), logged and written to
        metrics.jsonl once, at the end of the first log window; later log windows only warn when graphs were
        compiled since (a new shape or mode mid-run)."""
        s = self.compile_counters.summary()
        if self._compile_reported is None:
            self._compile_reported = s
            self.monitor.write({"event": "compile", "step": step, "blocks": self.compiled, **s})
            log.info(
                "train.compile after step %d: %d graphs for %s, %d graph breaks, %d recompilations, %.1f s "
                "compiling",
                step,
                s["graphs"],
                _blocks_text(self.compiled),
                s["graph_breaks"],
                s["recompiles"],
                s["compile_time_s"],
            )
            if s["graph_breaks"]:
                log.warning("train.compile: graph breaks in the blocks: %s", s["graph_break_reasons"])
        elif s["graphs"] > self._compile_reported["graphs"]:
            log.warning(
                "train.compile: %d more graphs compiled by step %d (%d in all; recompilations: %s)",
                s["graphs"] - self._compile_reported["graphs"],
                step,
                s["graphs"],
                s["recompile_reasons"],
            )
            self._compile_reported = s

    def _validate(self, state: dict, epoch: int, step: int) -> None:
        """Evaluate the val split; with a best metric, keep the best weights (in memory for the final test,
        and in checkpoint_best.pt)."""
        task = self.task
        m = self._evaluate("val", step)
        if m is None:
            return
        self.monitor.eval("val", step, m)
        state["history"].append({"epoch": epoch, "step": step, **m})
        if not task.best_metric or not m[task.best_metric] > state["best"]["value"]:
            return
        state["best"] = {"value": m[task.best_metric], "epoch": epoch, "step": step}
        full = self.engine.full_state_dict()  # a collective under DeepSpeed
        params = {n for n, _ in self.model.named_parameters()}
        # clone: on the CPU the engine's state dict shares storage with the live parameters
        self.best_state = {k: v.clone() for k, v in full.items() if k in params}
        if self.ctx.is_main:
            save_consolidated(
                self.best_path, full, config_to_dict(self.cfg), step=step, epoch=epoch, val=m, task=task.name
            )
            log.info(
                "best so far (epoch %d, val %s %.2f): saved %s",
                epoch,
                task.best_metric,
                m[task.best_metric],
                self.best_path,
            )

    def _read_best(self, tag: str) -> dict[str, torch.Tensor]:
        if not self.best_path.is_file():
            raise FileNotFoundError(
                f"resuming from {self.ckpt.root / tag}: its best checkpoint {self.best_path} is gone"
            )
        kept = torch.load(self.best_path, map_location="cpu", weights_only=True)["model"]
        params = {n for n, _ in self.model.named_parameters()}
        return {k: v for k, v in kept.items() if k in params}

    def _load_params(self, params: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            module_state = self.model.state_dict()
            for k, v in params.items():
                module_state[k].copy_(v.to(module_state[k].dtype))

    def _rank_report(self, seen, steps: int) -> dict:
        """`rank<N>.json` in the run folder: what this rank holds, to check that ranks agree where they must
        (momentum weights, queues: identical checksums) and split what they should (optimizer state,
        samples)."""
        model, engine = self.model, self.engine
        moms, _ = model.momentum_pairs() if hasattr(model, "momentum_pairs") else ([], [])
        queues = [b for n, b in model.named_buffers() if n.endswith("_queue")]
        report = {
            "rank": self.info.rank,
            "world_size": engine.world_size,
            "dist": dataclasses.asdict(self.info),  # what rank discovery found (other ranks log no INFO)
            "task": self.task.name,
            "steps": steps,
            "trainable_params": sum(p.numel() for p in model.parameters()),
            "optimizer_state_numel": engine.optimizer_state_numel(),
            "optimizer_state_abs_sum": engine.optimizer_state_abs_sum(),
            "momentum_sha256": _sha256(moms),
            "queue_sha256": _sha256(queues),
            "queue_ptr": int(model.queue_ptr.item()) if hasattr(model, "queue_ptr") else None,
            "samples": [[e, i] for e, idx in seen for i in idx.tolist()],
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{self.info.rank}.json").write_text(json.dumps(report))
        return report
