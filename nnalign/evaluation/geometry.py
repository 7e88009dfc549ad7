"""A prediction brought onto its reference's voxel grid before scoring, or refused.

Scoring compares voxel arrays, so it is only right when both arrays sample the same points in space. A prediction
saved with another axis order or with flipped axes (its direction matrix permuted or negated, the array with it) is
the same grid and is reordered to the reference's; a prediction whose grid is elsewhere (origin shifted by half a
voxel or more), is tilted against the reference's, or has other spacings or another extent is a
:class:`~nnalign.errors.CaseError` naming both files.
"""
from __future__ import annotations

import numpy as np

from nnalign.errors import CaseError

AXIS_TOLERANCE = 1e-4
"""How far the prediction's axes (direction x spacing, in the reference's voxel units) may be from an exact
permutation with flips: NIfTI keeps the direction as float32 quaternion parameters, far more precise than this."""
MAX_SHIFT_VOXELS = 0.5
"""How far (in voxels, per axis) the prediction's grid may be from the reference's: less than half a voxel is header
rounding, and every reference voxel still has one nearest prediction voxel."""


def _dims(values) -> str:
    return " x ".join(f"{v:g}" for v in values)


def _signed_permutation(matrix: np.ndarray) -> np.ndarray | None:
    """``matrix`` rounded, if that is a permutation matrix with signs and within :data:`AXIS_TOLERANCE`."""
    rounded = np.round(matrix)
    if (np.abs(matrix - rounded).max() > AXIS_TOLERANCE or not np.all(np.abs(rounded).sum(axis=0) == 1)
            or not np.all(np.abs(rounded).sum(axis=1) == 1)):
        return None
    return rounded


def on_reference_grid(pred_image, ref_image, files: str) -> np.ndarray:
    """The prediction's voxels (numpy axis order) in the reference's voxel order: the array itself when both grids
    are the same, reordered (axes permuted, flipped) when they are the same up to axis order and flips. CaseError
    (one line ending with ``files``) when the grids differ."""
    dim = ref_image.GetDimension()
    spacing_r, spacing_p = np.array(ref_image.GetSpacing()), np.array(pred_image.GetSpacing())
    direction_r = np.array(ref_image.GetDirection()).reshape(dim, dim)
    direction_p = np.array(pred_image.GetDirection()).reshape(dim, dim)
    size_r, size_p = np.array(ref_image.GetSize()), np.array(pred_image.GetSize())
    to_pred = np.linalg.inv(direction_p @ np.diag(spacing_p))
    # A reference index i is the prediction's continuous index axes @ i + offset.
    axes = _signed_permutation(to_pred @ direction_r @ np.diag(spacing_r))
    if axes is None:
        turn = _signed_permutation(direction_p.T @ direction_r)
        if turn is None:
            raise CaseError(f"the prediction's axes (direction {_dims(direction_p.ravel())}) are not those of the "
                            f"reference (direction {_dims(direction_r.ravel())}), not even reordered or flipped "
                            f"({files})")
        raise CaseError(f"spacing {_dims(np.abs(turn.T) @ spacing_p)} mm of the prediction differs from "
                        f"{_dims(spacing_r)} mm of the reference ({files})")
    source = np.argmax(np.abs(axes), axis=0)  # the prediction's axis along each reference axis
    flipped = axes[source, np.arange(dim)] < 0
    if not np.array_equal(size_p[source], size_r):
        raise CaseError(f"shape {_dims(size_p[::-1])} of the prediction differs from {_dims(size_r[::-1])} of the "
                        f"reference ({files})")
    offset = to_pred @ (np.array(ref_image.GetOrigin()) - np.array(pred_image.GetOrigin()))
    expected = np.zeros(dim)
    expected[source] = np.where(flipped, size_r - 1, 0)
    shift = offset - expected
    if np.abs(shift).max() >= MAX_SHIFT_VOXELS:
        mm = float(np.linalg.norm(direction_p @ np.diag(spacing_p) @ shift))
        raise CaseError(f"the prediction's voxel grid lies {mm:g} mm away from the reference's (origin "
                        f"{_dims(pred_image.GetOrigin())} mm against {_dims(ref_image.GetOrigin())} mm) ({files})")
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(pred_image)
    if np.array_equal(source, np.arange(dim)) and not flipped.any():
        return array
    index_order = array.transpose()  # numpy (z, y, x) -> SimpleITK's index order (x, y, z)
    reordered = np.transpose(index_order, source)
    reordered = np.flip(reordered, axis=tuple(int(a) for a in np.flatnonzero(flipped)))
    return np.ascontiguousarray(reordered.transpose())
