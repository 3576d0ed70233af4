"""`albef-ds` command line: pretrain, finetune TASK, evaluate TASK, visualize grounding, export, bench
throughput, data synth / synth-retrieval / synth-vqa / synth-nlvr2 / synth-ve / synth-ta / synth-grounding /
convert-refer / shard / validate, launch slurm. Each sub-command names its function
(`set_defaults(func=...)`)."""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML experiment config (e.g. configs/debug.yaml)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides applied after the file, e.g. train.max_steps=100 optim.lr=2e-4",
    )


# Config used when --config is not given (ALBEF-base for the throughput benchmark).
_DEFAULT_CONFIG = {"bench": "configs/pretrain_4m.yaml"}


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--checkpoint", default="", help="weights to evaluate (default: model.albef_init)")
    p.add_argument("--split-file", default="", help="JSON to evaluate on (default: data.eval_file)")
    p.add_argument("--output", default="", help="also write the metrics JSON to this file")
    p.add_argument(
        "--tensorboard", default="", help="TensorBoard folder (default: <train.output_dir>/tensorboard)"
    )
    p.add_argument("--step", type=int, default=0, help="TensorBoard step of these metrics (default 0)")
    _add_partial_arg(p)
    p.set_defaults(func=_cmd_evaluate)


def _add_partial_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="use weights that leave parts of the model unfilled (by default an error naming the parts)",
    )


