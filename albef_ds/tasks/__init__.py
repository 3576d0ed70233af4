"""Tasks on the one Trainer, by name: `albef-ds pretrain` is the "pretrain" task, `albef-ds finetune TASK`
every other one; `albef-ds evaluate TASK --checkpoint SOURCE` evaluates any weight source with the task's
evaluation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import Config, ConfigError
from ..train.task import Task, TaskContext
from ..train.trainer import StepHooks, Trainer
from .classify import NLVRTask, TextAssignmentTask, VETask
from .grounding import GroundingTask
from .pretrain import PretrainTask
from .retrieval import RetrievalTask
from .vqa import VQATask

log = logging.getLogger(__name__)

TASKS: dict[str, type[Task]] = {
    "pretrain": PretrainTask,
    "retrieval": RetrievalTask,
    "vqa": VQATask,
    "nlvr2-ta": TextAssignmentTask,
    "nlvr2": NLVRTask,
    "ve": VETask,
    "grounding": GroundingTask,
}
FINETUNE_TASKS = tuple(n for n in TASKS if n != "pretrain")

__all__ = [
    "FINETUNE_TASKS",
    "GroundingTask",
    "NLVRTask",
    "TextAssignmentTask",
    "VETask",
    "TASKS",
    "PretrainTask",
    "RetrievalTask",
    "VQATask",
    "evaluate_task",
    "visualize_grounding",
    "make_task",
    "train_task",
]


def make_task(name: str, cfg: Config) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    return TASKS[name](cfg)


def train_task(cfg: Config, name: str, *, hooks: StepHooks | None = None) -> dict:
    """Train task `name` on the ranks this process belongs to; the result dict (complete on rank 0)."""
    return Trainer(cfg, make_task(name, cfg), hooks=hooks).fit()


def _tensorboard(log_dir: Path, tag: str, metrics: dict, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(log_dir)) as tb:
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                tb.add_scalar(f"{tag}/{k}", v, step)


def _evaluation(cfg: Config, name: str, checkpoint: str, split_file: str, allow_partial: bool = False):
    """(task, context, model on its device, evaluation set, its path) of an evaluation of `checkpoint`
    (default model.albef_init) with task `name` on split_file (default: the task's default evaluation file),
    on the ranks a launcher started (the process group initialised when there are several). The checkpoint
    must fill every part of the model the evaluation reads (`load_weights(require="model")`), unless
    `allow_partial`."""
    from ..train.checkpoint import load_weights
    from ..train.dist_env import world_info_from_env
    from ..train.runtime import build_tokenizer, resolve_device, seed_everything, special_tokens

    cfg.validate()
    task = make_task(name, cfg)
    info = world_info_from_env()
    device = resolve_device(cfg.train.device, info.local_rank)
    path = split_file or task.default_eval_file()
    if not path:
        raise ConfigError(f"nothing to evaluate on: pass --split-file (or configure the {name} task's split)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"evaluation file {path} does not exist")
    eval_set = task.open_split(path)
    if info.world_size > 1:
        from ..train.engine import init_distributed

        init_distributed(info, device)
    tokenizer = build_tokenizer(cfg)
    seed_everything(cfg.train.seed)
    ctx = TaskContext(
        cfg=cfg,
        info=info,
        device=device,
        out_dir=Path(cfg.train.output_dir),
        tokenizer=tokenizer,
        special_tokens=special_tokens(tokenizer),
        extra={"label": f"checkpoint {checkpoint or cfg.model.albef_init or '(configured init)'}"},
    )
    # Built without its whole-model init, which is loaded here under the evaluation's coverage rule.
    model = task.build_model(ctx, init="")
    source = checkpoint or cfg.model.albef_init
    if source:
        load_weights(model, source, require="model", partial=allow_partial)
    else:
        log.warning("no --checkpoint and no model.albef_init: evaluating the configured initialisation")
    return task, ctx, model.to(device), eval_set, path


def visualize_grounding(
    cfg: Config,
    checkpoint: str = "",
    *,
    split_file: str = "",
    num: int = 16,
    out: str = "",
    allow_partial: bool = False,
) -> dict:
    """Grad-CAM pictures of the first `num` expressions of a grounding split (default grounding.test_file,
    else val_file) with `checkpoint` (default model.albef_init): one PNG per expression and a grid, into
    `out` (default <train.output_dir>/grounding_pictures/visualize_<split stem>); one process. Returns
    {"folder", "grid", "expressions", "accuracy"} (the accuracy of those expressions). `allow_partial`: as
    for `evaluate_task`."""
    from ..eval.grounding_eval import grounding_metrics, write_pictures

    if num < 1:
        raise ValueError(f"visualize grounding needs --num >= 1, got {num}")
    task, ctx, model, eval_set, path = _evaluation(cfg, "grounding", checkpoint, split_file, allow_partial)
    es = eval_set.head(num)
    boxes, maps = task.predict(model, es, ctx, keep_maps=len(es))
    folder = Path(out) if out else ctx.out_dir / "grounding_pictures" / f"visualize_{Path(path).stem}"
    grid = write_pictures(es, boxes, maps, folder)
    acc = grounding_metrics(es, boxes, threshold=cfg.grounding.iou_threshold)["accuracy"]
    return {"folder": str(folder), "grid": str(grid), "expressions": len(es), "accuracy": acc}


def evaluate_task(
    cfg: Config,
    name: str,
    checkpoint: str = "",
    *,
    split_file: str = "",
    k_test: int = 0,
    output: str = "",
    tensorboard: str = "",
    save_scores: str = "",
    answers_file: str = "",
    step: int = 0,
    allow_partial: bool = False,
) -> dict:
    """Evaluate `checkpoint` (any weight source; empty = the configured initialisation) with task `name`'s
    evaluation on split_file (default: the task's default evaluation file), on every rank a launcher
    started. Rank 0 writes the JSON (`output`), TensorBoard scalars `eval_<task>/<split>/*` (`tensorboard`,
    default <train.output_dir>/tensorboard when train.tensorboard) and, with `save_scores` (retrieval), the
    score matrices; VQA writes the EvalAI answer file (`answers_file`, default
    <train.output_dir>/vqa_<split file stem>_answers.json). `k_test`: the re-rank depth (retrieval) or the
    answers re-scored per question (VQA). The checkpoint must fill every part of the model the evaluation
    reads (encoders, heads, decoder; not the MLM head, queues or momentum copies), else a ValueError names
    the parts it leaves missing; `allow_partial` evaluates it anyway. Returns the metrics (on rank 0; None
    elsewhere for a rank-0-only evaluation)."""
    import torch

    task, ctx, model, eval_set, path = _evaluation(cfg, name, checkpoint, split_file, allow_partial)
    info, out_dir = ctx.info, ctx.out_dir
    extra: dict = {}
    if name == "retrieval":
        extra = {"k_test": k_test or cfg.eval.k_test, "return_scores": True}
    elif name == "vqa":
        extra = {
            "k": k_test,
            "answers_file": answers_file or str(out_dir / f"vqa_{Path(path).stem}_answers.json"),
        }
    out = task.evaluate(model, "val", ctx, step=step, eval_set=eval_set, **extra)
    metrics, scores = out if isinstance(out, tuple) else (out, None)
    if metrics is not None:
        metrics = {
            **metrics,
            "world_size": info.world_size,
            "checkpoint": str(checkpoint),
            "split": str(path),
        }
    if ctx.is_main:
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(metrics, indent=2) + "\n")
        tb_dir = tensorboard or (str(out_dir / "tensorboard") if cfg.train.tensorboard else "")
        if tb_dir:
            _tensorboard(Path(tb_dir), f"eval_{name}/{Path(path).stem}", metrics, step)
        if save_scores and scores is not None:
            torch.save({"itc": scores.itc, "i2t": scores.i2t, "t2i": scores.t2i}, Path(save_scores))
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    return metrics
