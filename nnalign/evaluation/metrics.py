"""Per-case Dice and HD95 on the BraTS regions WT, TC, ET (and RC), with the BraTS edge-case conventions.

Conventions (those of the BraTS 2017-2019 evaluation and of the missing-modality literature):

- both masks empty: Dice 1, HD95 0;
- exactly one mask empty: Dice 0, HD95 :data:`HD95_EMPTY` = 373.13 mm, the diagonal of the 240 x 240 x 155 BraTS volume;
- otherwise Dice = 2|P & R| / (|P| + |R|) and HD95 = the 95th percentile of the symmetric surface distances in mm,
  computed by MedPy (``medpy.metric.binary.hd95``, surfaces from a 6-connected erosion) with the image spacing.

The regions of each label convention are :func:`nnalign.data.labels.region_labels`'s: WT, TC and ET, and the
resection cavity RC in the conventions that have it (``nnunet``, ``brats2024``).

Arrays are numpy arrays in any axis order; ``spacing`` gives the voxel size along the same axes (for a SimpleITK
image read with ``GetArrayFromImage``, that is ``image.GetSpacing()[::-1]``). This module imports neither torch nor
nnunetv2, so it also runs in a plain numpy/scipy/MedPy environment.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from nnalign.data.brats_layout import NAMING_2023, NAMING_NNUNET
from nnalign.data.labels import CONVENTIONS, REGION_NAMES, check_labels, detect_convention, region_masks

HD95_EMPTY = 373.13  # mm: sqrt(240^2 + 240^2 + 155^2), the BraTS penalty when exactly one mask is empty
AGGREGATES: tuple[str, ...] = ("mean", "std", "median")
LABEL_CHOICES: tuple[str, ...] = ("auto", *CONVENTIONS)


def metric_columns(regions: Iterable[str] = REGION_NAMES) -> tuple[str, ...]:
    """``Dice_<region>`` for each region, then ``HD95_<region>``."""
    regions = tuple(regions)
    return tuple(f"{m}_{r}" for m in ("Dice", "HD95") for r in regions)


METRIC_COLUMNS: tuple[str, ...] = metric_columns()  # the tumour regions' columns, in every evaluation


def resolve_convention(values_by_case: Mapping[str, Iterable[int]], naming: str) -> str:
    """The label convention of references with one naming (:mod:`nnalign.data.brats_layout`'s NAMING_*), from the
    label values of all of them and their predictions.

    Flat ``<case>.nii.gz`` references (``nnunet``, as labelsTr/labelsTs): ``brats2018`` if label 4 occurs and label 3
    never does, else ``nnunet`` (4 is then the resection cavity). BraTS-named references (``<case>_seg``,
    ``<case>-seg``): :func:`nnalign.data.labels.detect_convention`. Flat files cannot tell a BraTS 2018 release
    without enhancing tumour from an nnU-Net one (necrosis and edema sit on different labels), which is why an
    explicit ``--labels`` is the reliable way. ValueError naming a case whose values fit no convention.
    """
    if naming != NAMING_NNUNET:
        return detect_convention(values_by_case, naming == NAMING_2023)
    found = set()
    for case, values in values_by_case.items():
        try:
            check_labels(values, "nnunet")
        except ValueError as e:
            raise ValueError(f"{case}: {e}") from None
        found |= set(values)
    return "brats2018" if 4 in found and 3 not in found else "nnunet"


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & ref)) / total


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance of two boolean masks in the units of ``spacing`` (mm).

    0 when both masks are empty and :data:`HD95_EMPTY` when exactly one is. The masks are cropped to the bounding box
    of their union plus one voxel before MedPy sees them, which leaves every surface voxel and every distance unchanged
    and makes a 240 x 240 x 155 case several times faster.
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {ref.shape}")
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if not has_pred or not has_ref:
        return HD95_EMPTY
    from medpy.metric.binary import hd95 as medpy_hd95

    box = _bounding_box(pred | ref, margin=1)
    return float(medpy_hd95(pred[box], ref[box], voxelspacing=None if spacing is None else tuple(spacing)))


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


@dataclass
class CaseScores:
    """Dice and HD95 of one case per region (keys :data:`METRIC_COLUMNS`), and whether ET post-processing fired."""

    scores: dict[str, float]
    et_removed: bool = False


def remove_small_et(pred_regions: Mapping[str, np.ndarray], et_min_voxels: int) -> tuple[dict[str, np.ndarray], bool]:
    """RFNet's "enhancing_postpro": a predicted ET of 1 to ``et_min_voxels - 1`` voxels becomes empty.

    The ET voxels are relabelled necrosis (non-enhancing core), so they stay in TC and WT: only the ET mask changes.
    ``et_min_voxels`` 0 (or 1) turns it off. Returns the (possibly) changed masks and whether ET was removed.
    """
    et_voxels = int(np.count_nonzero(pred_regions["ET"]))
    if 0 < et_voxels < et_min_voxels:
        regions = dict(pred_regions)
        regions["ET"] = np.zeros_like(pred_regions["ET"], dtype=bool)
        return regions, True
    return dict(pred_regions), False


def case_metrics(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float] | None, convention: str,
                 et_min_voxels: int = 0, rc: bool = False) -> CaseScores:
    """Dice and HD95 on WT, TC, ET (and RC with ``rc``, where ``convention`` has it) of a predicted label map against
    its reference, both in ``convention``."""
    ref, pred = np.asarray(ref), np.asarray(pred)
    if ref.shape != pred.shape:
        raise ValueError(f"shapes differ: reference {ref.shape}, prediction {pred.shape}")
    ref_regions = region_masks(ref, convention, rc=rc)
    pred_regions, et_removed = remove_small_et(region_masks(pred, convention, rc=rc), et_min_voxels)
    scores = {}
    for region in ref_regions:
        scores[f"Dice_{region}"] = dice(pred_regions[region], ref_regions[region])
        scores[f"HD95_{region}"] = hd95(pred_regions[region], ref_regions[region], spacing)
    return CaseScores({k: scores[k] for k in metric_columns(ref_regions)}, et_removed)


def both_empty_score(column: str) -> float:
    """The score of a region that neither mask holds: Dice 1, HD95 0."""
    return 1.0 if column.startswith("Dice") else 0.0


def missing_prediction_scores(columns: Sequence[str] = METRIC_COLUMNS) -> dict[str, float]:
    """The penalty for a reference case without prediction: Dice 0 and HD95 :data:`HD95_EMPTY` on every region."""
    return {k: (0.0 if k.startswith("Dice") else HD95_EMPTY) for k in columns}


def aggregate(rows: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and median over cases of every metric of the rows (all rows have the same keys).

    The standard deviation is the sample one (``ddof=1``, as pandas' and the BraTS metrics parser's), and 0 for a
    single case. Raises ValueError for no rows.
    """
    if not rows:
        raise ValueError("no cases to aggregate")
    columns = list(rows[0])
    table = np.array([[float(r[k]) for k in columns] for r in rows], dtype=np.float64)
    std = table.std(axis=0, ddof=1) if len(rows) > 1 else np.zeros(len(columns))
    stats = {"mean": table.mean(axis=0), "std": std, "median": np.median(table, axis=0)}
    return {name: {k: float(v) for k, v in zip(columns, stats[name])} for name in AGGREGATES}