_CLASSIFY_TASKS = (
    (
        "nlvr2-ta",
        "NLVR2's text-assignment pre-training (the checkpoint NLVR2 fine-tuning starts from)",
        "Text assignment on the pre-training corpus (data.train_file): the paired fusion encoder (each "
        "fusion layer of model.albef_init cloned into two blocks, one per image, key/value tied) learns "
        "whether a caption's image is in slot 0, slot 1 or neither, partner images drawn from the in-batch "
        "image similarities (vectorised). 1 epoch at 256 px in the paper; no momentum model.",
    ),
    (
        "nlvr2",
        "NLVR2 fine-tuning: a sentence about two images, true or false",
        "Fine-tune the paired encoder from the TA checkpoint (model.albef_init) with a 2-class MLP head and "
        "momentum distillation (the teacher copied from the loaded student); accuracy on nlvr.val_file (dev) "
        "every nlvr.eval_every epochs, the best kept in checkpoint_best.pt, nlvr.test_file with it.",
    ),
    (
        "ve",
        "SNLI-VE fine-tuning: entailment / neutral / contradiction of a sentence by an image",
        "Fine-tune ALBEF with a 3-class MLP head on the fusion [CLS] (entailment 2, neutral 1, "
        "contradiction 0) and momentum distillation at a constant alpha; accuracy on ve.val_file every "
        "ve.eval_every epochs, the best kept in checkpoint_best.pt, ve.test_file with it.",
    ),
)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="albef-ds",
        description="DeepSpeed-scaled ALBEF pre-training and fine-tuning.",
    )
    ap.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "pretrain",
        help="pre-train ALBEF (ITC + ITM + MLM with momentum distillation)",
        description="Pre-train ALBEF on the configured JSON lists or shards (the pretrain task on the one "
        "trainer); writes the resolved config, metrics.jsonl, rank<N>.json, resumable checkpoints "
        "(train.save_every), checkpoint.pt and results.json into train.output_dir. "
        "train.engine=torch runs one process; train.engine=deepspeed runs ZeRO-2 on the ranks a launcher "
        "started (deepspeed, torchrun, srun or mpirun). SIGTERM/SIGUSR1 checkpoint and exit with status 85 "
        "(requeue); train.resume=auto continues from the newest complete checkpoint, on any rank count.",
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_train, task="pretrain")

    p = sub.add_parser(
        "evaluate",
        help="evaluate any checkpoint with a task's evaluation (pretrain: ITC; retrieval: + ITM re-rank)",
        description="Evaluate weights with a task's evaluation, on one process or every rank a launcher "
        "started. The checkpoint may be a DeepSpeed checkpoint folder, a checkpoints folder, a run folder, "
        "checkpoint.pt, an exported .safetensors or a released ALBEF .pth; position embeddings are "
        "resampled to model.vision.image_size. It must fill every part of the model the evaluation reads "
        "(encoders, heads, answer decoder; not the MLM head, queues or momentum copies), else an error names "
        "the parts it leaves missing (--allow-partial evaluates it anyway). Prints JSON.",
    )
    esub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    e = esub.add_parser(
        "pretrain",
        help="ITC image-text retrieval R@1/5/10 on data.eval_file (rank 0)",
        description="ITC retrieval (no re-ranking) of the checkpoint on data.eval_file (or --split-file).",
    )
    _add_eval_args(e)
    e = esub.add_parser(
        "retrieval",
        help="ITC top-k + ITM re-rank retrieval, distributed over the ranks",
        description="Image-text retrieval with ITM re-ranking: every rank encodes its share of the images "
        "and texts, the ITC similarities give each image's top-k texts and each text's top-k images, and "
        "those are re-scored by the ITM head (final score: the ITM logit inside the top-k; outside it the "
        "ITC order, below). TR/IR R@1/5/10 and r_mean (and itc_* without re-ranking); rank 0 writes "
        "--output and TensorBoard scalars.",
    )
    _add_eval_args(e)
    e.add_argument("--k-test", type=int, default=0, help="re-rank depth (default: eval.k_test)")
    e.add_argument("--save-scores", default="", help="also save the score matrices (torch file)")
    e = esub.add_parser(
        "vqa",
        help="answer a VQA split by ranking the answer list; VQA accuracy + the EvalAI file",
        description="Answer every question of a VQA JSON (default vqa.test_file, else vqa.val_file; or "
        "--split-file) on every rank a launcher started, each rank its share: the decoder's first-token "
        "probabilities on [CLS] keep the top-k answers of vqa.answer_list, their sequence log-likelihoods "
        "pick the answer. Writes the EvalAI result file [{question_id, answer}] (every question once) and, "
        "when the split has human answers, the VQA accuracy. The checkpoint may be a pre-trained one (the "
        "decoder starts from its fusion layers) or a fine-tuned VQA one; missing decoder weights are an "
        "error.",
    )
    _add_eval_args(e)
    e.add_argument(
        "--k-test", type=int, default=0, help="answers re-scored per question (default vqa.k_test)"
    )
    e.add_argument(
        "--answers-file",
        default="",
        help="EvalAI result file (default <train.output_dir>/vqa_<split file stem>_answers.json)",
    )

    p = sub.add_parser(
        "finetune", help="fine-tuning tasks", description="Fine-tuning tasks on the one trainer."
    )
    fsub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    f = fsub.add_parser(
        "retrieval",
        help="image-text retrieval fine-tuning (COCO / Flickr30K Karpathy splits)",
        description="Fine-tune for image-text retrieval from model.albef_init (any checkpoint or a "
        "released ALBEF file; position embeddings resampled to model.vision.image_size): ITC with "
        "same-image-id positives and momentum distillation, ITM with hard negatives excluding same-id "
        "items. Validates every finetune.eval_every epochs (ITC top-k + ITM re-rank), keeps the best "
        "val r_mean in checkpoint_best.pt and evaluates the test split with it at the end (results.json). "
        "train.engine=torch (one process) or deepspeed (ZeRO-2, any number of ranks); SIGTERM/SIGUSR1 "
        "checkpoint and exit 85, train.resume=auto continues (on any rank count).",
    )
    _add_config_args(f)
    f.set_defaults(func=_cmd_train)
    f = fsub.add_parser(
        "vqa",
        help="VQA fine-tuning: the answer decoder, answer-list ranking, VQA accuracy, EvalAI file",
        description="Fine-tune ALBEF for VQA from model.albef_init (a pre-trained checkpoint: the 6-layer "
        "answer decoder starts from its fusion layers, embeddings and MLM head). Loss: per-answer summed "
        "token loss with momentum distillation, weighted by answer frequency, over the questions. Every "
        "vqa.eval_every epochs the local split (vqa.val_file) is answered by ranking vqa.answer_list (top "
        "vqa.k_test by first-token probability, re-scored by sequence log-likelihood) and scored with the "
        "VQA accuracy; the best is kept in checkpoint_best.pt, which answers vqa.test_file at the end into "
        "<output_dir>/vqa_test_answers.json (EvalAI). results.json holds val, test and the majority-answer "
        "baseline. Engines, preemption and resume as for every task.",
    )
    _add_config_args(f)
    f.set_defaults(func=_cmd_train)

    f = fsub.add_parser(
        "grounding",
        help="weakly-supervised grounding (RefCOCO+): retrieval training, Grad-CAM box choice",
        description="Fine-tune ALBEF on referring expressions as retrieval (every expression of an image a "
        "positive; grounding.train_file) from model.albef_init. Every grounding.eval_every epochs the "
        "val split is grounded: the Grad-CAM map of each expression (grounding.gradcam_kind: ITM on the "
        "cross-attention of grounding.gradcam_layer, default the third fusion layer; or ITC on a ViT block) "
        "picks the proposal (grounding.proposals_file) with the most heat per sqrt(area), a hit at IoU >= "
        "grounding.iou_threshold with the box of grounding.refs_file; accuracy per split (val / testA / "
        "testB). The best val accuracy is kept in checkpoint_best.pt, the test file is grounded with it; "
        "pictures of grounding.num_pictures expressions go to <output_dir>/grounding_pictures/; results.json "
        "holds val, test and the random- and largest-proposal baselines.",
    )
    _add_config_args(f)
    f.set_defaults(func=_cmd_train)

    for name, help_, desc in _CLASSIFY_TASKS:
        f = fsub.add_parser(name, help=help_, description=desc)
        _add_config_args(f)
        f.set_defaults(func=_cmd_train)
    e = esub.add_parser(
        "grounding",
        help="grounding accuracy (Grad-CAM over proposals) of a checkpoint, distributed over the ranks",
        description="Ground every expression of a grounding split (default grounding.test_file, else "
        "val_file; or --split-file) with the checkpoint's Grad-CAM map and the proposals, every rank its "
        "share; accuracy overall and per split. Rank 0 draws grounding.num_pictures expressions into "
        "<train.output_dir>/grounding_pictures/.",
    )
    _add_eval_args(e)
    for name in ("nlvr2", "ve"):
        e = esub.add_parser(
            name,
            help=f"{name} accuracy of a checkpoint, distributed over the ranks",
            description=f"Accuracy of the checkpoint on a {name} split (default its test file, else val; or "
            "--split-file), every rank classifying its share (each example counted once).",
        )
        _add_eval_args(e)

    p = sub.add_parser(
        "visualize", help="pictures of what a model does", description="Pictures of what a model does."
    )
    vsub = p.add_subparsers(dest="visualize_command", required=True, metavar="WHAT")
    v = vsub.add_parser(
        "grounding",
        help="PNGs of expressions with their Grad-CAM heat map, chosen proposal and true box",
        description="Ground the first --num expressions of a grounding split (default grounding.test_file, "
        "else val_file; or --split-file) with the checkpoint (default model.albef_init) and draw each: the "
        "image with its heat map, the chosen proposal, the ground-truth box and the expression as the "
        "title; one PNG per expression and grid.png, in --out. One process.",
    )
    _add_config_args(v)
    v.add_argument("--checkpoint", default="", help="weights (default: model.albef_init)")
    v.add_argument("--split-file", default="", help="grounding val/test JSON (default: the test file)")
    v.add_argument("--num", type=int, default=16, help="expressions to draw (default 16)")
    v.add_argument(
        "--out", default="", help="folder (default <train.output_dir>/grounding_pictures/visualize_<split>)"
    )
    _add_partial_arg(v)
    v.set_defaults(func=_cmd_visualize_grounding)

    p = sub.add_parser(
        "export",
        help="consolidated fp32 weights (safetensors) from a checkpoint or run folder",
        description="Write one .safetensors file of fp32 weights (momentum encoders and queues included) "
        "from a DeepSpeed checkpoint folder (fp32 master weights gathered from every rank's partition), a "
        "torch-engine checkpoint folder, a checkpoint.pt, or a run folder (its newest complete checkpoint). "
        "The tensors must fit the model of the checkpoint's config: every tensor, each of its shape "
        "(--allow-partial lets tensors be missing or extra, never of another shape). "
        "`albef-ds evaluate --checkpoint` and fine-tuning load the result.",
    )
    p.add_argument("source", help="checkpoint folder, run folder or checkpoint.pt")
    p.add_argument("--output", "-o", required=True, help="output file (.safetensors)")
    _add_partial_arg(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("bench", help="benchmarks", description="Benchmarks.")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH_COMMAND")
    b = bsub.add_parser(
        "throughput",
        help="samples/s, step breakdown, peak memory and MFU of the pre-training step",
        description="Time the real pre-training step (the configured engine; run it under a launcher for "
        "several ranks) on synthetic batches: samples/s, a per-section breakdown, peak memory and MFU from "
        "the analytic FLOP count. --recipe both adds the reference implementation's execution choices (fp32, "
        "per-tensor EMA loop, looped hard negatives, full-sequence MLM head, unfused ITC) in the same run. "
        "Writes JSON + a PNG breakdown.",
    )
    _add_config_args(b)
    b.add_argument(
        "--recipe",
        choices=["both", "all", "ours", "ours+compile", "ours+patch_dropout", "reference"],
        default="both",
        help="both = ours and reference; all = ours, ours+compile, ours+patch_dropout and reference",
    )
    b.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the recipes this many times, interleaved; report min / median / max (default 1)",
    )
    b.add_argument(
        "--patch-dropout",
        type=float,
        default=0.5,
        help="the share of patches the ours+patch_dropout recipe drops (default 0.5)",
    )
    b.add_argument(
        "--engine",
        choices=["deepspeed", "torch"],
        default="deepspeed",
        help="training engine (default deepspeed)",
    )
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    b.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    b.add_argument("--out", default="benchmarks/results/throughput.json", help="JSON output (PNG beside it)")
    b.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: known GPUs)")
    b.add_argument("--tensorboard", action="store_true", help="also write the numbers as TensorBoard scalars")
    b.add_argument("--profile", action="store_true", help="also write a torch profiler trace (.trace.json)")
    b.set_defaults(func=_cmd_bench_throughput)

    p = sub.add_parser("data", help="data utilities", description="Data utilities.")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    _synth_parser(
        dsub,
        "synth",
        "generate the synthetic image-text set (data.synth.*) if absent",
        "Write the embedded synthetic image-text set (JPEGs, train/eval JSON lists "
        "in the reference format, a WordPiece vocab.txt) into data.synth.out_dir. Skips the work "
        "when a complete set with the same settings is already there.",
        func=_cmd_synth,
    )
    s = dsub.add_parser(
        "synth-retrieval",
        help="the synthetic set in the Karpathy retrieval layout (finetune.*_file)",
        description="Generate the synthetic set if absent (data.synth.*), then write it in the Karpathy "
        "layout: finetune.train_file[0] (one entry per caption, with image_id), finetune.val_file and "
        "finetune.test_file (the held-out images split in two, caption lists).",
    )
    _add_config_args(s)
    s.set_defaults(func=_cmd_synth_retrieval)
    _synth_parser(
        dsub,
        "synth-vqa",
        "synthetic VQA questions about generated images (vqa.synth.*), in the VQA v2 layout",
        "Write images of one to three objects with questions about colour, shape, size, "
        "horizontal position, count and presence, 10 human answers each (with realistic disagreement), "
        "train/val/test JSON lists in the ALBEF VQA layout and answer_list.json into vqa.synth.out_dir. "
        "Skips the work when a complete set with the same settings is there.",
        func=_cmd_synth_vqa,
    )
    _synth_parser(
        dsub,
        "synth-ta",
        "synthetic captions for NLVR2's text-assignment pre-training (nlvr.ta_synth.*)",
        "Write images of one to three objects (the NLVR2 scenes), captions naming every object "
        "by colour, in the pre-training layout (train.json with image, caption list, image_id) into "
        "nlvr.ta_synth.out_dir. Skips the work when a complete set with the same settings is there.",
        func=_cmd_synth_pairs,
        what="ta",
    )
    for name, what in (("synth-nlvr2", "nlvr"), ("synth-ve", "ve")):
        _synth_parser(
            dsub,
            name,
            f"synthetic {what.upper()} examples about generated images ({what}.synth.*)",
            f"Write generated images and statements about them "
            f"({'NLVR2' if what == 'nlvr' else 'SNLI-VE'}), train/val/test JSON lists in the task's layout, "
            f"into {what}.synth.out_dir. Skips the work when a complete set with the same settings is there.",
            func=_cmd_synth_pairs,
            what=what,
        )
    s = dsub.add_parser(
        "synth-grounding",
        help="synthetic referring expressions with boxes and proposals (grounding.synth.*)",
        description="Write images of two or three objects, referring expressions that single out one of "
        "them ('the small red circle on the left'), their ground-truth boxes (from the generator) and "
        "proposals (the objects' boxes, jittered and random ones): train/val/test JSON in the ALBEF layout, "
        "refs.json and proposals.json, into grounding.synth.out_dir. Skips the work when a complete set "
        "with the same settings is there.",
    )
    _add_config_args(s)
    s.add_argument("--force", action="store_true", help="regenerate even if a complete set exists")
    s.set_defaults(func=_cmd_synth_grounding)
    s = dsub.add_parser(
        "convert-refer",
        help="RefCOCO+ refs pickle (REFER API) + instances.json -> our refs.json (and proposals.json)",
        description="Convert the REFER API's refs(unc).p and the COCO instances.json of RefCOCO+ into "
        "refs.json (ref_id -> image_id, split, box; image_id -> width, height, file name), once. The pickle "
        "is read with an unpickler that refuses every global, so nothing in it can run code. With --dets, "
        "the MAttNet proposals (dets.json) are checked against the refs and written as proposals.json.",
    )
    s.add_argument("refs_pickle", help="refs(unc).p of the REFER API")
    s.add_argument("instances_json", help="instances.json of refcoco+")
    s.add_argument("--dets", default="", help="dets.json proposals (str(image_id) -> [[x, y, w, h], ...])")
    s.add_argument("--out", "-o", required=True, help="output folder")
    s.set_defaults(func=_cmd_convert_refer)
    s = dsub.add_parser(
        "shard",
        help="convert JSON image-text lists into webdataset tar shards",
        description="Write the pairs of JSON lists ({image, caption: str | [str]}) as webdataset shards "
        "OUT/PREFIX-000000.tar, ... (webdataset's ShardWriter; per sample <key>.jpg|png|webp|bmp, <key>.txt "
        "with the first caption, <key>.json with every caption and the source path). Images that are "
        "missing or that the loaders would skip (the one usability check data validate applies too) are "
        "left out, listed and counted. Use the shards as data.train_file "
        "(e.g. 'OUT/PREFIX-{000000..000009}.tar' or 'OUT/*.tar').",
    )
    s.add_argument("inputs", nargs="+", help="JSON list files")
    s.add_argument("--out", "-o", required=True, help="output folder")
    s.add_argument(
        "--image-root", default="", help="prefix of relative image paths (default: each JSON's folder)"
    )
    s.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    s.add_argument("--prefix", default="shard", help="shard file name prefix")
    s.add_argument(
        "--max-image-pixels",
        type=int,
        default=89_478_485,
        help="larger images are left out (data.max_image_pixels)",
    )
    s.set_defaults(func=_cmd_shard)
    s = dsub.add_parser(
        "validate",
        help="find missing, unreadable and undecodable images in a data source",
        description="Read and decode every image of JSON lists and/or webdataset shards (the usability check "
        "both training loaders and data shard apply: header checks, PNG CRCs, a full PIL decode) and report "
        "the missing, unreadable and undecodable ones with their paths and the reason. Exit status 1 when "
        "any is found.",
    )
    s.add_argument(
        "inputs", nargs="+", help="JSON list files and/or shard specs ('a-{000..009}.tar', '*.tar')"
    )
    s.add_argument(
        "--image-root", default="", help="prefix of relative image paths (default: each JSON's folder)"
    )
    s.add_argument("--threads", type=int, default=4, help="decoding threads")
    s.add_argument("--max-image-pixels", type=int, default=89_478_485, help="larger images count as bad")
    s.add_argument("--output", "-o", default="", help="also write the report as JSON here")
    s.set_defaults(func=_cmd_validate)

    from .launcher.cli import add_launch_parser

    add_launch_parser(sub)  # launch slurm
    return ap


