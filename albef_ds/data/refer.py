"""The REFER API's files -> our refs.json and proposals.json (the layouts of `grounding`), without running any
code from them.

refs(unc).p (REFER, `lichengunc/refer`) is a Python pickle written by Python 2: a list of plain dicts ::

    {"ref_id": int, "ann_id": int, "image_id": int, "split": "train" | "val" | "testA" | "testB" | ...,
     "category_id": int, "sentences": [{"sent": str, ...}, ...], "sent_ids": [int], "file_name": str}

and instances.json the COCO annotations of its images ("images": id, width, height, file_name;
"annotations": id, image_id, bbox [x, y, w, h]). A ref's box is its annotation's bbox.

**Why not `pickle.load`.** Unpickling calls whatever the pickle names: any importable function (os.system,
subprocess.Popen, builtins.eval, ...) with arguments of the file's choosing, so loading a downloaded pickle
the ordinary way can run arbitrary code. `read_refer_pickle` uses `SafeUnpickler`, whose `find_class`
refuses every global: lists, dicts, tuples, str, bytes, numbers, booleans and None (all the REFER file
holds) are built by opcodes that need none, and every opcode that calls or instantiates something (REDUCE,
BUILD of an object, INST, OBJ, NEWOBJ, the extension codes) can only reach a callable through a global, so
a pickle naming one fails with a clear error and nothing it names is imported or called.
"""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any

from .annotations import read_json, require_fields, write_json_atomic
from .grounding import SPLITS, GroundingRefs, check_box, load_proposals, load_refs

logger = logging.getLogger(__name__)

REFS_FILE = "refs.json"
PROPOSALS_FILE = "proposals.json"


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle that names a global (a class, function or module attribute): refused, nothing was run."""


class SafeUnpickler(pickle.Unpickler):
    """An unpickler for plain data (lists, dicts, tuples, sets, str, bytes, numbers, booleans, None): every
    global the stream names is refused, so no class is instantiated and no function is called. Python 2 str
    objects are decoded as UTF-8 (undecodable bytes replaced)."""

    def __init__(self, file, *, source: str = "<bytes>") -> None:
        super().__init__(file, encoding="utf-8", errors="replace")
        self.source = source

    def find_class(self, module: str, name: str):
        raise UnsafePickleError(
            f"{self.source} names the global {module}.{name}: only plain data (lists, dicts, str, numbers) "
            "is accepted, so the pickle was refused and nothing it names was imported or run"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source} holds a persistent id {pid!r:.80}; refused (plain data only)")


def safe_loads(data: bytes, *, source: str = "<bytes>") -> Any:
    """`pickle.loads` for plain data only (`SafeUnpickler`); UnsafePickleError for a pickle naming a global,
    ValueError for a stream that is not a pickle."""
    try:
        return SafeUnpickler(io.BytesIO(data), source=source).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{source} is not a readable plain-data pickle: {type(e).__name__}: {e}") from e


def read_refer_pickle(path: str | Path) -> list[dict]:
    """The refs of a REFER refs(*).p file, read with `SafeUnpickler` (never runs code from the file); a
    ValueError naming the file, entry and field unless it is a list of dicts with int ref_id, ann_id,
    image_id and a str split."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"REFER refs file {p} does not exist")
    data = safe_loads(p.read_bytes(), source=f"REFER refs file {p}")
    if not isinstance(data, list) or not data:
        raise ValueError(f"REFER refs file {p} must hold a non-empty list of refs, got {type(data).__name__}")
    for i, r in enumerate(data):
        where = f"REFER refs file {p}: entry {i}"
        require_fields(r, where, ("ref_id", "ann_id", "image_id", "split"), kind="a dict")
        for key in ("ref_id", "ann_id", "image_id"):
            if isinstance(r[key], bool) or not isinstance(r[key], int):
                raise ValueError(f"{where}: field '{key}' must be an int, got {r[key]!r:.80}")
        if not isinstance(r["split"], str):
            raise ValueError(f"{where}: field 'split' must be a str, got {r['split']!r:.80}")
    return data


