"""Data pipeline throughput: the DALI loader (CPU mode here, `device_id=None`) against the reference PIL +
torchvision DataLoader, same pre-training transform, same number of threads / worker processes.

Usage:

    python benchmarks/bench_data.py [--images 384] [--workers 1 2] [--image-size 256] [--batch 64]
                                    [--out benchmarks/results/data_cpu.json]

Generates COCO-like JPEGs (640x480, quality 90: smooth gradients, shapes and sensor-like noise, about
about 55 KB each) in a temporary folder, then for each worker count runs one warm-up pass and
--repeats timed passes of each loader over all images (pre-training transform: random resized crop
0.2-1.0 to --image-size, flip, RandAugment N=2 M=7, CLIP normalisation; captions cleaned and tokenised)
and reports the best images/s of each and the ratio. With --device cuda the DALI pipeline decodes with
nvJPEG (`mixed`) and augments on the GPU. Writes the JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from albef_ds.config import DataConfig  # noqa: E402
from albef_ds.data import TextTokenizer, build_pretrain_loader, train_wordpiece_vocab  # noqa: E402

WORDS = "a the red blue green large small dog cat man woman riding sitting on table street near with".split()


def log(msg: str) -> None:
    print(msg, flush=True)


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    """n COCO-like JPEGs + a JSON list; returns the JSON path."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    entries = []
    for i in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)) / 800.0 + 0.5
        base = c0 * (1 - t[..., None]) + c1 * t[..., None]
        img = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.integers(0, 560), rng.integers(0, 400)
            box = (int(x0), int(y0), int(x0 + rng.integers(40, 240)), int(y0 + rng.integers(40, 200)))
            fill = tuple(int(v) for v in rng.integers(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        name = f"{i:06d}.jpg"
        img.save(folder / name, quality=90)
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 14))))
        entries.append({"image": name, "caption": caption})
    ann = folder / "train.json"
    ann.write_text(json.dumps(entries))
    return ann


def one_pass(loader, sampler, epoch: int) -> tuple[int, float]:
    sampler.set_epoch(epoch)
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["image"].shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n, time.perf_counter() - t0


def bench(kind: str, ann: Path, vocab: Path, workers: int, args) -> dict:
    data = DataConfig(train_file=[str(ann)], tokenizer=str(vocab), loader=kind, num_workers=workers)
    tok = TextTokenizer.from_path(str(vocab), max_tokens=data.max_tokens)
    loader, sampler = build_pretrain_loader(
        data, tok, image_size=args.image_size, batch_size=args.batch, seed=0, device=args.device
    )
    one_pass(loader, sampler, 0)  # warm-up: worker start, DALI pipeline build, page cache
    rates = []
    for r in range(args.repeats):
        n, dt = one_pass(loader, sampler, r + 1)
        rates.append(n / dt)
    best = max(rates)
    log(f"  {kind:>5}, {workers} {'threads' if kind == 'dali' else 'workers'}: {best:8.1f} images/s")
    return {"loader": kind, "workers": workers, "images_per_s": best, "all_images_per_s": rates}


