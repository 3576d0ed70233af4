"""refer.py: REFER's refs pickle + instances.json -> refs.json (protocols 0, 2, 4, Python 2 str), the
restricted unpickler (a pickle naming any global is refused and nothing runs) and the dets.json check."""

from __future__ import annotations

import copyreg
import json
import os
import pickle
from pathlib import Path

import pytest

from albef_ds.data.grounding import load_proposals, load_refs
from albef_ds.data.refer import (
    SafeUnpickler,
    UnsafePickleError,
    convert_proposals,
    convert_refer,
    read_refer_pickle,
    safe_loads,
)

REFS = [
    {
        "ref_id": 7,
        "ann_id": 100,
        "image_id": 1,
        "split": "testA",
        "category_id": 1,
        "sent_ids": [70, 71],
        "sentences": [
            {"sent": "man on the left", "raw": "Man on the left.", "sent_id": 70, "tokens": ["man"]}
        ],
        "file_name": "COCO_train2014_000000000001_100.jpg",
    },
    {"ref_id": 8, "ann_id": 101, "image_id": 1, "split": "testB", "category_id": 3, "sentences": []},
    {"ref_id": 9, "ann_id": 200, "image_id": 2, "split": "train", "category_id": 3, "sentences": []},
    {"ref_id": 10, "ann_id": 300, "image_id": 3, "split": "val", "category_id": 3, "sentences": []},
]
INSTANCES = {
    "images": [
        {"id": 1, "width": 640, "height": 480, "file_name": "COCO_train2014_000000000001.jpg"},
        {"id": 2, "width": 500, "height": 375, "file_name": "COCO_train2014_000000000002.jpg"},
        {"id": 3, "width": 300, "height": 200, "file_name": "COCO_train2014_000000000003.jpg"},
        {"id": 4, "width": 300, "height": 200, "file_name": "COCO_train2014_000000000004.jpg"},  # no ref
    ],
    "annotations": [
        {"id": 100, "image_id": 1, "bbox": [10.5, 20.0, 100.0, 200.25], "category_id": 1},
        {"id": 101, "image_id": 1, "bbox": [300, 40, 50, 60], "category_id": 3},
        {"id": 200, "image_id": 2, "bbox": [0, 0, 499, 374], "category_id": 3},
        {"id": 300, "image_id": 3, "bbox": [1, 2, 3, 4], "category_id": 3},
    ],
    "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
}
MARKER = "refer_pickle_ran"


class Exploit:
    """Unpickling this (with the plain pickle module) would run a shell command that creates MARKER."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __reduce__(self):
        return (os.system, (f"touch {self.folder}/{MARKER}",))


class Plain:
    def __init__(self) -> None:
        self.x = 1


def _write(tmp_path: Path, refs_bytes: bytes) -> tuple[Path, Path]:
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(refs_bytes)
    inst = tmp_path / "instances.json"
    inst.write_text(json.dumps(INSTANCES))
    return refs, inst


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_convert_refer_writes_our_layout(tmp_path: Path, protocol: int) -> None:
    refs, inst = _write(tmp_path, pickle.dumps(REFS, protocol=protocol))
    out = convert_refer(refs, inst, tmp_path / "out")
    assert out == tmp_path / "out" / "refs.json"
    data = json.loads(out.read_text())
    assert data["refs"] == {
        "7": {"image_id": 1, "split": "testA", "box": [10.5, 20.0, 100.0, 200.25]},
        "8": {"image_id": 1, "split": "testB", "box": [300.0, 40.0, 50.0, 60.0]},
        "9": {"image_id": 2, "split": "train", "box": [0.0, 0.0, 499.0, 374.0]},
        "10": {"image_id": 3, "split": "val", "box": [1.0, 2.0, 3.0, 4.0]},
    }
    assert (
        data["images"]
        == {  # only the refs' images
            str(i["id"]): {"width": i["width"], "height": i["height"], "file_name": i["file_name"]}
            for i in INSTANCES["images"][:3]
        }
    )
    loaded = load_refs(out)
    assert loaded.refs["7"].box == (10.5, 20.0, 100.0, 200.25) and loaded.refs["7"].image_id == "1"
    assert loaded.images["2"].width == 500 and loaded.images["2"].file_name.endswith("002.jpg")
    assert not [p for p in out.parent.iterdir() if p.name != "refs.json"]  # no temporary file left


def test_python2_str_pickle(tmp_path: Path) -> None:
    """Python 2 writes str as BINSTRING opcodes (bytes), the REFER file's case: decoded as text."""
    # Protocol-2 stream of [{'split': 'val', 'ref_id': 10, 'ann_id': 300, 'image_id': 3}] as Python 2
    # pickles it: dict keys and values as SHORT_BINSTRING ('U').
    body = b"\x80\x02]q\x00}q\x01("
    for k, v in (("split", "val"), ("ref_id", 10), ("ann_id", 300), ("image_id", 3)):
        body += b"U" + bytes([len(k)]) + k.encode()
        if isinstance(v, str):
            body += b"U" + bytes([len(v)]) + v.encode()
        else:
            body += b"M" + v.to_bytes(2, "little")
    body += b"ua."
    assert pickle.loads(body, encoding="bytes")[0][b"split"] == b"val"  # really a bytes-str stream
    refs, inst = _write(tmp_path, body)
    assert read_refer_pickle(refs) == [{"split": "val", "ref_id": 10, "ann_id": 300, "image_id": 3}]
    assert json.loads(convert_refer(refs, inst, tmp_path / "o").read_text())["refs"]["10"]["split"] == "val"


