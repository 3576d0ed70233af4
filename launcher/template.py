"""The sbatch script and the rank entry point that `albef-ds launch slurm` writes into a run folder.

Placeholders are ``{{name}}``. `render` fills them with text the caller has already quoted (see
`slurm.py`: shell values go through `shlex.quote`, `#SBATCH` values through `quote_directive`); a
placeholder left unfilled or a value given for no placeholder is an error, so the template and the
renderer cannot drift apart silently. Kept as Python strings (not package data) so that every install of
the package, editable or not, carries them.
"""

from __future__ import annotations

import re

# The job script. Everything that varies per request arrives through the variables in the first block;
# the rest is fixed text. Not `set -e`: the script must see the trainer's exit status to decide on a requeue.
SBATCH_TEMPLATE = r"""#!/bin/bash
# Written by `albef-ds launch slurm`. Resubmit as it is with: sbatch <this file>
{{directives}}
set -uo pipefail

# ---- the request (every value shell-quoted)
RUN_DIR={{run_dir}}
WORKDIR={{workdir}}
PYTHON={{python}}
MODE={{mode}}
TASKS_PER_NODE={{tasks_per_node}}
CPUS_PER_TASK={{cpus_per_task}}
MAX_RESTARTS={{max_restarts}}
EXIT_PREEMPTED=85  # albef_ds.train.runtime.EXIT_PREEMPTED: "checkpoint written, requeue me"
ENTRY="$RUN_DIR/launch/entry.py"
CONFIG="$RUN_DIR/launch/config.yaml"
SRUN_ARGS=({{srun_args}})

# ---- site setup (--setup lines, inserted verbatim: module loads, container or venv activation)
{{setup}}

# ---- environment: threads per rank, then --env (which may override it)
export OMP_NUM_THREADS="$CPUS_PER_TASK"
{{env}}

cd "$WORKDIR" || exit 1
# Ranks come from SLURM's variables (albef_ds/train/dist_env.py reads SLURM_PROCID, SLURM_NTASKS,
# SLURM_LOCALID, SLURM_NODEID); torchrun-style ones left over from the submitting shell would win over them.
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK CROSS_RANK LOCAL_SIZE
# Rendezvous on the allocation's first node; the port follows the job id (dist_env.slurm_port) so that jobs
# sharing a node do not collide.
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_ADDR
export MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))
RESTARTS="${SLURM_RESTART_COUNT:-0}"
echo "[albef-ds launch] job $SLURM_JOB_ID start $((RESTARTS + 1)) (requeues so far $RESTARTS, at most" \
    "$MAX_RESTARTS) on $SLURM_JOB_NODELIST: $SLURM_JOB_NUM_NODES nodes x $TASKS_PER_NODE tasks, mode $MODE," \
    "master $MASTER_ADDR:$MASTER_PORT, run folder $RUN_DIR"

# ---- preemption: SLURM sends USR1 to this shell before the time limit (--signal=B:USR1@N), and so does
# `scancel --batch --signal=USR1`. Pass it on to the training ranks (the job's steps); each finishes its step,
# the ranks write one checkpoint together and exit with EXIT_PREEMPTED. A rank ignores USR1 outside its
# training loop (still starting up, or already finished), so the signal is repeated every RESEND_SECONDS
# until the ranks have exited: one that arrived during start-up takes effect once the loop runs.
RESEND_SECONDS=20
SIGNALLED=0
RESENDER=""
forward_usr1() {
    SIGNALLED=1
    [ -z "$RESENDER" ] || return 0
    echo "[albef-ds launch] USR1: asking the ranks to checkpoint and stop"
    scancel --signal=USR1 "$SLURM_JOB_ID" || echo "[albef-ds launch] scancel --signal=USR1 failed"
    (trap '' USR1; while sleep "$RESEND_SECONDS"; do scancel --signal=USR1 "$SLURM_JOB_ID"; done) &
    RESENDER=$!
}
trap forward_usr1 USR1

# The launch runs with USR1 ignored, so that a signal sent to this shell's whole process tree
# (`scancel --full`) cannot kill the launcher process itself; the ranks install their own handler (and the
# deepspeed mode's supervisor its own, which passes USR1 on to the ranks as well).
if [ "$MODE" = deepspeed ]; then
    # deepspeed's launcher wants a hostfile; build it from the allocation, one slot per task.
    HOSTFILE="$RUN_DIR/launch/hostfile.$SLURM_JOB_ID"
    scontrol show hostnames "$SLURM_JOB_NODELIST" | awk -v s="$TASKS_PER_NODE" '{print $1 " slots=" s}' \
        >"$HOSTFILE"
    # The runner goes under the supervisor of the copied code (albef_ds/launcher/ds_run.py): a signal to the
    # supervisor or the runner reaches every rank as USR1, the ranks report their exit status into
    # launch/status (on the shared run folder, read back here), nothing of the run outlives it, and its exit
    # status is the ranks' (85 after their checkpoint), whatever the runner's own says.
    (trap '' USR1; PYTHONPATH="$RUN_DIR/launch/code${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -u \
        -m albef_ds.launcher.ds_run --status-dir "$RUN_DIR/launch/status" -- \
        --hostfile "$HOSTFILE" --launcher slurm \
        --launcher_args "--label --cpus-per-task=$CPUS_PER_TASK ${SRUN_ARGS[*]@Q}" --force_multi \
        --no_ssh_check --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        "$ENTRY" --config "$CONFIG") &
else
    # one task per GPU (or per --tasks-per-node on CPU nodes)
    (trap '' USR1; exec srun --label --ntasks-per-node="$TASKS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" \
        --kill-on-bad-exit=0 "${SRUN_ARGS[@]}" "$PYTHON" -u "$ENTRY" --config "$CONFIG") &
fi
CHILD=$!
while :; do
    SIGNALLED=0
    wait "$CHILD"
    RC=$?
    # a trapped signal interrupts `wait`; wait again for the launcher's own exit status
    [ "$SIGNALLED" = 1 ] || break
done
if [ -n "$RESENDER" ]; then kill "$RESENDER" 2>/dev/null; fi

if [ "$RC" -eq 0 ]; then
    echo "[albef-ds launch] training finished"
    exit 0
fi
if [ "$RC" -eq "$EXIT_PREEMPTED" ]; then
    if [ "$RESTARTS" -lt "$MAX_RESTARTS" ]; then
        echo "[albef-ds launch] checkpoint written; requeueing (requeue $((RESTARTS + 1)) of $MAX_RESTARTS)"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        echo "[albef-ds launch] scontrol requeue failed; resubmit this script to continue"
        exit "$RC"
    fi
    echo "[albef-ds launch] checkpoint written but the restart limit ($MAX_RESTARTS) is reached: not" \
        "requeued; resubmit this script to continue from the checkpoint"
    exit "$RC"
fi
echo "[albef-ds launch] training failed with exit status $RC: not requeued"
exit "$RC"
"""

