"""`albef-ds export`: consolidated fp32 weights in one safetensors file, from any checkpoint we write.

Sources:
- a DeepSpeed ZeRO-1/2 checkpoint folder (`checkpoints/step_XXXXXXXX/`): the fp32 *master* weights are
  reassembled from every rank's optimizer partition (so a bf16 run exports its fp32 weights, not upcast
  bf16 copies), buffers (momentum encoders, queues, pointer) come from the module state, and tied weights
  are restored. The result equals what DeepSpeed's own `zero_to_fp32.py` reconstructs from the same folder
  (tested), but every file is read with `weights_only=True` (DeepSpeed's three checkpoint classes are
  allow-listed by name instead of unpickling arbitrary objects).
- a torch-engine checkpoint folder (`state.pt`), a consolidated `checkpoint.pt`, a checkpoints folder (its
  `latest`), or a run folder (its `checkpoints/latest`, else its `checkpoint.pt`).

Sources are resolved and read by `weights.resolve_source` / `weights.read_source`, the same rule and reader
`load_weights` uses. Only our own checkpoints are exported (a released ALBEF / DeiT / BERT file is loaded
with `load_weights`, which converts it). The safetensors file carries `albef_ds_format`, the step and the
run's config in its metadata, so `load_weights` reads it as one of ours; DeepSpeed-free tools read it as a
plain state dict.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ...model.weights import OUR_FORMAT
from .files import atomic_write_bytes
from .weights import consolidate_deepspeed, read_source, resolve_source

__all__ = ["consolidate_deepspeed", "export_weights", "resolve_source"]

log = logging.getLogger(__name__)


def export_weights(source: str | Path, output: str | Path) -> dict:
    """Write the consolidated fp32 state dict of `source` to `output` (.safetensors), atomically.
    Returns a summary (source, tensors, parameters, step)."""
    from safetensors.torch import save

    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"export output {output} must end in .safetensors")
    st = read_source(source)
    if st.layout != "ours":
        raise ValueError(
            f"{st.path} is not an albef-ds checkpoint (it holds the {st.layout!r} layout); nothing to "
            "export: load it with load_weights, which converts it"
        )
    meta: dict[str, str] = {"albef_ds_format": str(OUR_FORMAT), "source": str(st.path)}
    if st.client.get("config") is not None:
        meta["config"] = json.dumps(st.client["config"])
    if "step" in st.client:
        meta["step"] = str(int(st.client["step"]))
    # safetensors wants contiguous tensors that share no storage (tied weights are written twice).
    tensors = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().clone()
        for k, v in st.tensors.items()
    }
    data = save(tensors, metadata=meta)
    atomic_write_bytes(output, data)
    n = sum(v.numel() for v in tensors.values())
    log.info("exported %d tensors (%.2fM values) from %s to %s", len(tensors), n / 1e6, st.path, output)
    return {
        "source": str(st.path),
        "output": str(output),
        "tensors": len(tensors),
        "values": n,
        "step": meta.get("step"),
    }
