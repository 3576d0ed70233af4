"""`albef-ds launch slurm ...`: the argparse side of the launcher (albef_ds/cli.py hooks it in)."""

from __future__ import annotations

import argparse
import sys

from .slurm import MODES, LaunchError, SlurmRequest, submit

_DEFAULTS = SlurmRequest(config="", output="")


def _env_pair(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--env {text!r}: expected NAME=VALUE")
    k, v = text.split("=", 1)
    return k, v


def add_launch_parser(sub) -> None:
    p = sub.add_parser(
        "launch",
        help="launch pre-training: on a SLURM cluster, or the deepspeed launcher with working signals",
        description="Launch pre-training on a cluster.",
    )
    lsub = p.add_subparsers(dest="launch_command", required=True, metavar="LAUNCHER")
    s = lsub.add_parser(
        "slurm",
        help="render an sbatch script for a multi-node ZeRO-2 run and submit it",
        description="Check the request, copy the code, resolved config and DeepSpeed JSON into the run "
        "folder (--output), render an sbatch script from the template and submit it. The job resumes from "
        "the newest complete checkpoint of the run folder (train.resume=auto); USR1 before the time limit "
        "(or from `scancel --batch --signal=USR1`) makes the ranks checkpoint and the job requeue itself, at "
        "most --max-restarts times; a job that finishes or crashes is not requeued.",
    )
    s.add_argument("--config", "-c", required=True, help="experiment YAML (e.g. configs/pretrain_4m.yaml)")
    s.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides (train.output_dir and train.resume are the launcher's)",
    )
    s.add_argument("--output", "-o", required=True, help="run folder (logs, config, code, checkpoints)")
    s.add_argument("--nodes", "-N", type=int, default=_DEFAULTS.nodes, help="nodes (default 1)")
    s.add_argument(
        "--gpus-per-node",
        type=int,
        default=_DEFAULTS.gpus_per_node,
        help="GPUs per node = ranks per node (default 8; 0 = CPU nodes)",
    )
    s.add_argument(
        "--tasks-per-node",
        type=int,
        default=0,
        help="ranks per node on CPU nodes (default: one per GPU, or 1 without GPUs)",
    )
    s.add_argument(
        "--cpus-per-task", type=int, default=_DEFAULTS.cpus_per_task, help="cores per rank (default 8)"
    )
    s.add_argument("--partition", "-p", default="", help="SLURM partition")
    s.add_argument("--account", "-A", default="", help="SLURM account")
    s.add_argument("--qos", default="", help="SLURM quality of service")
    s.add_argument("--time", "-t", default="", help="time limit, e.g. 2-00:00:00 (default: the partition's)")
    s.add_argument("--mem", default="", help="memory per node, e.g. 400G (default: the site's)")
    s.add_argument("--job-name", "-J", default=_DEFAULTS.job_name, help="job name (default albef-ds)")
    s.add_argument(
        "--mode",
        choices=MODES,
        default="srun",
        help="srun: one task per GPU, ranks from SLURM's variables (default); deepspeed: the deepspeed "
        "launcher with a hostfile built from the allocation",
    )
    s.add_argument("--ds-config", default="", help="DeepSpeed JSON (default: the config's train.ds_config)")
    s.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="export in the job (repeatable), e.g. NCCL_IB_HCA=mlx5 NCCL_SOCKET_IFNAME=ib0",
    )
    s.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run before the launch, verbatim (repeatable): module load ..., "
        "source venv/bin/activate",
    )
    s.add_argument(
        "--srun-arg",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra srun option (repeatable), e.g. --srun-arg=--container-image=IMAGE",
    )
    s.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra #SBATCH option (repeatable), e.g. --sbatch-arg=--exclusive",
    )
    s.add_argument(
        "--signal-seconds",
        type=int,
        default=_DEFAULTS.signal_seconds,
        help="send USR1 this many seconds before the time limit: checkpoint and requeue (default 120)",
    )
    s.add_argument(
        "--max-restarts",
        type=int,
        default=_DEFAULTS.max_restarts,
        help="requeues after preemption before the job gives up (default 3)",
    )
    s.add_argument(
        "--max-gpus-per-node",
        type=int,
        default=_DEFAULTS.max_gpus_per_node,
        help="refuse more GPUs per node than this (default 8)",
    )
    s.add_argument("--python", default="", help="Python on the compute nodes (default: this one)")
    s.add_argument("--workdir", default="", help="job working directory (default: the current one)")
    s.add_argument("--dry-run", action="store_true", help="check and print the script; submit nothing")
    s.set_defaults(func=run_launch)

    # Listed for --help only: albef_ds.cli hands `launch deepspeed ...` to ds_run.main before argparse runs,
    # since the arguments are deepspeed's own (--num_gpus, --module, ...).
    d = lsub.add_parser(
        "deepspeed",
        help="run the deepspeed launcher on this machine (or a hostfile's) so that a signal makes every "
        "rank checkpoint once and the command exit 85",
        description="`albef-ds launch deepspeed [--grace-seconds S] [--resend-seconds S] [--status-dir DIR] "
        "[--] DEEPSPEED_ARGS`: what `deepspeed DEEPSPEED_ARGS` does, under a supervisor. SIGTERM, SIGINT, "
        "SIGHUP or SIGUSR1 to it (or the deepspeed runner dying of a signal) reach every rank as SIGUSR1; "
        "the ranks finish their step, write one checkpoint and exit 85, and so does this command; no "
        "process of the run outlives it. A second SIGINT kills the run at once.",
    )
    d.add_argument("deepspeed_args", nargs=argparse.REMAINDER, help="the arguments of `deepspeed`")


def run_launch(args: argparse.Namespace) -> int:
    """Exit status: 0 submitted (or printed), 2 a request that cannot be submitted."""
    req = SlurmRequest(
        config=args.config,
        output=args.output,
        overrides=list(args.overrides),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        time=args.time,
        mem=args.mem,
        job_name=args.job_name,
        mode=args.mode,
        ds_config=args.ds_config,
        env=dict(args.env),
        setup=list(args.setup),
        srun_args=list(args.srun_arg),
        sbatch_args=list(args.sbatch_arg),
        signal_seconds=args.signal_seconds,
        max_restarts=args.max_restarts,
        max_gpus_per_node=args.max_gpus_per_node,
        python=args.python,
        workdir=args.workdir,
    )
    try:
        prepared, job_id = submit(req, dry_run=args.dry_run)
    except LaunchError as e:
        print(f"albef-ds launch slurm: error: {e}", file=sys.stderr)
        return 2
    if job_id is None:
        print(prepared.script, end="")
        return 0
    print(f"submitted batch job {job_id}")
    print(f"run folder {prepared.run_dir}; log {prepared.run_dir / f'slurm-{job_id}.out'}")
    return 0