# The rank entry point (`<run>/launch/entry.py`). It puts the code copied into the run folder first on
# sys.path, so every rank of every restart runs the code of submission time, whatever has changed in the
# checkout since; `srun` and `deepspeed --launcher slurm` both start it as a plain script.
ENTRY_TEMPLATE = r'''"""Rank entry point written by `albef-ds launch slurm` (runs the copied code)."""

import os
import signal
import socket
import sys


def _outside_loop(signum, frame):
    # The trainer handles USR1 only inside its step loop (checkpoint, exit 85) and puts this handler back
    # afterwards; here (start-up, final save, shutdown) the default action would kill the rank and turn a
    # finished run into a failed one. The job script repeats the signal until the ranks have exited.
    print("[albef-ds launch] USR1 outside the training loop: ignored here", flush=True)


signal.signal(signal.SIGUSR1, _outside_loop)
sys.path[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "code")

import albef_ds  # noqa: E402
from albef_ds.cli import main  # noqa: E402

env = os.environ
task, tasks, local = (env.get(k, "?") for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
print(
    f"[albef-ds launch] task {task}/{tasks} on node {env.get('SLURMD_NODENAME', '?')} "
    f"(host {socket.gethostname()}, local task {local}), code {os.path.dirname(albef_ds.__file__)}",
    flush=True,
)
sys.exit(main(["pretrain", *sys.argv[1:]]))
'''

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def render(template: str, values: dict[str, str]) -> str:
    """Fill every ``{{name}}`` of `template` from `values` (already-quoted text)."""
    names = set(_PLACEHOLDER.findall(template))
    missing, extra = names - values.keys(), values.keys() - names
    if missing or extra:
        raise KeyError(f"template placeholders: missing {sorted(missing)}, unknown {sorted(extra)}")
    return _PLACEHOLDER.sub(lambda m: values[m[1]], template)
