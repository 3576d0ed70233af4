"""Momentum (EMA) copies of online modules, shared by every task that distils from a momentum model.

Each online module `<name>` gets a twin `<name>_m` on the same host module, with every parameter turned into
a *buffer*. So the copies are never in `parameters()` (never in an optimizer, never given gradients), never
cast by an engine that casts parameters to bf16 (their EMA stays fp32: with m = 0.995 a bf16 EMA loses most
updates to rounding), and still in `state_dict()` under the reference's names (`visual_encoder_m.*`, ...).

`MomentumPairs` is a plain object, not an nn.Module: it registers the copies on its host and reaches every
tensor through the host by name at each call, so the host's state-dict keys and parameter names stay flat
(checkpoints and DeepSpeed's parameter order depend on them) and `.to()` or `load_state_dict` on the host
never leave it holding stale tensors.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .. import kernels

# (momentum tensors, online tensors, m) -> None, in place: m_p <- m * m_p + (1 - m) * p
EmaUpdate = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], float], None]


def params_to_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of `module` into a persistent buffer of the same name (tied ones stay tied)."""
    seen: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            buf = seen.setdefault(id(p), p.detach().clone())
            del sub._parameters[name]
            sub.register_buffer(name, buf, persistent=True)
    return module


def momentum_autocast(inputs: torch.Tensor, weight_dtype: torch.dtype):
    """The context for a momentum forward. The momentum copies keep fp32 weights (a bf16 EMA would lose
    most updates) while a bf16/fp16 engine feeds low-precision inputs: their forward then runs under
    autocast in the input's dtype (low-precision matmuls on fp32 weights), as fast as the online pass."""
    if inputs.dtype in (torch.bfloat16, torch.float16) and weight_dtype == torch.float32:
        return torch.autocast(device_type=inputs.device.type, dtype=inputs.dtype)
    return contextlib.nullcontext()


class MomentumPairs:
    """EMA pairs: online module `host.<name>` -> buffer copy `host.<name><suffix>` for each name.

    host: the task module that already holds the online modules; names: their attribute names, in the
    order the copies are registered (that order is the order of `pairs()`, which the fused EMA and the
    trainer's checks follow); momentum: m of the EMA.
    """

    def __init__(self, host: nn.Module, names: Sequence[str], momentum: float, *, suffix: str = "_m") -> None:
        if not names:
            raise ValueError("MomentumPairs needs at least one online module")
        self._host = host
        self.names = tuple((name, name + suffix) for name in names)
        self.momentum = momentum
        for online, mom in self.names:
            host.add_module(mom, params_to_buffers(copy.deepcopy(getattr(host, online))))

    def pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(momentum buffers, online parameters), paired by name, each tensor once."""
        moms, onlines = [], []
        for online, mom in self.names:
            params = dict(getattr(self._host, online).named_parameters())
            bufs = dict(getattr(self._host, mom).named_buffers())
            if params.keys() != bufs.keys():
                raise RuntimeError(f"{mom} does not mirror {online}: {sorted(params.keys() ^ bufs.keys())}")
            for name, p in params.items():
                moms.append(bufs[name])
                onlines.append(p)
        return moms, onlines

    @torch.no_grad()
    def copy_params(self) -> None:
        """Momentum := online (at start-up, after loading pretrained weights)."""
        moms, onlines = self.pairs()
        for pm, p in zip(moms, onlines):
            pm.copy_(p.detach().to(pm.dtype))

    @torch.no_grad()
    def update(self, ema: EmaUpdate | None = None) -> None:
        """One EMA step over every momentum tensor: `ema` (default `kernels.ema_update`, one fused
        multi-tensor update where the kernels allow it); call once per optimizer step, before the forward."""
        moms, onlines = self.pairs()
        (ema or kernels.ema_update)(moms, onlines, self.momentum)


class MomentumModel:
    """The momentum protocol of a task module that holds its `MomentumPairs` as `self.momentum` (mixed into
    the nn.Module): the trainer calls `momentum_update()` once per optimizer step, start-up calls
    `copy_params()`, the rank reports read `momentum_pairs()`. `ema_update_fn` picks the EMA kernel."""

    momentum: MomentumPairs

    def momentum_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(momentum buffers, online parameters), paired by name, each tensor once."""
        return self.momentum.pairs()

    def copy_params(self) -> None:
        """Momentum := online (at start-up, after loading pretrained weights)."""
        self.momentum.copy_params()

    def ema_update_fn(self) -> EmaUpdate | None:
        """The EMA implementation (None: the fused default)."""
        return None

    def momentum_update(self) -> None:
        """One EMA step over every momentum tensor; call once per optimizer step, before the forward."""
        self.momentum.update(self.ema_update_fn())

    def momentum_dtype(self) -> torch.dtype:
        """The momentum copies' dtype (fp32 under every engine: they are buffers)."""
        return next(getattr(self, self.momentum.names[0][1]).buffers()).dtype
