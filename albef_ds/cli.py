"""`albef-ds` command line: pretrain, evaluate, data synth."""

from __future__ import annotations

import argparse
import json
import logging
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
        description="Pre-train ALBEF on the configured JSON lists; writes the resolved config, metrics.jsonl,"
        " "
        "rank<N>.json, resumable checkpoints (train.save_every) and checkpoint.pt into train.output_dir. "
        "train.engine=torch runs one process; train.engine=deepspeed runs ZeRO-2 on the ranks a launcher "
        "started (deepspeed, torchrun, srun or mpirun). SIGTERM/SIGUSR1 checkpoint and exit with status 85 "
        "(requeue); train.resume=auto continues from the newest complete checkpoint.",
    )
    _add_config_args(p)

    p = sub.add_parser(
        "evaluate",
        help="ITC image-text retrieval R@1/5/10 on data.eval_file",
        description="Evaluate a checkpoint (ours or a released ALBEF one) by ITC retrieval on "
        "data.eval_file; prints JSON.",
    )
    _add_config_args(p)
    p.add_argument("--checkpoint", default="", help="checkpoint to evaluate (default: random init)")
    p.add_argument("--output", default="", help="also write the metrics JSON to this file")

    p = sub.add_parser(
        "export",
        help="consolidated fp32 weights (safetensors) from a checkpoint or run folder",
        description="Write one .safetensors file of fp32 weights (momentum encoders and queues included) "
        "from a DeepSpeed checkpoint folder (fp32 master weights gathered from every rank's partition), a "
        "torch-engine checkpoint folder, a checkpoint.pt, or a run folder (its newest complete checkpoint). "
        "`albef-ds evaluate --checkpoint` and fine-tuning load the result.",
    )
    p.add_argument("source", help="checkpoint folder, run folder or checkpoint.pt")
    p.add_argument("--output", "-o", required=True, help="output file (.safetensors)")

    p = sub.add_parser("data", help="data utilities", description="Data utilities.")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    s = dsub.add_parser(
        "synth",
        help="generate the synthetic image-text set (data.synth.*) if absent",
        description="Write the embedded synthetic image-text set (JPEGs, train/eval JSON lists "
        "in the reference format, a WordPiece vocab.txt) into data.synth.out_dir. Skips the work "
        "when a complete set with the same settings is already there.",
    )
    _add_config_args(s)
    s.add_argument("--force", action="store_true", help="regenerate even if a complete set exists")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if args.command == "export":
            from .train.export import export_weights

            print(json.dumps(export_weights(args.source, args.output), indent=2))
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "pretrain":
            from .train.loop import EXIT_PREEMPTED, pretrain

            result = pretrain(cfg)
            if result.get("preempted"):
                return EXIT_PREEMPTED
            before = result.get("retrieval_before", {})
            after = result.get("retrieval_after", {})
            if before and after:
                print(
                    f"ITC retrieval R@1 before -> after: "
                    f"text {before['txt_r1']:.1f} -> {after['txt_r1']:.1f}, "
                    f"image {before['img_r1']:.1f} -> {after['img_r1']:.1f}"
                )
        elif args.command == "evaluate":
            from .train.loop import evaluate_checkpoint

            metrics = evaluate_checkpoint(cfg, args.checkpoint)
            text = json.dumps(metrics, indent=2)
            print(text)
            if args.output:
                with open(args.output, "w") as f:
                    f.write(text + "\n")
        elif args.command == "data" and args.data_command == "synth":
            from .data.synth import generate_synthetic, synthetic_ready

            if synthetic_ready(cfg.data.synth) and not args.force:
                print(f"synthetic set already complete in {cfg.data.synth.out_dir}")
            else:
                out = generate_synthetic(cfg.data.synth, force=args.force)
                print(f"synthetic set written to {out}")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"albef-ds: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
