"""Where this process sits in the job: the one place that reads distributed environment variables.

Launchers describe the job in different variables; `world_info_from_env` turns them into one `DistInfo`,
checked and logged, and `DistInfo.export` writes the torchrun-style set back so that
`torch.distributed` / `deepspeed.init_distributed` (both `env://`) see the same answer we do.

Sources, first match wins:

1. ``"env"``: torchrun or the deepspeed launcher (``RANK`` and ``WORLD_SIZE``). This comes before SLURM
   because ``srun ... torchrun`` leaves the SLURM variables of the *launcher* task in each worker; the
   torchrun ones describe the worker.
2. ``"slurm"``: ``srun`` tasks (``SLURM_PROCID`` and ``SLURM_NTASKS`` / ``SLURM_NPROCS``).
3. ``"mpi"``: OpenMPI (``OMPI_COMM_WORLD_*``) or MPICH / Intel MPI (``PMI_RANK`` / ``PMI_SIZE``).
4. ``"single"``: none of these; one process.

Pure Python on purpose (no torch.distributed, no deepspeed): it runs before any process group exists and
is tested with plain dicts.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

DEFAULT_MASTER_ADDR = "127.0.0.1"

# SLURM jobs that share a node must not all rendezvous on 29500. Deriving the port from the job id keeps
# concurrent jobs apart without coordination; the range stays below Linux's default ephemeral range
# (32768-60999) so the kernel is unlikely to have handed the port to some outgoing connection.
SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistInfo:
    """One process's place in the job, as found in the environment."""

    rank: int  # global rank, 0 <= rank < world_size
    local_rank: int  # rank on this node; selects the GPU
    world_size: int  # processes in the job
    local_world_size: int  # processes on this node
    node_rank: int  # index of this node in the job
    master_addr: str  # host of rank 0's rendezvous store
    master_port: int  # port of that store
    source: str  # "env" (torchrun / deepspeed launcher), "slurm", "mpi" or "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def export(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Write RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and GROUP_RANK)
        into `environ` (default os.environ).

        torch.distributed / deepspeed.init_distributed with env:// then see one consistent set, whatever
        launcher started us. GROUP_RANK (torchrun's node rank) is written too so that reading the exported
        set back gives the same node_rank even when nodes run different numbers of tasks.
        """
        env = os.environ if environ is None else environ
        env.update(
            {
                "RANK": str(self.rank),
                "LOCAL_RANK": str(self.local_rank),
                "WORLD_SIZE": str(self.world_size),
                "LOCAL_WORLD_SIZE": str(self.local_world_size),
                "GROUP_RANK": str(self.node_rank),
                "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port),
            }
        )


# --------------------------------------------------------------------------------------------- parsing


def _get(environ: Mapping[str, str], name: str) -> str | None:
    """The variable's value, or None when unset or blank (an exported-but-empty variable means unset)."""
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _all_set(environ: Mapping[str, str], *names: str) -> bool:
    return all(_get(environ, name) is not None for name in names)


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = _get(environ, name)
    if value is None:
        if default is None:
            raise ValueError(f"{name} is not set but is required here")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _first_int(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[int, str] | None:
    """The first of `names` that is set, parsed, with the name (for error messages)."""
    for name in names:
        if _get(environ, name) is not None:
            return _int(environ, name), name
    return None


_RANGE_GROUP = re.compile(r"^(?P<prefix>[^\[\]]*)\[(?P<ranges>[^\[\]]+)\](?P<suffix>[^\[\]]*)$")


def _split_top_level(s: str) -> list[str]:
    """Split on commas outside brackets: "a[1-2,4],b5" -> ["a[1-2,4]", "b5"]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise ValueError(f"SLURM node list {s!r}: unbalanced or nested brackets")
    if depth != 0:
        raise ValueError(f"SLURM node list {s!r}: unbalanced brackets")
    parts.append(s[start:])
    return parts


def expand_slurm_nodelist(s: str) -> list[str]:
    """Expand SLURM's compressed host list: "gpu-[01-03,07]" -> gpu-01, gpu-02, gpu-03, gpu-07.

    Handles comma lists ("a[1-2],b5"), ranges and single numbers inside one bracket group, and zero padding
    (a range keeps the width of its lower bound, as SLURM writes it: "node[001-002]"). More than one bracket
    group per host ("n[1-2]-g[1-2]") is rejected; pass `resolve_hostnames` (e.g. `scontrol show hostnames`)
    to `world_info_from_env` for those.
    """
    if not s or not s.strip():
        raise ValueError(f"SLURM node list {s!r} is empty")
    hosts: list[str] = []
    for item in _split_top_level(s.strip()):
        item = item.strip()
        if not item:
            raise ValueError(f"SLURM node list {s!r}: empty entry")
        if "[" not in item and "]" not in item:
            hosts.append(item)
            continue
        if item.count("[") > 1:
            raise ValueError(
                f"SLURM node list {s!r}: {item!r} has more than one bracket group; "
                "pass resolve_hostnames (scontrol show hostnames) to expand it"
            )
        m = _RANGE_GROUP.match(item)
        if m is None:
            raise ValueError(f"SLURM node list {s!r}: cannot parse {item!r}")
        prefix, suffix = m["prefix"], m["suffix"]
        for part in m["ranges"].split(","):
            lo, sep, hi = part.strip().partition("-")
            if not lo.isdigit() or (sep and not hi.isdigit()):
                raise ValueError(f"SLURM node list {s!r}: bad range {part!r}")
            width = len(lo)
            first, last = int(lo), int(hi) if sep else int(lo)
            if last < first:
                raise ValueError(f"SLURM node list {s!r}: range {part!r} runs backwards")
            hosts.extend(f"{prefix}{n:0{width}d}{suffix}" for n in range(first, last + 1))
    return hosts


def _expand_tasks_per_node(name: str, s: str) -> list[int]:
    """SLURM's per-node task counts: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in s.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"{name}={s!r}: cannot parse {part!r} (expected N or N(xM))")
        counts.extend([int(m[1])] * int(m[2] or 1))
    return counts


def _slurm_local_world_size(environ: Mapping[str, str], node_rank: int) -> tuple[int, str] | None:
    for name in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = _get(environ, name)
        if value is None:
            continue
        counts = _expand_tasks_per_node(name, value)
        if len(counts) == 1 and "(" not in value:
            return counts[0], name  # one plain number: the same on every node
        if not 0 <= node_rank < len(counts):
            raise ValueError(f"{name}={value!r} has no entry for SLURM_NODEID={node_rank}")
        return counts[node_rank], name
    return None


# --------------------------------------------------------------------------------------------- sources


def _from_torchrun(environ: Mapping[str, str], default_port: int) -> tuple[DistInfo, dict[str, str]]:
    rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    local_rank = _int(environ, "LOCAL_RANK", 0)
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE. With neither, assume one node
    # holds the whole job: never wrong for the GPU choice (local_rank) and only node_rank depends on it.
    lws = _first_int(environ, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"))
    local_world, lws_name = lws if lws else (world, "WORLD_SIZE")
    # torchrun: GROUP_RANK; deepspeed launcher: CROSS_RANK; else assume equal-sized nodes in rank order.
    nr = _first_int(environ, ("GROUP_RANK", "CROSS_RANK"))
    node_rank, nr_name = nr if nr else (rank // max(local_world, 1), "RANK // " + lws_name)
    info = DistInfo(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        node_rank=node_rank,
        master_addr=_get(environ, "MASTER_ADDR") or DEFAULT_MASTER_ADDR,
        master_port=_int(environ, "MASTER_PORT", default_port),
        source="env",
    )
    names = {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK"}
    return info, {**names, "local_world_size": lws_name, "node_rank": nr_name, "master_port": "MASTER_PORT"}


def _from_slurm(
    environ: Mapping[str, str],
    default_port: int,
    resolve_hostnames: Callable[[str], list[str]] | None,
) -> tuple[DistInfo, dict[str, str]]:
    rank = _int(environ, "SLURM_PROCID")
    world_name = "SLURM_NTASKS" if _get(environ, "SLURM_NTASKS") is not None else "SLURM_NPROCS"
    world = _int(environ, world_name)
    local_rank = _int(environ, "SLURM_LOCALID", 0)
    node_rank = _int(environ, "SLURM_NODEID", 0)
    lws = _slurm_local_world_size(environ, node_rank)
    local_world, lws_name = lws if lws else (world, world_name)

    master_addr = _get(environ, "MASTER_ADDR")
    if master_addr is None:
        nodelist_name = next((n for n in ("SLURM_JOB_NODELIST", "SLURM_NODELIST") if _get(environ, n)), None)
        if nodelist_name is not None:
            nodelist = _get(environ, nodelist_name) or ""
            hosts = resolve_hostnames(nodelist) if resolve_hostnames else expand_slurm_nodelist(nodelist)
            if not hosts:
                raise ValueError(f"{nodelist_name}={nodelist!r} resolved to no hosts")
            master_addr = hosts[0]  # rank 0 runs on the first node of the allocation
        elif world > local_world:
            raise ValueError(
                f"multi-node SLURM job ({world_name}={world}, {lws_name}={local_world}) but neither "
                "MASTER_ADDR nor SLURM_JOB_NODELIST / SLURM_NODELIST is set"
            )
        else:
            master_addr = DEFAULT_MASTER_ADDR

    if _get(environ, "MASTER_PORT") is not None:
        master_port, port_name = _int(environ, "MASTER_PORT"), "MASTER_PORT"
    elif _get(environ, "SLURM_JOB_ID") is not None:
        master_port, port_name = slurm_port(_int(environ, "SLURM_JOB_ID")), "SLURM_JOB_ID"
    else:
        master_port, port_name = default_port, "default_port"

    info = DistInfo(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        source="slurm",
    )
    names = {"rank": "SLURM_PROCID", "world_size": world_name, "local_rank": "SLURM_LOCALID"}
    names.update(local_world_size=lws_name, node_rank="SLURM_NODEID", master_port=port_name)
    return info, names


def _from_mpi(environ: Mapping[str, str], default_port: int) -> tuple[DistInfo, dict[str, str]]:
    if _all_set(environ, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        keys = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
        local_keys = ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
    else:
        keys = ("PMI_RANK", "PMI_SIZE")
        local_keys = ("MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    rank, world = _int(environ, keys[0]), _int(environ, keys[1])
    local_rank = _int(environ, local_keys[0], 0)
    local_world = _int(environ, local_keys[1], world)
    lws_name = local_keys[1] if _get(environ, local_keys[1]) else keys[1]
    info = DistInfo(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        # MPI exports no node index; by-slot mapping (the default) fills nodes in rank order.
        node_rank=rank // max(local_world, 1),
        # MPI exports no rendezvous address either: multi-node runs must export MASTER_ADDR (the first
        # host), e.g. `mpirun -x MASTER_ADDR=...`, or use deepspeed's own mpi discovery instead.
        master_addr=_get(environ, "MASTER_ADDR") or DEFAULT_MASTER_ADDR,
        master_port=_int(environ, "MASTER_PORT", default_port),
        source="mpi",
    )
    names = {"rank": keys[0], "world_size": keys[1], "local_rank": local_keys[0]}
    return info, {**names, "local_world_size": lws_name, "node_rank": f"{keys[0]} // {lws_name}"}


def mpi_launched(env: Mapping[str, str]) -> bool:
    return _all_set(env, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE") or _all_set(
        env, "PMI_RANK", "PMI_SIZE"
    )


def _mpi4py_world():
    try:
        from mpi4py import MPI
    except ImportError:
        logger.warning(
            "launched by MPI but mpi4py is not installed: ranks come from the MPI environment variables and "
            "the rendezvous address from MASTER_ADDR (pip install mpi4py for full MPI discovery)"
        )
        return None
    return MPI.COMM_WORLD


def mpi4py_rendezvous(info: DistInfo, comm, env: Mapping[str, str]) -> DistInfo:
    """Complete what MPI's variables leave open, by asking the MPI world itself (mpi4py):

    - the node layout: ranks sharing a node (MPI_COMM_TYPE_SHARED) give local rank and size, and nodes are
      numbered in the order of their lowest rank;
    - the rendezvous: rank 0's host name and, unless MASTER_PORT is set, a port rank 0 found free, sent to
      every rank (so multi-node mpirun needs no `-x MASTER_ADDR=...`).

    The rank and world size must agree with the environment's; a mismatch is an error naming both.
    """
    import socket

    from mpi4py import MPI

    if comm.Get_rank() != info.rank or comm.Get_size() != info.world_size:
        raise ValueError(
            f"MPI says rank {comm.Get_rank()} of {comm.Get_size()} but the environment says rank {info.rank} "
            f"of {info.world_size}"
        )
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=info.rank)
    local_rank, local_world = node.Get_rank(), node.Get_size()
    leaders = comm.allgather(info.rank if local_rank == 0 else None)
    node_leader = node.bcast(info.rank if local_rank == 0 else None, root=0)
    node_rank = sorted(r for r in leaders if r is not None).index(node_leader)
    node.Free()
    rendezvous = None
    if info.rank == 0:
        addr = _get(env, "MASTER_ADDR") or socket.gethostname()
        port = _int(env, "MASTER_PORT", 0) if _get(env, "MASTER_PORT") else _free_port()
        rendezvous = (addr, port)
    addr, port = comm.bcast(rendezvous, root=0)
    return DistInfo(
        rank=info.rank,
        local_rank=local_rank,
        world_size=info.world_size,
        local_world_size=local_world,
        node_rank=node_rank,
        master_addr=addr,
        master_port=port,
        source="mpi (mpi4py)",
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def slurm_port(job_id: int) -> int:
    """Rendezvous port for a SLURM job: SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN (10000-29999)."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _validate(info: DistInfo, names: Mapping[str, str]) -> None:
    """Every error names the variable(s) it came from and their values."""

    def var(field: str) -> str:
        return f"{names.get(field, field)}={getattr(info, field)}"

    if info.world_size < 1:
        raise ValueError(f"{var('world_size')} must be >= 1")
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"{var('rank')} must be in [0, {var('world_size')})")
    if info.local_world_size < 1:
        raise ValueError(f"{var('local_world_size')} must be >= 1")
    if info.local_world_size > info.world_size:
        raise ValueError(f"{var('local_world_size')} exceeds {var('world_size')}")
    if not 0 <= info.local_rank < info.local_world_size:
        raise ValueError(f"{var('local_rank')} must be in [0, {var('local_world_size')})")
    if info.node_rank < 0:
        raise ValueError(f"{var('node_rank')} must be >= 0")
    if not 0 < info.master_port < 65536:
        raise ValueError(f"{var('master_port')} is not a TCP port")


def env_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank as a launcher announced it (torchrun/deepspeed, SLURM, OpenMPI, PMI), 0
    when none did; no validation or MPI set-up (for choosing a log level before anything starts)."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def world_info_from_env(
    environ: Mapping[str, str] | None = None,
    *,
    default_port: int = 29500,
    resolve_hostnames: Callable[[str], list[str]] | None = None,
) -> DistInfo:
    """Read rank, world size, local rank, node and rendezvous address from the launcher's variables.

    environ: defaults to os.environ; tests pass dicts.
    default_port: MASTER_PORT when the launcher gives none (SLURM derives one from SLURM_JOB_ID instead).
    resolve_hostnames: expands a SLURM node list (e.g. by running `scontrol show hostnames`); without it
        `expand_slurm_nodelist` handles the common compressed forms.

    Raises ValueError naming the variable and its value when anything is missing, malformed or inconsistent.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    mpi_comm = None
    if environ is None and mpi_launched(env):
        mpi_comm = _mpi4py_world()  # the MPI world itself, when mpi4py is installed
    names: dict[str, str] = {}
    if _all_set(env, "RANK", "WORLD_SIZE"):
        info, names = _from_torchrun(env, default_port)
    elif _all_set(env, "SLURM_PROCID") and (_all_set(env, "SLURM_NTASKS") or _all_set(env, "SLURM_NPROCS")):
        info, names = _from_slurm(env, default_port, resolve_hostnames)
    elif mpi_launched(env):
        info, names = _from_mpi(env, default_port)
        if mpi_comm is not None:
            info = mpi4py_rendezvous(info, mpi_comm, env)
    else:
        info = DistInfo(
            rank=0,
            local_rank=0,
            world_size=1,
            local_world_size=1,
            node_rank=0,
            master_addr=_get(env, "MASTER_ADDR") or DEFAULT_MASTER_ADDR,
            master_port=_int(env, "MASTER_PORT", default_port),
            source="single",
        )
        names = {"master_port": "MASTER_PORT"}
    _validate(info, names)
    logger.info(
        "distributed env (%s): rank %d/%d, local rank %d/%d, node %d, master %s:%d",
        info.source,
        info.rank,
        info.world_size,
        info.local_rank,
        info.local_world_size,
        info.node_rank,
        info.master_addr,
        info.master_port,
    )
    return info
