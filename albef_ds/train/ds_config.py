"""The DeepSpeed JSON, filled from the experiment config: one source of truth for batch, LR and clipping.

`"auto"` values are filled in; explicit values must agree with the experiment config. Every contradiction is
a ConfigError naming the JSON file and field and the experiment-config field, raised before any model is
built (`global_batch` needs only the world size).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError

AUTO = "auto"


def global_batch(cfg: Config, world_size: int) -> int:
    """micro x accumulation x world, checked against train.global_batch_size when that is set."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    t = cfg.train
    product = t.batch_size * t.grad_accum * world_size
    if t.global_batch_size and t.global_batch_size != product:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) != train.batch_size ({t.batch_size}) x "
            f"train.grad_accum ({t.grad_accum}) x world size ({world_size}) = {product}"
        )
    return product


def scaled_lr(cfg: Config, world_size: int) -> float:
    """Peak LR after the linear batch-scaling rule (optim.lr_ref_batch; 0 = no scaling)."""
    o = cfg.optim
    if o.lr_ref_batch == 0:
        return o.lr
    return o.lr * global_batch(cfg, world_size) / o.lr_ref_batch


def load_ds_json(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {p} (train.ds_config) does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {p} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {p} must hold a JSON object")
    return data


def _fill(ds: dict, key: str, value: Any, ours: str, src: str) -> None:
    have = ds.get(key, AUTO)
    if have == AUTO:
        ds[key] = value
    elif have != value:
        raise ConfigError(
            f'{src}: {key} = {have!r} contradicts {ours} = {value!r} (use "auto" or make them agree)'
        )


def _enabled(ds: dict, section: str, src: str) -> bool:
    sec = ds.get(section, {})
    if not isinstance(sec, dict):
        raise ConfigError(f"{src}: '{section}' must be an object")
    val = sec.get("enabled", False)
    if val == AUTO:
        return False
    if not isinstance(val, bool):
        raise ConfigError(f'{src}: {section}.enabled must be true, false or "auto", got {val!r}')
    return val


def resolve_precision(cfg: Config, ds: dict, src: str) -> str:
    """bf16 | fp16 | fp32, from train.precision and the JSON's bf16/fp16 sections (which must agree)."""
    bf16, fp16 = _enabled(ds, "bf16", src), _enabled(ds, "fp16", src)
    if bf16 and fp16:
        raise ConfigError(f"{src}: bf16.enabled and fp16.enabled are both true")
    from_file = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    want = cfg.train.precision
    if want == "auto":
        return from_file
    explicit = any(ds.get(s, {}).get("enabled", AUTO) != AUTO for s in ("bf16", "fp16"))
    if explicit and want != from_file:
        raise ConfigError(f"train.precision = {want!r} contradicts {src}, which enables {from_file}")
    return want


def build_ds_config(cfg: Config, *, world_size: int, path: str | Path | None = None) -> dict:
    """The DeepSpeed config dict for `deepspeed.initialize`, every "auto" resolved."""
    src = str(path if path is not None else cfg.train.ds_config)
    ds = copy.deepcopy(load_ds_json(src))
    if "amp" in ds:
        # DeepSpeed 0.19 refuses it too, but only inside deepspeed.initialize, after the model is built, and
        # without naming the file.
        raise ConfigError(
            f"{src}: 'amp' (NVIDIA apex AMP) was removed from DeepSpeed, and apex.amp from apex; delete the "
            "section and use the 'bf16' or 'fp16' section (enabled: \"auto\") with train.precision=bf16|fp16"
        )
    t = cfg.train
    total = global_batch(cfg, world_size)
    _fill(ds, "train_micro_batch_size_per_gpu", t.batch_size, "train.batch_size", src)
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, "train.grad_accum", src)
    _fill(ds, "train_batch_size", total, "train.batch_size x train.grad_accum x world size", src)
    # DeepSpeed >= 0.19 clips at 1.0 unless told otherwise; the reference does not clip, so always set it.
    _fill(ds, "gradient_clipping", float(cfg.optim.grad_clip), "optim.grad_clip", src)
    # DeepSpeed's throughput timer (on by default) calls torch.cuda.synchronize() at every forward and every
    # step() from the third step on (deepspeed/utils/timer.py:238 and :256 in 0.19.8): a full device sync
    # per micro-batch, for a samples/s line it prints every steps_per_print steps. The monitor measures
    # throughput itself, so it is off unless the JSON asks for it.
    timers = ds.setdefault("timers", {})
    if not isinstance(timers, dict) or not isinstance(timers.setdefault("throughput", {}), dict):
        raise ConfigError(f"{src}: 'timers' and 'timers.throughput' must be objects")
    timers["throughput"].setdefault("enabled", False)
    precision = resolve_precision(cfg, ds, src)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) != 2:
        raise ConfigError(f"{src}: zero_optimization.stage must be 2 (ZeRO-2), got {zero.get('stage', 0)!r}")
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(
            f"{src}: remove 'optimizer'/'scheduler': the trainer passes AdamW with ALBEF's weight-decay "
            "groups "
            "and sets the LR per step from the optim.* section"
        )
    leftover = [k for k, v in _walk(ds) if v == AUTO]
    if leftover:
        raise ConfigError(f"{src}: no experiment-config field fills {', '.join(leftover)}")
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _walk(v, key + ".")
        else:
            yield key, v
