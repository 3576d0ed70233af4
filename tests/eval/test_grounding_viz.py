"""Grounding pictures: size, content, box colours at the box edges, grids, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageColor

pytest.importorskip("matplotlib")

from albef_ds.eval.grounding_viz import (  # noqa: E402
    BAND_PX,
    GT_COLOUR,
    PRED_COLOUR,
    GroundingExample,
    draw_grid,
    draw_grounding,
)


def _scene(w: int = 160, h: int = 120):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(60, 200, (h, w, 3), dtype=np.uint8))
    yy, xx = np.mgrid[0:h, 0:w]
    heat = np.exp(-(((xx - 60) / 20.0) ** 2 + ((yy - 60) / 25.0) ** 2))
    return image, heat


def _near(picture: np.ndarray, row: int, col: int, colour: str, radius: int = 2, tol: float = 40) -> bool:
    """A pixel within `radius` of (row, col) has `colour` (up to `tol` in RGB distance)."""
    want = np.array(ImageColor.getrgb(colour), dtype=float)
    patch = picture[row - radius : row + radius + 1, col - radius : col + radius + 1].astype(float)
    return bool((np.linalg.norm(patch - want, axis=-1) < tol).any())


@pytest.mark.parametrize("scale", [1, 2])
def test_png_size_content_and_box_colours(tmp_path, scale):
    image, heat = _scene()
    pred, gt = [30, 40, 50, 50], [90, 20, 50, 70]
    out = draw_grounding(image, heat, pred, gt, "the object on the left", tmp_path / "a.png", scale=scale)
    assert out == tmp_path / "a.png" and [p.name for p in tmp_path.iterdir()] == [
        "a.png"
    ]  # no temp file left
    pic = np.asarray(Image.open(out).convert("RGB"))
    assert pic.shape == (120 * scale + BAND_PX, 160 * scale, 3)
    assert pic.reshape(-1, 3).std(0).min() > 5  # not constant
    body = pic[BAND_PX:]
    for (x, y, w, h), colour in ((pred, PRED_COLOUR), (gt, GT_COLOUR)):
        mid_r, mid_c = (y + h // 2) * scale, (x + w // 2) * scale
        for r, c in (
            (mid_r, x * scale),
            (mid_r, (x + w) * scale),
            (y * scale, mid_c),
            ((y + h) * scale, mid_c),
        ):
            assert _near(body, r, c, colour), (colour, r, c)
    # Away from the boxes neither colour appears.
    assert not _near(body, 110 * scale, 5 * scale, PRED_COLOUR) and not _near(
        body, 110 * scale, 5 * scale, GT_COLOUR
    )
    # The heat map shows: its peak (inside the proposal) is redder than the far corner.
    assert body[60 * scale, 60 * scale, 0] > body[110 * scale, 150 * scale, 0]


def test_coinciding_boxes_both_show_and_small_maps_are_upsampled(tmp_path):
    image, _ = _scene()
    box = [40, 30, 60, 50]
    out = draw_grounding(image, torch.rand(4, 4), box, box, "x" * 300, tmp_path / "b.png")
    body = np.asarray(Image.open(out).convert("RGB"))[BAND_PX:]
    assert _near(body, 55, 40, PRED_COLOUR, radius=1) and _near(body, 55, 40, GT_COLOUR, radius=2)
    draw_grounding(image, np.zeros((120, 160)), None, box, "no prediction", tmp_path / "c.png")


def test_grid_and_atomic_replace(tmp_path):
    image, heat = _scene()
    ex = [
        GroundingExample(image, heat, [30, 40, 50, 50], [90, 20, 50, 70], f"expression {i}") for i in range(5)
    ]
    ex[4] = {"image": image, "heat": heat, "pred_box": None, "gt_box": None, "text": "a mapping"}
    path = tmp_path / "grid.png"
    path.write_bytes(b"old")
    draw_grid(ex, path, cols=3, cell_width=200)
    grid = Image.open(path)
    assert grid.size == (3 * 200, 2 * round((120 + BAND_PX) * 200 / 160))
    assert sorted(os.listdir(tmp_path)) == ["grid.png"]
    with pytest.raises(ValueError, match="at least one"):
        draw_grid([], path)
