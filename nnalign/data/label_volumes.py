"""Region volumes of label maps, and the range a model's training cases span.

A trainer records the range of its training cases' volumes per region (:func:`volume_range`, in its settings
record); a prediction's report compares each predicted volume with it (:func:`volume_warnings`), since a volume far
outside what the model was trained on is a reason to look twice. The per-case volumes come from nnU-Net's copy of the
training labels (``gt_segmentations`` beside the preprocessed data) and are kept in :data:`VOLUMES_FILE` there, so
each label map is read once per dataset.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from nnalign.atomic import write_json_atomic
from nnalign.data.labels import region_labels

VOLUMES_FILE = "nnalign_label_volumes.json"
FAR_OUTSIDE = 2.0
"""A volume above this many times the largest training volume, or below the smallest non-zero one divided by it, is
far outside the training range."""


def region_volumes_ml(seg: np.ndarray, spacing: Sequence[float], rc: bool = False) -> dict[str, float]:
    """Volume in mL (to 0.1 mm^3) of WT, TC, ET (and RC with ``rc``) of an nnU-Net-labelled map; ``spacing`` in mm."""
    counts = np.bincount(np.asarray(seg).ravel(), minlength=5)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {region: round(float(sum(counts[v] for v in values)) * voxel_ml, 4)
            for region, values in region_labels("nnunet", rc=rc).items()}


def case_volumes(preprocessed_dataset: str | Path, cases: Iterable[str], file_ending: str,
                 rc: bool = False) -> dict[str, dict[str, float]]:
    """``{case: region volumes in mL}`` of the training labels of ``cases`` (nnU-Net's ``gt_segmentations``),
    read once and kept in :data:`VOLUMES_FILE` where the folder is writable; cases whose label file is absent or
    unreadable are left out."""
    import SimpleITK as sitk

    folder = Path(preprocessed_dataset)
    store = folder / VOLUMES_FILE
    try:
        known = json.loads(store.read_text())["cases"]
    except (OSError, ValueError, KeyError, TypeError):
        known = {}
    wanted = list(cases)
    new = {}
    for case in wanted:
        if case in known:
            continue
        path = folder / "gt_segmentations" / f"{case}{file_ending}"
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:  # absent or unreadable: the range leaves the case out, training goes on
            continue
        new[case] = region_volumes_ml(sitk.GetArrayFromImage(image), image.GetSpacing(), rc=rc)
    if new:
        known.update(new)
        with contextlib.suppress(OSError):  # a read-only preprocessed folder: measured again next time
            write_json_atomic(store, {"cases": known})
    return {case: known[case] for case in wanted if case in known}


def volume_range(volumes: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per region the largest volume, the smallest non-zero one (None if every case lacks it) and the number of
    cases, over ``volumes`` (``{case: region volumes}``)."""
    regions = sorted({r for v in volumes.values() for r in v})
    result = {}
    for region in regions:
        values = [v[region] for v in volumes.values() if region in v]
        nonzero = [x for x in values if x > 0]
        result[region] = {"max": max(values), "min_nonzero": min(nonzero) if nonzero else None, "cases": len(values)}
    return result


def _is_range(r) -> bool:
    """Whether ``r`` is one region's entry of :func:`volume_range` (a record is user input: anything else is
    ignored)."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) and x >= 0

    return (isinstance(r, dict) and number(r.get("max")) and (r.get("min_nonzero") is None or number(r["min_nonzero"]))
            and isinstance(r.get("cases"), int) and not isinstance(r["cases"], bool))


def merge_ranges(ranges: Sequence[Mapping[str, Mapping]]) -> dict[str, dict]:
    """One range from several folds' (largest of the maxima, smallest of the minima; cases of the largest fold);
    entries that are not such ranges are left out."""
    merged: dict[str, dict] = {}
    for found in ranges:
        for region, r in found.items():
            if not _is_range(r):
                continue
            m = merged.setdefault(region, {"max": r["max"], "min_nonzero": r["min_nonzero"], "cases": r["cases"]})
            m["max"] = max(m["max"], r["max"])
            lows = [x for x in (m["min_nonzero"], r["min_nonzero"]) if x is not None]
            m["min_nonzero"] = min(lows) if lows else None
            m["cases"] = max(m["cases"], r["cases"])
    return merged


def volume_warnings(volumes: Mapping[str, float], training: Mapping[str, Mapping]) -> list[str]:
    """A sentence for each predicted region volume far outside the training cases' range (:data:`FAR_OUTSIDE`)."""
    found = []
    for region, volume in volumes.items():
        r = training.get(region)
        if not r or volume <= 0:
            continue
        low, high = r["min_nonzero"], r["max"]
        span = f"{low:g}-{high:g} mL" if low is not None else f"up to {high:g} mL"
        if volume > FAR_OUTSIDE * high:
            found.append(f"{region} {volume:g} mL is far above the training cases' range ({span}, {r['cases']} cases): "
                         f"check the segmentation")
        elif low is not None and volume < low / FAR_OUTSIDE:
            found.append(f"{region} {volume:g} mL is far below the training cases' range ({span}, {r['cases']} cases): "
                         f"check the segmentation")
    return found
