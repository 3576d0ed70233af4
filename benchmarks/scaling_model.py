"""Scaling model: per-step time and weak-scaling efficiency of ALBEF pre-training under DeepSpeed ZeRO-2,
from 8 to 512 GPUs on A100 and H100 nodes.

Inputs: (a) a single-device step time (measured: `--measured` JSON from `albef-ds bench throughput`, or
`--step-time-s`; otherwise the stated default scenarios below) and (b) the step's communication, derived from
what DeepSpeed 0.19.8 ZeRO-2 actually issues for this model (read from deepspeed/runtime/zero/stage_1_and_2.py
and deepspeed/runtime/utils.py, and checked against bytes measured on 2 CPU ranks by
`benchmarks/comm_bytes.py`):

* gradients: every micro-batch's backward fills "IPG" buckets of at most `reduce_bucket_size` elements in
  gradient-hook order; each full bucket (and the last, partly filled one at the end of backward) is reduced
  with ONE `all_reduce` of the whole bucket in the communication dtype (bf16 under bf16, fp32 under fp32),
  after which each rank keeps its own partition. `reduce_scatter: true` does not select a reduce-scatter
  collective: with the default `use_multi_rank_bucket_allreduce=true` it groups every destination rank's
  slices into one all-reduce (with it false: one `reduce` per destination rank);
* parameters: after the optimizer step, one `all_gather_into_tensor` per optimizer parameter group (2 here:
  decay / no decay) of the flat, padded bf16 (fp32) group. `allgather_bucket_size` is NOT used when
  torch has all_gather_into_tensor (torch >= 1.13), which is always the case here;
* gradient norm: one 4-byte all-reduce per parameter group (gradient clipping); overflow check: one 1-byte
  all-reduce (bf16 / fp16 only);
* ours: the queue all-gather (each rank sends batch x accumulation rows of 2 x embed_dim + 1 fp32 values;
  only when queue_size > 0) and the 4-byte stop-vote all-reduce.

Run:  python benchmarks/scaling_model.py [--measured throughput.json | --step-time-s 0.2 --batch-per-gpu 64]
      -> benchmarks/results/scaling_model.json and .png
Every assumption is a field of `assumptions` in the JSON (and listed in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_COUNTS = (8, 16, 32, 64, 128, 256, 512)
DEFAULT_CONFIG = ROOT / "configs/pretrain_4m.yaml"
ISSUE_GFLOP_PER_PAIR = 300.0  # issue #7's figure, used when albef_ds.bench.flops is unavailable


# ----------------------------------------------------------------------------------------------------------
# machines


@dataclass(frozen=True)
class Machine:
    """One node type. Bandwidths as marketed; the efficiencies turn them into what NCCL achieves."""

    name: str
    gpus_per_node: int
    nvlink_GBps: float  # per GPU, both directions together (A100: 600, H100: 900)
    nic_Gbps: float  # per InfiniBand NIC, one direction (HDR 200, NDR 400)
    nics_per_node: int
    hbm_GBps: float  # per GPU, for the optimizer step estimate
    peak_bf16_tflops: float  # dense
    nvlink_efficiency: float = 0.8  # nccl-tests all_reduce busbw / per-direction NVLink bandwidth
    ib_efficiency: float = 0.8  # achieved / line rate for large messages, incl. fabric congestion
    hbm_efficiency: float = 0.7
    launch_latency_s: float = 10e-6  # per collective: kernel launch, NCCL proxy, first hop
    nvlink_hop_s: float = 0.7e-6  # per ring step inside a node
    ib_hop_s: float = 3e-6  # per step that crosses the network (NIC + switches)

    @property
    def nvlink_busbw(self) -> float:
        """Bytes/s per GPU per direction over NVLink that a ring achieves."""
        return self.nvlink_GBps / 2 * 1e9 * self.nvlink_efficiency

    @property
    def network_busbw(self) -> float:
        """Ring bus bandwidth across nodes: with one NIC per GPU (rail-optimised), NCCL runs one ring per NIC
        and each ring crosses each node boundary once, so a node's NICs together carry what one GPU sends:
        busbw = nics x NIC bandwidth."""
        return self.nics_per_node * self.nic_Gbps / 8 * 1e9 * self.ib_efficiency


MACHINES = {
    "a100": Machine(
        name="A100-SXM4 40GB, 8/node, NVLink 600 GB/s, 8 x HDR 200 Gb/s",
        gpus_per_node=8,
        nvlink_GBps=600.0,
        nic_Gbps=200.0,
        nics_per_node=8,
        hbm_GBps=1555.0,
        peak_bf16_tflops=312.0,
    ),
    "h100": Machine(
        name="H100-SXM5 80GB, 8/node, NVLink 900 GB/s, 8 x NDR 400 Gb/s",
        gpus_per_node=8,
        nvlink_GBps=900.0,
        nic_Gbps=400.0,
        nics_per_node=8,
        hbm_GBps=3350.0,
        peak_bf16_tflops=989.0,
        ib_hop_s=2.5e-6,
    ),
}


# ----------------------------------------------------------------------------------------------------------
# what DeepSpeed ZeRO-2 sends


@dataclass(frozen=True)
class ModelInfo:
    """The trainable parameters as DeepSpeed sees them."""

    numels_hook_order: tuple[int, ...]  # trainable tensors in (approximate) gradient-hook order
    group_numels: tuple[int, ...]  # per optimizer parameter group (decay, no decay)
    embed_dim: int
    queue_size: int
    flops_per_pair: float  # model FLOPs of one training pair (forward + backward + momentum forward)
    backward_fraction: float  # share of the step's FLOPs in the backward pass
    flops_source: str
    # (optimizer group, offset in the group's flat buffer) of each tensor, in the same order; () = unknown
    flat_offsets: tuple[tuple[int, int], ...] = ()

    @property
    def trainable(self) -> int:
        return sum(self.numels_hook_order)


def model_info(config: str | Path = DEFAULT_CONFIG, overrides: list[str] | tuple[str, ...] = ()) -> ModelInfo:
    """Instantiate the model of `config` on the meta device (no memory, no weights) and read its
    trainable parameters, optimizer groups and FLOPs."""
    import torch

    from albef_ds.config import load_config
    from albef_ds.model import ALBEFPretrain
    from albef_ds.train.schedule import param_groups

    cfg = load_config(config, ["model.vit_init=", "model.bert_init=", "model.albef_init=", *overrides])
    with torch.device("meta"):
        model = ALBEFPretrain(cfg.model, special_tokens={"pad": 0, "cls": 2, "mask": 4})
    params = [p for p in model.parameters() if p.requires_grad]
    pgroups = param_groups(model, cfg.optim.weight_decay)
    groups = tuple(sum(p.numel() for p in g["params"]) for g in pgroups)
    where: dict[int, tuple[int, int]] = {}  # DeepSpeed flattens each group in its parameter order
    for gi, g in enumerate(pgroups):
        off = 0
        for p in g["params"]:
            where[id(p)] = (gi, off)
            off += p.numel()
    batch = cfg.train.batch_size
    try:
        from albef_ds.bench.flops import step_flops

        f = step_flops(cfg.model, batch, cfg.data.max_tokens)
        total = f.total
        parts = f.as_dict()
        online = total - parts.get("momentum", 0.0)  # forward + backward of the online model = 3 x forward
        backward_fraction = (2.0 / 3.0) * online / total
        source = "albef_ds.bench.flops.step_flops"
    except Exception as e:  # the FLOP counter is optional for this model
        total = ISSUE_GFLOP_PER_PAIR * 1e9 * batch
        backward_fraction = 0.55
        source = f"issue #7's 300 GFLOP per pair, backward 55% (flops counter unavailable: {e})"
    return ModelInfo(
        # backward produces gradients roughly in reverse registration order (an approximation)
        numels_hook_order=tuple(p.numel() for p in reversed(params)),
        flat_offsets=tuple(where[id(p)] for p in reversed(params)),
        group_numels=groups,
        embed_dim=cfg.model.embed_dim,
        queue_size=cfg.model.queue_size,
        flops_per_pair=total / batch,
        backward_fraction=backward_fraction,
        flops_source=source,
    )


@dataclass(frozen=True)
class ZeroSettings:
    """The parts of a DeepSpeed JSON that shape ZeRO-2's communication."""

    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    grad_bytes: int = 2  # communication dtype of the gradient reduction
    param_bytes: int = 2  # dtype of the parameters that are all-gathered
    overflow_check: bool = True  # the 1-byte all-reduce before the step (bf16/fp16)
    multi_rank_bucket_allreduce: bool = True  # DeepSpeed's default

    @classmethod
    def from_ds_config(cls, ds: dict) -> ZeroSettings:
        z = ds.get("zero_optimization", {})
        if z.get("stage") != 2:
            raise ValueError(
                f"the scaling model covers ZeRO stage 2; the DeepSpeed config has {z.get('stage')!r}"
            )
        bf16 = bool(ds.get("bf16", {}).get("enabled", False))
        fp16 = bool(ds.get("fp16", {}).get("enabled", False))
        width = 2 if (bf16 or fp16) else 4
        comm = ds.get("communication_data_type")
        comm_bytes = {"fp32": 4, "fp16": 2, "bf16": 2, None: width}.get(comm, width)
        return cls(
            reduce_bucket_size=int(z.get("reduce_bucket_size", 500_000_000)),
            allgather_bucket_size=int(z.get("allgather_bucket_size", 500_000_000)),
            overlap_comm=bool(z.get("overlap_comm", False)),
            grad_bytes=comm_bytes,
            param_bytes=width,
            overflow_check=bf16 or fp16,
            multi_rank_bucket_allreduce=bool(z.get("use_multi_rank_bucket_allreduce", True)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ZeroSettings:
        p = Path(path)
        try:
            return cls.from_ds_config(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: not a readable DeepSpeed JSON ({e})") from e


def _bucket_members(numels_hook_order: tuple[int, ...] | list[int], bucket_size: int) -> list[list[int]]:
    """Indices of the tensors in each IPG bucket (see grad_buckets)."""
    out: list[list[int]] = []
    cur: list[int] = []
    filled = 0
    for i, n in enumerate(numels_hook_order):
        if n == 0:
            continue
        if filled + n > bucket_size and cur:
            out.append(cur)
            cur, filled = [], 0
        cur.append(i)
        filled += n
    if cur:
        out.append(cur)
    return out


def grad_buckets(numels_hook_order: tuple[int, ...] | list[int], bucket_size: int) -> list[int]:
    """Elements per IPG bucket, as DeepSpeed fills it in gradient-hook order: a gradient that would overflow
    the bucket first flushes what is there; a gradient larger than the bucket goes out alone."""
    return [sum(numels_hook_order[i] for i in b) for b in _bucket_members(numels_hook_order, bucket_size)]


def grad_reductions(info: ModelInfo, bucket_size: int, world: int) -> list[list[int]]:
    """Elements of each all_reduce, grouped by bucket. A bucket within reduce_bucket_size is one all_reduce.
    A bucket holding a gradient larger than that is cut, as `allreduce_and_scatter` does, into its slices
    per owning rank (partition of the flat group), sent whenever the running sum exceeds the bucket size."""
    out = []
    for members in _bucket_members(info.numels_hook_order, bucket_size):
        total = sum(info.numels_hook_order[i] for i in members)
        if total <= bucket_size or not info.flat_offsets:
            out.append([total])
            continue
        slices = []
        for i in members:
            g, off = info.flat_offsets[i]
            n = info.numels_hook_order[i]
            padded = math.ceil(info.group_numels[g] / (2 * world)) * 2 * world
            part = padded // world
            pos = off
            while pos < off + n:
                end = min(off + n, (pos // part + 1) * part)
                slices.append(end - pos)
                pos = end
        calls, acc = [], 0
        for x in slices:
            acc += x
            if acc > bucket_size:
                calls.append(acc)
                acc = 0
        if acc:
            calls.append(acc)
        out.append(calls)
    return out


@dataclass(frozen=True)
class Collective:
    """`count` calls of `op` of `bytes` payload each (payload: the full logical buffer, as in comm_bytes)."""

    purpose: str
    op: str
    bytes: int
    count: int = 1
    bucket: int = -1  # gradient reductions: the IPG bucket it belongs to (per micro-batch)


def step_collectives(
    info: ModelInfo, zs: ZeroSettings, *, world: int, batch: int, accum: int = 1
) -> list[Collective]:
    """Every collective of one optimizer step on one rank (identical on every rank)."""
    if world < 2:
        return []
    out: list[Collective] = []
    for _ in range(accum):  # ZeRO-2 reduces the gradients of every micro-batch
        for b, calls in enumerate(grad_reductions(info, zs.reduce_bucket_size, world)):
            if zs.multi_rank_bucket_allreduce:
                for n in calls:
                    out.append(Collective("grad_reduce", "all_reduce", n * zs.grad_bytes, bucket=b))
            else:  # one reduce per destination rank of its slice of the bucket
                per = math.ceil(sum(calls) / world) * zs.grad_bytes
                out.append(Collective("grad_reduce", "reduce", per, count=world, bucket=b))
    for _ in info.group_numels:  # grad-norm partial sums, fp32
        out.append(Collective("grad_norm", "all_reduce", 4))
    if zs.overflow_check:
        out.append(Collective("overflow_check", "all_reduce", 1))
    align = 2 * world  # DeepSpeed pads each flat group to a multiple of nccl_start_alignment_factor x world
    for g in info.group_numels:
        out.append(
            Collective(
                "param_allgather", "all_gather_into_tensor", math.ceil(g / align) * align * zs.param_bytes
            )
        )
    if info.queue_size > 0:  # our enqueue: rows padded to batch x accum, plus a validity column, fp32
        rows = batch * accum
        out.append(Collective("queue_allgather", "all_gather", world * rows * (2 * info.embed_dim + 1) * 4))
    out.append(Collective("stop_vote", "all_reduce", 4))
    return out


def bytes_by_purpose(colls: list[Collective]) -> dict:
    """{purpose: {calls, bytes}} and the total, in comm_bytes' per-step format."""
    table: dict = {}
    for c in colls:
        t = table.setdefault(c.purpose, {"calls": 0, "bytes": 0})
        t["calls"] += c.count
        t["bytes"] += c.count * c.bytes
    return {
        "by_purpose": dict(sorted(table.items())),
        "total_bytes": sum(c.count * c.bytes for c in colls),
        "calls": sum(c.count for c in colls),
    }


def compare_with_measured(measured: dict) -> dict:
    """Predicted vs measured bytes per optimizer step for a `benchmarks/comm_bytes.py` result (same config,
    overrides, DeepSpeed JSON, ranks, batch and accumulation)."""
    config = Path(measured["config"])
    if not config.is_absolute() and not config.is_file():
        config = ROOT / config  # comm_bytes.py stores paths relative to the repository root
    info = model_info(config, measured.get("overrides", []))
    zs = ZeroSettings.from_ds_config(measured["ds_config"])
    world = measured["world_size"]
    pred = bytes_by_purpose(
        step_collectives(
            info, zs, world=world, batch=measured["batch_size_per_rank"], accum=measured.get("grad_accum", 1)
        )
    )
    meas = measured["per_step"]
    rows = {}
    for purpose in sorted(set(pred["by_purpose"]) | set(meas["by_purpose"])):
        p = pred["by_purpose"].get(purpose, {"calls": 0, "bytes": 0})
        m = meas["by_purpose"].get(purpose, {"calls": 0, "bytes": 0})
        rows[purpose] = {
            "predicted_bytes": p["bytes"],
            "measured_bytes": m["bytes"],
            "predicted_calls": p["calls"],
            "measured_calls": m["calls"],
            "ratio": p["bytes"] / m["bytes"] if m["bytes"] else None,
        }
    return {
        "config": measured["config"],
        "overrides": measured.get("overrides", []),
        "world_size": world,
        "trainable_params_model": info.trainable,
        "trainable_params_run": measured.get("trainable_params"),
        "zero": asdict(zs),
        "by_purpose": rows,
        "predicted_total_bytes": pred["total_bytes"],
        "measured_total_bytes": meas["total_bytes"],
        "ratio_total": pred["total_bytes"] / meas["total_bytes"] if meas["total_bytes"] else None,
    }


# ----------------------------------------------------------------------------------------------------------
# time of a collective


def wire_factor(op: str, n: int) -> float:
    """Bytes each rank sends, per payload byte, on a ring of n ranks."""
    if n <= 1:
        return 0.0
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    return (n - 1) / n  # all_gather, reduce_scatter, reduce, broadcast (pipelined)


def collective_time(op: str, nbytes: float, n: int, m: Machine) -> float:
    """Seconds for one collective on n GPUs: bandwidth term on the slowest link class plus latency, the
    cheaper of NCCL's ring and (all-reduce only) tree algorithms.

    Inside a node (n <= gpus_per_node) the ring runs on NVLink; across nodes the bus bandwidth is the lower of
    NVLink and the node's NICs together (rail-optimised rings). Ring latency: 2(n-1) steps for all-reduce,
    n-1 for the others, the steps that cross nodes costing ib_hop_s; tree all-reduce: 2 log2(nodes) network
    steps plus the in-node ring, at the same bus bandwidth.
    """
    if n <= 1 or nbytes <= 0 and op != "all_reduce":
        return 0.0
    g = m.gpus_per_node
    nodes = max(1, math.ceil(n / g))
    in_node = min(n, g)
    busbw = m.nvlink_busbw if nodes == 1 else min(m.nvlink_busbw, m.network_busbw)
    bw_time = wire_factor(op, n) * nbytes / busbw
    steps = 2 if op == "all_reduce" else 1
    ring_lat = m.launch_latency_s + steps * ((in_node - 1) * m.nvlink_hop_s + (nodes - 1) * m.ib_hop_s)
    ring = bw_time + ring_lat
    if op != "all_reduce" or nodes == 1:
        return ring
    tree_lat = m.launch_latency_s + 2 * (
        (in_node - 1) * m.nvlink_hop_s + math.ceil(math.log2(nodes)) * m.ib_hop_s
    )
    return min(ring, bw_time + tree_lat)


# ----------------------------------------------------------------------------------------------------------
# step time


@dataclass(frozen=True)
class Scenario:
    """The single-device side of the model."""

    name: str
    step_time_s: float  # one optimizer step on one device, no communication (includes the optimizer)
    batch_per_gpu: int
    precision: str  # bf16 | fp32 (sets the dtypes of the gradient reduction and parameter all-gather)
    source: str
    backward_fraction: float | None = None  # share of the step in backward (default: from FLOPs)
    optimizer_s: float | None = None  # the optimizer step inside step_time_s (default: HBM estimate)


@dataclass(frozen=True)
class Assumptions:
    overlap_efficiency: float = 0.8  # share of the time-line overlap with backward that is really hidden
    optimizer_bytes_per_param: float = 40.0  # AdamW on fp32 master + bf16 copy + grad-norm read, HBM bytes
    grad_production: str = "uniform in parameters, reverse registration order"
    notes: tuple[str, ...] = field(
        default=(
            "weak scaling: the per-GPU micro-batch is fixed; efficiency(n) = T_ideal(n) / T(n), "
            "T_ideal(n) = the step with free communication = T(1 GPU) - optimizer + optimizer / n",
            "ZeRO-2 shards the AdamW step: its time falls as 1/n (so per-GPU speed can exceed one GPU's)",
            "gradient all-reduce per micro-batch; with overlap_comm a bucket starts once its last gradient "
            "exists and runs beside the rest of backward (one communication stream, buckets in order)",
            "the parameter all-gather, the queue all-gather, grad-norm / overflow / stop-vote all-reduces "
            "are not overlapped",
            "no data-loader stalls, no stragglers, no host syncs beyond the above",
        )
    )


def step_time(
    info: ModelInfo,
    zs: ZeroSettings,
    sc: Scenario,
    m: Machine,
    *,
    n: int,
    accum: int = 1,
    a: Assumptions = Assumptions(),
) -> dict:
    """Predicted seconds of one optimizer step on n GPUs, broken down."""
    t1 = sc.step_time_s
    opt = sc.optimizer_s
    if opt is None:
        opt = info.trainable * a.optimizer_bytes_per_param / (m.hbm_GBps * 1e9 * m.hbm_efficiency)
    opt = min(opt, 0.5 * t1)
    bwd_frac = sc.backward_fraction if sc.backward_fraction is not None else info.backward_fraction
    compute = (t1 - opt) + opt / n
    colls = step_collectives(info, zs, world=n, batch=sc.batch_per_gpu, accum=accum)
    grad = [c for c in colls if c.purpose == "grad_reduce"]
    rest = [c for c in colls if c.purpose != "grad_reduce"]
    # Gradient reduction per micro-batch, on a time-line of that micro-batch's backward.
    t_bwd = bwd_frac * (t1 - opt) / accum
    per_micro = len(grad) // accum
    grad_total = grad_exposed = 0.0
    for k in range(accum):
        times = [0.0] * len(grad_buckets(info.numels_hook_order, zs.reduce_bucket_size))
        for c in grad[k * per_micro : (k + 1) * per_micro]:
            times[c.bucket] += c.count * collective_time(c.op, c.bytes, n, m)
        total = sum(times)
        grad_total += total
        if not zs.overlap_comm:
            grad_exposed += total
            continue
        # Bucket k can start once its last gradient exists (gradients assumed to appear uniformly in
        # parameter count over the backward pass); the last one is flushed at the end of backward.
        end, numel_done = 0.0, 0
        sizes = grad_buckets(info.numels_hook_order, zs.reduce_bucket_size)
        for size, t in zip(sizes, times):
            numel_done += size
            ready = t_bwd * min(1.0, numel_done / info.trainable)
            end = max(ready, end) + t
        exposed_line = max(0.0, end - t_bwd)
        hidden_line = total - exposed_line
        grad_exposed += exposed_line + (1.0 - a.overlap_efficiency) * hidden_line
    other = {}
    for c in rest:
        other[c.purpose] = other.get(c.purpose, 0.0) + c.count * collective_time(c.op, c.bytes, n, m)
    total_t = compute + grad_exposed + sum(other.values())
    return {
        "gpus": n,
        "nodes": math.ceil(n / m.gpus_per_node),
        "step_time_s": total_t,
        "compute_s": compute,
        "optimizer_s": opt / n,
        "grad_reduce_s": grad_total,
        "grad_reduce_exposed_s": grad_exposed,
        **{f"{k}_s": v for k, v in sorted(other.items())},
        "comm_exposed_s": total_t - compute,
        "comm_bytes_per_gpu": bytes_by_purpose(colls)["total_bytes"],
        "wire_bytes_per_gpu": sum(c.count * c.bytes * wire_factor(c.op, n) for c in colls),
        # weak-scaling efficiency: the step with free communication over the predicted step (<= 1)
        "efficiency": compute / total_t,
        # per-GPU throughput over one GPU's (no communication, unsharded optimizer); can exceed 1 because
        # ZeRO-2 divides the optimizer step by n
        "per_gpu_speed_vs_1gpu": t1 / total_t,
        "samples_per_s": n * sc.batch_per_gpu * accum / total_t,
        "samples_per_s_per_gpu": sc.batch_per_gpu * accum / total_t,
    }


def default_scenarios(info: ModelInfo, machine_key: str, batch: int) -> list[Scenario]:
    """Stated single-device assumptions when nothing was measured."""
    m = MACHINES[machine_key]
    flops = info.flops_per_pair * batch
    out = []
    for mfu in (0.5, 0.3):
        out.append(
            Scenario(
                name=f"bf16_mfu{int(mfu * 100)}",
                step_time_s=flops / (mfu * m.peak_bf16_tflops * 1e12),
                batch_per_gpu=batch,
                precision="bf16",
                source=f"assumed: {int(mfu * 100)}% MFU of {m.peak_bf16_tflops:.0f} TFLOP/s bf16 dense "
                f"({info.flops_per_pair / 1e9:.0f} GFLOP per pair, {info.flops_source})"
                + (" -- issue #7's target" if mfu == 0.5 else ""),
            )
        )
    if machine_key == "a100":
        out.append(
            Scenario(
                name="fp32_reference_anchor",
                step_time_s=batch / 70.0,
                batch_per_gpu=batch,
                precision="fp32",
                source="the reference recipe on 8 x A100-40GB: ALBEF-4M (5.1M pairs x 30 epochs) in 2-3 "
                "days, about 50-90 pairs/s per GPU; 70 taken, fp32 gradients and parameters on the wire",
            )
        )
    return out


def scenario_from_measured(path: str | Path, *, recipe: str = "ours") -> Scenario:
    """A Scenario from the JSON of `albef-ds bench throughput` (its `recipes` list; `recipe` picks one), or
    from a JSON with top-level step_time_s and batch_per_device."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot read the measured step ({e})") from e
    rec = data
    if "recipes" in data:
        found = [r for r in data["recipes"] if r.get("recipe") == recipe]
        if not found:
            have = [r.get("recipe") for r in data["recipes"]]
            raise ValueError(f"{p}: no recipe {recipe!r} in recipes (has {have})")
        rec = found[0]
    for key in ("step_time_s", "batch_per_device"):
        if key not in rec:
            raise ValueError(f"{p}: field {key!r} missing (expected the output of albef-ds bench throughput)")
    bd = rec.get("breakdown_s", {})
    step = float(rec["step_time_s"])
    bwd = bd.get("backward")
    return Scenario(
        name=f"measured_{recipe}",
        step_time_s=step,
        batch_per_gpu=int(rec["batch_per_device"]),
        precision=rec.get("precision", "bf16") if rec.get("precision") in ("bf16", "fp32") else "bf16",
        source=f"measured: {p} ({data.get('device_name', '?')}, {data.get('date', '?')})",
        backward_fraction=(bwd / step) if bwd else None,
        optimizer_s=bd.get("optimizer"),
    )


def with_precision(zs: ZeroSettings, precision: str) -> ZeroSettings:
    width = 4 if precision == "fp32" else 2
    return replace(zs, grad_bytes=width, param_bytes=width, overflow_check=precision != "fp32")


def predict(
    info: ModelInfo,
    zs: ZeroSettings,
    scenarios: dict[str, list[Scenario]],
    *,
    gpu_counts: tuple[int, ...] = GPU_COUNTS,
    accum: int = 1,
    a: Assumptions = Assumptions(),
) -> dict:
    """{machine: {scenario: {source, step_time_1gpu_s, rows: [step_time(...) per GPU count]}}}"""
    out: dict = {}
    for key, scs in scenarios.items():
        m = MACHINES[key]
        out[key] = {}
        for sc in scs:
            z = with_precision(zs, sc.precision)
            rows = [step_time(info, z, sc, m, n=n, accum=accum, a=a) for n in gpu_counts]
            base8 = rows[0]["samples_per_s_per_gpu"] if gpu_counts[0] == 8 else None
            for r in rows:
                r["efficiency_vs_8"] = r["samples_per_s_per_gpu"] / base8 if base8 else None
            out[key][sc.name] = {"scenario": asdict(sc), "rows": rows}
    return out


def bucket_sweep(
    info: ModelInfo,
    zs: ZeroSettings,
    scenarios: dict[str, list[Scenario]],
    *,
    sizes: tuple[int, ...] = (12_500_000, 25_000_000, 50_000_000, 100_000_000, 200_000_000, 500_000_000),
    gpus: tuple[int, ...] = (64, 512),
    accum: int = 1,
    a: Assumptions = Assumptions(),
) -> dict:
    """What-if: efficiency of each machine's first scenario for other reduce_bucket_size values (a bucket as
    large as the model leaves nothing to overlap with backward)."""
    out: dict = {}
    for key, scs in scenarios.items():
        sc = scs[0]
        z0 = with_precision(zs, sc.precision)
        out[key] = {"scenario": sc.name, "rows": []}
        for size in sizes:
            z = replace(z0, reduce_bucket_size=size)
            row = {"reduce_bucket_size": size, "buckets": len(grad_buckets(info.numels_hook_order, size))}
            for n in gpus:
                r = step_time(info, z, sc, MACHINES[key], n=n, accum=accum, a=a)
                row[f"efficiency_{n}"] = r["efficiency"]
                row[f"grad_reduce_exposed_s_{n}"] = r["grad_reduce_exposed_s"]
            out[key]["rows"].append(row)
    return out


def plot(pred: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pred), figsize=(5.5 * len(pred), 4.2), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (key, by_sc) in zip(axes, pred.items()):
        for name, v in by_sc.items():
            xs = [r["gpus"] for r in v["rows"]]
            ys = [100 * r["efficiency"] for r in v["rows"]]
            ax.plot(
                xs,
                ys,
                marker="o",
                label=f"{name} ({1000 * v['scenario']['step_time_s']:.0f} ms/step on 1 GPU)",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(GPU_COUNTS), [str(x) for x in GPU_COUNTS])
        ax.set_title(MACHINES[key].name, fontsize=9)
        ax.set_xlabel("GPUs (8 per node)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("efficiency: step with free comm. / predicted step (%)")
    fig.suptitle("ALBEF pre-training, DeepSpeed ZeRO-2: predicted weak-scaling efficiency", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _rel(path: str | Path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="experiment YAML (model, batch); default 4M"
    )
    ap.add_argument("--ds-config", default="", help="DeepSpeed JSON (default: the config's train.ds_config)")
    ap.add_argument("--measured", default="", help="albef-ds bench throughput JSON (single device)")
    ap.add_argument("--recipe", default="ours", help="which recipe of --measured (default ours)")
    ap.add_argument("--step-time-s", type=float, default=0.0, help="measured single-device step time")
    ap.add_argument("--batch-per-gpu", type=int, default=0, help="micro-batch per GPU (default: config)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="with --step-time-s")
    ap.add_argument(
        "--machine", default="a100", choices=sorted(MACHINES), help="with --measured/--step-time-s"
    )
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--reduce-bucket-size", type=int, default=0, help="override the JSON's value")
    ap.add_argument("--overlap-efficiency", type=float, default=Assumptions.overlap_efficiency)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/scaling_model.json"))
    ap.add_argument(
        "--check",
        default="",
        help="instead: compare the predicted bytes per step with a comm_bytes.py result JSON (writes --out)",
    )
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args(argv)
    if args.check:
        try:
            measured = json.loads(Path(args.check).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--check {args.check}: cannot read a comm_bytes.py result ({e})") from e
        cmp = compare_with_measured(measured)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"measured_file": args.check, **cmp}, indent=1))
        for purpose, r in cmp["by_purpose"].items():
            print(
                f"{purpose:16s} predicted {r['predicted_bytes']:>13,d} B ({r['predicted_calls']} calls)  "
                f"measured {r['measured_bytes']:>13,d} B ({r['measured_calls']} calls)"
            )
        print(f"total: predicted / measured = {cmp['ratio_total']:.4f}; wrote {args.out}")
        return 0

    from albef_ds.config import load_config

    cfg = load_config(args.config, ["model.vit_init=", "model.bert_init=", *args.overrides])
    info = model_info(args.config, args.overrides)
    ds_path = Path(args.ds_config or cfg.train.ds_config)
    if not ds_path.is_absolute() and not ds_path.is_file():
        ds_path = ROOT / ds_path
    zs = ZeroSettings.from_file(ds_path)
    if args.reduce_bucket_size:
        zs = replace(zs, reduce_bucket_size=args.reduce_bucket_size)
    batch = args.batch_per_gpu or cfg.train.batch_size
    if args.measured:
        scenarios = {args.machine: [scenario_from_measured(args.measured, recipe=args.recipe)]}
    elif args.step_time_s > 0:
        sc = Scenario("measured", args.step_time_s, batch, args.precision, "given on the command line")
        scenarios = {args.machine: [sc]}
    else:
        scenarios = {k: default_scenarios(info, k, batch) for k in MACHINES}
    a = Assumptions(overlap_efficiency=args.overlap_efficiency)
    pred = predict(info, zs, scenarios, accum=args.grad_accum, a=a)
    sweep = bucket_sweep(info, zs, scenarios, accum=args.grad_accum, a=a)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": _rel(args.config),
        "overrides": args.overrides,
        "ds_config": _rel(ds_path),
        "zero": asdict(zs),
        "trainable_params": info.trainable,
        "param_groups": list(info.group_numels),
        "grad_buckets_elements": grad_buckets(info.numels_hook_order, zs.reduce_bucket_size),
        "flops_per_pair": info.flops_per_pair,
        "backward_fraction": info.backward_fraction,
        "flops_source": info.flops_source,
        "grad_accum": args.grad_accum,
        "machines": {k: asdict(MACHINES[k]) for k in scenarios},
        "assumptions": asdict(a),
        "predictions": pred,
        "bucket_sweep": sweep,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(pred, out.with_suffix(".png"))
    for key, by_sc in pred.items():
        for name, v in by_sc.items():
            effs = "  ".join(f"{r['gpus']}:{100 * r['efficiency']:.0f}%" for r in v["rows"])
            print(f"{key} {name} ({1000 * v['scenario']['step_time_s']:.0f} ms/step): {effs}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