@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("payload", ["function", "exploit", "instance", "set_of_globals"])
def test_pickles_naming_globals_are_refused_and_nothing_runs(
    tmp_path: Path, protocol: int, payload: str
) -> None:
    obj = {
        "function": [{"ref_id": 1, "split": os.system}],
        "exploit": [Exploit(str(tmp_path))],
        "instance": [Plain()],
        "set_of_globals": [{"ref_id": 1, "x": frozenset({1})}],  # frozenset is a global in protocols < 4
    }[payload]
    data = pickle.dumps(obj, protocol=protocol)
    if payload == "set_of_globals" and protocol >= 4:
        assert safe_loads(data) == obj  # protocol 4 has its own frozenset opcode: plain data
        return
    refs, inst = _write(tmp_path, data)
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p names the global .*nothing it names was"):
        convert_refer(refs, inst, tmp_path / "out")
    assert not (tmp_path / MARKER).exists() and not (tmp_path / "out").exists()
    # The same stream through the plain pickle module does run the command: the test means something.
    if payload == "exploit":
        pickle.loads(data)
        assert (tmp_path / MARKER).exists()


def test_extension_codes_are_refused(tmp_path: Path) -> None:
    module = os.system.__module__  # "posix" on Linux
    copyreg.add_extension(module, "system", 0x7F_FE01)
    try:
        data = pickle.dumps([os.system], protocol=2)
        assert pickle.EXT4 in data and b"system" not in data  # named by its extension code only
        with pytest.raises(UnsafePickleError, match=f"{module}.system"):
            safe_loads(data)
    finally:
        copyreg.remove_extension(module, "system", 0x7F_FE01)


