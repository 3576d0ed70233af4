"""The feature queue: a ring buffer of momentum features (and optional id columns) shared by every task.

Rows are (Q, D) (the released checkpoints store (D, Q); the loader transposes). One enqueue packs the
image features, text features and id columns of the local batch into one (B, 2D + k) tensor, gathers it
with the injected `all_gather` (one collective; the identity in one process) and writes the global batch at
slots (ptr + i) mod Q. Any global batch G and queue size Q work: when G > Q only the newest Q rows are kept,
exactly as if the rows had been written one by one.

Like `MomentumPairs`, `FeatureQueue` is a plain object that registers its buffers on the host module under
the reference's names (`image_queue`, `text_queue`, `queue_ptr`, `idx_queue`) and reaches them through the
host at each call: the host's state-dict keys stay flat and `.to()` never leaves it with stale tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# An all_gather returns the gathered rows, or (rows, valid) when ranks may hold fewer rows than the padded
# size: `valid` (bool, one per row) marks the real ones, so no host-side count is needed.
AllGather = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]

NO_ID = -100  # id of queue slots that hold no real sample (never equal to a sample's id, which is >= 0)
MAX_EXACT_ID = 2**24  # ids travel through the (float) queue gather: exact below 2^24


def identity_gather(x: torch.Tensor) -> torch.Tensor:
    """The one-process `all_gather`: the local batch is the global batch."""
    return x


class FeatureQueue:
    """Image and text feature queues (Q, D) with a shared pointer, plus integer id columns (Q,), on `host`.

    size: Q (0 disables the queue: `enqueue` is a no-op); dim: D; seed: the queues start as random unit rows
    drawn from their own generator (identical on every rank; DeepSpeed broadcasts parameters, never
    buffers); id_columns: names of (Q,) long buffers filled with NO_ID that travel with the features (for
    example `idx_queue`, the image ids of retrieval); all_gather: the injected collective (settable).
    """

    def __init__(
        self,
        host: nn.Module,
        *,
        size: int,
        dim: int,
        seed: int,
        all_gather: AllGather = identity_gather,
        id_columns: Sequence[str] = (),
        names: tuple[str, str, str] = ("image_queue", "text_queue", "queue_ptr"),
    ) -> None:
        self._host = host
        self.names = names
        self.id_columns = tuple(id_columns)
        self.all_gather = all_gather
        image, text, ptr = names
        gen = torch.Generator().manual_seed(seed)
        host.register_buffer(image, F.normalize(torch.randn(size, dim, generator=gen), dim=1))
        host.register_buffer(text, F.normalize(torch.randn(size, dim, generator=gen), dim=1))
        host.register_buffer(ptr, torch.zeros(1, dtype=torch.long))
        for name in self.id_columns:
            host.register_buffer(name, torch.full((size,), NO_ID, dtype=torch.long))

    # The host's buffers, looked up at each use (they are replaced by .to() and may be by loaders).
    @property
    def image(self) -> torch.Tensor:  # (Q, D)
        return getattr(self._host, self.names[0])

    @property
    def text(self) -> torch.Tensor:  # (Q, D)
        return getattr(self._host, self.names[1])

    @property
    def ptr(self) -> torch.Tensor:  # (1,) long, on the device: the next slot to write
        return getattr(self._host, self.names[2])

    def ids(self, name: str) -> torch.Tensor:  # (Q,) long
        return getattr(self._host, name)

    @property
    def size(self) -> int:
        return self.image.shape[0]

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, *ids: torch.Tensor) -> None:
        """Gather (image feature (B, D), text feature (B, D), one (B,) tensor per id column) of the global
        batch in one collective and write them into the ring. Rows the gather marks as padding (ranks that
        dropped undecodable images) are left out, without a host sync as long as the global batch fits."""
        if len(ids) != len(self.id_columns):
            want = len(self.id_columns)
            raise ValueError(f"enqueue needs {want} id tensor(s) {self.id_columns}, got {len(ids)}")
        if self.size == 0:
            return
        dt = self.image.dtype
        cols = [image_feat.to(dt), text_feat.to(dt)] + [i.to(dt)[:, None] for i in ids]
        gathered = self.all_gather(torch.cat(cols, dim=1))  # (G, 2D + k) or ((G, 2D + k), valid)
        valid = None
        if isinstance(gathered, tuple):
            gathered, valid = gathered
        self.write(gathered, valid)

    @torch.no_grad()
    def write(self, rows: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Write packed rows (G, 2D + k) [image | text | ids] at ptr, ptr + 1, ... (mod Q); with `valid`
        (G,) bool only the valid rows, in order. The pointer advances by the number of rows written."""
        q = self.size
        g = rows.shape[0]
        if valid is not None and g <= q:
            self._write_masked(rows, valid)
            return
        if valid is not None:  # more rows than slots: select the real ones (a host sync; rare)
            rows = rows[valid]
            g = rows.shape[0]
        skip = max(0, g - q)  # entries that the newer ones would overwrite within this same write
        rows = rows[skip:]
        slots = (self.ptr + skip + torch.arange(g - skip, device=rows.device)) % q
        for buf, col in self._columns(rows):
            buf.index_copy_(0, slots, col)
        self.ptr.copy_((self.ptr + g) % q)

    def _write_masked(self, rows: torch.Tensor, valid: torch.Tensor) -> None:
        """Every row gets a distinct slot (G <= Q): the valid rows (in order) at ptr, ptr+1, ...; the padded
        ones, moved to the end, write back what their slot already holds. No data-dependent shape."""
        q = self.size
        g = rows.shape[0]
        order = torch.sort((~valid).to(torch.uint8), stable=True).indices  # valid rows first, in order
        rows = rows[order]
        n = valid.sum()
        pos = torch.arange(g, device=rows.device)
        slots = (self.ptr + pos) % q
        keep = pos < n  # (G,)
        for buf, col in self._columns(rows):
            k = keep.view(-1, *([1] * (col.dim() - 1)))
            buf.index_copy_(0, slots, torch.where(k, col, buf[slots]))
        self.ptr.copy_((self.ptr + n) % q)

    def _columns(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(buffer, its part of the packed rows in the buffer's dtype) for every queue."""
        d = self.image.shape[1]
        out = [(self.image, rows[:, :d]), (self.text, rows[:, d : 2 * d])]
        for j, name in enumerate(self.id_columns):
            buf = self.ids(name)
            out.append((buf, rows[:, 2 * d + j].round().to(buf.dtype)))
        return out
