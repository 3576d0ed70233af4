"""Fused kernels against their pure-torch references: the ITC loss over [batch; 65,536 queue] and the EMA.

Usage:

    python benchmarks/bench_kernels.py [--out benchmarks/results/kernels_<device>.json] [--ema-repeats 3]

Parts (each prints the fused/foreach figure beside the reference figure of the same run):

* ITC, GPU only (skipped with a message without CUDA): B in {32, 64, 128, 256}, Q = 65,536, D = 256,
  all inputs fp32 or all bf16; forward+backward time (CUDA events, median of 20 after 5 warm-ups) and peak
  memory above the inputs (torch.cuda.max_memory_allocated), fused vs reference.
* ITC memory model, any device: bytes each implementation keeps for backward (measured with
  saved_tensors_hooks on the reference, run on this device; the fused op's are the shapes it saves) plus
  the fused op's workspace (its split plan on a 132-SM H200), at the same shapes.
* EMA over ALBEF-base's momentum parameter list (configs/pretrain_4m.yaml, shapes from a meta-device model),
  fp32 momentum from bf16 and from fp32 online weights: the per-tensor reference loop vs torch's _foreach
  path (CPU and GPU) and the Triton multi-tensor kernel (GPU); time ratio, and on GPU the achieved GB/s
  against the card's nominal bandwidth. Best of --ema-repeats interleaved rounds (medians in the JSON too).

Writes the JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from albef_ds.kernels import (  # noqa: E402
    ema_update_foreach,
    ema_update_fused,
    ema_update_reference,
    itc_loss_fused,
    itc_loss_reference,
)
from albef_ds.kernels.itc import BLOCK_N_GPU, blocks, split_plan, triton_available  # noqa: E402

BATCHES = (32, 64, 128, 256)
QUEUE, DIM = 65536, 256
H200_SMS = 132
# Nominal HBM bandwidth (bytes/s) of cards we may meet; others report GB/s without the fraction.
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------- ITC
def itc_inputs(b, dtype, device, requires_grad=True):
    g = torch.Generator(device="cpu").manual_seed(0)

    def unit(n):
        return F.normalize(torch.randn(n, DIM, generator=g), dim=-1).to(device=device, dtype=dtype)

    fi, ft, fmi, fmt = unit(b), unit(b), unit(b), unit(b)
    bank_i, bank_t = torch.cat([fmi, unit(QUEUE)]), torch.cat([fmt, unit(QUEUE)])
    fi.requires_grad_(requires_grad)
    ft.requires_grad_(requires_grad)
    temp = torch.tensor([0.07], device=device, requires_grad=requires_grad)
    return fi, ft, fmi, fmt, bank_i, bank_t, temp


def saved_bytes(fn, args) -> int:
    """Bytes of the tensors autograd keeps for backward, not counting storages of the inputs."""
    inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        st = t.untyped_storage()
        if st.data_ptr() not in inputs and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, 0.4)
    return total


def fused_memory_model(b: int) -> dict:
    """What the fused op keeps and allocates at (B, Q, D) on a 132-SM GPU (both directions)."""
    block_m, _ = blocks(b, DIM)
    row_blocks = -(-b // block_m)
    n_tiles = -(-(b + QUEUE) // BLOCK_N_GPU)
    _, s_fwd = split_plan(H200_SMS, row_blocks, n_tiles, None, 4)
    _, s_bwd = split_plan(H200_SMS, row_blocks, n_tiles, None, 1)
    saved = 2 * (3 * b * 4)  # per direction: lse of s and of s_m, s_ii (fp32)
    fwd_ws = 5 * s_fwd * b * 4  # one direction at a time
    bwd_ws = s_bwd * b * (DIM + 1) * 4
    return {"saved_bytes": saved, "fwd_workspace_bytes": fwd_ws, "bwd_workspace_bytes": bwd_ws}


def itc_memory_model(device) -> list[dict]:
    rows = []
    for b in BATCHES:
        args = itc_inputs(b, torch.float32, device)
        ref_saved = saved_bytes(itc_loss_reference, args)
        fm = fused_memory_model(b)
        n = b + QUEUE
        rows.append(
            {
                "B": b,
                "N": n,
                "bxn_fp32_bytes": b * n * 4,
                "reference_saved_bytes": ref_saved,
                "reference_saved_bxn_matrices": ref_saved / (b * n * 4),
                **{f"fused_{k}": v for k, v in fm.items()},
            }
        )
        log(
            f"[itc memory] B={b:3d} N={n}: reference keeps {ref_saved / 2**20:7.1f} MiB for backward "
            f"({ref_saved / (b * n * 4):.1f} B x N fp32 matrices); fused keeps "
            f"{fm['saved_bytes'] / 1024:.1f} KiB, workspace fwd {fm['fwd_workspace_bytes'] / 1024:.0f} KiB / "
            f"bwd {fm['bwd_workspace_bytes'] / 2**20:.2f} MiB"
        )
        del args
    return rows


def cuda_time(fn, warmup=5, iters=20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def itc_gpu() -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in full fp32, as the fused kernel
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for b in BATCHES:
            args = itc_inputs(b, dtype, "cuda")
            row = {"B": b, "Q": QUEUE, "D": DIM, "dtype": str(dtype).removeprefix("torch.")}
            for name, fn in (("reference", itc_loss_reference), ("fused", itc_loss_fused)):

                def step(fn=fn, args=args):
                    for t in (args[0], args[1], args[6]):
                        t.grad = None
                    fn(*args, 0.4).backward()

                step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                row[f"{name}_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
                row[f"{name}_fwd_bwd_s"] = cuda_time(step)
            row["time_ratio_ref_over_fused"] = row["reference_fwd_bwd_s"] / row["fused_fwd_bwd_s"]
            row["memory_ratio_ref_over_fused"] = row["reference_peak_extra_bytes"] / max(
                1, row["fused_peak_extra_bytes"]
            )
            log(
                f"[itc gpu] {row['dtype']:8s} B={b:3d}: reference {row['reference_fwd_bwd_s'] * 1e3:7.3f} ms "
                f"{row['reference_peak_extra_bytes'] / 2**20:8.1f} MiB | fused "
                f"{row['fused_fwd_bwd_s'] * 1e3:7.3f} ms {row['fused_peak_extra_bytes'] / 2**20:6.2f} MiB | "
                f"x{row['time_ratio_ref_over_fused']:.2f} time, "
                f"x{row['memory_ratio_ref_over_fused']:.0f} memory"
            )
            rows.append(row)
            del args
    return rows


# ------------------------------------------------------------------------------------------------- EMA
MODEL_CONFIG = "configs/pretrain_4m.yaml"  # whose momentum tensors the EMA benchmark updates


def albef_base_momentum_shapes() -> list[tuple[int, ...]]:
    from albef_ds.config import load_config
    from albef_ds.model import ALBEFPretrain

    cfg = load_config(ROOT / MODEL_CONFIG, ["model.vit_init=", "model.bert_init="])
    with torch.device("meta"):
        model = ALBEFPretrain(cfg.model, special_tokens={"pad": 0, "cls": 101, "mask": 103})
    moms, _ = model.momentum_pairs()
    return [tuple(t.shape) for t in moms]


def interleaved_times(fns: dict, device: str, repeats: int) -> dict:
    """Best wall time of each function over `repeats` rounds, the functions alternating within a round (so
    that a burst of load from other processes hits all of them; the best of n is the least disturbed)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in fns.values():  # warm-up (and Triton compile)
        fn()
    sync()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def ema_bench(device: str, repeats: int) -> list[dict]:
    shapes = albef_base_momentum_shapes()
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    log(f"[ema] {MODEL_CONFIG}: {len(shapes)} momentum tensors, {numel / 1e6:.1f}M elements, on {device}")
    bandwidth = next(
        (v for k, v in BANDWIDTH.items() if device == "cuda" and k in torch.cuda.get_device_name()), None
    )
    rows = []
    for online_dtype in (torch.bfloat16, torch.float32):
        moms = [torch.randn(s, device=device) for s in shapes]
        onlines = [torch.randn(s, device=device).to(online_dtype) for s in shapes]
        osize = torch.finfo(online_dtype).bits // 8
        impls = [("reference_loop", ema_update_reference), ("foreach", ema_update_foreach)]
        if device == "cuda" and triton_available():
            impls.append(("fused_triton", ema_update_fused))
        row = {"device": device, "online_dtype": str(online_dtype).removeprefix("torch."), "elements": numel}
        timed = interleaved_times(
            {name: (lambda fn=fn, a=moms, b=onlines: fn(a, b, 0.995)) for name, fn in impls}, device, repeats
        )
        for name, (t, t_median) in timed.items():
            row[f"{name}_s"] = t
            row[f"{name}_median_s"] = t_median
            # Minimum traffic: read m_p and p, write m_p (one pass); foreach and the loop make two passes.
            passes_bytes = numel * (4 + 4 + osize) + (numel * 8 if name != "fused_triton" else 0)
            row[f"{name}_GBps"] = passes_bytes / t / 1e9
            if bandwidth:
                row[f"{name}_fraction_of_bandwidth"] = passes_bytes / t / bandwidth
        row["loop_over_foreach"] = row["reference_loop_s"] / row["foreach_s"]
        if "fused_triton_s" in row:
            row["loop_over_fused"] = row["reference_loop_s"] / row["fused_triton_s"]
        log(
            f"[ema] online {row['online_dtype']:8s}: loop {row['reference_loop_s'] * 1e3:8.1f} ms, foreach "
            f"{row['foreach_s'] * 1e3:8.1f} ms (x{row['loop_over_foreach']:.2f})"
            + (
                f", fused {row['fused_triton_s'] * 1e3:.2f} ms ({row['fused_triton_GBps']:.0f} GB/s)"
                if "fused_triton_s" in row
                else ""
            )
        )
        rows.append(row)
        del moms, onlines
    return rows


