"""Per-case Dice and HD95 on the BraTS regions WT, TC and ET, with the BraTS edge-case conventions.

Conventions (those of the BraTS 2017-2019 evaluation and of the missing-modality literature):

- both masks empty: Dice 1, HD95 0;
- exactly one mask empty: Dice 0, HD95 :data:`HD95_EMPTY` = 373.13 mm, the diagonal of the 240 x 240 x 155 BraTS volume;
- otherwise Dice = 2|P & R| / (|P| + |R|) and HD95 = the 95th percentile of the symmetric surface distances in mm,
  computed by MedPy (``medpy.metric.binary.hd95``, surfaces from a 6-connected erosion) with the image spacing.

Arrays are numpy arrays in any axis order; ``spacing`` gives the voxel size along the same axes (for a SimpleITK
image read with ``GetArrayFromImage``, that is ``image.GetSpacing()[::-1]``). This module imports neither torch nor
nnunetv2, so it also runs in a plain numpy/scipy/MedPy environment.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from nnalign.data.labels import REGION_NAMES

HD95_EMPTY = 373.13  # mm: sqrt(240^2 + 240^2 + 155^2), the BraTS penalty when exactly one mask is empty
METRIC_COLUMNS: tuple[str, ...] = tuple(f"{m}_{r}" for m in ("Dice", "HD95") for r in REGION_NAMES)
AGGREGATES: tuple[str, ...] = ("mean", "std", "median")

# Region membership (WT, TC, ET) per label convention.
LABEL_CONVENTIONS: dict[str, dict[str, tuple[int, ...]]] = {
    # nnU-Net / nnalign datasets: 1 edema, 2 necrosis / non-enhancing core, 3 enhancing tumour.
    "nnunet": {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)},
    # BraTS 2017-2021 releases: 1 necrosis / non-enhancing core, 2 edema, 4 enhancing tumour.
    "brats2018": {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
    # BraTS 2023+ releases: 1 necrosis (NETC), 2 edema (SNFH), 3 enhancing tumour.
    "brats2023": {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
}
LABEL_CHOICES: tuple[str, ...] = ("auto", *LABEL_CONVENTIONS)


def label_values(seg: np.ndarray) -> set[int]:
    """The label values of a segmentation; ValueError if it holds non-integer values."""
    values = np.unique(np.asarray(seg))
    if values.dtype.kind == "f" and (not np.all(np.isfinite(values)) or not np.all(values == np.round(values))):
        raise ValueError("segmentation holds non-integer values (is this an image rather than a label map?)")
    if values.dtype.kind not in "biuf":
        raise ValueError(f"segmentation has non-numeric type {values.dtype}")
    return {int(v) for v in values}


def check_labels(values: Iterable[int], convention: str) -> None:
    """ValueError if ``values`` holds a label the convention does not use (0 plus the labels of its regions)."""
    allowed = {0}.union(*LABEL_CONVENTIONS[convention].values())
    bad = sorted(set(values) - allowed)
    if bad:
        raise ValueError(f"label value(s) {bad} are not in the {convention} convention "
                         f"(labels {sorted(allowed)}); pass the right --labels")


def resolve_convention(requested: str, values: Iterable[int], nnunet_naming: bool) -> str:
    """The label convention to score with.

    An explicit convention is returned unchanged. ``auto``: ``brats2018`` if label 4 occurs (``values`` should hold the
    labels of both reference and prediction); otherwise ``nnunet`` when the reference file has nnU-Net naming (a flat
    ``<case>.nii.gz``, as in labelsTr/labelsTs) and ``brats2023`` when it has BraTS naming (``<case>_seg.nii.gz`` or
    ``<case>-seg.nii.gz``). Auto-detection cannot tell a flat BraTS 2018 file without enhancing tumour from an nnU-Net
    one (they put necrosis and edema on different labels), which is why an explicit ``--labels`` is the reliable way.
    """
    if requested != "auto":
        if requested not in LABEL_CONVENTIONS:
            raise ValueError(f"unknown label convention '{requested}' (known: {', '.join(LABEL_CHOICES)})")
        return requested
    if 4 in set(values):
        return "brats2018"
    return "nnunet" if nnunet_naming else "brats2023"


def region_masks(seg: np.ndarray, convention: str) -> dict[str, np.ndarray]:
    """Boolean WT, TC and ET masks of a label map in the given convention (``nnunet``, ``brats2018``, ``brats2023``)."""
    if convention not in LABEL_CONVENTIONS:
        raise ValueError(f"unknown label convention '{convention}' (known: {', '.join(LABEL_CONVENTIONS)})")
    seg = np.asarray(seg)
    return {name: np.isin(seg, labels) for name, labels in LABEL_CONVENTIONS[convention].items()}


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
                 et_min_voxels: int = 0) -> CaseScores:
    """Dice and HD95 on WT, TC and ET of a predicted label map against its reference, both in ``convention``."""
    ref, pred = np.asarray(ref), np.asarray(pred)
    if ref.shape != pred.shape:
        raise ValueError(f"shapes differ: reference {ref.shape}, prediction {pred.shape}")
    ref_regions = region_masks(ref, convention)
    pred_regions, et_removed = remove_small_et(region_masks(pred, convention), et_min_voxels)
    scores = {}
    for region in REGION_NAMES:
        scores[f"Dice_{region}"] = dice(pred_regions[region], ref_regions[region])
        scores[f"HD95_{region}"] = hd95(pred_regions[region], ref_regions[region], spacing)
    return CaseScores({k: scores[k] for k in METRIC_COLUMNS}, et_removed)


def missing_prediction_scores() -> dict[str, float]:
    """The penalty for a reference case without prediction: Dice 0 and HD95 :data:`HD95_EMPTY` on every region."""
    return {k: (0.0 if k.startswith("Dice") else HD95_EMPTY) for k in METRIC_COLUMNS}


def aggregate(rows: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and median over cases of every metric in :data:`METRIC_COLUMNS`.

    The standard deviation is the sample one (``ddof=1``, as pandas' and the BraTS metrics parser's), and 0 for a
    single case. Raises ValueError for no rows.
    """
    if not rows:
        raise ValueError("no cases to aggregate")
    table = np.array([[float(r[k]) for k in METRIC_COLUMNS] for r in rows], dtype=np.float64)
    std = table.std(axis=0, ddof=1) if len(rows) > 1 else np.zeros(len(METRIC_COLUMNS))
    stats = {"mean": table.mean(axis=0), "std": std, "median": np.median(table, axis=0)}
    return {name: {k: float(v) for k, v in zip(METRIC_COLUMNS, stats[name])} for name in AGGREGATES}