def test_persistent_ids_and_garbage_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafePickleError, match="persistent id"):
        safe_loads(b"Pfoo\n.")
    with pytest.raises(ValueError, match="not a readable plain-data pickle"):
        safe_loads(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a readable plain-data pickle"):
        safe_loads(pickle.dumps(REFS)[:-5])  # truncated
    assert issubclass(SafeUnpickler, pickle.Unpickler)


@pytest.mark.parametrize(
    "refs, match",
    [
        ({"ref_id": 1}, r"must hold a non-empty list of refs"),
        ([["ref_id", 1]], r"entry 0 must be a dict"),
        ([{"ref_id": 1, "ann_id": 100, "split": "val"}], r"entry 0 has no field 'image_id'"),
        (
            [{"ref_id": "1", "ann_id": 100, "image_id": 1, "split": "val"}],
            r"entry 0: field 'ref_id' must be an int",
        ),
        ([{"ref_id": 1, "ann_id": 100, "image_id": 1, "split": 3}], r"entry 0: field 'split' must be a str"),
        ([{"ref_id": 1, "ann_id": 999, "image_id": 1, "split": "val"}], r"ann_id 999 has no annotation"),
        ([{"ref_id": 1, "ann_id": 200, "image_id": 1, "split": "val"}], r"annotation 200 .* is on image 2"),
        (
            [{"ref_id": 1, "ann_id": 100, "image_id": 1, "split": "dev"}],
            r"entry 0 \(ref_id 1\): field 'split' must be one of",
        ),
        ([REFS[0], REFS[0]], r"entry 1 \(ref_id 7\): ref_id 7 appears twice"),
    ],
)
def test_bad_refs_name_file_entry_and_field(tmp_path: Path, refs, match: str) -> None:
    path, inst = _write(tmp_path, pickle.dumps(refs, protocol=2))
    with pytest.raises(ValueError, match=match):
        convert_refer(path, inst, tmp_path / "out")


def test_bad_instances_and_boxes(tmp_path: Path) -> None:
    refs, inst = _write(tmp_path, pickle.dumps(REFS, protocol=2))
    bad = json.loads(json.dumps(INSTANCES))
    bad["annotations"][0]["bbox"] = [1, 2, 0, 5]
    inst.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"annotation 100 \(ref 7\): bbox: box .* width 0"):
        convert_refer(refs, inst, tmp_path / "out")
    inst.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="lists 'images' and 'annotations'"):
        convert_refer(refs, inst, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="REFER refs file"):
        convert_refer(tmp_path / "nope.p", inst, tmp_path / "out")


def test_convert_proposals(tmp_path: Path) -> None:
    refs, inst = _write(tmp_path, pickle.dumps(REFS, protocol=2))
    refs_json = convert_refer(refs, inst, tmp_path / "out")
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps({"1": [[1, 2, 3, 4, 0.9, 1], [5, 6, 7, 8]], "3": []}))  # image 2 is train only
    out = convert_proposals(dets, tmp_path / "out", refs=refs_json)
    assert json.loads(out.read_text()) == {"1": [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], "3": []}
    assert load_proposals(out).boxes["1"][0] == (1.0, 2.0, 3.0, 4.0)
    dets.write_text(json.dumps({"1": [[1, 2, 3, 4]]}))
    with pytest.raises(ValueError, match=r"no entry for 1 image\(s\) of the val/test refs .* \['3'\]"):
        convert_proposals(dets, tmp_path / "out2", refs=refs_json)
    dets.write_text(json.dumps({"1": [[1, 2, 3]]}))
    with pytest.raises(ValueError, match=r"proposals file .*dets.json: image '1', box 0 must be a box"):
        convert_proposals(dets, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_convert_refer_command(tmp_path: Path, capsys) -> None:
    """`albef-ds data convert-refer` writes refs.json and proposals.json; an exploit pickle exits 2 with the
    file named and nothing run."""
    from albef_ds.cli import main

    refs, inst = _write(tmp_path, pickle.dumps(REFS, protocol=4))
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps({"1": [[1, 2, 3, 4]], "3": [[0, 0, 5, 5]]}))
    out = tmp_path / "out"
    assert main(["data", "convert-refer", str(refs), str(inst), "--dets", str(dets), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"refs": str(out / "refs.json"), "proposals": str(out / "proposals.json")}
    assert load_refs(out / "refs.json").refs["10"].split == "val"
    assert load_proposals(out / "proposals.json").boxes["3"] == [(0.0, 0.0, 5.0, 5.0)]
    bad = tmp_path / "exploit.p"
    bad.write_bytes(pickle.dumps([Exploit(str(tmp_path))], protocol=2))
    assert main(["data", "convert-refer", str(bad), str(inst), "--out", str(tmp_path / "o2")]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / MARKER).exists() and not (tmp_path / "o2" / "refs.json").exists()
