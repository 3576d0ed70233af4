"""`albef-ds launch slurm` without a cluster: the rendered script (bash -n, quoting of hostile values by
running the script's variable block) and requests refused before anything is written or submitted."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from albef_ds.launcher.slurm import LaunchError, SlurmRequest, prepare, quote_directive
from albef_ds.launcher.template import SBATCH_TEMPLATE, render

from albef_ds.cli import main

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/debug.yaml")
DS = str(ROOT / "ds_configs/zero2_cpu.json")
HOSTILE_NAME = (
    """x"; touch pwned_name; echo "$(touch pwned_sub) `touch pwned_tick` ' ; touch pwned_semi # %j \\"""
)
HOSTILE_DIR = """run dir 'q' "dq" $(touch pwned_dir) ; touch pwned_semi2 `touch pwned_tick2`"""


def _request(workdir: Path, **kw) -> SlurmRequest:
    base = dict(
        config=CFG,
        output=str(workdir / "run"),
        overrides=[
            "data.train_file=[synth/train.json]",
            "data.eval_file=synth/eval.json",
            "data.tokenizer=synth/vocab.txt",
        ],
        nodes=2,
        gpus_per_node=0,
        cpus_per_task=1,
        ds_config=DS,
        workdir=str(workdir),
    )
    base.update(kw)
    return SlurmRequest(**base)


def _dry_run(capsys, workdir: Path, *extra: str) -> tuple[int, str, str]:
    rc = main(
        [
            "launch",
            "slurm",
            "--config",
            CFG,
            "--ds-config",
            DS,
            "--workdir",
            str(workdir),
            "--gpus-per-node",
            "0",
            "--cpus-per-task",
            "1",
            "--dry-run",
            *extra,
            "data.train_file=[synth/train.json]",
            "data.eval_file=synth/eval.json",
            "data.tokenizer=synth/vocab.txt",
        ]
    )
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_dry_run_prints_a_valid_script_and_writes_nothing(capsys, workdir):
    rc, script, _ = _dry_run(
        capsys,
        workdir,
        "--output",
        "runs/a",
        "--nodes",
        "2",
        "--partition",
        "gpu",
        "--account",
        "proj",
        "--qos",
        "high",
        "--time",
        "1-00:00:00",
        "--env",
        "NCCL_IB_HCA=mlx5",
        "--setup",
        "echo site-setup",
        "--signal-seconds",
        "300",
    )
    assert rc == 0
    assert script.startswith("#!/bin/bash\n")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=1",
        '#SBATCH --partition="gpu"',
        '#SBATCH --account="proj"',
        '#SBATCH --qos="high"',
        '#SBATCH --time="1-00:00:00"',
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        f'#SBATCH --output="{workdir}/runs/a/slurm-%j.out"',
        "export NCCL_IB_HCA=mlx5",
        "echo site-setup",
    ):
        assert line in script.splitlines(), line
    assert "--gpus-per-node" not in script  # CPU nodes
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert not (workdir / "runs").exists()


def test_deepspeed_mode_builds_a_hostfile_from_the_allocation(capsys, workdir):
    rc, script, _ = _dry_run(capsys, workdir, "--output", "r", "--mode", "deepspeed", "--srun-arg=--mpi=pmix")
    assert rc == 0
    assert "MODE=deepspeed" in script and "SRUN_ARGS=(--mpi=pmix)" in script
    # the deepspeed runner under the supervisor of the copied code, reports on the shared run folder
    assert '-m albef_ds.launcher.ds_run --status-dir "$RUN_DIR/launch/status" --' in script
    assert 'PYTHONPATH="$RUN_DIR/launch/code' in script
    assert '--hostfile "$HOSTFILE" --launcher slurm' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_dry_run_needs_no_data_files(capsys, workdir):
    """Rendering on a machine without the data (a laptop) works; submitting checks the files."""
    rc, script, err = _dry_run(capsys, workdir, "--output", "r", "data.train_file=[/cluster/only.json]")
    assert rc == 0 and script.startswith("#!/bin/bash"), err


def test_gpu_request_renders_one_task_per_gpu(workdir):
    p = prepare(_request(workdir, gpus_per_node=4, nodes=3, overrides=[*_request(workdir).overrides]))
    lines = p.script.splitlines()
    assert "#SBATCH --gpus-per-node=4" in lines and "#SBATCH --ntasks-per-node=4" in lines
    assert "TASKS_PER_NODE=4" in lines


