"""Where image-text pairs come from, and the checks every image goes through before it is decoded.

Two source formats, one interface (`ImageTextSource`: `len`, `read(i)` -> encoded image bytes,
`caption(i)`, `name(i)` for messages):

* the reference JSON list ``[{"image": path, "caption": str | [str]}, ...]`` (`JsonListSource`, over the
  entries `annotations.load_annotations` reads and checks);
* webdataset tar shards, the layout img2dataset writes (`ShardSource`): members ``<key>.<ext>`` grouped by
  key (the name up to the first dot of its last path component), an image (jpg, jpeg, png, webp, bmp) and a
  caption (``json`` with a "caption" str or list, else ``txt``). Shards are indexed once at start (tar
  headers only; captions are read then) and images are read by offset, so the sampler's seeded global
  order, the per-rank split and the mid-epoch resume are the same for shards as for JSON lists.

`check_image` is the one rule for "is this image usable", applied by both training loaders, `data shard` and
`data validate`: `inspect_image`'s header checks (empty files, non-images, images above `max_pixels`,
truncated JPEG/PNG streams without an end marker), then PIL's `verify()` (PNG CRCs) and a full PIL decode.
`inspect_image` also flags formats DALI decodes differently from PIL (16-bit PNG, GIF, TIFF, ...) for
decoding with PIL.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import pickle
import re
import tarfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .annotations import load_annotations

logger = logging.getLogger(__name__)

# Pillow's own decompression-bomb threshold (it warns above this and refuses above twice this).
DEFAULT_MAX_PIXELS = 89_478_485
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
# (format, mode) pairs DALI's decoders turn into the same RGB pixels as PIL's convert("RGB").
_DALI_MODES = {
    "JPEG": {"RGB", "L", "CMYK"},
    "PNG": {"RGB", "RGBA", "L", "LA", "P", "1"},
    "BMP": {"RGB", "L", "P"},
    "WEBP": {"RGB", "RGBA"},
}


class BadImage(ValueError):
    """An image that cannot be used; the message says why."""


@dataclass(frozen=True)
class ImageCheck:
    """What `inspect_image` found: `reason` is "" for a usable image."""

    reason: str
    width: int = 0
    height: int = 0
    format: str = ""
    dali_native: bool = False  # DALI decodes it to the pixels PIL would give

    @property
    def ok(self) -> bool:
        return not self.reason


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageCheck:
    """Header-level check of an encoded image (no pixel decoding)."""
    if not data:
        return ImageCheck("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, (w, h) = img.format or "", img.mode, img.size
    except Image.DecompressionBombError as e:
        return ImageCheck(f"too large: {e}")
    except Exception as e:  # PIL raises UnidentifiedImageError, SyntaxError, struct.error, ... on garbage
        return ImageCheck(f"not a recognised image ({type(e).__name__}: {e})")
    if w <= 0 or h <= 0:
        return ImageCheck(f"{fmt} image with size {w}x{h}", w, h, fmt)
    if w * h > max_pixels:
        return ImageCheck(f"too large: {w}x{h} = {w * h} pixels > max {max_pixels}", w, h, fmt)
    # Entropy-coded JPEG data never holds FF D9 (FF bytes are stuffed), so an end-of-image marker after the
    # last start-of-scan exists in every complete file, trailers (phone metadata, padding) or not.
    if fmt == "JPEG" and data.find(b"\xff\xd9", max(data.rfind(b"\xff\xda"), 0)) < 0:
        return ImageCheck("truncated JPEG (no end-of-image marker)", w, h, fmt)
    if fmt == "PNG" and data.rfind(b"IEND") < 0:
        return ImageCheck("truncated PNG (no IEND chunk)", w, h, fmt)
    return ImageCheck("", w, h, fmt, mode in _DALI_MODES.get(fmt, ()))


def decode_checked(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[ImageCheck, Image.Image | None]:
    """The one usability rule (see `check_image`) -> (check, the decoded image or None when refused)."""
    check = inspect_image(data, max_pixels)
    if not check.ok:
        return check, None
    try:
        # verify() walks the chunk structure and checks every PNG CRC, which load() does not; libpng (DALI's
        # decoder) refuses a bad CRC, so PIL must too. verify() leaves the image unusable: reopen to decode.
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            # A full decode: a stream corrupt in the middle (libjpeg "Unsupported marker type", a bad zlib
            # stream) raises here. LOAD_TRUNCATED_IMAGES stays Pillow's default (off): a stream that ends
            # early is an error, not grey rows.
            img.load()
            rgb = img.convert("RGB")
    except Exception as e:  # PIL raises SyntaxError, OSError, struct.error, ... on corrupt streams
        why = f"corrupt {check.format} ({type(e).__name__}: {e})"
        return ImageCheck(why, check.width, check.height, check.format), None
    return check, rgb


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageCheck:
    """Is this image usable? The one decision every consumer applies: both training loaders (torch and
    DALI), `data shard` and `data validate` (and the evaluation and task datasets, through `decode_rgb`).

    Usable = `inspect_image`'s header checks pass (not empty, an image, within `max_pixels`, end marker
    present), PIL's `verify()` passes (PNG chunk CRCs) and PIL decodes every pixel. Cost: one full decode
    (about 2-3 ms for a 640x480 JPEG on one core); `decode_rgb` returns the pixels of that same pass."""
    return decode_checked(data, max_pixels)[0]


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> RGB PIL image (alpha dropped, palette/CMYK/grey converted); BadImage (with the
    reason) when `check_image` refuses it."""
    check, img = decode_checked(data, max_pixels)
    if img is None:
        raise BadImage(check.reason)
    return img


