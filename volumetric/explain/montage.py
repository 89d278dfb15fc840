"""A PNG montage of a relevance map: three orthogonal slices through its maximum, over the scan.

    sagittal (x fixed) | coronal (y fixed) | axial (z fixed)      scan in grey, map in colour

Both are first reoriented to RAS+ (TorchIO's ToCanonical), so the panels are anatomical whatever
the file's orientation, and drawn in millimetres (anisotropic voxels keep their true aspect), in
the neurological convention: the patient's right on the right of the axial and coronal panels.
Drawn with matplotlib's object-oriented API and the Agg renderer: no display, no pyplot state.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import torch
import torchio as tio
from matplotlib.figure import Figure

from volumetric.atomic_files import atomic_path

SHOWN_ABOVE = 0.1
"""Map values below this fraction of the map's maximum are not coloured (the scan shows through)."""


def canonical(
    scan: np.ndarray, relevance: np.ndarray, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(W, H, D) scan and map on the file's grid → both in RAS+ voxel order, and the RAS spacing (mm)."""

    def image(data: np.ndarray) -> tio.ScalarImage:
        return tio.ScalarImage(
            tensor=torch.from_numpy(np.array(data, dtype=np.float32)[None]), affine=affine
        )

    subject = tio.ToCanonical()(tio.Subject(scan=image(scan), map=image(relevance)))
    images = cast("dict[str, tio.ScalarImage]", subject)  # a Subject's items are typed object
    return (
        images["scan"].data[0].numpy(),
        images["map"].data[0].numpy(),
        tuple(images["scan"].spacing),
    )


def save_montage(
    path: Path, scan: np.ndarray, relevance: np.ndarray, affine: np.ndarray, title: str = ""
) -> None:
    """Write the montage of ``relevance`` over ``scan`` (both (W, H, D) on the grid of ``affine``) as a PNG,
    atomically. The slices cross at the map's maximum, or at the centre when the map is all zero."""
    figure = montage_figure(scan, relevance, affine, title)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def montage_figure(
    scan: np.ndarray,
    relevance: np.ndarray,
    affine: np.ndarray,
    title: str = "",
    *,
    overlay: bool = True,
) -> Figure:
    """The montage of `save_montage` as a matplotlib Figure (Agg). ``overlay=False`` draws the same
    three slices of the scan alone (through the map's maximum, or the centre of an all-zero map)."""
    scan, relevance, (sx, sy, sz) = canonical(scan, relevance, affine)
    peak = relevance.max()
    if peak > 0:
        i, j, k = np.unravel_index(int(np.argmax(relevance)), relevance.shape)
    else:
        i, j, k = (n // 2 for n in relevance.shape)
    low, high = np.percentile(scan, [1, 99]) if scan.size else (0.0, 1.0)
    nx, ny, nz = relevance.shape
    x = ("L → R (mm)", nx * sx, (i + 0.5) * sx)  # (label, extent, crosshair) of each RAS axis
    y = ("P → A (mm)", ny * sy, (j + 0.5) * sy)
    z = ("I → S (mm)", nz * sz, (k + 0.5) * sz)
    panels = [  # (title, scan slice, map slice, horizontal axis, vertical axis)
        ("sagittal", scan[i], relevance[i], y, z),
        ("coronal", scan[:, j], relevance[:, j], x, z),
        ("axial", scan[:, :, k], relevance[:, :, k], x, y),
    ]
    figure = Figure(figsize=(12, 4.4), dpi=100, layout="constrained")
    axes = figure.subplots(1, 3)
    shown = None
    for ax, (name, grey, colour, (xlabel, width, cx), (ylabel, height, cy)) in zip(axes, panels):
        # rows of the transposed slice run along the vertical axis, upward
        extent = (0, width, 0, height)
        ax.imshow(
            grey.T,
            cmap="gray",
            origin="lower",
            extent=extent,
            vmin=low,
            vmax=max(high, low + 1e-6),
            interpolation="nearest",
        )
        if overlay:
            hidden = colour.T <= SHOWN_ABOVE * peak if peak > 0 else np.ones(colour.T.shape, bool)
            shown = ax.imshow(
                np.ma.masked_array(colour.T, mask=hidden),
                cmap="inferno",
                origin="lower",
                extent=extent,
                vmin=0,
                vmax=max(peak, 1e-12),
                alpha=0.6,
                interpolation="nearest",
            )
        ax.axhline(cy, color="cyan", linewidth=0.5)
        ax.axvline(cx, color="cyan", linewidth=0.5)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.tick_params(labelsize=7)
    if shown is not None:
        figure.colorbar(shown, ax=list(axes), shrink=0.8, label="relevance (logit units)")
    if title:
        figure.suptitle(title)
    return figure
