"""Sources (JSON lists, webdataset shards), the image checks, `albef-ds data shard` / `data validate`, and
every kind of bad input through both loaders (torch reference and DALI CPU), with the skip counts."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from albef_ds.cli import main
from albef_ds.config import DataConfig
from albef_ds.data import TextTokenizer, build_pretrain_loader
from albef_ds.data.sources import (
    ShardSource,
    decode_rgb,
    expand_shards,
    inspect_image,
    open_source,
    validate_source,
    write_shards,
)

dali = pytest.importorskip("nvidia.dali")


def _photo(h: int = 60, w: int = 80, seed: int = 0) -> Image.Image:
    # Smooth gradients plus a little noise: compresses like a photo, every pixel value distinct enough.
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + 60], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bad_kinds() -> dict[str, tuple[bytes, bool]]:
    """name -> (file bytes, usable). Usable kinds must decode to the pixels PIL gives."""
    img = _photo()
    jpeg = _enc(img, "JPEG", quality=90)
    png = _enc(img, "PNG")
    corrupt_png = bytearray(png)
    corrupt_png[png.index(b"IDAT") + 100] ^= 0xFF  # passes the header checks, fails the decoder's CRC
    grey16 = Image.fromarray((np.arange(60 * 80).reshape(60, 80) * 13).astype(np.uint16))
    return {
        "good.jpg": (jpeg, True),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], False),
        "zero.jpg": (b"", False),
        "text.jpg": (b"<html>404 not found</html>\n" * 20, False),
        "cmyk.jpg": (_enc(img.convert("CMYK"), "JPEG", quality=95), True),
        "grey.jpg": (_enc(img.convert("L"), "JPEG", quality=95), True),
        "rgba.png": (_enc(img.convert("RGBA"), "PNG"), True),
        "palette.png": (_enc(img.convert("P"), "PNG"), True),
        "grey16.png": (_enc(grey16, "PNG"), True),
        "anim.gif": (_enc(img.convert("P"), "GIF"), True),
        "corrupt.png": (bytes(corrupt_png), False),
        "huge.jpg": (_enc(_photo(1200, 1600, 1), "JPEG", quality=80), False),  # over max_pixels below
    }


MAX_PIXELS = 1_000_000  # the 1600x1200 image is "huge" for these tests


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    entries = []
    for name, (data, _) in _bad_kinds().items():
        (root / name).write_bytes(data)
        entries.append({"image": name, "caption": f"a picture named {name.split('.')[0]}"})
    entries.append({"image": "missing.jpg", "caption": "a missing file"})
    (root / "list.json").write_text(json.dumps(entries))
    return root


def test_inspect_image_reasons() -> None:
    kinds = _bad_kinds()
    assert inspect_image(b"").reason.startswith("empty")
    assert "not a recognised image" in inspect_image(kinds["text.jpg"][0]).reason
    assert "truncated JPEG" in inspect_image(kinds["truncated.jpg"][0]).reason
    assert "too large" in inspect_image(kinds["huge.jpg"][0], MAX_PIXELS).reason
    assert inspect_image(kinds["huge.jpg"][0]).ok  # 1.9 MP is fine at the default limit
    png = kinds["good.jpg"][0]
    assert inspect_image(png).dali_native
    assert not inspect_image(kinds["grey16.png"][0]).dali_native  # DALI would not scale 16-bit like PIL
    assert not inspect_image(kinds["anim.gif"][0]).dali_native
    # Bytes after the end marker (phone metadata trailers, padding) do not make a JPEG truncated.
    trailer = kinds["good.jpg"][0] + b"SEFH" + bytes(range(256)) * 40
    assert inspect_image(trailer).ok
    assert decode_rgb(trailer).size == (80, 60)
    chk = inspect_image(_enc(_photo(), "PNG")[:-20])
    assert "truncated PNG" in chk.reason
    for name in ("cmyk.jpg", "grey.jpg", "rgba.png", "palette.png", "grey16.png", "anim.gif"):
        assert decode_rgb(kinds[name][0]).mode == "RGB"


def test_validate_reports_every_bad_file(bad_set: Path, capsys) -> None:
    src = open_source([str(bad_set / "list.json")])
    rep = validate_source(src, threads=2, max_pixels=MAX_PIXELS, progress=False)
    names = {k: sorted(Path(n).name for n, _ in rep[k]) for k in ("missing", "unreadable", "undecodable")}
    assert names["missing"] == ["missing.jpg"]
    assert names["undecodable"] == sorted(
        ["truncated.jpg", "zero.jpg", "text.jpg", "corrupt.png", "huge.jpg"]
    )
    assert rep["total"] == 13 and rep["ok"] == 7
    # The CLI: lists each bad file with its reason, exit status 1, JSON report.
    out_json = bad_set / "report.json"
    rc = main(
        [
            "data",
            "validate",
            str(bad_set / "list.json"),
            "--max-image-pixels",
            str(MAX_PIXELS),
            "-o",
            str(out_json),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 1
    assert "missing: " in text and "missing.jpg" in text and "truncated JPEG" in text
    assert "13 images: 7 ok, 1 missing, 0 unreadable, 5 undecodable" in text
    assert json.loads(out_json.read_text())["ok"] == 7


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_bad_images_are_skipped_and_counted(bad_set: Path, vocab_file: Path, loader: str, caplog) -> None:
    data = DataConfig(
        train_file=[str(bad_set / "list.json")],
        tokenizer=str(vocab_file),
        loader=loader,
        num_workers=0 if loader == "torch" else 2,
        max_image_pixels=MAX_PIXELS,
    )
    tok = TextTokenizer.from_path(data.tokenizer, max_tokens=data.max_tokens)
    ld, sampler = build_pretrain_loader(data, tok, image_size=32, batch_size=13, seed=0)
    sampler.set_epoch(0)
    with caplog.at_level(logging.WARNING):
        (batch,) = list(ld)
    bad = {"truncated.jpg", "zero.jpg", "text.jpg", "corrupt.png", "huge.jpg", "missing.jpg"}
    # The 7 usable pairs, then refilled from the start of the order (bad files met again, counted again).
    assert batch["num_skipped"] >= len(bad)
    assert batch["image"].shape == (13, 3, 32, 32)
    assert torch.isfinite(batch["image"]).all()
    src = open_source([str(bad_set / "list.json")])
    kept = [Path(src.name(i)).name for i in batch["index"].tolist()]
    assert set(kept[:7]) == {n for n in _bad_kinds() if n not in bad} == set(kept)
    for name in bad:  # every skipped file is logged with its path
        assert any(name in r.getMessage() for r in caplog.records), name


def test_usable_kinds_decode_like_pil_through_dali(bad_set: Path) -> None:
    from albef_ds.data import RetrievalEvalSet
    from albef_ds.data.dali import DaliEvalImages

    names = ["good.jpg", "cmyk.jpg", "grey.jpg", "rgba.png", "palette.png", "grey16.png", "anim.gif"]
    entries = [{"image": n, "caption": ["x"]} for n in names]
    (bad_set / "usable.json").write_text(json.dumps(entries))
    ref = RetrievalEvalSet(str(bad_set / "usable.json"), image_size=40, max_words=30)
    want = torch.stack([ref.image_dataset()[i][0] for i in range(len(names))])
    (got, ids) = next(iter(DaliEvalImages(ref.images, image_size=40, batch_size=len(names))))
    assert ids.tolist() == list(range(len(names)))
    # Both resample bicubically with antialiasing; decoded pixels are identical (CMYK and grey JPEGs via
    # libjpeg-turbo in both), so the normalised values differ by resampler rounding only.
    diff = (got - want).abs().mean(dim=(1, 2, 3))  # per image, in normalised units (~1/60 per grey level)
    assert (diff < 0.05).all(), dict(zip(names, diff.tolist()))
    # Through the RetrievalEvalSet switch as well.
    dset = RetrievalEvalSet(str(bad_set / "usable.json"), image_size=40, max_words=30, loader="dali")
    (x, i) = next(dset.image_batches(2, 5, batch_size=8))
    assert torch.equal(x, got[2:5]) and i.tolist() == [2, 3, 4]


def test_dali_eval_images_refuse_a_bad_image(bad_set: Path) -> None:
    from albef_ds.data.dali import DaliEvalImages

    with pytest.raises(RuntimeError, match="truncated.jpg"):
        list(
            DaliEvalImages(
                [str(bad_set / "good.jpg"), str(bad_set / "truncated.jpg")], image_size=32, batch_size=2
            )
        )


# ---------------------------------------------------------------------------------------------- shards
def test_shards_written_by_webdataset_are_read_back(tmp_path: Path) -> None:
    import webdataset as wds

    imgs = [_photo(40 + i, 50, seed=i) for i in range(7)]
    caps: list = ["first caption", ["two", "captions"], "third", "fourth", "fifth", "sixth", "seventh"]
    with wds.ShardWriter(str(tmp_path / "w-%03d.tar"), maxcount=3, verbose=0) as sink:
        for i, (im, c) in enumerate(zip(imgs, caps)):
            sample = {"__key__": f"dir/s{i:04d}", "jpg": _enc(im, "JPEG", quality=92)}
            if isinstance(c, list):
                sample["json"] = {"caption": c, "url": "http://x"}
                sample["txt"] = c[0]
            else:
                sample["txt"] = c  # img2dataset's layout: .txt caption (+ .json metadata without caption)
                sample["json"] = {"url": "http://x"}
            sink.write(sample)
        sink.write({"__key__": "nocaption", "jpg": _enc(imgs[0], "JPEG")})  # incomplete: left out
    assert expand_shards(str(tmp_path / "w-{000..002}.tar")) == [
        str(tmp_path / f"w-00{k}.tar") for k in range(3)
    ]
    src = open_source([str(tmp_path / "w-{000..002}.tar")])
    assert isinstance(src, ShardSource) and len(src) == 7 and src.incomplete == 1
    got = {src.name(i).split(":")[1]: i for i in range(len(src))}
    for k, (im, c) in enumerate(zip(imgs, caps)):
        i = got[f"dir/s{k:04d}"]
        assert src.caption(i) == (tuple(c) if isinstance(c, list) else c)
        assert np.array_equal(
            np.asarray(decode_rgb(src.read(i))),
            np.asarray(Image.open(io.BytesIO(_enc(im, "JPEG", quality=92))).convert("RGB")),
        )
    # Globs work too, and the same order comes back.
    src2 = open_source([str(tmp_path / "w-*.tar")])
    assert [src2.name(i) for i in range(7)] == [src.name(i) for i in range(7)]


def test_data_shard_command_roundtrip(bad_set: Path, tmp_path: Path, vocab_file: Path, capsys) -> None:
    rc = main(["data", "shard", str(bad_set / "list.json"), "-o", str(tmp_path / "sh"), "--shard-size", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    # 13 entries: the missing, zero-byte, text, truncated and corrupt files are left out, as the loaders
    # would skip them (huge is fine at the default limit).
    assert "8 samples in 3 shard(s)" in out and "5 left out as unusable" in out
    src = open_source([str(tmp_path / "sh" / "shard-*.tar")])
    assert len(src) == 8
    lst = open_source([str(bad_set / "list.json")])
    by_cap = {lst.caption(i): lst.read(i) for i in range(len(lst)) if Path(lst.name(i)).name != "missing.jpg"}
    for i in range(len(src)):
        orig = by_cap[src.caption(i)]
        if inspect_image(orig).format == "GIF":  # re-encoded losslessly as PNG
            assert inspect_image(src.read(i)).format == "PNG"
            assert np.array_equal(np.asarray(decode_rgb(src.read(i))), np.asarray(decode_rgb(orig)))
        else:  # copied byte for byte
            assert src.read(i) == orig
    # Training reads the shards with both loaders.
    for loader in ("torch", "dali"):
        data = DataConfig(
            train_file=[str(tmp_path / "sh" / "shard-{000000..000002}.tar")],
            tokenizer=str(vocab_file),
            loader=loader,
            num_workers=0 if loader == "torch" else 1,
        )
        tok = TextTokenizer.from_path(data.tokenizer, max_tokens=data.max_tokens)
        ld, sampler = build_pretrain_loader(data, tok, image_size=32, batch_size=4, seed=0)
        sampler.set_epoch(0)
        batches = list(ld)
        assert len(batches) == 2 and sum(b["num_skipped"] for b in batches) == 0  # shards hold usable images


def test_missing_and_empty_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        open_source([str(tmp_path / "nothing.json")])
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        open_source([str(tmp_path / "x-*.tar")])
    import tarfile

    with tarfile.open(tmp_path / "x-000.tar", "w"):
        pass
    with pytest.raises(FileNotFoundError, match="1 of 2 shard.s. do not exist, first .*x-001.tar"):
        open_source([str(tmp_path / "x-{000..001}.tar")])
    with pytest.raises(ValueError, match="no training source"):
        open_source([])
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match="junk.tar is not a readable tar"):
        open_source([str(tmp_path / "junk.tar")])
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with pytest.raises(ValueError, match="hold no image-text pairs"):
        open_source([str(tmp_path / "empty.tar")])


def _disagreeing_kinds() -> dict[str, bytes]:
    """Files the two decoders used to judge differently: libpng (DALI) refuses a PNG whose IDAT CRC is
    wrong (pixel data intact), which PIL's load() decodes; libjpeg in PIL raises on a marker inside the
    entropy-coded data ("Unsupported marker type 0xb0"), which DALI's decoder passes over."""
    img = _photo()
    png = bytearray(_enc(img, "PNG"))
    at = png.index(b"IDAT")
    length = int.from_bytes(png[at - 4 : at], "big")
    png[at + 4 + length] ^= 0xFF  # the first byte of the IDAT CRC
    jpeg = bytearray(_enc(img, "JPEG", quality=90))
    mid = (jpeg.rindex(b"\xff\xda") + len(jpeg)) // 2
    jpeg[mid : mid + 2] = b"\xff\xb0"
    return {"crc.png": bytes(png), "marker.jpg": bytes(jpeg)}