def stages(ann: Path, image_size: int) -> dict:
    """Images/s of each stage on one thread: where the time goes (DALI graph pieces vs PIL calls)."""
    import io

    from nvidia.dali import fn, pipeline_def, types

    from albef_ds.data.transforms import pretrain_transform

    files = [ann.parent / e["image"] for e in json.loads(ann.read_text())][:128]
    blobs = [np.fromfile(f, np.uint8) for f in files]
    window = (np.array([60, 80], np.float32), np.array([360, 480], np.float32))  # a 0.56-area crop

    def dali_rate(step: str) -> float:
        @pipeline_def(
            batch_size=len(blobs), num_threads=1, device_id=None, exec_async=False, exec_pipelined=False
        )
        def graph():
            enc = fn.external_source(name="e", dtype=types.UINT8, ndim=1)
            if step == "decode":
                return fn.decoders.image(enc, output_type=types.RGB)
            img = fn.decoders.image_slice(
                enc,
                *window,
                axes=[0, 1],
                normalized_anchor=False,
                normalized_shape=False,
                output_type=types.RGB,
            )
            if step == "decode_window":
                return img
            interp = types.INTERP_CUBIC if step == "window_resize_cubic" else types.INTERP_LINEAR
            return fn.resize(img, size=[image_size, image_size], interp_type=interp, antialias=True)

        pipe = graph()
        pipe.build()
        pipe.feed_input("e", blobs)
        pipe.run()
        t0 = time.perf_counter()
        for _ in range(2):
            pipe.feed_input("e", blobs)
            pipe.run()
        return 2 * len(blobs) / (time.perf_counter() - t0)

    def pil_rate(fn_) -> float:
        t0 = time.perf_counter()
        for b in blobs:
            fn_(Image.open(io.BytesIO(b.tobytes())).convert("RGB"))
        return len(blobs) / (time.perf_counter() - t0)

    y, x, h, w = (int(v) for v in (*window[0], *window[1]))
    tf = pretrain_transform(image_size)
    out = {
        f"dali_{k}": dali_rate(k)
        for k in ("decode", "decode_window", "window_resize_linear", "window_resize_cubic")
    }
    out["pil_decode"] = pil_rate(lambda im: im)
    out["pil_window_resize_cubic"] = pil_rate(
        lambda im: im.crop((x, y, x + w, y + h)).resize((image_size, image_size), Image.Resampling.BICUBIC)
    )
    out["pil_full_transform"] = pil_rate(tf)
    for k, v in out.items():
        log(f"  {k:>28}: {v:8.1f} images/s (1 thread)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for DALI's GPU mode")
    ap.add_argument("--out", default="benchmarks/results/data_cpu.json")
    args = ap.parse_args()
    if args.images < args.batch:
        ap.error("--images must be at least --batch")
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        folder = Path(tmp)
        log(f"generating {args.images} 640x480 JPEGs (quality 90) in {folder}")
        ann = make_images(folder, args.images)
        sizes = [os.path.getsize(p) for p in folder.glob("*.jpg")]
        caps = [e["caption"] for e in json.loads(ann.read_text())]
        vocab = train_wordpiece_vocab(caps, folder / "vocab.txt", vocab_size=120)
        rows = []
        for w in args.workers:
            log(f"{w} worker(s) / thread(s):")
            rows.append(bench("torch", ann, vocab, w, args))
            rows.append(bench("dali", ann, vocab, w, args))
        log("stages, one thread:")
        stage_rates = stages(ann, args.image_size)
    ratios = {}
    for w in args.workers:
        t = next(r for r in rows if r["loader"] == "torch" and r["workers"] == w)["images_per_s"]
        d = next(r for r in rows if r["loader"] == "dali" and r["workers"] == w)["images_per_s"]
        ratios[str(w)] = d / t
        log(f"DALI / PIL at {w}: {d / t:.2f}x")
    import nvidia.dali

    result = {
        "benchmark": "data pipeline, pre-training transform",
        "command": "python benchmarks/bench_data.py " + " ".join(sys.argv[1:]),
        "host": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "device": args.device},
        "versions": {"torch": torch.__version__, "dali": nvidia.dali.__version__},
        "images": {
            "count": args.images,
            "size": "640x480",
            "jpeg_quality": 90,
            "mean_kb": np.mean(sizes) / 1024,
        },
        "transform": {
            "image_size": args.image_size,
            "crop_scale": [0.2, 1.0],
            "randaug": "N=2 M=7",
            "batch": args.batch,
        },
        "rows": rows,
        "dali_over_pil": ratios,
        "stages_images_per_s_1_thread": stage_rates,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = np.arange(len(args.workers))
        for k, (kind, label) in enumerate(
            [("torch", "PIL + torchvision (DataLoader workers)"), ("dali", "DALI CPU (threads)")]
        ):
            ys = [
                next(r for r in rows if r["loader"] == kind and r["workers"] == w)["images_per_s"]
                for w in args.workers
            ]
            ax.bar(xs + (k - 0.5) * 0.38, ys, 0.38, label=label)
        ax.set_xticks(xs, [str(w) for w in args.workers])
        ax.set_xlabel("worker processes / DALI threads")
        ax.set_ylabel("images / s")
        ax.set_title(f"pre-training transform, 640x480 JPEG -> {args.image_size}px ({args.device})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
        log(f"wrote {out.with_suffix('.png')}")
    except ImportError:
        log("matplotlib missing: no plot")


if __name__ == "__main__":
    main()
