"""A test-only recorder of device-to-host reads: every call of a Tensor method that hands a value to Python
(`item`, `tolist`, `cpu`, `numpy`, `bool(t)`, `float(t)`, `int(t)`, `t` as an index) while it is on.

Also recorded: `torch.tensor(data, device=...)` ("torch.tensor"), a copy from Python data that on a GPU
waits for the stream to drain (pageable memory, non_blocking=False), whatever device it names here.

On a GPU each of these blocks the host until the device has finished everything queued before it; on the
CPU nothing blocks, so the CPU tests check the code instead: a read made by our step's code is a sync as
soon as the tensor lives on a GPU. Each read is attributed to the code that made it: its caller, looking
through torch.Tensor's own Python methods (torch/_tensor.py: `f"{t:.3f}"` reads through `__format__`):
    "albef_ds"       our code
    "albef_ds.data"  our data pipeline (albef_ds/data): host tensors by construction (sampler orders,
                     decoded images), moved to the device after it; never a device read
    "deepspeed"      DeepSpeed's code
    "other"          anything else (torch's own internals, e.g. CPU AdamW's host-side step counter)
with its file:line and a short stack.

Usage:
    rec = HostReadRecorder()
    with rec:               # patches torch.Tensor
        rec.tag = "step 3"  # optional: a label stored with each read
        ...
    ours = rec.reads_by("albef_ds")
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

import albef_ds

METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _roots() -> dict[str, tuple[str, ...]]:
    pkg = Path(albef_ds.__file__).parent
    ours = {pkg, pkg.resolve()} | {(pkg / d).resolve() for d in ("kernels", "launcher") if (pkg / d).exists()}
    out = {
        "albef_ds.data": tuple(str(p / "data") + os.sep for p in {pkg, pkg.resolve()}),
        "albef_ds": tuple(sorted(str(p) + os.sep for p in ours)),
    }
    try:
        import deepspeed

        out["deepspeed"] = (str(Path(deepspeed.__file__).parent) + os.sep,)
    except ImportError:  # pragma: no cover - deepspeed is in requirements.txt
        pass
    return out


TENSOR_PY = str(Path(torch.__file__).parent / "_tensor.py")


@dataclass
class HostRead:
    method: str
    owner: str  # "albef_ds", "deepspeed" or "other"
    where: str  # file:line in the owner's code
    function: str
    tag: object
    stack: str

    def __str__(self) -> str:
        return f"{self.method} in {self.function} at {self.where} ({self.owner}, {self.tag})\n{self.stack}"


class HostReadRecorder:
    """Records host reads while entered (and while `enabled`); re-entering is an error."""

    def __init__(self) -> None:
        self.roots = _roots()
        self.reads: list[HostRead] = []
        self.tag: object = None
        self.enabled = True
        self._saved: dict[str, object] = {}
        self._busy = False

    def owner(self, frame) -> tuple[str, object]:
        """(owner, frame) of the code in `frame`, looking through torch.Tensor's Python methods."""
        while frame.f_back is not None and frame.f_code.co_filename == TENSOR_PY:
            frame = frame.f_back
        name = frame.f_code.co_filename
        for owner, prefixes in self.roots.items():  # albef_ds.data before albef_ds
            if name.startswith(prefixes):
                return owner, frame
        return "other", frame

    def _record(self, method: str) -> None:
        if not self.enabled or self._busy:
            return
        self._busy = True  # formatting the stack must not record itself
        try:
            caller = sys._getframe(2)
            owner, f = self.owner(caller)
            stack = "".join(traceback.format_stack(f, limit=6))
            where = f"{f.f_code.co_filename}:{f.f_lineno}"
            self.reads.append(HostRead(method, owner, where, f.f_code.co_name, self.tag, stack))
        finally:
            self._busy = False

    def __enter__(self) -> HostReadRecorder:
        if self._saved:
            raise RuntimeError("HostReadRecorder is already active")
        for name in METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(t, *args, _original=original, _name=name, **kwargs):
                self._record(_name)
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        factory = torch.tensor
        self._saved["torch.tensor"] = factory

        def tensor(*args, **kwargs):
            if kwargs.get("device") is not None:
                self._record("torch.tensor")
            return factory(*args, **kwargs)

        torch.tensor = tensor
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            if name == "torch.tensor":
                torch.tensor = original
            else:
                setattr(torch.Tensor, name, original)
        self._saved.clear()

    def reads_by(self, owner: str) -> list[HostRead]:
        return [r for r in self.reads if r.owner == owner]