# ----------------------------------------------------------------------------------------------- sources
class _PackedList:
    """Read-only list of picklable records in one numpy byte buffer (no per-record Python objects, so
    forked DataLoader workers do not copy it page by page as reference counts change)."""

    def __init__(self, items: Sequence[Any]) -> None:
        blobs = [pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL) for x in items]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)  # [N] end offset of each record
        self._buf = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> Any:
        start = int(self._ends[i - 1]) if i > 0 else 0
        return pickle.loads(self._buf[start : int(self._ends[i])].tobytes())


class ImageTextSource:
    """Indexable image-text pairs: encoded bytes, caption(s), a printable name, an optional integer id."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> bytes:
        """Encoded image bytes; OSError when the file cannot be read."""
        raise NotImplementedError

    def caption(self, i: int) -> str | tuple[str, ...]:
        raise NotImplementedError

    def name(self, i: int) -> str:
        raise NotImplementedError

    def image_id(self, i: int) -> int:
        return i


class JsonListSource(ImageTextSource):
    """Entries of `load_annotations` (absolute image paths); `ids` gives each entry an integer id."""

    def __init__(self, entries: list[dict], ids: Sequence[int] | None = None) -> None:
        recs = []
        for k, e in enumerate(entries):
            cap = tuple(e["caption"]) if isinstance(e["caption"], list) else e["caption"]
            recs.append((e["image"], cap, int(ids[k]) if ids is not None else k))
        self._recs = _PackedList(recs)

    def __len__(self) -> int:
        return len(self._recs)

    def read(self, i: int) -> bytes:
        with open(self._recs[i][0], "rb") as f:
            return f.read()

    def caption(self, i: int) -> str | tuple[str, ...]:
        return self._recs[i][1]

    def name(self, i: int) -> str:
        return self._recs[i][0]

    def image_id(self, i: int) -> int:
        return self._recs[i][2]


def expand_shards(spec: str) -> list[str]:
    """Shard spec -> sorted existing paths: brace ranges ``{000..099}``, brace lists ``{a,b}``, glob."""
    m = re.search(r"\{([^{}]*)\}", spec)
    if m:
        body, out = m.group(1), []
        r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if r:
            lo, hi = int(r.group(1)), int(r.group(2))
            width = len(r.group(1))
            parts = [f"{k:0{width}d}" for k in range(lo, hi + 1)]
        else:
            parts = body.split(",")
        for p in parts:
            out.extend(expand_shards(spec[: m.start()] + p + spec[m.end() :]))
        return out
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec))
    return [spec]


def _split_member(name: str) -> tuple[str, str]:
    d, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (os.path.join(d, stem) if d else stem), ext.lower()


def _caption_from(ext: str, payload: bytes, where: str) -> str | tuple[str, ...] | None:
    text = payload.decode("utf-8", errors="replace")
    if ext == "txt":
        return text.strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        logger.warning("%s: unreadable json (%s); using the txt caption if there is one", where, e)
        return None
    cap = obj.get("caption") if isinstance(obj, dict) else None
    if isinstance(cap, str):
        return cap
    if isinstance(cap, list) and cap and all(isinstance(c, str) for c in cap):
        return tuple(cap)
    return None


def index_shard(path: str) -> tuple[list[tuple[int, int, str | tuple[str, ...], str]], int]:
    """Scan one tar: ([(data offset, size, caption, key)] for complete samples, samples without image or
    caption). Reads member headers, seeking over image data, and the caption members."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_member(m.name)
                s = samples.setdefault(key, {})
                if ext in IMAGE_EXTS and "image" not in s:
                    s["image"] = (m.offset_data, m.size)
                elif ext in ("txt", "json"):
                    f = tf.extractfile(m)
                    cap = _caption_from(ext, f.read() if f else b"", f"shard {path} member {m.name}")
                    if cap is not None and (ext == "json" or "json" not in s):
                        s["caption"] = cap
                        if ext == "json":
                            s["json"] = True
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"shard {path} is not a readable tar file: {e}") from e
    out, incomplete = [], 0
    for key, s in samples.items():
        if "image" in s and "caption" in s:
            out.append((s["image"][0], s["image"][1], s["caption"], key))
        else:
            incomplete += 1
    return out, incomplete