def test_hostile_name_and_path_are_inert(workdir, tmp_path):
    """Every shell value, run through bash, comes back byte for byte and runs nothing."""
    p = prepare(_request(workdir, job_name=HOSTILE_NAME, output=str(tmp_path / HOSTILE_DIR)))
    subprocess.run(["bash", "-n"], input=p.script, text=True, check=True)
    # the job-name directive: one double-quoted word in sbatch's grammar (the cluster test reads it back)
    name_line = next(x for x in p.script.splitlines() if x.startswith("#SBATCH --job-name="))
    assert name_line == "#SBATCH --job-name=" + quote_directive(HOSTILE_NAME)
    # the request block: execute it and print the values back
    block = p.script.split("# ---- the request", 1)[1].split("# ---- site setup", 1)[0]
    probe = block + '\nprintf "%s\\0" "$RUN_DIR" "$WORKDIR" "$CONFIG"\n'
    out = subprocess.run(["bash", "-c", probe], capture_output=True, cwd=tmp_path, check=True)
    run_dir, wd, config = out.stdout.decode().split("\0")[:3]
    assert run_dir == str(tmp_path / HOSTILE_DIR)
    assert wd == str(workdir)
    assert config == f"{tmp_path / HOSTILE_DIR}/launch/config.yaml"
    for d in (tmp_path, workdir, Path.cwd()):
        assert not list(d.glob("pwned*"))


def test_quote_directive_escapes_and_refuses_newlines():
    assert quote_directive('a "b" \\ # c') == '"a \\"b\\" \\\\ # c"'
    with pytest.raises(LaunchError, match="control character"):
        quote_directive("a\nb")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--nodes", "0"], "--nodes must be >= 1, got 0"),
        (["--gpus-per-node", "9"], "--gpus-per-node 9 exceeds the limit of 8 GPUs per node"),
        (["--gpus-per-node", "16", "--max-gpus-per-node", "8"], "exceeds the limit of 8"),
        (["--gpus-per-node", "4", "--tasks-per-node", "2"], "--tasks-per-node 2 != --gpus-per-node 4"),
        (["--cpus-per-task", "0"], "--cpus-per-task must be >= 1"),
        (["--time", "soon"], "--time 'soon': expected a SLURM time limit"),
        (["--time", "2", "--signal-seconds", "300"], "leaves no room for the USR1 warning"),
        (["--max-restarts", "-1"], "--max-restarts must be >= 0"),
        (["--env", "1BAD=x"], "--env '1BAD': not a valid environment variable name"),
        (["--job-name", "a\nb"], "--job-name 'a\\nb' contains a control character"),
        (["--sbatch-arg", "exclusive"], "must start with '-'"),
        (["train.output_dir=elsewhere"], "the launcher sets train.output_dir itself"),
        (["train.no_such_key=1"], "train.no_such_key"),
        (["train.engine=torch"], "2 ranks requested"),
        (["data.train_file=[synth/missing.json]"], "data.train_file synth/missing.json does not exist"),
        (["train.global_batch_size=48"], "for 2 ranks: train.global_batch_size (48)"),
    ],
)
def test_bad_requests_fail_before_submission(capsys, workdir, extra, message):
    # options first, overrides last (argparse puts the positional overrides after them)
    opts = [x for x in extra if x.startswith("-") or not re.match(r"^[a-z_]+\.[a-z_]+=", x)]
    overrides = [x for x in extra if x not in opts]
    rc = main(
        [
            "launch",
            "slurm",
            "--config",
            CFG,
            "--ds-config",
            DS,
            "--workdir",
            str(workdir),
            "--output",
            "refused",
            "--gpus-per-node",
            "0",
            "--nodes",
            "2",
            *opts,
            "data.train_file=[synth/train.json]",
            "data.eval_file=synth/eval.json",
            "data.tokenizer=synth/vocab.txt",
            *overrides,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("albef-ds launch slurm: error: ") and message in err, err
    assert not (workdir / "refused").exists()  # nothing written, nothing submitted


def test_missing_config_and_existing_launch_are_refused(capsys, workdir, tmp_path):
    rc = main(["launch", "slurm", "--config", str(tmp_path / "nope.yaml"), "--output", str(tmp_path / "r")])
    assert rc == 2 and f"--config {tmp_path / 'nope.yaml'} does not exist" in capsys.readouterr().err
    (tmp_path / "r" / "launch").mkdir(parents=True)
    (tmp_path / "r" / "launch" / "job.sbatch").write_text("#!/bin/bash\n")
    with pytest.raises(LaunchError, match=re.escape(f"sbatch {tmp_path / 'r' / 'launch' / 'job.sbatch'}")):
        prepare(_request(workdir, output=str(tmp_path / "r")))


def test_template_placeholders_must_match():
    with pytest.raises(KeyError, match="missing"):
        render(SBATCH_TEMPLATE, {})
    assert render("a {{x}} b", {"x": shlex.quote("$(y)")}) == "a '$(y)' b"
    with pytest.raises(KeyError, match="unknown"):
        render("{{x}}", {"x": "1", "y": "2"})
