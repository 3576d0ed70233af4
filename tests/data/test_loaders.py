"""loaders.py: the torch reference training loader (batch format, reproducibility, resume, rank split)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from albef_ds.config import DataConfig, SynthConfig
from albef_ds.data import TextTokenizer, build_pretrain_loader


def _loader(cfg: SynthConfig, workers: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
    out = Path(cfg.out_dir)
    data = DataConfig(train_file=[str(out / "train.json")], tokenizer=str(out / "vocab.txt"), num_workers=3)
    tok = TextTokenizer.from_path(data.tokenizer, max_tokens=data.max_tokens)
    return build_pretrain_loader(
        data,
        tok,
        image_size=32,
        batch_size=8,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=workers,
    )


def _first_batches(loader, sampler, epoch: int, n: int = 2) -> list[dict]:
    sampler.set_epoch(epoch)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("image", "input_ids", "attention_mask", "index"))


def test_loader_batch_format(small_synth: SynthConfig) -> None:
    loader, sampler = _loader(small_synth, 0)
    # Everything a spawned worker receives must pickle.
    for obj in (loader.dataset, loader.collate_fn):
        pickle.loads(pickle.dumps(obj))
    assert sampler.batches_per_epoch == 8 and len(loader) == 8
    (batch,) = _first_batches(loader, sampler, 0, 1)
    assert set(batch) == {"image", "input_ids", "attention_mask", "index", "num_skipped"}
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == mask.shape
    assert ids.shape[0] == 8 and 2 <= ids.shape[1] <= 25
    assert (ids[:, 0] == 2).all() and not (ids == 3).any()  # albef mode: [CLS] first, no [SEP]
    assert batch["index"].shape == (8,) and batch["num_skipped"] == 0


def test_loader_reproducible_across_workers_and_resume(small_synth: SynthConfig) -> None:
    l0, s0 = _loader(small_synth, 0)
    torch.manual_seed(1)  # the caller's global RNG state must not matter
    ref = _first_batches(l0, s0, 0)
    torch.manual_seed(999)
    again = _first_batches(*_loader(small_synth, 0), 0)
    assert all(_same(a, b) for a, b in zip(ref, again))
    l2, s2 = _loader(small_synth, 2)
    par = _first_batches(l2, s2, 0)
    assert all(_same(a, b) for a, b in zip(ref, par))  # 0 and 2 workers give identical batches
    # A new epoch reshuffles and re-augments; a mid-epoch resume reproduces the skipped-to batch exactly.
    e1 = _first_batches(l0, s0, 1)
    assert not torch.equal(e1[0]["index"], ref[0]["index"])
    s0.set_epoch(0)
    s0.set_start(1)
    resumed = _first_batches(l0, s0, 0, 1)
    assert _same(resumed[0], ref[1])
    # Other seed, other order.
    assert not _same(_first_batches(*_loader(small_synth, 0, seed=1), 0, 1)[0], ref[0])


def test_loader_ranks_disjoint(small_synth: SynthConfig) -> None:
    idx = []
    for r in range(2):
        loader, sampler = _loader(small_synth, 0, rank=r, world_size=2)
        sampler.set_epoch(0)
        idx.append(torch.cat([b["index"] for b in loader]).tolist())
    assert len(idx[0]) == len(idx[1]) == 32
    assert not set(idx[0]) & set(idx[1]) and len(set(idx[0]) | set(idx[1])) == 64


def _list_with_bad_files(cfg: SynthConfig, tmp: Path) -> tuple[Path, set[int]]:
    """The 64 synthetic pairs and 10 unusable files (13.5%) in one JSON list -> (list, bad indices)."""
    out = Path(cfg.out_dir)
    entries = [
        {"image": str(out / e["image"]), "caption": e["caption"]}
        for e in json.loads((out / "train.json").read_text())
    ]
    good = Path(entries[0]["image"]).read_bytes()
    kinds = [good[: len(good) // 2], b"", b"<html>not found</html>" * 9]
    rng = np.random.default_rng(0)
    for k in range(10):
        at = int(rng.integers(0, len(entries) + 1))
        entries.insert(at, {"image": str(tmp / f"bad{k}.jpg"), "caption": "a bad file"})
        (tmp / f"bad{k}.jpg").write_bytes(kinds[k % len(kinds)])
    bad = {i for i, e in enumerate(entries) if Path(e["image"]).parent == tmp}
    (tmp / "list.json").write_text(json.dumps(entries))
    return tmp / "list.json", bad


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_bad_files_refill_batches_and_resume_exactly(
    small_synth: SynthConfig, tmp_path: Path, backend
) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    lst, bad = _list_with_bad_files(small_synth, tmp_path)
    out = Path(small_synth.out_dir)
    data = DataConfig(train_file=[str(lst)], tokenizer=str(out / "vocab.txt"), loader=backend, num_workers=1)
    tok = TextTokenizer.from_path(data.tokenizer, max_tokens=data.max_tokens)

    def build():
        return build_pretrain_loader(data, tok, image_size=32, batch_size=2, seed=0, num_workers=0)

    loader, sampler = build()
    sampler.set_epoch(0)
    batches = list(loader)
    # Every batch is full (batch_size=2 used to leave 1 or 0 images, which stops a pre-training run), and
    # the epoch has its usual number of batches.
    assert len(batches) == sampler.batches_per_epoch == 37
    assert [b["image"].shape[0] for b in batches] == [2] * 37
    # The batches read this rank's order in sequence, skipping exactly the bad files, and say so; the
    # last ones are filled from the start of the order.
    order = sampler.rank_indices()
    consumed = sum(2 + b["num_skipped"] for b in batches)
    read = [order[k % len(order)] for k in range(consumed)]
    assert [i for b in batches for i in b["index"].tolist()] == [i for i in read if i not in bad]
    assert sum(b["num_skipped"] for b in batches) == sum(i in bad for i in read) >= 10
    # A resume after the first refilled batch (position = batches done + the skips they consumed) gives
    # the uninterrupted run's batches: same samples, same augmented pixels, same tokens.
    k = next(n for n, b in enumerate(batches) if b["num_skipped"]) + 1
    loader2, sampler2 = build()
    sampler2.set_epoch(0)
    sampler2.set_start(k, sum(b["num_skipped"] for b in batches[:k]))
    resumed = list(loader2)
    assert len(resumed) == 37 - k
    assert all(_same(a, b) and a["num_skipped"] == b["num_skipped"] for a, b in zip(resumed, batches[k:]))


def test_refill_gives_up_on_unusable_data(tmp_path: Path, small_synth: SynthConfig) -> None:
    entries = [{"image": f"bad{k}.jpg", "caption": "x"} for k in range(8)]
    for k in range(8):
        (tmp_path / f"bad{k}.jpg").write_bytes(b"")
    (tmp_path / "list.json").write_text(json.dumps(entries))
    data = DataConfig(
        train_file=[str(tmp_path / "list.json")], tokenizer=str(Path(small_synth.out_dir) / "vocab.txt")
    )
    tok = TextTokenizer.from_path(data.tokenizer, max_tokens=data.max_tokens)
    loader, sampler = build_pretrain_loader(data, tok, image_size=32, batch_size=2, seed=0, num_workers=0)
    sampler.set_epoch(0)
    with pytest.raises(RuntimeError, match="8 unusable samples while filling one batch of 2"):
        next(iter(loader))