def test_one_usability_rule_for_loaders_shard_and_validate(tmp_path: Path, vocab_file: Path) -> None:
    bad = _disagreeing_kinds()
    entries = []
    for k in range(6):
        name = f"good{k}.{'png' if k % 2 else 'jpg'}"
        (tmp_path / name).write_bytes(_enc(_photo(seed=k), "PNG" if k % 2 else "JPEG", quality=90))
        entries.append({"image": name, "caption": f"good picture {k}"})
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        entries.append({"image": name, "caption": "a broken picture"})
    (tmp_path / "list.json").write_text(json.dumps(entries))
    names = {e["image"] for e in entries}
    skipped: dict[str, set[str]] = {}
    src = open_source([str(tmp_path / "list.json")])
    for loader in ("torch", "dali"):
        data = DataConfig(
            train_file=[str(tmp_path / "list.json")], tokenizer=str(vocab_file), loader=loader, num_workers=0
        )
        tok = TextTokenizer.from_path(data.tokenizer, max_tokens=data.max_tokens)
        ld, sampler = build_pretrain_loader(data, tok, image_size=32, batch_size=2, seed=0)
        sampler.set_epoch(0)
        trained = {Path(src.name(i)).name for b in ld for i in b["index"].tolist()}
        skipped[loader] = names - trained
    rep = validate_source(src, threads=1, progress=False)
    skipped["validate"] = {Path(n).name for n, _ in rep["undecodable"]}
    res = write_shards(
        [{"image": str(tmp_path / e["image"]), "caption": e["caption"]} for e in entries],
        tmp_path / "sh",
        progress=False,
    )
    skipped["shard"] = {Path(p).name for p, _ in res["skipped"]}
    assert skipped == {k: set(bad) for k in ("torch", "dali", "validate", "shard")}
    from albef_ds.data.sources import check_image  # the one rule all four apply

    assert "CRC" in check_image(bad["crc.png"]).reason or "checksum" in check_image(bad["crc.png"]).reason
    assert not check_image(bad["marker.jpg"]).ok and check_image(_enc(_photo(), "PNG")).ok