# ------------------------------------------------------------------------------------------------- plot
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if result["itc_gpu"] else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    mem = result["itc_memory_model"]
    ax = axes[0]
    bs = [r["B"] for r in mem]
    ax.plot(bs, [r["reference_saved_bytes"] / 2**20 for r in mem], "o-", label="reference: kept for backward")
    ax.plot(
        bs,
        [(r["fused_saved_bytes"] + r["fused_bwd_workspace_bytes"]) / 2**20 for r in mem],
        "s-",
        label="fused: kept + backward workspace",
    )
    ax.set(xlabel="B", ylabel="MiB", title=f"ITC memory, Q={QUEUE}, D={DIM}, fp32", yscale="log")
    ax.legend(fontsize=8)
    ema = result["ema"]
    ax = axes[1]
    labels = [r["online_dtype"] for r in ema]
    x = range(len(ema))
    keys = [k for k in ("reference_loop_s", "foreach_s", "fused_triton_s") if k in ema[0]]
    w = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ax.bar([j + i * w for j in x], [r[k] * 1e3 for r in ema], w, label=k.removesuffix("_s"))
    ax.set_xticks([j + w * (len(keys) - 1) / 2 for j in x], [f"online {lab}" for lab in labels])
    ax.set(
        ylabel="ms per EMA step",
        title=f"EMA over ALBEF-base ({ema[0]['elements'] / 1e6:.0f}M), {ema[0]['device']}",
    )
    ax.legend(fontsize=8)
    if result["itc_gpu"]:
        ax = axes[2]
        for dt in ("bfloat16", "float32"):
            rows = [r for r in result["itc_gpu"] if r["dtype"] == dt]
            ax.plot(
                [r["B"] for r in rows],
                [r["reference_fwd_bwd_s"] * 1e3 for r in rows],
                "o--",
                label=f"ref {dt}",
            )
            ax.plot(
                [r["B"] for r in rows], [r["fused_fwd_bwd_s"] * 1e3 for r in rows], "s-", label=f"fused {dt}"
            )
        ax.set(xlabel="B", ylabel="ms (fwd+bwd)", title="ITC time")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/kernels_<dev>.json)"
    )
    ap.add_argument("--ema-repeats", type=int, default=7)
    ap.add_argument("--skip-ema", action="store_true")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="the same code at tiny sizes (B in {4, 8}, Q = 256, the debug model's EMA, 1 repeat): checks "
        "the script in seconds on a CPU before GPU minutes are spent on it",
    )
    args = ap.parse_args(argv)
    global BATCHES, QUEUE, MODEL_CONFIG
    if args.dry_run:
        BATCHES, QUEUE, MODEL_CONFIG, args.ema_repeats = (4, 8), 256, "configs/debug.yaml", 1
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    out = args.out or ROOT / "benchmarks" / "results" / f"kernels_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": torch.cuda.get_device_name()
        if cuda
        else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dry_run": args.dry_run,
        "queue": QUEUE,
        "ema_model": MODEL_CONFIG,
        "itc_memory_model": itc_memory_model(device),
        "itc_gpu": [],
        "ema": [],
    }
    if cuda and triton_available():
        result["itc_gpu"] = itc_gpu()
    else:
        log("[itc gpu] skipped: no CUDA device (or no Triton) here; the memory model above is the CPU part")
    if not args.skip_ema:
        result["ema"] = ema_bench(device, args.ema_repeats)
    out.write_text(json.dumps(result, indent=2))
    if result["ema"]:
        plot(result, out.with_suffix(".png"))
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
