"""``nnalign_predict --qc-images``: one PNG per case, three orthogonal slices (axial, coronal, sagittal) through the
tumour's centre of mass with the contours of WT, TC and ET on the case's T1ce (else FLAIR, else its first image).

Drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot state), written atomically.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nnalign.atomic import write_bytes_atomic
from nnalign.data.labels import REGION_NAMES, region_masks

SIZE_PIXELS, DPI = (1200, 440), 100
REGION_COLOURS = {"WT": "lime", "TC": "red", "ET": "yellow"}
BACKGROUND_ORDER = ("T1ce", "FLAIR", "T2", "T1")


def tumour_centre(wt: np.ndarray) -> tuple[int, int, int]:
    """The voxel (z, y, x) nearest the centre of mass of ``wt``; the volume's centre if it is empty."""
    if not wt.any():
        return tuple(n // 2 for n in wt.shape)
    return tuple(int(round(c)) for c in np.argwhere(wt).mean(axis=0))


def qc_png(images: Mapping[str, np.ndarray], seg: np.ndarray, convention: str, spacing: Sequence[float],
           title: str) -> bytes:
    """The QC picture as PNG bytes. ``images``: modality -> (z, y, x); ``seg`` (z, y, x) in ``convention``;
    ``spacing`` (x, y, z) in mm, as SimpleITK gives it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    name = next((m for m in BACKGROUND_ORDER if m in images), next(iter(images)))
    image = images[name]
    masks = region_masks(seg, convention)
    z, y, x = tumour_centre(masks["WT"])
    sx, sy, sz = spacing
    views = (("axial", np.s_[z, :, :], sy / sx, "upper"), ("coronal", np.s_[:, y, :], sz / sx, "lower"),
             ("sagittal", np.s_[:, :, x], sz / sy, "lower"))
    low, high = _window([image[view] for _, view, _, _ in views])
    fig = Figure(figsize=(SIZE_PIXELS[0] / DPI, SIZE_PIXELS[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    for ax, (label, view, aspect, origin) in zip(fig.subplots(1, 3), views):
        ax.imshow(image[view], cmap="gray", vmin=low, vmax=high, aspect=aspect, origin=origin,
                  interpolation="nearest")
        for region in REGION_NAMES:
            if masks[region][view].any():
                ax.contour(masks[region][view].astype(np.float32), levels=[0.5], colors=[REGION_COLOURS[region]],
                           linewidths=1.0)  # Z[i, j] at (j, i): imshow's pixel centres, either origin
        ax.set_title(label, fontsize=9)
        ax.set_axis_off()
    legend = ", ".join(f"{r} {c}" for r, c in REGION_COLOURS.items())
    fig.suptitle(f"{title}  |  {name}; {legend}", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _window(slices: Sequence[np.ndarray]) -> tuple[float, float]:
    """Grey levels from the 0.5th to the 99.5th percentile of the slices' non-zero voxels."""
    values = np.concatenate([s[s != 0].ravel() for s in slices])
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, (0.5, 99.5))
    return float(low), (float(high) if high > low else float(low) + 1.0)


def write_qc_image(path: Path, images: Mapping[str, np.ndarray], seg: np.ndarray, convention: str,
                   spacing: Sequence[float], title: str) -> None:
    """:func:`qc_png` written atomically to ``path``."""
    write_bytes_atomic(path, qc_png(images, seg, convention, spacing, title))
