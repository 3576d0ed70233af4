"""`albef-ds launch slurm`: check a request, render the sbatch script, lay out the run folder, submit.

One request (`SlurmRequest`) becomes one run folder::

    <output>/launch/job.sbatch      the rendered script (resubmit it as it is to continue the run)
    <output>/launch/config.yaml     the resolved experiment config the ranks read
    <output>/launch/ds_config.json  the DeepSpeed JSON, copied
    <output>/launch/code/albef_ds/  the code at submission time (every rank and restart runs this copy)
    <output>/launch/entry.py        the rank entry point
    <output>/launch/request.json    the request, for the record
    <output>/slurm-<jobid>.out      the job log (appended across requeues)
    <output>/metrics.jsonl, checkpoints/, rank<N>.json, checkpoint.pt   what training writes

Everything a user typed reaches the script quoted: shell values by `shlex.quote`, `#SBATCH` values by
`quote_directive` (sbatch's own directive grammar). The exception is `setup`, shell lines a site needs
(module loads, container set-up) that are inserted verbatim on purpose.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from albef_ds.config import Config, ConfigError, load_config, save_config

from .template import ENTRY_TEMPLATE, SBATCH_TEMPLATE, render

MODES = ("srun", "deepspeed")
# Launcher-owned config keys: the run folder is --output and a requeued job must resume by itself.
OWNED_KEYS = ("train.output_dir", "train.resume")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# SLURM time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


class LaunchError(ValueError):
    """A request that cannot become a job; the message names the option and what was expected."""


@dataclass
class SlurmRequest:
    config: str  # experiment YAML
    output: str  # run folder (relative paths are taken from workdir)
    overrides: list[str] = field(default_factory=list)  # section.key=value, applied after the YAML
    nodes: int = 1
    gpus_per_node: int = 8  # one rank per GPU; 0 = CPU nodes (then tasks_per_node ranks per node)
    tasks_per_node: int = 0  # 0 = gpus_per_node (or 1 on CPU nodes); with GPUs it must equal gpus_per_node
    cpus_per_task: int = 8  # CPU cores per rank (data loading); also OMP_NUM_THREADS
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = ""  # SLURM time limit (e.g. 2-00:00:00); "" = the partition's default
    mem: str = ""  # memory per node (e.g. 400G); "" = the site's default
    job_name: str = "albef-ds"
    mode: str = "srun"  # srun: one task per GPU; deepspeed: deepspeed launcher + hostfile from the allocation
    ds_config: str = ""  # DeepSpeed JSON; "" = the config's train.ds_config
    env: dict[str, str] = field(default_factory=dict)  # exported in the job (NCCL/IB settings, ...)
    setup: list[str] = field(default_factory=list)  # shell lines run before the launch, verbatim
    srun_args: list[str] = field(default_factory=list)  # extra srun options (e.g. --container-image=...)
    sbatch_args: list[str] = field(default_factory=list)  # extra #SBATCH options (e.g. --exclusive)
    signal_seconds: int = 120  # USR1 this many seconds before the time limit: checkpoint and requeue
    max_restarts: int = 3  # requeues after preemption; a crash is never requeued
    max_gpus_per_node: int = 8  # the site's largest node
    python: str = ""  # interpreter on the compute nodes; "" = the one running this command
    workdir: str = ""  # job working directory (relative paths in the config); "" = current directory

    @property
    def ranks_per_node(self) -> int:
        if self.tasks_per_node:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1


@dataclass
class Prepared:
    """A checked request: what the run folder will hold."""

    request: SlurmRequest
    run_dir: Path
    workdir: Path
    cfg: Config  # resolved; train.output_dir = run_dir, train.resume = auto
    ds_config: Path  # source JSON, copied into the run folder
    script: str


def quote_directive(value: str) -> str:
    """A value for an `#SBATCH` line. sbatch reads these lines itself (no shell): inside double quotes a
    backslash escapes the next character and `#` is no comment. Control characters cannot be written."""
    if _CONTROL.search(value):
        raise LaunchError(f"{value!r} contains a control character (newline, tab, ...)")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _time_seconds(text: str) -> int:
    m = _TIME.fullmatch(text.strip())
    if not m or (m[1] is None and m[4] is not None and m[3] is None):
        raise LaunchError(
            f"--time {text!r}: expected a SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)"
        )
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-H[:M[:S]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # H:M:S
        return a * 3600 + b * 60 + c
    if b is not None:  # M:S
        return a * 60 + b
    return a * 60  # M


def _no_control(name: str, value: str) -> None:
    if _CONTROL.search(value):
        raise LaunchError(f"{name} {value!r} contains a control character (newline, tab, ...)")


def _check_request(r: SlurmRequest) -> None:
    """Counts, names and formats: everything that needs no file."""
    if r.nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, got {r.nodes}")
    if r.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node must be >= 0 (0 = CPU nodes), got {r.gpus_per_node}")
    if r.gpus_per_node > r.max_gpus_per_node:
        raise LaunchError(
            f"--gpus-per-node {r.gpus_per_node} exceeds the limit of {r.max_gpus_per_node} GPUs per node "
            "(--max-gpus-per-node)"
        )
    if r.tasks_per_node < 0:
        raise LaunchError(f"--tasks-per-node must be >= 1 (or 0 = automatic), got {r.tasks_per_node}")
    if r.gpus_per_node > 0 and r.tasks_per_node not in (0, r.gpus_per_node):
        raise LaunchError(
            f"--tasks-per-node {r.tasks_per_node} != --gpus-per-node {r.gpus_per_node}: one rank per GPU"
        )
    if r.cpus_per_task < 1:
        raise LaunchError(f"--cpus-per-task must be >= 1, got {r.cpus_per_task}")
    if r.mode not in MODES:
        raise LaunchError(f"--mode must be one of {', '.join(MODES)}, got {r.mode!r}")
    if not r.job_name.strip():
        raise LaunchError("--job-name is empty")
    for name, value in (
        ("--job-name", r.job_name),
        ("--partition", r.partition),
        ("--account", r.account),
        ("--qos", r.qos),
        ("--mem", r.mem),
        ("--output", r.output),
        ("--python", r.python),
        ("--workdir", r.workdir),
    ):
        _no_control(name, value)
    if "\\" in r.output:
        # SLURM stops expanding %j in a log path that contains a backslash
        raise LaunchError(f"--output {r.output!r}: a backslash in the run folder path is not supported")
    if not 1 <= r.signal_seconds <= 65535:
        raise LaunchError(f"--signal-seconds must lie in 1..65535 (SLURM's limit), got {r.signal_seconds}")
    if r.time:
        limit = _time_seconds(r.time)
        if limit <= r.signal_seconds:
            raise LaunchError(
                f"--time {r.time} ({limit} s) leaves no room for the USR1 warning {r.signal_seconds} s "
                "before the limit (--signal-seconds)"
            )
    if r.max_restarts < 0:
        raise LaunchError(f"--max-restarts must be >= 0, got {r.max_restarts}")
    for k in r.env:
        if not _ENV_NAME.fullmatch(k):
            raise LaunchError(f"--env {k!r}: not a valid environment variable name")
    for a in r.sbatch_args + r.srun_args:
        _no_control("extra option", a)
        if not a.startswith("-"):
            raise LaunchError(f"extra sbatch/srun option {a!r} must start with '-' (e.g. --exclusive)")
    for ov in r.overrides:
        key = ov.split("=", 1)[0].strip()
        if key in OWNED_KEYS:
            raise LaunchError(
                f"override {ov!r}: the launcher sets {key} itself (the run folder is --output; a requeued "
                "job resumes with train.resume=auto)"
            )


def prepare(r: SlurmRequest, *, check_data: bool = True) -> Prepared:
    """Check everything that can be checked before submission and render the script. Writes nothing.
    check_data=False skips the data files (a dry run on a machine that does not hold them)."""
    _check_request(r)
    workdir = Path(r.workdir or os.getcwd()).resolve()
    if not workdir.is_dir():
        raise LaunchError(f"--workdir {workdir} is not a directory")

    def at_workdir(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else workdir / q

    cfg_path = at_workdir(r.config)
    if not cfg_path.is_file():
        raise LaunchError(f"--config {cfg_path} does not exist")
    run_dir = at_workdir(r.output).resolve()
    if (run_dir / "launch" / "job.sbatch").exists():
        raise LaunchError(
            f"--output {run_dir} already holds a launched run; continue it with "
            f"`sbatch {run_dir / 'launch' / 'job.sbatch'}` or pick another folder"
        )
    world = r.nodes * r.ranks_per_node
    # deepspeed for several ranks unless the overrides say otherwise; the launcher's keys come last
    overrides = ["train.engine=deepspeed", *r.overrides]
    if r.ds_config:
        overrides.append(f"train.ds_config={r.ds_config}")
    try:
        cfg = load_config(cfg_path, overrides)
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    if cfg.train.engine == "torch" and world > 1:
        raise LaunchError(
            f"{world} ranks requested (--nodes {r.nodes} x {r.ranks_per_node} per node) but train.engine = "
            "torch runs one process; use train.engine=deepspeed"
        )
    ds_src = at_workdir(cfg.train.ds_config)
    if cfg.train.engine == "deepspeed" and not ds_src.is_file():
        raise LaunchError(f"DeepSpeed config {ds_src} (train.ds_config / --ds-config) does not exist")
    files = [("data.train_file", f) for f in cfg.data.train_file]
    if cfg.data.eval_file:
        files.append(("data.eval_file", cfg.data.eval_file))
    if cfg.data.tokenizer:
        files.append(("data.tokenizer", cfg.data.tokenizer))
    for key, f in files if check_data else []:
        if not at_workdir(f).exists():
            raise LaunchError(f"{key} {f} does not exist (paths are taken from --workdir {workdir})")
    cfg.train.output_dir = str(run_dir)
    cfg.train.resume = "auto"
    if cfg.train.engine == "deepspeed":
        cfg.train.ds_config = str(run_dir / "launch" / "ds_config.json")
    try:
        from albef_ds.train.ds_config import build_ds_config, global_batch

        global_batch(cfg, world_size=world)  # micro x accumulation x ranks against global_batch_size
        if cfg.train.engine == "deepspeed":
            build_ds_config(cfg, world_size=world, path=ds_src)
    except ConfigError as e:
        raise LaunchError(f"for {world} ranks: {e}") from None
    return Prepared(r, run_dir, workdir, cfg, ds_src, render_script(r, run_dir=run_dir, workdir=workdir))


def _directives(r: SlurmRequest, run_dir: Path, workdir: Path) -> list[str]:
    q = quote_directive
    lines = [
        f"--job-name={q(r.job_name)}",
        f"--nodes={r.nodes}",
        f"--ntasks-per-node={r.ranks_per_node}",
        f"--cpus-per-task={r.cpus_per_task}",
    ]
    if r.gpus_per_node:
        lines.append(f"--gpus-per-node={r.gpus_per_node}")
    for opt, value in (("partition", r.partition), ("account", r.account), ("qos", r.qos)):
        if value:
            lines.append(f"--{opt}={q(value)}")
    if r.time:
        lines.append(f"--time={q(r.time)}")
    if r.mem:
        lines.append(f"--mem={q(r.mem)}")
    log = str(run_dir).replace("%", "%%") + "/slurm-%j.out"  # %j: job id; a literal % is %%
    lines += [
        f"--output={q(log)}",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--chdir={q(str(workdir))}",
        "--requeue",
        f"--signal=B:USR1@{r.signal_seconds}",
    ]
    lines += [q(a) for a in r.sbatch_args]
    return ["#SBATCH " + x for x in lines]


def render_script(r: SlurmRequest, *, run_dir: Path, workdir: Path) -> str:
    """The sbatch script for a checked request."""
    sq = shlex.quote
    env_lines = [f"export {k}={sq(v)}" for k, v in r.env.items()]
    return render(
        SBATCH_TEMPLATE,
        {
            "directives": "\n".join(_directives(r, run_dir, workdir)),
            "run_dir": sq(str(run_dir)),
            "workdir": sq(str(workdir)),
            "python": sq(r.python or sys.executable),
            "mode": sq(r.mode),
            "tasks_per_node": str(r.ranks_per_node),
            "cpus_per_task": str(r.cpus_per_task),
            "max_restarts": str(r.max_restarts),
            "srun_args": " ".join(sq(a) for a in r.srun_args),
            "setup": "\n".join(r.setup) if r.setup else "# (none)",
            "env": "\n".join(env_lines) if env_lines else "# (no --env)",
        },
    )


def _copy_code(dest: Path) -> None:
    """The importable albef_ds tree as installed: the package plus its kernels and launcher sub-packages,
    which live in top-level folders of the checkout."""
    import albef_ds.kernels
    import albef_ds.launcher

    import albef_ds

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    root = dest / "albef_ds"
    shutil.copytree(Path(albef_ds.__file__).parent, root, ignore=ignore, dirs_exist_ok=True)
    for sub in (albef_ds.kernels, albef_ds.launcher):
        target = root / sub.__name__.split(".")[-1]
        shutil.copytree(Path(sub.__file__).parent, target, ignore=ignore, dirs_exist_ok=True)


def write_run_folder(p: Prepared) -> Path:
    """Lay out <run>/launch (script, resolved config, DeepSpeed JSON, code, entry point, request)."""
    launch = p.run_dir / "launch"
    launch.mkdir(parents=True, exist_ok=True)
    _copy_code(launch / "code")
    if p.cfg.train.engine == "deepspeed":
        shutil.copyfile(p.ds_config, launch / "ds_config.json")
    save_config(p.cfg, launch / "config.yaml")
    (launch / "entry.py").write_text(ENTRY_TEMPLATE)
    (launch / "request.json").write_text(json.dumps(dataclasses.asdict(p.request), indent=2) + "\n")
    script = launch / "job.sbatch"
    script.write_text(p.script)
    script.chmod(0o755)
    return script


def submit(r: SlurmRequest, *, dry_run: bool = False, sbatch: str = "sbatch") -> tuple[Prepared, str | None]:
    """Check, then (unless dry_run) write the run folder and submit; returns (prepared, job id or None)."""
    p = prepare(r, check_data=not dry_run)
    if dry_run:
        return p, None
    exe = shutil.which(sbatch)
    if exe is None:
        raise LaunchError(f"{sbatch!r} is not on PATH: run this on a SLURM login node (or use --dry-run)")
    script = write_run_folder(p)
    out = subprocess.run([exe, "--parsable", str(script)], capture_output=True, text=True, cwd=p.workdir)
    if out.returncode != 0:
        raise LaunchError(f"sbatch {script} failed (exit {out.returncode}): {out.stderr.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    (p.run_dir / "launch" / "job_id").write_text(job_id + "\n")
    return p, job_id
