"""Pictures of grounding results: the image, its Grad-CAM heat map, the chosen proposal and the ground truth.

`draw_grounding` writes one PNG of (W * scale) x (H * scale + BAND_PX) pixels: the image (pixel-aligned,
box coordinates in the grounding convention [x, y, w, h], continuous pixels) with the heat map overlaid
(min-max normalised, colormap, alpha), the chosen proposal in PRED_COLOUR drawn over the ground truth in
GT_COLOUR (wider, so both show where they coincide), and above the image a band with the expression as the
title and the legend. `draw_grid` tiles several of them. PNGs are written atomically (temp file + rename).

Needs matplotlib (Agg canvas, no pyplot state): `pip install matplotlib`.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..train.checkpoint import atomic_write_bytes
from .grounding import iou, upsample_map

PRED_COLOUR = "#ff00ff"  # magenta: the chosen proposal (absent from the heat colormap)
GT_COLOUR = "#00ff00"  # lime: the ground-truth box
BAND_PX = 44  # height of the title + legend band above the image
_DPI = 100
Box = Sequence[float] | None  # [x, y, w, h] pixels, or None to leave the box out


@dataclass
class GroundingExample:
    """One panel of `draw_grid`; the fields are `draw_grounding`'s arguments."""

    image: Image.Image
    heat: object  # (H, W) or (g, g) array / tensor
    pred_box: Box
    gt_box: Box
    text: str


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch, Rectangle
    except ImportError as e:  # optional: only the pictures need it
        raise ImportError("grounding pictures need matplotlib: pip install matplotlib") from e
    return Figure, FigureCanvasAgg, Patch, Rectangle


def _heat_at(heat, height: int, width: int) -> np.ndarray:
    """The heat map at image resolution, min-max normalised to [0, 1] (a constant map -> zeros)."""
    h = torch.as_tensor(heat).detach().float().cpu()
    if tuple(h.shape) != (height, width):
        h = upsample_map(h, height, width)
    h = h.numpy()
    span = float(h.max() - h.min())
    return (h - h.min()) / span if span > 0 else np.zeros_like(h)


def render_grounding(
    image: Image.Image,
    heat,
    pred_box: Box,
    gt_box: Box,
    text: str,
    *,
    alpha: float = 0.45,
    cmap: str = "jet",
    scale: int = 1,
) -> Image.Image:
    """The picture `draw_grounding` writes, as an RGB PIL image of (W * scale, H * scale + BAND_PX).

    heat: (H, W) at image resolution, or a smaller map (e.g. the (g, g) Grad-CAM), upsampled bicubically;
    pred_box / gt_box: [x, y, w, h] pixels, or None to leave one out."""
    figure_cls, canvas_cls, patch_cls, rect_cls = _matplotlib()
    width, height = image.size
    out_w, img_h = width * scale, height * scale
    out_h = img_h + BAND_PX
    # +1e-6: matplotlib truncates the canvas size to whole pixels.
    fig = figure_cls(figsize=((out_w + 1e-6) / _DPI, (out_h + 1e-6) / _DPI), dpi=_DPI, facecolor="#202020")
    canvas_cls(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, img_h / out_h))  # the image fills the lower img_h pixels exactly
    extent = (0, width, height, 0)  # data coordinates = continuous pixel coordinates of the image
    ax.imshow(np.asarray(image.convert("RGB")), extent=extent, interpolation="nearest", aspect="auto")
    ax.imshow(
        _heat_at(heat, height, width),
        cmap=cmap,
        alpha=alpha,
        extent=extent,
        interpolation="nearest",
        aspect="auto",
        vmin=0.0,
        vmax=1.0,
    )
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    px = 72.0 / _DPI  # points per output pixel
    handles = []
    for box, colour, line_px, label in (
        (gt_box, GT_COLOUR, 4, "ground truth"),
        (pred_box, PRED_COLOUR, 2, "chosen proposal"),
    ):
        if box is None:
            continue
        x, y, w, h = (float(v) for v in box)
        ax.add_patch(rect_cls((x, y), w, h, fill=False, edgecolor=colour, linewidth=line_px * scale * px))
        if label == "chosen proposal" and gt_box is not None:
            label = f"{label} (IoU {iou(box, gt_box):.2f})"
        handles.append(patch_cls(facecolor="none", edgecolor=colour, linewidth=2 * px, label=label))
    handles.reverse()  # legend: the proposal first
    band = BAND_PX / out_h  # the band's height as a fraction of the figure
    chars = max(8, int(out_w / 7))  # about 7 px per character at this font size
    title = textwrap.shorten(text, width=chars, placeholder="...")
    fig.text(0.5, 1.0 - 0.28 * band, title, ha="center", va="center", color="white", fontsize=10)
    if handles:
        fig.legend(
            handles=handles,
            loc="center",
            bbox_to_anchor=(0.5, 1.0 - 0.72 * band),
            ncol=len(handles),
            frameon=False,
            fontsize=8,
            labelcolor="white",
            handlelength=1.5,
            borderpad=0.0,
            borderaxespad=0.0,
        )
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return Image.fromarray(rgba[..., :3].copy())


def _write_png(picture: Image.Image, path) -> Path:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return atomic_write_bytes(Path(path), buf.getvalue())


def draw_grounding(image: Image.Image, heat, pred_box: Box, gt_box: Box, text: str, path, **kw) -> Path:
    """Write the grounding picture of one expression (module docstring) to `path` as a PNG, atomically.
    Keyword arguments go to `render_grounding` (alpha, cmap, scale). Returns the path."""
    return _write_png(render_grounding(image, heat, pred_box, gt_box, text, **kw), path)


def draw_grid(
    examples: Sequence[GroundingExample | Mapping], path, cols: int = 4, *, cell_width: int = 320, **kw
) -> Path:
    """Tile the pictures of several examples (GroundingExample or mappings with its fields), `cols` per
    row, each resized to `cell_width` pixels wide (aspect kept), on a dark background; written atomically.
    Keyword arguments go to `render_grounding`."""
    if not examples:
        raise ValueError("draw_grid needs at least one example")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    panels = []
    for ex in examples:
        ex = ex if isinstance(ex, GroundingExample) else GroundingExample(**ex)
        pic = render_grounding(ex.image, ex.heat, ex.pred_box, ex.gt_box, ex.text, **kw)
        h = max(1, round(pic.height * cell_width / pic.width))
        panels.append(pic.resize((cell_width, h), Image.Resampling.LANCZOS))
    cols = min(cols, len(panels))
    rows = math.ceil(len(panels) / cols)
    cell_h = max(p.height for p in panels)
    sheet = Image.new("RGB", (cols * cell_width, rows * cell_h), (32, 32, 32))
    for i, p in enumerate(panels):
        sheet.paste(p, ((i % cols) * cell_width, (i // cols) * cell_h))
    return _write_png(sheet, path)
