"""Weakly-supervised grounding (RefCOCO+, DOWNSTREAM_SPEC.md section 4) as a task on the one trainer.

Training is retrieval fine-tuning (`RetrievalTask`'s model, step and queue) on the referring expressions:
grounding.train_file ({image, text}) is rewritten into the retrieval layout with one id per image file, so
every expression of an image is an ITC positive and no ITM negative (`data.grounding`). The debug and paper
configs use the whole image (data.crop_scale [1, 1]).

Evaluation (`eval.grounding_eval`): the Grad-CAM map of each test expression (grounding.gradcam_kind: ITM
on the cross-attention of grounding.gradcam_layer, default the third fusion layer; or ITC on a ViT block),
the proposal with the most heat per sqrt(area), a hit at IoU >= grounding.iou_threshold; accuracy per split
(val / testA / testB), distributed over the ranks with each expression once. The best val accuracy picks
checkpoint_best.pt, the test file is evaluated with it; grounding.num_pictures expressions of each
evaluation are drawn into <output_dir>/grounding_pictures/. Baselines in results.json: a random proposal
and the largest proposal.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import Config, ConfigError
from ..data.grounding import GroundingEvalSet, build_grounding_train_loader
from ..eval.grounding_eval import grounding_metrics, predict_boxes, proposal_baselines, write_pictures
from ..train.task import TaskContext
from .common import make_comm
from .retrieval import RetrievalTask

log = logging.getLogger(__name__)


class GroundingTask(RetrievalTask):
    name = "grounding"
    best_metric = "accuracy"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self._sets: dict[str, GroundingEvalSet] = {}

    def check_inputs(self, cfg: Config) -> None:
        g = cfg.grounding
        hint = "for the synthetic set: albef-ds data synth-grounding"
        if not g.train_file:
            raise ConfigError(f"grounding.train_file is empty: give the ALBEF grounding train JSON ({hint})")
        files = [("train_file", p) for p in g.train_file] + [
            ("val_file", g.val_file),
            ("test_file", g.test_file),
        ]
        for key, path in files:
            if path and not Path(path).is_file():
                raise ConfigError(f"grounding.{key}: {path} does not exist ({hint})")
        if g.val_file or g.test_file:
            for key in ("refs_file", "proposals_file"):
                path = getattr(g, key)
                if not path:
                    raise ConfigError(f"grounding.{key} is empty: the evaluation needs it ({hint})")
                if not Path(path).is_file():
                    raise ConfigError(f"grounding.{key}: {path} does not exist ({hint})")

    def train_loader(self, ctx: TaskContext):
        return build_grounding_train_loader(ctx.cfg, ctx.tokenizer, work_dir=ctx.out_dir, **ctx.loader_args())

    def eval_every(self) -> int:
        return self.cfg.grounding.eval_every

    def _split_file(self, split: str) -> str:
        g = self.cfg.grounding
        return {"val": g.val_file, "test": g.test_file}.get(split, "")

    def default_eval_file(self) -> str:
        return self.cfg.grounding.test_file or self.cfg.grounding.val_file

    def open_split(self, path: str) -> GroundingEvalSet:
        c, g = self.cfg, self.cfg.grounding
        if not (g.refs_file and g.proposals_file):
            raise ConfigError("grounding evaluation needs grounding.refs_file and grounding.proposals_file")
        return GroundingEvalSet(
            path,
            refs=g.refs_file,
            proposals=g.proposals_file,
            image_root=g.image_root,
            image_size=c.model.vision.image_size,
            max_words=c.data.max_words,
            loader=c.data.loader,
        )

    def eval_set(self, split: str) -> GroundingEvalSet:
        if split not in self._sets:
            self._sets[split] = self.open_split(self._split_file(split))
        return self._sets[split]

    def predict(self, model, eval_set: GroundingEvalSet, ctx: TaskContext, *, keep_maps: int = 0, comm=None):
        """(the proposal each expression picks, the first keep_maps Grad-CAM maps) with the configured
        Grad-CAM kind and layer (`eval.grounding_eval.predict_boxes`); one process unless `comm`."""
        cfg, g = ctx.cfg, ctx.cfg.grounding
        return predict_boxes(
            model,
            eval_set,
            ctx.tokenizer,
            kind=g.gradcam_kind,
            layer=g.resolved_gradcam_layer(cfg.model),
            device=ctx.device,
            batch_size=cfg.eval.batch_size,
            comm=comm,
            num_workers=cfg.data.num_workers,
            progress=ctx.is_main,
            keep_maps=keep_maps,
        )

    def evaluate(self, model, split: str, ctx: TaskContext, *, step: int = 0, eval_set=None, **kw) -> dict:
        """Grounding accuracy of `split` (or `eval_set`), every rank Grad-CAMing its share; the same metrics
        on every rank. Rank 0 draws the first grounding.num_pictures expressions (of its share) and adds the
        grid's path as "pictures"."""
        g = ctx.cfg.grounding
        es = eval_set or self.eval_set(split)
        if self._comm is None:
            self._comm = make_comm(ctx)
        pictures = g.num_pictures if ctx.is_main else 0
        boxes, maps = self.predict(model, es, ctx, keep_maps=pictures, comm=self._comm)
        m = grounding_metrics(es, boxes, threshold=g.iou_threshold)
        if ctx.is_main:
            if maps:
                folder = ctx.out_dir / "grounding_pictures" / f"{Path(es.path).stem}_step{step}"
                m["pictures"] = str(write_pictures(es, boxes, maps, folder))
            per_split = "  ".join(f"{s} {m[f'accuracy_{s}']:.2f}" for s in es.split_names)
            log.info("[%s] step %d: grounding accuracy %.2f (%s)", split, step, m["accuracy"], per_split)
        return m

    def baseline(self, ctx: TaskContext, result: dict) -> dict:
        """The random-proposal and largest-proposal accuracies of val and test."""
        out: dict = {}
        for split in ("val", "test"):
            if self.has_split(split):
                base = proposal_baselines(self.eval_set(split), threshold=self.cfg.grounding.iou_threshold)
                out.update({f"{split}_{k}": v for k, v in base.items()})
        if "val_before" in result:
            out["before_finetuning"] = result["val_before"]
        return out
