"""world_info_from_env: torchrun, deepspeed launcher, SLURM, MPI and single-process environments."""

from __future__ import annotations

import dataclasses
import logging
import os

import pytest

from albef_ds.train.dist_env import DistInfo, expand_slurm_nodelist, slurm_port, world_info_from_env

# What `torchrun --nnodes 2 --nproc-per-node 4` gives the second worker on the second node.
TORCHRUN = {
    "RANK": "5",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "8",
    "LOCAL_WORLD_SIZE": "4",
    "GROUP_RANK": "1",
    "GROUP_WORLD_SIZE": "2",
    "ROLE_RANK": "5",
    "MASTER_ADDR": "node-a",
    "MASTER_PORT": "29400",
    "TORCHELASTIC_RUN_ID": "none",
}

# What `deepspeed --num_nodes 2 --num_gpus 2` gives rank 3 (launcher/launch.py).
DEEPSPEED_LAUNCHER = {
    "RANK": "3",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "4",
    "LOCAL_SIZE": "2",
    "CROSS_RANK": "1",
    "CROSS_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
}

# `srun --nodes 2 --ntasks-per-node 2`, task 3 (second task on the second node).
SRUN = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu-[01-02]",
    "SLURM_NODELIST": "gpu-[01-02]",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "4",
    "SLURM_NPROCS": "4",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURMD_NODENAME": "gpu-02",
}

# `mpirun -n 2` (OpenMPI), rank 1.
OMPI = {
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_SIZE": "2",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    "OMPI_COMM_WORLD_NODE_RANK": "1",
    "OMPI_UNIVERSE_SIZE": "2",
}

# MPICH / Intel MPI hydra, 2 nodes x 2 ranks, rank 2.
PMI = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2", "PMI_FD": "7"}


def test_torchrun():
    assert world_info_from_env(TORCHRUN) == DistInfo(
        rank=5,
        local_rank=1,
        world_size=8,
        local_world_size=4,
        node_rank=1,
        master_addr="node-a",
        master_port=29400,
        source="env",
    )


def test_deepspeed_launcher():
    assert world_info_from_env(DEEPSPEED_LAUNCHER) == DistInfo(
        rank=3,
        local_rank=1,
        world_size=4,
        local_world_size=2,
        node_rank=1,
        master_addr="10.0.0.1",
        master_port=29500,
        source="env",
    )


def test_env_minimal_defaults():
    info = world_info_from_env({"RANK": "2", "WORLD_SIZE": "4"}, default_port=12345)
    # No local information: one node holds the job, local rank defaults to 0.
    assert (info.local_rank, info.local_world_size, info.node_rank) == (0, 4, 0)
    assert (info.master_addr, info.master_port) == ("127.0.0.1", 12345)


def test_env_node_rank_derived_from_local_world_size():
    env = {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}
    assert world_info_from_env(env).node_rank == 1


def test_srun_two_nodes_two_tasks():
    assert world_info_from_env(SRUN) == DistInfo(
        rank=3,
        local_rank=1,
        world_size=4,
        local_world_size=2,
        node_rank=1,
        master_addr="gpu-01",
        master_port=slurm_port(123456),
        source="slurm",
    )


def test_slurm_master_addr_and_port_from_env_win():
    info = world_info_from_env({**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "4444"})
    assert (info.master_addr, info.master_port) == ("head", 4444)