class ShardSource(ImageTextSource):
    """Webdataset tar shards read by offset (see the module docstring)."""

    def __init__(self, paths: list[str]) -> None:
        if not paths:
            raise ValueError("empty shard list")
        self.paths = list(paths)
        recs, incomplete = [], 0
        for s, p in enumerate(self.paths):
            entries, bad = index_shard(p)
            incomplete += bad
            if not entries:
                logger.warning("shard %s holds no complete image-text sample", p)
            recs.extend((s, off, size, cap, key) for off, size, cap, key in entries)
        if incomplete:
            logger.warning(
                "%d sample(s) without an image or a caption in %s shard(s)", incomplete, len(paths)
            )
        self.incomplete = incomplete
        self._recs = _PackedList(recs)
        self._fds: dict[tuple[int, int], int] = {}  # (pid, shard) -> fd; pread needs no shared offset
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._recs)

    def _fd(self, s: int) -> int:
        k = (os.getpid(), s)
        fd = self._fds.get(k)
        if fd is None:
            with self._lock:
                fd = self._fds.get(k)
                if fd is None:
                    fd = os.open(self.paths[s], os.O_RDONLY)
                    self._fds[k] = fd
        return fd

    def read(self, i: int) -> bytes:
        s, off, size, _, _ = self._recs[i]
        data = os.pread(self._fd(s), size, off)
        if len(data) != size:
            raise OSError(f"shard {self.paths[s]}: short read ({len(data)} of {size} bytes at {off})")
        return data

    def caption(self, i: int) -> str | tuple[str, ...]:
        return self._recs[i][3]

    def name(self, i: int) -> str:
        s, _, _, _, key = self._recs[i]
        return f"{self.paths[s]}:{key}"

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_fds"], d["_lock"] = {}, None
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        for (pid, _), fd in list(getattr(self, "_fds", {}).items()):
            if pid == os.getpid():
                try:
                    os.close(fd)
                except OSError:
                    pass


