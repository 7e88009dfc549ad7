"""BraTS label conventions and nnU-Net's region encoding.

nnU-Net (and nnalign) store 0 background, 1 edema, 2 necrosis / non-enhancing core, 3 enhancing tumour, and train
on the regions WT = (1, 2, 3), TC = (2, 3), ET = (3,) with ``regions_class_order`` (1, 2, 3), exactly as nnU-Net's
``Dataset137_BraTS21`` conversion. BraTS releases label 1 necrosis, 2 edema, and enhancing tumour 4 (2017-2021) or 3
(2023 onwards).
"""
from __future__ import annotations

import numpy as np

NNUNET_LABELS: dict[str, int | list[int]] = {
    "background": 0,
    "whole tumor": [1, 2, 3],
    "tumor core": [2, 3],
    "enhancing tumor": [3],
}
REGIONS_CLASS_ORDER: list[int] = [1, 2, 3]
REGION_NAMES: tuple[str, ...] = ("WT", "TC", "ET")
# Region membership in nnU-Net labels, in REGION_NAMES order.
NNUNET_REGIONS: tuple[tuple[int, ...], ...] = ((1, 2, 3), (2, 3), (3,))

# Label conventions of BraTS releases: the value used for enhancing tumour.
CONVENTIONS: dict[str, int] = {"brats2018": 4, "brats2023": 3}


def detect_convention(values: set[int]) -> str | None:
    """The convention a set of label values implies: ``brats2018`` (has 4), ``brats2023`` (has 3), or None.

    Raises ValueError for values outside {0, 1, 2, 3} and {0, 1, 2, 4}, including both 3 and 4.
    """
    allowed_2018, allowed_2023 = {0, 1, 2, 4}, {0, 1, 2, 3}
    if values <= allowed_2018 and values <= allowed_2023:
        return None
    if values <= allowed_2018:
        return "brats2018"
    if values <= allowed_2023:
        return "brats2023"
    bad = sorted(values - (allowed_2018 | allowed_2023)) or [3, 4]
    raise ValueError(f"unexpected label values {bad} (BraTS uses 0/1/2/4 or 0/1/2/3)")


def brats_to_nnunet(seg: np.ndarray) -> np.ndarray:
    """Map a BraTS segmentation (either convention) to nnU-Net labels (edema 1, necrosis 2, enhancing 3).

    Raises ValueError on any value outside the BraTS conventions or on non-integer values.
    """
    arr = np.asarray(seg)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError("segmentation holds non-integer values")
    values = {int(v) for v in np.unique(arr)}
    detect_convention(values)
    out = np.zeros(arr.shape, dtype=np.uint8)
    out[arr == 2] = 1
    out[arr == 1] = 2
    out[(arr == 3) | (arr == 4)] = 3
    return out


def nnunet_to_brats(seg: np.ndarray, convention: str = "brats2018") -> np.ndarray:
    """Map nnU-Net labels back to a BraTS convention (``brats2018``: ET = 4, ``brats2023``: ET = 3)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown label convention '{convention}' (known: {', '.join(CONVENTIONS)})")
    arr = np.asarray(seg)
    out = np.zeros(arr.shape, dtype=np.uint8)
    out[arr == 1] = 2
    out[arr == 2] = 1
    out[arr == 3] = CONVENTIONS[convention]
    return out


def region_masks(seg: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean WT, TC and ET masks of an nnU-Net-labelled segmentation."""
    return {name: np.isin(seg, labels) for name, labels in zip(REGION_NAMES, NNUNET_REGIONS)}
