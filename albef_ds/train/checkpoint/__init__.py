"""The checkpoint package: atomic files, the `latest` pointer, RNG states (`files`), consolidation and export
of DeepSpeed folders (`export`), and (being built) one `load_weights` for every weight source and one
manager for resumable checkpoints."""

from .files import (
    CLIENT_FILE,
    atomic_torch_save,
    atomic_write_bytes,
    publish,
    read_client,
    read_latest,
    rng_state,
    set_rng_state,
    step_tag,
    write_client,
)

__all__ = [
    "CLIENT_FILE",
    "atomic_torch_save",
    "atomic_write_bytes",
    "publish",
    "read_client",
    "read_latest",
    "rng_state",
    "set_rng_state",
    "step_tag",
    "write_client",
]

# One `load_weights` for every weight source, the start-up initialisation, and `albef-ds export`.
from .export import export_weights  # noqa: E402
from .weights import init_weights, load_weights, resolve_source  # noqa: E402

__all__ += ["export_weights", "init_weights", "load_weights", "resolve_source"]
