#!/usr/bin/env bash
# A local two-node SLURM on this one machine, for the launcher tests and for trying `albef-ds launch slurm`.
#
#   bash scripts/slurm_local.sh start    # install slurm-wlm + munge if missing, write slurm.conf, start daemons
#   bash scripts/slurm_local.sh stop     # cancel our jobs, stop slurmd n1/n2, slurmctld and munged
#   bash scripts/slurm_local.sh status   # exit 0 when the controller answers and both nodes are usable
#
# Both commands are idempotent. Layout: one slurmctld plus one `slurmd -N n1` and one `slurmd -N n2`, both
# nodes at 127.0.0.1 on their own ports with CPUs=2 each (the two slurmds share this machine's cores).
# Needs root (daemons, /etc/slurm, /etc/hosts, apt-get). Exit status 3 = this machine cannot run SLURM at
# all (not root, or the packages cannot be installed); tests skip on that and fail on anything else.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# albef-ds local test cluster (scripts/slurm_local.sh)"
STATE=/var/lib/albef-ds-slurm # records whether munged was started by us
NODES=(n1 n2)
LOG=/var/log/slurm

say() { echo "[slurm_local] $*" >&2; }
cannot() {
    say "cannot run SLURM here: $*"
    exit 3
}

# A process counts as alive unless it is gone or a zombie: on machines whose init does not reap orphans
# (containers, microVMs), a stopped daemon stays behind as a zombie and `kill -0` still succeeds on it.
alive() {
    local st
    st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" && [[ -n $st && $st != Z ]]
}
pid_alive() {
    local pid
    pid="$(cat "$1" 2>/dev/null)" && [[ -n $pid ]] && alive "$pid"
}
munged_running() {
    local pid
    for pid in $(pgrep -x munged); do alive "$pid" && return 0; done
    return 1
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || cannot "slurm-wlm/munge are missing and there is no apt-get"
    say "installing slurm-wlm and munge (apt-get)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge; } >"${TMPDIR:-/tmp}/albef-ds-slurm-apt.log" 2>&1; then
        tail -20 "${TMPDIR:-/tmp}/albef-ds-slurm-apt.log" >&2
        cannot "apt-get install slurm-wlm munge failed (log: ${TMPDIR:-/tmp}/albef-ds-slurm-apt.log)"
    fi
}

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        say "$CONF exists and was not written by this script: refusing to overwrite a real cluster's config"
        exit 1
    fi
    local host
    host="$(hostname -s)"
    mkdir -p /etc/slurm /var/spool/slurmctld "$LOG" /var/spool/slurmd/n1 /var/spool/slurmd/n2
    cat >"$CONF.tmp" <<EOF
$MARK
ClusterName=albefds
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
ReturnToService=2
JobRequeue=1
# short waits: a test cluster should schedule, signal and clean up in seconds
KillWait=5
MinJobAge=600
MessageTimeout=20
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
StateSaveLocation=/var/spool/slurmctld
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdLogFile=$LOG/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName=n1 NodeAddr=127.0.0.1 Port=6818 CPUs=2 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=6819 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    # The node names must resolve (slurmd looks its own name up; srun tasks see them in SLURM_JOB_NODELIST).
    if ! grep -qE '^[^#]*[[:space:]]n1([[:space:]]|$)' /etc/hosts; then
        echo "127.0.0.1 n1 n2 $MARK" >>/etc/hosts
    fi
}

start_munge() {
    if munged_running; then return; fi
    [[ -f /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    mkdir -p "$STATE" && touch "$STATE/munged.ours"
}

ready() {
    # both nodes known and in a schedulable state (idle, mixed or allocated; not down/drained/unknown)
    local states
    states="$(sinfo -h -N -o '%N %t' 2>/dev/null)" || return 1
    for n in "${NODES[@]}"; do
        grep -qE "^$n (idle|mix|alloc)\$" <<<"$states" || return 1
    done
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || cannot "the local cluster needs root (daemons, /etc/slurm, /etc/hosts)"
    install_packages
    if pid_alive /run/slurmctld.pid && ready; then
        say "already running"
        return
    fi
    write_conf
    start_munge
    # -c: a controller that is not running has no live jobs; without it, jobs of a run that was killed come
    # back from the saved state as running, hold both nodes until slurmctld notices they are gone (minutes),
    # then are requeued and run again.
    pid_alive /run/slurmctld.pid || slurmctld -c
    for n in "${NODES[@]}"; do
        pid_alive "/run/slurmd-$n.pid" || slurmd -N "$n"
    done
    local i
    for ((i = 0; i < 60; i++)); do
        if ready; then
            say "up: $(sinfo -h -N -o '%N:%t' | tr '\n' ' ')"
            return
        fi
        # nodes left down/drained by an earlier unclean stop come back here
        if ((i == 10)); then scontrol update NodeName=n1,n2 State=RESUME 2>/dev/null || true; fi
        sleep 0.5
    done
    say "nodes did not become ready; sinfo:"
    sinfo -N >&2 || true
    tail -5 "$LOG/slurmctld.log" >&2 || true
    exit 1
}

wait_gone() { # pidfile...
    local f i
    for f in "$@"; do
        for ((i = 0; i < 40; i++)); do
            pid_alive "$f" || break
            sleep 0.25
        done
        if pid_alive "$f"; then
            kill -9 "$(cat "$f")" 2>/dev/null || true
        fi
        rm -f "$f"
    done
}

cmd_stop() {
    if pid_alive /run/slurmctld.pid; then
        scancel --full --signal=KILL --state=RUNNING,PENDING,SUSPENDED --user=root 2>/dev/null || true
        scancel --user=root 2>/dev/null || true
    fi
    local n i
    for n in "${NODES[@]}"; do
        if pid_alive "/run/slurmd-$n.pid"; then kill -TERM "$(cat "/run/slurmd-$n.pid")"; fi
    done
    wait_gone /run/slurmd-n1.pid /run/slurmd-n2.pid
    if pid_alive /run/slurmctld.pid; then kill -TERM "$(cat /run/slurmctld.pid)"; fi
    wait_gone /run/slurmctld.pid
    if [[ -f $STATE/munged.ours ]]; then
        local pid
        for pid in $(pgrep -x munged); do
            if alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
        done
        for ((i = 0; i < 40; i++)); do
            munged_running || break
            sleep 0.25
        done
        rm -f "$STATE/munged.ours"
    fi
    say "stopped"
}

cmd_status() {
    pid_alive /run/slurmctld.pid && ready
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
