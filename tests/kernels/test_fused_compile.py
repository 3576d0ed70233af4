"""The Triton kernels compiled for a GPU that is not here: Triton lowers them to PTX and ptxas assembles a
cubin for sm_90 (H100/H200) on the CPU machine. This catches what the interpreter cannot (type rules of the
compiler, tl.dot shapes, int-to-pointer casts, register spills, shared memory over the limit) in every CI
run; running them on a GPU stays with the `gpu` tests.

Runs in a fresh process without TRITON_INTERPRET (Triton's mode is fixed at its first import, and the
interpreted tests need the other one). Compiled kernels land in Triton's cache, so reruns are fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
H100_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90

SCRIPT = r"""
import json, re
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from albef_ds.kernels import _ema_triton as E, _itc_triton as K
from albef_ds.kernels.itc import blocks, default_block_n

target = GPUTarget("cuda", 90, 32)
out = {}

def comp(name, fn, sig, consts, num_warps):
    k = triton.compile(ASTSource(fn=JITFunction(fn), signature=sig, constexprs=consts), target=target,
                       options={"num_warps": num_warps})
    ptx = k.asm["ptx"]
    out[name] = {"shared": k.metadata.shared, "local": ptx.count(".local"),
                 "v4_loads": ptx.count("ld.global.v4"), "fma": ptx.count("fma.rn.f32"),
                 "cubin_bytes": len(k.asm["cubin"])}

ints = {n: "i32" for n in ("B", "N", "D", "stride_f", "stride_fm", "stride_bank", "tiles_per_split")}
for b, d in ((64, 256), (8, 100)):
    bm, bd = blocks(b, d)
    consts = {"BLOCK_M": bm, "BLOCK_N": default_block_n(bd, False), "BLOCK_D": bd}
    nw = 8 if bm * bd >= 32 * 256 else 4
    for feat, bank in (("*bf16", "*fp32"), ("*fp32", "*fp32")):
        common = {"f_ptr": feat, "fm_ptr": feat, "bank_ptr": bank, "temp_ptr": "*fp32"}
        comp(f"itc_fwd B{b} D{d} {feat}/{bank}", K.itc_fwd_kernel,
             {**common, "part_ptr": "*fp32", **ints, "n_splits": "i32",
              "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}, consts, nw)
        comp(f"itc_bwd B{b} D{d} {feat}/{bank}", K.itc_bwd_kernel,
             {**common, "lse_ptr": "*fp32", "gpart_ptr": "*fp32", "rpart_ptr": "*fp32", "alpha": "fp32",
              **ints, "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}, consts, nw)
sig = {"mom_addr_ptr": "*i64", "onl_addr_ptr": "*i64", "numel_ptr": "*i64", "chunk_tensor_ptr": "*i32",
       "chunk_start_ptr": "*i64", "m": "fp32", "one_minus_m": "fp32", "ONLINE_DTYPE": "constexpr",
       "CHUNK": "constexpr", "BLOCK": "constexpr", "ALIGNED": "constexpr"}
for dt in ("bfloat16", "float32"):
    comp(f"ema {dt}", E.ema_multi_tensor_kernel, sig,
         {"ONLINE_DTYPE": getattr(tl, dt), "CHUNK": 65536, "BLOCK": 1024, "ALIGNED": True}, 4)
print("RESULT " + json.dumps(out))
"""


def test_kernels_compile_for_sm90_without_spills():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line.removeprefix("RESULT "))
    assert len(res) == 10
    for name, k in res.items():
        assert k["cubin_bytes"] > 0, name
        assert k["local"] == 0, f"{name}: register spills to local memory"
        assert k["shared"] <= H100_SHARED_LIMIT, f"{name}: {k['shared']} bytes of shared memory"
        assert k["fma"] > 0, name  # fp32 FMA: ieee tl.dot (no tf32) in the ITC, a true fma in the EMA
    for dt in ("bfloat16", "float32"):
        assert res[f"ema {dt}"]["v4_loads"] > 0  # 16-byte loads on aligned tensors
