"""Regional torch.compile: the encoders' transformer blocks compiled in place, everything else eager.

`compile_blocks(model)` compiles every ViT block (timm `Block`) and every BERT layer (`BertLayer`: text,
fusion, paired-fusion and VQA decoder layers) of a task model with `nn.Module.compile`, online and momentum
copies alike. That sets the block's compiled call and changes nothing else: no wrapper module, so state-dict
keys, parameter names and order (optimizer and DeepSpeed checkpoints record them), the EMA's name pairing
and checkpoints stay those of an eager model (no `_orig_mod.` prefix). Embeddings, heads, losses,
hard-negative sampling, masking, the queue and the EMA stay eager: they are cheap, and the sampling draws
from the RNG.

Compilation is lazy (at a block's first call) and cached per code object, so every block of one class shares
its graphs: one per (class, grad mode, layer kind, input shape), e.g. the online ViT block (grad) and the
momentum one (no grad). Shapes use PyTorch's automatic dynamic (`dynamic=None`): a graph starts static and a
recompilation after a size change (text padded to the batch's longest caption, ITM's 3B rows) makes that size
symbolic, after which new lengths reuse the graph. `RECOMPILE_LIMIT` caps the graphs per block class.

`CompileCounters` reads torch._dynamo's process-wide counters against a snapshot: graphs, graph breaks (with
their reasons), recompilations (guard failures that compiled again, with their reasons) and the compile time.

`eager()` turns every compiled block back to eager for a block of code (evaluation; `keep_attention`).
"""

from __future__ import annotations

import collections
import contextlib
import re
import time
from collections.abc import Iterator

import torch
from timm.models.vision_transformer import Block as VitBlock
from torch import nn

from .bert import BertLayer

COMPILED_BLOCKS: tuple[type[nn.Module], ...] = (VitBlock, BertLayer)

# Cache entries per block class (forward code object) before dynamo falls back to eager for new variants.
# Pre-training's BertLayer alone needs about 10 (text/fusion x grad/no-grad x B/3B rows, static then
# symbolic); dynamo's default of 8 would silently leave the last variants eager.
RECOMPILE_LIMIT = 32

_COMPILE_ID = re.compile(r"^\d+/\d+: ")


def _reason(text: str) -> str:
    """A guard failure's first line without its compile id and source comment: "1/0: self.has_cross_attention
    == False   # if self.has_cross_attention:  # .../bert.py:129" -> "self.has_cross_attention == False"."""
    return _COMPILE_ID.sub("", text.splitlines()[0]).split("  #")[0].strip()


def compile_blocks(model: nn.Module) -> dict[str, int]:
    """Compile every ViT block and BERT layer of `model` in place (`nn.Module.compile`; nothing else changes).

    Call it once the model is complete (momentum copies made: a deep copy of a compiled block would call the
    original's forward) and before an engine wraps it. A block compiled before is compiled again, onto itself.
    Returns the number of blocks compiled per class name.
    """
    done: collections.Counter[str] = collections.Counter()
    for module in model.modules():
        if isinstance(module, COMPILED_BLOCKS):
            module.compile(dynamic=None, recompile_limit=RECOMPILE_LIMIT)
            done[type(module).__name__] += 1
    if not done:
        raise ValueError(f"{type(model).__name__} has no ViT block or BERT layer to compile")
    return dict(done)


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Every compiled function runs eagerly within the block and nothing is compiled (a dynamo stance).

    Evaluation runs this way (other batch sizes and eval mode would each compile new graphs), and so does
    `keep_attention`, whose explicit attention must not be traced into, or hidden behind, a compiled graph."""
    with torch.compiler.set_stance("force_eager"):
        yield


class CompileCounters:
    """torch._dynamo's counters since this object was made (they are process-wide and only grow)."""

    def __init__(self) -> None:
        self._start = self._read()
        self._t0_us = time.time_ns() // 1000

    @staticmethod
    def _read() -> dict[str, object]:
        from torch._dynamo.utils import counters

        return {
            "graphs": counters["stats"]["unique_graphs"],
            "frames": counters["frames"]["ok"],
            "breaks": collections.Counter(counters["graph_break"]),
        }

    def summary(self) -> dict:
        """graphs: graphs compiled; graph_breaks: breaks inside compiled code (reason -> count under
        graph_break_reasons); recompiles: compilations after a guard failure of an earlier graph of the same
        code (first reasons under recompile_reasons); compile_time_s: dynamo + AOT + inductor, forward and
        backward."""
        from torch._dynamo.utils import get_compilation_metrics

        now, start = self._read(), self._start
        breaks = now["breaks"] - start["breaks"]
        # Compilation metrics are a bounded deque (64): enough for RECOMPILE_LIMIT x the two block classes.
        mine = [m for m in get_compilation_metrics() if (m.start_time_us or 0) >= self._t0_us]
        reasons = [_reason(m.recompile_reason) for m in mine if m.recompile_reason]
        seconds = sum(m.entire_frame_compile_time_s or 0.0 for m in mine)
        seconds += sum((m.backward_cumulative_compile_time_us or 0) / 1e6 for m in mine)
        return {
            "graphs": now["graphs"] - start["graphs"],
            "frames": now["frames"] - start["frames"],
            "graph_breaks": sum(breaks.values()),
            "graph_break_reasons": dict(breaks),
            "recompiles": len(reasons),
            "recompile_reasons": dict(collections.Counter(reasons).most_common(5)),
            "compile_time_s": round(seconds, 3),
        }
