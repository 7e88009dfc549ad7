"""Scores of a trained model's validation predictions: nnalign's own (cached per fold), an ``nnalign_evaluate`` JSON,
or nnU-Net's ``validation/summary.json``.

A fold folder ``fold_{f}/`` of nnU-Net's results holds its validation predictions ``validation/<case>.nii.gz``
(nnU-Net labels) and nnU-Net's ``validation/summary.json``. :func:`score_validation_fold` scores the predictions with
:func:`nnalign.evaluation.evaluate.score_case` and caches the scores as ``validation/nnalign_metrics.json``;
:func:`read_validation_summary` reads what nnU-Net wrote. Nothing here imports torch or nnU-Net.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nnalign.data.labels import REGION_NAMES

CACHE_FILE = "nnalign_metrics.json"
SUMMARY_FILE = "summary.json"
_NIFTI_ENDINGS = (".nii.gz", ".nii")
# nnU-Net's summary.json keys for the BraTS regions (str of the region tuple), in REGION_NAMES order.
_SUMMARY_REGION_KEYS = ("(1, 2, 3)", "(2, 3)", "(3,)")


@dataclass(frozen=True)
class Metrics:
    """Mean Dice (0-1) and HD95 (mm) per region over ``num_cases`` cases, and where they came from."""

    dice: dict[str, float]
    hd95: dict[str, float] | None
    num_cases: int
    source: str

    @property
    def dice_avg(self) -> float:
        return sum(self.dice[r] for r in REGION_NAMES) / len(REGION_NAMES)

    @property
    def hd95_avg(self) -> float | None:
        return None if self.hd95 is None else sum(self.hd95[r] for r in REGION_NAMES) / len(REGION_NAMES)


# ----------------------------------------------------------------------------------------------------------------------
# nnalign's scores of the validation predictions


def _nifti_stem(name: str) -> str | None:
    for ending in _NIFTI_ENDINGS:
        if name.endswith(ending) and len(name) > len(ending) and not name.startswith("."):
            return name[: -len(ending)]
    return None


def validation_predictions(fold_dir: Path) -> dict[str, Path]:
    """``{case: prediction}`` in a fold's ``validation/`` folder (nnU-Net's ``<case>.nii.gz``)."""
    folder = fold_dir / "validation"
    if not folder.is_dir():
        return {}
    found = {}
    for p in sorted(folder.iterdir()):
        stem = _nifti_stem(p.name)
        if stem is not None and p.is_file():
            found.setdefault(stem, p)
    return found


def reference_file(gt_folder: Path, case: str) -> Path | None:
    """``gt_folder/<case>.nii.gz`` (or ``.nii``) if it exists."""
    for ending in _NIFTI_ENDINGS:
        if (gt_folder / f"{case}{ending}").is_file():
            return gt_folder / f"{case}{ending}"
    return None


def _read_cache(cache: Path, predictions: dict[str, Path]) -> dict[str, dict[str, float]] | None:
    """The cached per-case scores if the cache covers exactly these predictions and is newer than all of them."""
    from nnalign.evaluation.metrics import HD95_EMPTY, METRIC_COLUMNS

    try:
        stamp = cache.stat().st_mtime
        payload = json.loads(cache.read_text())
        cases = payload["cases"]
        if payload.get("labels") != "nnunet" or payload.get("hd95_empty") != HD95_EMPTY or payload.get("errors"):
            return None
        if set(cases) != set(predictions) or any(p.stat().st_mtime > stamp for p in predictions.values()):
            return None
        return {case: {k: float(cases[case][k]) for k in METRIC_COLUMNS} for case in sorted(cases)}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_scored(fold_dir: Path) -> bool:
    """Whether the fold's cached scores are up to date, so that :func:`score_validation_fold` scores nothing."""
    return _read_cache(fold_dir / "validation" / CACHE_FILE, validation_predictions(fold_dir)) is not None