def _synth_parser(dsub, name: str, help: str, description: str, **defaults) -> None:
    """A `data synth*` sub-command: --config, overrides, --force."""
    s = dsub.add_parser(name, help=help, description=description)
    _add_config_args(s)
    s.add_argument("--force", action="store_true", help="regenerate even if a complete set exists")
    s.set_defaults(**defaults)


def _config(args: argparse.Namespace):
    return load_config(args.config or _DEFAULT_CONFIG.get(args.command), args.overrides)


def _is_rank0() -> bool:
    from .train.dist_env import env_rank

    return env_rank() == 0


def _cmd_train(args: argparse.Namespace) -> int:
    """`pretrain` and `finetune TASK`: the task on the one trainer."""
    from .tasks import train_task
    from .train.runtime import EXIT_PREEMPTED

    result = train_task(_config(args), args.task)
    if result.get("preempted"):
        return EXIT_PREEMPTED
    if _is_rank0():
        before, val, test = result.get("val_before"), result.get("val"), result.get("test")
        if args.task == "pretrain" and before and val:
            print(
                f"ITC retrieval R@1 before -> after: text {before['txt_r1']:.1f} -> {val['txt_r1']:.1f}, "
                f"image {before['img_r1']:.1f} -> {val['img_r1']:.1f}"
            )
        elif args.task == "vqa" and val:
            base = result.get("baseline", {})
            print(
                f"vqa fine-tuning: best epoch {result.get('best_epoch')}, val accuracy {val['accuracy']:.2f} "
                f"(majority answer {base.get('val_majority_accuracy', float('nan')):.2f})"
                + (f", test answers in {test['answers_file']}" if test else "")
            )
        elif args.task in ("nlvr2", "ve") and val:
            base = result.get("baseline", {})
            print(
                f"{args.task} fine-tuning: best epoch {result.get('best_epoch')}, "
                f"val accuracy {val['accuracy']:.2f}"
                f" (majority class {base.get('val_majority_accuracy', float('nan')):.2f})"
                + (f", test accuracy {test['accuracy']:.2f}" if test else "")
            )
        elif args.task == "grounding" and val:
            base = result.get("baseline", {})
            rand = base.get("val_random_proposal_accuracy", float("nan"))
            largest = base.get("val_largest_box_accuracy", float("nan"))
            print(
                f"grounding fine-tuning: best epoch {result.get('best_epoch')}, val accuracy "
                f"{val['accuracy']:.2f} (random proposal {rand:.2f}, largest box {largest:.2f})"
                + (f", test accuracy {test['accuracy']:.2f}" if test else "")
            )
        elif test and "r_mean" in test:
            print(
                f"{args.task} fine-tuning: best epoch {result.get('best_epoch')}, test TR R@1 "
                f"{test['txt_r1']:.2f} IR R@1 {test['img_r1']:.2f} r_mean {test['r_mean']:.2f}"
            )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .tasks import evaluate_task

    metrics = evaluate_task(
        _config(args),
        args.task,
        args.checkpoint,
        split_file=args.split_file,
        k_test=getattr(args, "k_test", 0),
        output=args.output,
        tensorboard=args.tensorboard,
        save_scores=getattr(args, "save_scores", ""),
        answers_file=getattr(args, "answers_file", ""),
        step=args.step,
        allow_partial=args.allow_partial,
    )
    if _is_rank0():
        print(json.dumps(metrics, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .train.checkpoint.export import export_weights

    print(json.dumps(export_weights(args.source, args.output, allow_partial=args.allow_partial), indent=2))
    return 0


_BENCH_RECIPES = {
    "both": ["ours", "reference"],
    "all": ["ours", "ours+compile", "ours+patch_dropout", "reference"],
}


def _cmd_bench_throughput(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench.throughput import bench_throughput

    cfg = _config(args)
    cfg.train.engine = args.engine
    res = bench_throughput(
        cfg,
        config_name=Path(args.config or _DEFAULT_CONFIG["bench"]).stem,
        recipes=_BENCH_RECIPES.get(args.recipe, [args.recipe]),
        warmup=args.warmup,
        steps=args.steps,
        out=Path(args.out),
        peak_tflops=args.peak_tflops,
        tensorboard=args.tensorboard,
        profile=args.profile,
        repeats=args.repeats,
        patch_dropout=args.patch_dropout,
    )
    for r in res["recipes"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no known peak)"
        per_dev, step_ms = r["samples_per_s_per_device"], 1000 * r["step_time_s"]
        print(
            f"{r['recipe']:>9}: {r['samples_per_s']:.2f} samples/s ({per_dev:.2f} per device), "
            f"step {step_ms:.1f} ms, peak memory {r['peak_mem_gb']:.2f} GB, MFU {mfu}"
        )
    for name, v in res["ratios"].items():
        spread = (
            f" (min {v['min']:.2f}x, max {v['max']:.2f}x over {res['repeats']})" if res["repeats"] > 1 else ""
        )
        print(f"{name}: {v['median']:.2f}x samples/s{spread}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import generate_synthetic, synthetic_ready

    cfg = _config(args)
    if synthetic_ready(cfg.data.synth) and not args.force:
        print(f"synthetic set already complete in {cfg.data.synth.out_dir}")
    else:
        out = generate_synthetic(cfg.data.synth, force=args.force)
        print(f"synthetic set written to {out}")
    return 0


def _cmd_synth_retrieval(args: argparse.Namespace) -> int:
    from .data.karpathy import write_synthetic_karpathy
    from .data.synth import generate_synthetic

    cfg = _config(args)
    f = cfg.finetune
    if not (f.train_file and f.val_file and f.test_file):
        raise ConfigError(
            "data synth-retrieval writes finetune.train_file, val_file and test_file: set all three"
        )
    synth = generate_synthetic(cfg.data.synth)
    out = write_synthetic_karpathy(synth, f.train_file[0], f.val_file, f.test_file, num_val=f.synth_num_val)
    print(json.dumps(out, indent=2))
    return 0


def _cmd_synth_vqa(args: argparse.Namespace) -> int:
    from .data.synth_vqa import generate_synthetic_vqa

    cfg = _config(args)
    out = generate_synthetic_vqa(cfg.vqa.synth, force=args.force)
    print(f"synthetic VQA set in {out}")
    return 0


def _cmd_synth_pairs(args: argparse.Namespace) -> int:
    from .data import synth_pairs

    cfg = _config(args)
    if args.what == "ta":
        out = synth_pairs.generate_synthetic_ta(cfg.nlvr.ta_synth, force=args.force)
    else:
        make = (
            synth_pairs.generate_synthetic_nlvr2 if args.what == "nlvr" else synth_pairs.generate_synthetic_ve
        )
        out = make(getattr(cfg, args.what).synth, force=args.force)
    print(f"synthetic {args.what} set in {out}")
    return 0


def _cmd_synth_grounding(args: argparse.Namespace) -> int:
    from .data.synth_grounding import generate_synthetic_grounding

    out = generate_synthetic_grounding(_config(args).grounding.synth, force=args.force)
    print(f"synthetic grounding set in {out}")
    return 0


def _cmd_convert_refer(args: argparse.Namespace) -> int:
    from .data.refer import convert_proposals, convert_refer

    out = {"refs": str(convert_refer(args.refs_pickle, args.instances_json, args.out))}
    if args.dets:
        out["proposals"] = str(convert_proposals(args.dets, args.out, refs=out["refs"]))
    print(json.dumps(out, indent=2))
    return 0


def _cmd_visualize_grounding(args: argparse.Namespace) -> int:
    from .tasks import visualize_grounding

    res = visualize_grounding(
        _config(args),
        args.checkpoint,
        split_file=args.split_file,
        num=args.num,
        out=args.out,
        allow_partial=args.allow_partial,
    )
    print(json.dumps(res, indent=2))
    return 0


def _cmd_shard(args: argparse.Namespace) -> int:
    from .data import load_annotations, write_shards

    entries = [e for f in args.inputs for e in load_annotations(f, args.image_root)]
    res = write_shards(
        entries, args.out, shard_size=args.shard_size, prefix=args.prefix, max_pixels=args.max_image_pixels
    )
    print(
        json.dumps(
            {"shards": len(res["shards"]), "written": res["written"], "skipped": res["skipped"]}, indent=2
        )
    )
    print(
        f"{res['written']} samples in {len(res['shards'])} shard(s) under {args.out}, "
        f"{len(res['skipped'])} left out as unusable"
    )
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .data import open_source, validate_source

    source = open_source(args.inputs, args.image_root)
    report = validate_source(source, threads=args.threads, max_pixels=args.max_image_pixels)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    for kind in ("missing", "unreadable", "undecodable"):
        for name, why in report[kind]:
            print(f"{kind}: {name}: {why}")
    bad = report["total"] - report["ok"]
    print(
        f"{report['total']} images: {report['ok']} ok, {len(report['missing'])} missing, "
        f"{len(report['unreadable'])} unreadable, {len(report['undecodable'])} undecodable"
    )
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["launch", "deepspeed"]:
        # its arguments are deepspeed's (--num_gpus, --module, ...), which argparse would take for ours
        from .launcher.ds_run import main as supervise

        return supervise(argv[2:])
    args = _parser().parse_args(argv)
    from .launcher.ds_run import record_exit
    from .train.dist_env import env_rank
    from .train.runtime import configure_logging

    configure_logging(args.log_level, rank=env_rank())
    code = 1  # an exception escaping below
    try:
        code = args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"albef-ds: error: {e}", file=sys.stderr)
        code = 2
    finally:
        # under `albef-ds launch deepspeed`: this rank's status for the supervisor (launch.py loses it)
        record_exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
