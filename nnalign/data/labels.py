"""BraTS label conventions, their detection, and nnU-Net's region encoding.

A convention says which value each tissue has. nnU-Net (and nnalign) store 0 background, 1 edema, 2 necrosis /
non-enhancing core, 3 enhancing tumour and, in datasets converted from BraTS 2024+, 4 resection cavity; they train on
the regions WT = (1, 2, 3), TC = (2, 3), ET = (3,) (and RC = (4,)) with ``regions_class_order`` (1, 2, 3[, 4]),
exactly as nnU-Net's ``Dataset137_BraTS21`` conversion. BraTS releases label 1 necrosis (NCR/NETC), 2 edema (ED/SNFH)
and enhancing tumour 4 (2017-2021) or 3 (2023 onwards); BraTS 2024/2025 GLI adds 4 resection cavity (RC). RC belongs
to no tumour region and is scored as a region of its own.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

NECROSIS, EDEMA, ENHANCING, CAVITY = "necrosis", "edema", "enhancing tumour", "resection cavity"
# Tissue -> label value, per convention.
CONVENTIONS: dict[str, dict[str, int]] = {
    "nnunet": {EDEMA: 1, NECROSIS: 2, ENHANCING: 3, CAVITY: 4},
    "brats2018": {NECROSIS: 1, EDEMA: 2, ENHANCING: 4},
    "brats2023": {NECROSIS: 1, EDEMA: 2, ENHANCING: 3},
    "brats2024": {NECROSIS: 1, EDEMA: 2, ENHANCING: 3, CAVITY: 4},
}
BRATS_CONVENTIONS: tuple[str, ...] = tuple(c for c in CONVENTIONS if c.startswith("brats"))
REGION_NAMES: tuple[str, ...] = ("WT", "TC", "ET")  # the tumour regions, in every dataset
RC = "RC"  # the resection cavity, a region of its own where the convention has it
REGION_TISSUES: dict[str, tuple[str, ...]] = {
    "WT": (NECROSIS, EDEMA, ENHANCING), "TC": (NECROSIS, ENHANCING), "ET": (ENHANCING,), RC: (CAVITY,)}
NNUNET_NAMES: dict[str, str] = {"WT": "whole tumor", "TC": "tumor core", "ET": "enhancing tumor", RC: CAVITY}


def region_labels(convention: str, rc: bool = True) -> dict[str, tuple[int, ...]]:
    """Label values of WT, TC, ET in ``convention``, and of RC with ``rc`` where the convention has it."""
    table = _table(convention)
    names = [*REGION_NAMES, *([RC] if rc and CAVITY in table else [])]
    return {r: tuple(sorted(table[t] for t in REGION_TISSUES[r])) for r in names}


def nnunet_dataset_labels(cavity: bool) -> tuple[dict[str, int | list[int]], list[int]]:
    """dataset.json ``labels`` and ``regions_class_order`` of an nnalign dataset, with or without the RC region.

    nnU-Net paints each predicted region with its ``regions_class_order`` label in turn, so each region's is its
    lowest label (WT 1, TC 2, ET 3, RC 4): the nested regions painted after it overwrite the rest.
    """
    regions = region_labels("nnunet", rc=cavity)
    labels: dict[str, int | list[int]] = {"background": 0}
    labels.update({NNUNET_NAMES[r]: list(v) for r, v in regions.items()})
    return labels, [min(v) for v in regions.values()]


def allowed_values(convention: str) -> set[int]:
    """0 and the label values of ``convention``."""
    return {0, *_table(convention).values()}


def _table(convention: str) -> dict[str, int]:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown label convention '{convention}' (known: {', '.join(CONVENTIONS)})")
    return CONVENTIONS[convention]


def label_values(seg: np.ndarray) -> set[int]:
    """The label values of a segmentation; ValueError if it holds non-integer values."""
    values = np.unique(np.asarray(seg))
    if values.dtype.kind == "f" and (not np.all(np.isfinite(values)) or not np.all(values == np.round(values))):
        bad = next(float(v) for v in values if not np.isfinite(v) or v != np.round(v))
        raise ValueError(f"segmentation holds non-integer values such as {bad:g} (is this an image rather than a "
                         f"label map?)")
    if values.dtype.kind not in "biuf":
        raise ValueError(f"segmentation has non-numeric type {values.dtype}")
    return {int(v) for v in values}


def check_labels(values: Iterable[int], convention: str) -> None:
    """ValueError if ``values`` holds a label the convention does not use."""
    allowed = allowed_values(convention)
    bad = sorted(set(values) - allowed)
    if bad:
        raise ValueError(f"label value(s) {bad} are not in the {convention} convention (labels {sorted(allowed)})")


def check_brats_values(values: Iterable[int]) -> None:
    """ValueError if ``values`` hold a label of no BraTS convention."""
    bad = sorted(set(values) - allowed_values("brats2024"))
    if bad:
        raise ValueError(f"label value(s) {bad} belong to no BraTS convention (2018-2021: 0, 1, 2, 4; 2023: 0, 1, 2, "
                         f"3; 2024+: 0, 1, 2, 3, 4 with 4 the resection cavity)")


def detect_convention(values_by_case: Mapping[str, Iterable[int]], new_naming: bool) -> str:
    """The BraTS convention of a whole release, from the label values of all its cases and its file names.

    ``new_naming``: the files carry BraTS 2023+ names (``-t2f``, ``-seg``). The rule:

    - every value must be one of 0-4, else ValueError naming the first case that has another;
    - 2023+ names: ``brats2024`` if any case has label 4 (2023 never used 4, so it is the resection cavity), else
      ``brats2023`` (labels 1, 2, 3 mean the same in 2023 and 2024; 2024 cases without RC read identically);
    - 2018-2021 names: ``brats2018`` if label 4 occurs, ``brats2023`` if label 3 does, ``brats2018`` if neither;
      both 3 and 4 is a ValueError naming a case with each (2024 labels under 2018-2021 names: pass the convention
      explicitly).

    PED (pediatric) releases give 1-4 other meanings and are not recognised.
    """
    with_value: dict[int, list[str]] = {3: [], 4: []}
    for case, values in values_by_case.items():
        values = set(values)
        try:
            check_brats_values(values)
        except ValueError as e:
            raise ValueError(f"{case}: {e}") from None
        for v in with_value:
            if v in values:
                with_value[v].append(case)
    if new_naming:
        return "brats2024" if with_value[4] else "brats2023"
    if with_value[3] and with_value[4]:
        both = [c for c in with_value[3] if c in with_value[4]]
        where = (f"{both[0]} has both" if both else
                 f"{with_value[3][0]} has label 3, {with_value[4][0]} has label 4")
        raise ValueError(f"{where}: enhancing tumour 3 and 4 in one release with BraTS 2018-2021 file names; pass "
                         f"--labels brats2024 if 4 is the resection cavity, or convert the releases separately")
    return "brats2023" if with_value[3] else "brats2018"


def relabel(seg: np.ndarray, source: str, target: str) -> np.ndarray:
    """Map a label map from convention ``source`` to ``target`` tissue by tissue; uint8.

    ValueError for a value ``source`` does not use, or a tissue present in ``seg`` that ``target`` has no label for
    (the resection cavity in ``brats2018`` or ``brats2023``).
    """
    arr = np.asarray(seg)
    check_labels(label_values(arr), source)
    to = _table(target)
    out = np.zeros(arr.shape, dtype=np.uint8)
    for tissue, value in _table(source).items():
        mask = arr == value
        if tissue not in to:
            if mask.any():
                raise ValueError(f"the {tissue} (label {value} in {source}) has no label in {target}; use "
                                 f"{' or '.join(c for c in CONVENTIONS if tissue in CONVENTIONS[c])}")
            continue
        out[mask] = to[tissue]
    return out


def brats_to_nnunet(seg: np.ndarray, convention: str) -> np.ndarray:
    """A BraTS segmentation in ``convention`` in nnU-Net labels (see :func:`relabel`)."""
    return relabel(seg, convention, "nnunet")


def nnunet_to_brats(seg: np.ndarray, convention: str = "brats2018") -> np.ndarray:
    """An nnU-Net-labelled segmentation in a BraTS convention (see :func:`relabel`)."""
    return relabel(seg, "nnunet", convention)


def region_masks(seg: np.ndarray, convention: str = "nnunet", rc: bool = False) -> dict[str, np.ndarray]:
    """Boolean WT, TC and ET masks (and RC with ``rc``, where the convention has it) of a label map."""
    seg = np.asarray(seg)
    return {name: np.isin(seg, values) for name, values in region_labels(convention, rc=rc).items()}