def _index_instances(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """instances.json -> ({image id: image}, {annotation id: annotation}), checked."""
    data = read_json(path, what="instances file")
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations")
    ):
        raise ValueError(f"instances file {path} must be a COCO object with lists 'images' and 'annotations'")
    out: list[dict[int, dict]] = []
    for key, fields in (("images", ("id", "width", "height")), ("annotations", ("id", "image_id", "bbox"))):
        index = {}
        for i, e in enumerate(data[key]):
            index[require_fields(e, f"instances file {path}: {key}[{i}]", fields)["id"]] = e
        out.append(index)
    return out[0], out[1]


def convert_refer(refs_pickle: str | Path, instances_json: str | Path, out_dir: str | Path) -> Path:
    """REFER's refs(*).p + instances.json -> out_dir/refs.json in our layout (`grounding`): every ref with its
    image_id, split and its annotation's bbox, every image of the refs with width, height and file_name;
    written atomically and read back with `grounding.load_refs`. The pickle is read with `SafeUnpickler`:
    a pickle that names any global (a class instance, a function such as os.system) is refused before
    anything runs. Returns the path of refs.json."""
    refs_in = read_refer_pickle(refs_pickle)
    ipath = Path(instances_json)
    images, anns = _index_instances(ipath)
    refs: dict[str, dict] = {}
    used: dict[str, dict] = {}
    for i, r in enumerate(refs_in):
        where = f"REFER refs file {refs_pickle}: entry {i} (ref_id {r['ref_id']})"
        key = str(r["ref_id"])
        if key in refs:
            raise ValueError(f"{where}: ref_id {r['ref_id']} appears twice")
        if r["split"] not in SPLITS:
            raise ValueError(f"{where}: field 'split' must be one of {SPLITS}, got {r['split']!r}")
        ann = anns.get(r["ann_id"])
        if ann is None:
            raise ValueError(f"{where}: ann_id {r['ann_id']} has no annotation in instances file {ipath}")
        if ann["image_id"] != r["image_id"]:
            raise ValueError(
                f"{where}: image_id {r['image_id']} but its annotation {r['ann_id']} in {ipath} is on image "
                f"{ann['image_id']}"
            )
        img = images.get(r["image_id"])
        if img is None:
            raise ValueError(f"{where}: image_id {r['image_id']} has no image in instances file {ipath}")
        box = check_box(
            ann["bbox"], f"instances file {ipath}: annotation {r['ann_id']} (ref {r['ref_id']}): bbox"
        )
        refs[key] = {"image_id": r["image_id"], "split": r["split"], "box": list(box)}
        entry = {"width": img["width"], "height": img["height"]}
        if img.get("file_name"):
            entry["file_name"] = img["file_name"]
        used[str(r["image_id"])] = entry
    out = write_json_atomic(Path(out_dir) / REFS_FILE, {"refs": refs, "images": used})
    load_refs(out)  # our own reader checks what was written (splits, sizes, boxes)
    logger.info("wrote %d refs on %d images to %s", len(refs), len(used), out)
    return out


def convert_proposals(
    dets_json: str | Path, out_dir: str | Path, *, refs: str | Path | GroundingRefs | None = None
) -> Path:
    """The reference's dets.json (str(image_id) -> boxes [x, y, w, h, ...]) checked with
    `grounding.load_proposals` and written as out_dir/proposals.json (4 numbers per box), atomically. With
    `refs`: every image of a non-train ref must have an entry (else a ValueError naming a few). Returns the
    path of proposals.json."""
    props = load_proposals(dets_json)
    if refs is not None:
        refs = refs if isinstance(refs, GroundingRefs) else load_refs(refs)
        need = sorted({r.image_id for r in refs.refs.values() if r.split != "train"} - set(props.boxes))
        if need:
            raise ValueError(
                f"proposals file {dets_json} has no entry for {len(need)} image(s) of the val/test refs of "
                f"{refs.path}, e.g. image_id {need[:5]}"
            )
    out = write_json_atomic(
        Path(out_dir) / PROPOSALS_FILE, {k: [list(b) for b in v] for k, v in props.boxes.items()}
    )
    logger.info("wrote the proposals of %d images to %s", len(props.boxes), out)
    return out
