"""One voxel grid for the sequences of a case: the grid most of them share, the others resampled onto it.

Clinical sequences are often acquired on their own grids (a FLAIR with 3 mm slices, a T2 in another orientation).
Where a case's files do not share one geometry, the reference is the geometry most of them have (a tie goes to the
group with the earliest modality of :data:`REFERENCE_PREFERENCE`: BraTS registers every sequence to T1ce); every
other file is resampled onto it (linear, zero outside its field of view), and the report says which and why. A file
whose field of view covers less than :data:`MIN_COVERAGE` of the reference's is refused: such sequences disagree
beyond what resampling fixes (they need registration).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from nnalign.data.case_checks import geometry_difference, geometry_groups
from nnalign.errors import CaseError

REFERENCE_PREFERENCE = ("T1ce", "T1", "T2", "FLAIR")
MIN_COVERAGE = 0.9
"""The share of the reference grid's field of view a resampled sequence must cover."""
COVERAGE_SAMPLES = 9
"""Sample points per axis of the reference grid for the coverage."""


@dataclass(frozen=True)
class SequenceGrid:
    """The reference modality of a case and, for each other modality on another grid, what differed."""

    reference: str
    resampled: dict[str, str] = field(default_factory=dict)


def _values(what: str, values: tuple) -> str:
    return " x ".join(f"{v:g}" for v in values) if what in ("shape", "spacing") else str(values)


def coverage(reference, moving) -> float:
    """The share of the reference grid's field of view (header readers or images) inside the moving one's."""
    size = np.array(reference.GetSize())
    axes = [np.linspace(0, n - 1, COVERAGE_SAMPLES) for n in size]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(size))
    direction = np.array(reference.GetDirection()).reshape(len(size), len(size))
    physical = np.array(reference.GetOrigin()) + (points * np.array(reference.GetSpacing())) @ direction.T
    moving_direction = np.array(moving.GetDirection()).reshape(len(size), len(size))
    index = np.linalg.solve(moving_direction, (physical - np.array(moving.GetOrigin())).T).T / np.array(
        moving.GetSpacing())
    inside = np.all((index >= -0.5) & (index <= np.array(moving.GetSize()) - 0.5), axis=1)
    return float(inside.mean())


def sequence_grid(case_id: str, files: Mapping[str, object], readers: Mapping) -> SequenceGrid:
    """The grid a case's modalities (``files``: modality -> path, ``readers``: their header readers) are brought
    onto; CaseError (one line naming the case and the file) for a file that covers too little of it."""
    geometries, groups = geometry_groups(files, readers)
    rank = {m: REFERENCE_PREFERENCE.index(m) if m in REFERENCE_PREFERENCE else len(REFERENCE_PREFERENCE)
            for m in files}
    best = min(groups, key=lambda g: (-len(g), min(rank[m] for m in g)))
    reference = min(best, key=lambda m: rank[m])
    resampled = {}
    for m in files:
        if m in best:
            continue
        share = coverage(readers[reference], readers[m])
        if share < MIN_COVERAGE:
            name = getattr(files[m], "name", files[m])
            raise CaseError(f"{case_id}: {name}: its field of view covers {share:.0%} of {reference}'s, beyond what "
                            f"resampling fixes (register the sequences first)")
        what, theirs, own = geometry_difference(geometries[reference], geometries[m])
        resampled[m] = (f"{m} resampled onto {reference}'s grid: its {what} {_values(what, own)} differed from "
                        f"{_values(what, theirs)}")
    return SequenceGrid(reference, resampled)


def resample_onto(path, reference_reader) -> np.ndarray:
    """The image at ``path`` resampled (linear, 0 outside it) onto the grid of ``reference_reader``, as a float32
    array in numpy (z, y, x) order."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(reference_reader.GetSize())
    resampler.SetOutputSpacing(reference_reader.GetSpacing())
    resampler.SetOutputOrigin(reference_reader.GetOrigin())
    resampler.SetOutputDirection(reference_reader.GetDirection())
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(0.0)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampler.Execute(image))