class ConcatSource(ImageTextSource):
    """Several sources as one index space."""

    def __init__(self, parts: list[ImageTextSource]) -> None:
        self.parts = parts
        self._ends = np.cumsum([len(p) for p in parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _locate(self, i: int) -> tuple[ImageTextSource, int]:
        k = int(np.searchsorted(self._ends, i, side="right"))
        return self.parts[k], i - (int(self._ends[k - 1]) if k else 0)

    def read(self, i: int) -> bytes:
        p, j = self._locate(i)
        return p.read(j)

    def caption(self, i: int) -> str | tuple[str, ...]:
        p, j = self._locate(i)
        return p.caption(j)

    def name(self, i: int) -> str:
        p, j = self._locate(i)
        return p.name(j)

    def image_id(self, i: int) -> int:
        p, j = self._locate(i)
        return p.image_id(j)


def is_shard_spec(spec: str) -> bool:
    """Shards are named ``*.tar`` or given as a brace range / glob; anything else is a JSON list."""
    return spec.endswith(".tar") or bool(re.search(r"[{*?\[]", os.path.basename(spec)))


def open_source(specs: Sequence[str] | str, image_root: str = "") -> ImageTextSource:
    """JSON lists and shard specs (``*.tar``, brace ranges, globs) -> one source.

    A missing file, a spec that matches no shard and an empty result are errors that name the spec."""
    specs = [specs] if isinstance(specs, (str, Path)) else list(specs)
    if not specs:
        raise ValueError("no training source given: list JSON files or webdataset shards in data.train_file")
    parts: list[ImageTextSource] = []
    for spec in map(str, specs):
        if not is_shard_spec(spec):
            parts.append(JsonListSource(load_annotations(spec, image_root)))
            continue
        paths = expand_shards(spec)
        missing = [p for p in paths if not os.path.isfile(p)]
        if not paths:
            raise FileNotFoundError(f"data source {spec!r}: no shard matches")
        if missing:
            raise FileNotFoundError(
                f"data source {spec!r}: {len(missing)} of {len(paths)} shard(s) do not exist, "
                f"first {missing[0]}"
            )
        parts.append(ShardSource(paths))
    src = parts[0] if len(parts) == 1 else ConcatSource(parts)
    if len(src) == 0:
        raise ValueError(f"data sources {specs} hold no image-text pairs")
    return src


# ------------------------------------------------------------------------------------ shards and checks
def write_shards(
    entries: list[dict],
    out_dir: str | Path,
    *,
    shard_size: int = 10000,
    prefix: str = "shard",
    progress=True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict:
    """JSON-list entries -> webdataset shards `<out_dir>/<prefix>-%06d.tar` written with webdataset's
    ShardWriter (one sample: `<key>.<jpg|png|...>`, `<key>.txt` (first caption), `<key>.json` (the caption
    or caption list and the source path)). Images that cannot be read or that `check_image` refuses (what
    the loaders would skip) are left out, listed and counted; everything written is usable. Returns
    {"shards": [...], "written": n, "skipped": [[path, reason], ...]}."""
    import webdataset as wds
    from tqdm import tqdm

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / f"{prefix}-%06d.tar")
    skipped: list[list[str]] = []
    written = 0
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for k, e in enumerate(tqdm(entries, desc="shard", unit="img", disable=not progress)):
            path = e["image"]
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as err:
                skipped.append([path, f"unreadable: {err}"])
                continue
            check, img = decode_checked(data, max_pixels)  # the loaders' rule: nothing they would skip
            if img is None:
                skipped.append([path, check.reason])
                continue
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}.get(check.format)
            if ext is None:  # any other format PIL reads is re-encoded losslessly
                ext, data = "png", _png(img)
            cap = e["caption"]
            first = cap if isinstance(cap, str) else cap[0]
            sample = {"__key__": f"{k:09d}", ext: data, "txt": first, "json": {"caption": cap, "image": path}}
            sink.write(sample)
            written += 1
    shards = sorted(str(p) for p in out.glob(f"{prefix}-*.tar"))
    if skipped:
        logger.warning("shard: %d image(s) left out, e.g. %s (%s)", len(skipped), *skipped[0])
    return {"shards": shards, "written": written, "skipped": skipped}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def validate_source(
    source: ImageTextSource, *, threads: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS, progress=True
) -> dict:
    """Read every image and apply `check_image` (the loaders' rule: a full PIL decode) on `threads` threads.

    Returns {"total", "ok", "missing": [[name, reason]], "unreadable": [...], "undecodable": [...]}:
    missing = no such file; unreadable = the file exists but cannot be read; undecodable = read but not a
    usable image (empty, not an image, truncated, corrupt, too large)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def one(i: int) -> tuple[str, str, str]:
        name = source.name(i)
        try:
            data = source.read(i)
        except FileNotFoundError as e:
            return "missing", name, str(e)
        except OSError as e:
            return "unreadable", name, str(e)
        try:
            decode_rgb(data, max_pixels)
        except BadImage as e:
            return "undecodable", name, str(e)
        return "ok", name, ""

    report: dict[str, Any] = {
        "total": len(source),
        "ok": 0,
        "missing": [],
        "unreadable": [],
        "undecodable": [],
    }

    def results() -> Iterator[tuple[str, str, str]]:
        # Blocks of indices, so that a corpus of millions never has millions of pending futures.
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for start in range(0, len(source), 4096):
                yield from pool.map(one, range(start, min(start + 4096, len(source))))

    with tqdm(total=len(source), desc="validate", unit="img", disable=not progress) as bar:
        for kind, name, why in results():
            bar.update(1)
            if kind == "ok":
                report["ok"] += 1
            else:
                report[kind].append([name, why])
    return report