def test_slurm_port_from_job_id():
    assert slurm_port(123456) == 10000 + 123456 % 20000
    assert world_info_from_env({**SRUN, "SLURM_JOB_ID": "20001"}).master_port == 10001
    # Different concurrent jobs rendezvous on different ports; all stay out of the ephemeral range.
    ports = {slurm_port(j) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(10000 <= p < 32768 for p in ports)
    no_job = {k: v for k, v in SRUN.items() if k != "SLURM_JOB_ID"}
    assert world_info_from_env(no_job, default_port=29501).master_port == 29501


def test_slurm_uses_resolve_hostnames():
    calls = []

    def resolve(nodelist: str) -> list[str]:
        calls.append(nodelist)
        return ["head-node", "other"]

    info = world_info_from_env({**SRUN, "SLURM_JOB_NODELIST": "n[1-2]-g[1-2]"}, resolve_hostnames=resolve)
    assert info.master_addr == "head-node" and calls == ["n[1-2]-g[1-2]"]


def test_slurm_nodelist_fallback_and_nprocs():
    env = {k: v for k, v in SRUN.items() if k not in ("SLURM_JOB_NODELIST", "SLURM_NTASKS")}
    env["SLURM_NODELIST"] = "b7,b9"
    info = world_info_from_env(env)
    assert (info.master_addr, info.world_size) == ("b7", 4)


@pytest.mark.parametrize(
    "tasks, ntasks, procid, node_id, local_rank, expected",
    [
        ("2(x3)", 6, 5, 2, 1, 2),  # 3 nodes x 2 tasks, last task
        ("3,1", 4, 2, 0, 2, 3),  # heterogeneous: 3 tasks on node 0 ...
        ("3,1", 4, 3, 1, 0, 1),  # ... and 1 on node 1
        ("2(x2),1", 5, 4, 2, 0, 1),
    ],
)
def test_slurm_tasks_per_node_forms(tasks, ntasks, procid, node_id, local_rank, expected):
    env = {
        "SLURM_PROCID": str(procid),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_LOCALID": str(local_rank),
        "SLURM_NODEID": str(node_id),
        "SLURM_TASKS_PER_NODE": tasks,
        "SLURM_JOB_NODELIST": "n[1-3]",
    }
    info = world_info_from_env(env)
    assert (info.rank, info.local_world_size, info.node_rank) == (procid, expected, node_id)


def test_slurm_ntasks_per_node_preferred_over_tasks_per_node():
    env = {**SRUN, "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "garbage-not-read"}
    assert world_info_from_env(env).local_world_size == 2


def test_slurm_tasks_per_node_missing_entry():
    env = {**SRUN, "SLURM_NODEID": "3", "SLURM_NTASKS_PER_NODE": "", "SLURM_TASKS_PER_NODE": "2(x2)"}
    with pytest.raises(ValueError, match=r"SLURM_TASKS_PER_NODE='2\(x2\)'.*SLURM_NODEID=3"):
        world_info_from_env(env)


def test_slurm_multinode_without_nodelist_fails():
    env = {k: v for k, v in SRUN.items() if "NODELIST" not in k}
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        world_info_from_env(env)


def test_torchrun_beats_slurm():
    # srun launching torchrun: each worker sees both sets; torchrun's describe the worker.
    info = world_info_from_env({**SRUN, **TORCHRUN})
    assert info.source == "env" and (info.rank, info.world_size, info.master_addr) == (5, 8, "node-a")


def test_slurm_beats_mpi():
    assert world_info_from_env({**OMPI, **SRUN}).source == "slurm"


def test_openmpi():
    assert world_info_from_env(OMPI) == DistInfo(
        rank=1,
        local_rank=1,
        world_size=2,
        local_world_size=2,
        node_rank=0,
        master_addr="127.0.0.1",
        master_port=29500,
        source="mpi",
    )


def test_pmi():
    info = world_info_from_env({**PMI, "MASTER_ADDR": "host0", "MASTER_PORT": "23456"})
    assert info == DistInfo(
        rank=2,
        local_rank=0,
        world_size=4,
        local_world_size=2,
        node_rank=1,
        master_addr="host0",
        master_port=23456,
        source="mpi",
    )


def test_single_process_default():
    assert world_info_from_env({"PATH": "/usr/bin", "HOME": "/root"}) == DistInfo(
        rank=0,
        local_rank=0,
        world_size=1,
        local_world_size=1,
        node_rank=0,
        master_addr="127.0.0.1",
        master_port=29500,
        source="single",
    )
    # RANK without WORLD_SIZE is not a launcher environment.
    assert world_info_from_env({"RANK": "0"}).source == "single"


@pytest.mark.parametrize(
    "s, expected",
    [
        ("n1", ["n1"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("gpu-[01-03,07]", ["gpu-01", "gpu-02", "gpu-03", "gpu-07"]),
        ("a[1-2],b5", ["a1", "a2", "b5"]),
        ("rack1-node[001-002]", ["rack1-node001", "rack1-node002"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
        ("x[3],y[09-10],z", ["x3", "y09", "y10", "z"]),
    ],
)
def test_expand_slurm_nodelist(s, expected):
    assert expand_slurm_nodelist(s) == expected


@pytest.mark.parametrize("s", ["n[1-2]-g[1-2]", "n[1-2", "n[a-b]", "n[3-1]", "", "a,,b"])
def test_expand_slurm_nodelist_rejects(s):
    with pytest.raises(ValueError, match=f"node list {s!r}".replace("[", r"\[")):
        expand_slurm_nodelist(s)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4"),
        ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "four"}, "WORLD_SIZE='four' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
        ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "99999"}, "MASTER_PORT=99999"),
        ({**SRUN, "SLURM_PROCID": "4"}, "SLURM_PROCID=4"),
        ({**SRUN, "SLURM_LOCALID": "2"}, "SLURM_LOCALID=2"),
        ({**SRUN, "SLURM_NTASKS_PER_NODE": "2(x"}, "SLURM_NTASKS_PER_NODE='2\\(x'"),
        ({**SRUN, "SLURM_JOB_ID": "12a"}, "SLURM_JOB_ID='12a'"),
        ({**OMPI, "OMPI_COMM_WORLD_RANK": "-1"}, "OMPI_COMM_WORLD_RANK=-1"),
        ({**PMI, "MPI_LOCALRANKID": "1.0"}, "MPI_LOCALRANKID='1.0'"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        world_info_from_env(env)


@pytest.mark.parametrize("env", [TORCHRUN, DEEPSPEED_LAUNCHER, SRUN, OMPI, PMI, {}])
def test_export_round_trip(env):
    info = world_info_from_env(env)
    exported: dict[str, str] = {}
    info.export(exported)
    assert world_info_from_env(exported) == dataclasses.replace(info, source="env")


def test_export_round_trip_heterogeneous_slurm():
    env = {**SRUN, "SLURM_NTASKS_PER_NODE": "", "SLURM_TASKS_PER_NODE": "3,1", "SLURM_LOCALID": "0"}
    info = world_info_from_env(env)
    exported: dict[str, str] = {}
    info.export(exported)
    assert world_info_from_env(exported) == dataclasses.replace(info, source="env")


def test_export_defaults_to_os_environ(monkeypatch):
    # A private copy of the environment: export() writes variables that must not leak into later tests
    # (monkeypatch.delenv of an unset variable records nothing to undo).
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "stale")
    monkeypatch.setenv("MASTER_PORT", "1")
    info = world_info_from_env(SRUN)
    info.export()
    assert os.environ["RANK"] == "3" and os.environ["MASTER_ADDR"] == "gpu-01"
    assert world_info_from_env() == dataclasses.replace(info, source="env")


def test_logs_one_info_line(caplog):
    with caplog.at_level(logging.INFO, logger="albef_ds.train.dist_env"):
        world_info_from_env(SRUN)
    records = [r for r in caplog.records if r.name == "albef_ds.train.dist_env"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    msg = records[0].getMessage()
    assert "slurm" in msg and "rank 3/4" in msg and "local rank 1/2" in msg and "node 1" in msg
    assert f"gpu-01:{slurm_port(123456)}" in msg