def score_validation_fold(fold_dir: Path, gt_folder: Path, on_error: Callable[[str], None] | None = None
                          ) -> dict[str, dict[str, float]] | None:
    """Per-case Dice and HD95 of a fold's validation predictions against ``gt_folder`` (both nnU-Net labels).

    Uses ``validation/nnalign_metrics.json`` when it is up to date; otherwise scores every case with
    :func:`nnalign.evaluation.evaluate.score_case` and rewrites that cache atomically (the JSON layout of
    ``nnalign_evaluate``). A case that cannot be scored is reported through ``on_error`` and left out. None when the
    fold has no predictions, or none could be scored.
    """
    from nnalign.atomic import write_text_atomic
    from nnalign.errors import CaseError
    from nnalign.evaluation.evaluate import score_case
    from nnalign.evaluation.metrics import HD95_EMPTY, METRIC_COLUMNS, aggregate
    from nnalign.data.brats_layout import NAMING_NNUNET
    from nnalign.evaluation.pairing import ReferenceFile

    predictions = validation_predictions(fold_dir)
    if not predictions:
        return None
    cache = fold_dir / "validation" / CACHE_FILE
    cached = _read_cache(cache, predictions)
    if cached is not None:
        return cached
    scores: dict[str, dict[str, float]] = {}
    cases: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for case, prediction in predictions.items():
        ref = reference_file(gt_folder, case)
        if ref is None:
            errors[case] = f"case {case}: no reference {gt_folder / (case + '.nii.gz')} for {prediction}"
            continue
        try:
            scored = score_case(ReferenceFile(case, ref, NAMING_NNUNET), prediction, "nnunet")
        except CaseError as e:
            errors[case] = f"case {case}: {e}"
            continue
        scores[case] = {k: scored.scores[k] for k in METRIC_COLUMNS}
        cases[case] = {"reference": str(ref), "prediction": str(prediction), "status": "ok", "labels": "nnunet",
                       "et_removed": scored.et_removed, **scores[case]}
    for message in errors.values():
        if on_error is not None:
            on_error(message)
    if not scores:
        return None
    payload = {"reference": str(gt_folder), "prediction": str(fold_dir / "validation"), "labels": "nnunet",
               "et_min_voxels": 0, "hd95_empty": HD95_EMPTY, "num_cases": len(scores),
               "aggregates": aggregate(list(scores.values())), "cases": cases, "missing_predictions": [],
               "ignored_predictions": [], "errors": errors}
    try:
        write_text_atomic(cache, json.dumps(payload, indent=2) + "\n")
    except OSError as e:  # a read-only results folder: report from memory
        if on_error is not None:
            on_error(f"cannot write the metrics cache {cache}: {e.strerror or e}")
    return scores


def read_evaluation(path: Path, source: str | None = None) -> Metrics | None:
    """Metrics from an ``nnalign_evaluate`` JSON (its ``aggregates.mean`` and ``num_cases``); None if unreadable."""
    try:
        payload = json.loads(path.read_text())
        mean = payload["aggregates"]["mean"]
        dice = {r: float(mean[f"Dice_{r}"]) for r in REGION_NAMES}
        hd95 = {r: float(mean[f"HD95_{r}"]) for r in REGION_NAMES}
        count = int(payload.get("num_cases") or len(payload.get("cases") or {}))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Metrics(dice, hd95, count, source or f"evaluation {path}")


# ----------------------------------------------------------------------------------------------------------------------
# nnU-Net's summary.json


@dataclass(frozen=True)
class ValidationSummary:
    """What nnU-Net's ``fold_*/validation/summary.json`` says (its means leave out cases where a region is empty in
    both the prediction and the reference)."""

    foreground_dice: float | None  # ``foreground_mean`` Dice; None if absent or not finite
    region_dice: dict[str, float] | None  # mean Dice of WT, TC, ET; None unless each is there and finite
    num_cases: int  # entries of ``metric_per_case``


def _dice(entry: Any) -> float | None:
    """``entry["Dice"]`` as a finite float, else None."""
    try:
        value = float(entry["Dice"])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_validation_summary(fold_dir: Path) -> ValidationSummary | None:
    """The fold's ``validation/summary.json``; None if it is missing or not a JSON object."""
    try:
        summary = json.loads((fold_dir / "validation" / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    means = summary.get("mean") if isinstance(summary.get("mean"), dict) else {}
    regions = {r: _dice(means.get(key)) for r, key in zip(REGION_NAMES, _SUMMARY_REGION_KEYS)}
    cases = summary.get("metric_per_case")
    return ValidationSummary(foreground_dice=_dice(summary.get("foreground_mean")),
                             region_dice=None if None in regions.values() else regions,
                             num_cases=len(cases) if isinstance(cases, list) else 0)
