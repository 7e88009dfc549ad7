"""The report of one segmented case: the modalities found and missing, the model chosen and why, the volume of each
region in millilitres, the Dice the model is expected to reach on this modality subset, and warnings in words.

``nnalign_predict`` writes it as ``OUT/<case>.json`` beside the segmentation and as one row of
``OUT/nnalign_predict_report.csv``; ``nnalign.Segmenter`` returns it. Everything here works on what prediction
already holds (the label map, its spacing, the model), so a report costs milliseconds; nothing imports torch.

The expected Dice is the model's validation over its folds, only where the validation saw exactly the modalities the
case was segmented from (a student on its subset, any other model on all modalities): per fold, nnalign's scores of
the validation predictions (``validation/nnalign_metrics.json``, written when ``nnalign_report`` scores a fold)
where they are up to date, else nnU-Net's ``validation/summary.json``; folds are weighted by their cases.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from nnalign.atomic import write_text_atomic
from nnalign.data.label_volumes import merge_ranges, region_volumes_ml, volume_warnings
from nnalign.data.labels import CAVITY, REGION_NAMES
from nnalign.evaluation.validation import CACHE_FILE, is_scored, read_evaluation, read_validation_summary
from nnalign.inference.models import Model
from nnalign.model_folders import EVALUATION_FILE, evaluation_folder, fold_folder
from nnalign.training.record import TRAINING_VOLUMES, read_settings_record

REPORT_CSV = "nnalign_predict_report.csv"
CSV_COLUMNS = ("case", "modalities_present", "modalities_missing", "model", "reason",
               *(f"volume_{r}_ml" for r in (*REGION_NAMES, "RC")),
               *(f"expected_dice_{r}" for r in REGION_NAMES), "expected_dice_n", "warnings")


def has_cavity(model: Model) -> bool:
    """Whether the model segments the resection cavity (its dataset.json has that label)."""
    return CAVITY in (model.dataset_json.get("labels") or {})


def expected_dice(model: Model, used: Sequence[str]) -> tuple[dict | None, str]:
    """The Dice of WT, TC, ET the model reached on ``used`` with ``n`` (cases), and where it comes from: its
    validation where that saw exactly ``used``, else a held-out evaluation of the model from ``used`` alone (what
    ``nnalign_experiment`` and ``nnalign_demo`` write, :func:`~nnalign.model_folders.evaluation_folder`); (None, why)
    if there is neither."""
    if set(used) == set(model.subset):
        found = [s for s in map(_fold_scores, (fold_folder(model.folder, f) for f in model.folds)) if s]
        if found:
            n = sum(count for _, count, _ in found)
            dice = {r: round(sum(d[r] * count for d, count, _ in found) / n, 4) for r in REGION_NAMES}
            sources = sorted({source for _, _, source in found})
            return {**dice, "n": n}, (f"validation of fold(s) {', '.join(map(str, model.folds))} "
                                      f"({', '.join(sources)})")
    path = evaluation_folder(model.folder.parent, model.name, [m for m in model.modalities if m in used]) \
        / EVALUATION_FILE
    metrics = read_evaluation(path) if path.is_file() else None
    if metrics is not None and metrics.num_cases:
        return ({**{r: round(metrics.dice[r], 4) for r in REGION_NAMES}, "n": metrics.num_cases},
                f"held-out evaluation from {'+'.join(used)} ({path})")
    if set(used) != set(model.subset):
        return None, (f"none: the model's validation saw {'+'.join(model.subset)}, not {'+'.join(used)}, and no "
                      f"held-out evaluation from {'+'.join(used)} was found")
    return None, "none: no per-region validation Dice in the model's folds"


def _fold_scores(fold_dir: Path) -> tuple[dict[str, float], int, str] | None:
    """(Dice per region, cases, file) of one fold's validation: nnalign's up-to-date scores, else nnU-Net's."""
    if is_scored(fold_dir):
        metrics = read_evaluation(fold_dir / "validation" / CACHE_FILE)
        if metrics is not None and metrics.num_cases:
            return metrics.dice, metrics.num_cases, CACHE_FILE
    summary = read_validation_summary(fold_dir)
    if summary is not None and summary.region_dice is not None and summary.num_cases:
        return summary.region_dice, summary.num_cases, "summary.json"
    return None


def training_volumes(model: Model) -> dict[str, dict]:
    """The range of the training cases' region volumes over the model's folds (their settings records;
    :func:`~nnalign.data.label_volumes.volume_range`); {} for models trained before it was recorded."""
    ranges = [(read_settings_record(fold_folder(model.folder, f)) or {}).get(TRAINING_VOLUMES) for f in model.folds]
    return merge_ranges([r for r in ranges if isinstance(r, dict)])


def case_warnings(volumes: dict[str, float], used: Sequence[str], training: dict[str, dict] | None = None,
                  notes: Sequence[str] = ()) -> list[str]:
    """Warnings in words: enhancing tumour predicted without T1ce, empty regions, volumes far outside the
    ``training`` range (:func:`training_volumes`), and ``notes`` (e.g. sequences resampled)."""
    found = list(notes)
    if volumes["ET"] > 0 and "T1ce" not in used:
        found.append(f"enhancing tumour (ET, {volumes['ET']:g} mL) predicted without T1ce: enhancement cannot be seen "
                     f"without the contrast-enhanced sequence, so ET (and TC) are uncertain")
    if volumes["WT"] == 0:
        found.append("no tumour predicted: WT, TC and ET are empty")
    else:
        found += [f"{r} is empty" for r in ("TC", "ET") if volumes[r] == 0]
    return found + volume_warnings(volumes, training or {})


def case_report(case_id: str, present: Sequence[str], used: Sequence[str], model: Model, reason: str,
                convention: str, seg: np.ndarray, spacing: Sequence[float], notes: Sequence[str] = ()) -> dict:
    """The report of one case from its nnU-Net-labelled segmentation ``seg`` and its ``spacing`` (mm); ``notes``
    join its warnings."""
    from nnalign import __version__

    volumes = region_volumes_ml(seg, spacing, rc=has_cavity(model))
    dice, source = expected_dice(model, used)
    return {"case": case_id, "nnalign_version": __version__, "modalities_present": list(present),
            "modalities_missing": [m for m in model.modalities if m not in present],
            "modalities_used": list(used), "model": model.name, "model_folder": str(model.folder.resolve()),
            "folds": list(model.folds), "reason": reason, "labels": convention, "volumes_ml": volumes,
            "expected_dice": dice, "expected_dice_source": source,
            "warnings": case_warnings(volumes, used, training_volumes(model), notes)}


def csv_row(report: dict) -> dict:
    """The report as one row of ``CSV_COLUMNS`` (lists joined; a missing volume or Dice empty)."""
    dice = report["expected_dice"] or {}
    return {"case": report["case"], "modalities_present": ",".join(report["modalities_present"]),
            "modalities_missing": ",".join(report["modalities_missing"]), "model": report["model"],
            "reason": report["reason"],
            **{f"volume_{r}_ml": report["volumes_ml"].get(r, "") for r in (*REGION_NAMES, "RC")},
            **{f"expected_dice_{r}": dice.get(r, "") for r in REGION_NAMES}, "expected_dice_n": dice.get("n", ""),
            "warnings": "; ".join(report["warnings"])}


class ReportTable:
    """``OUT/nnalign_predict_report.csv``: one row per predicted case, merged with an earlier run's (a skipped case
    keeps its row) and rewritten atomically after every case, as the log is."""

    def __init__(self, output: Path) -> None:
        self.path = Path(output) / REPORT_CSV
        self.rows: dict[str, dict] = {}
        try:
            with self.path.open(newline="") as f:
                self.rows = {row["case"]: row for row in csv.DictReader(f) if row.get("case")}
        except (OSError, ValueError, KeyError, csv.Error):
            pass  # no earlier table, or one that cannot be parsed: start afresh

    def update(self, report: dict) -> None:
        self.rows[report["case"]] = csv_row(report)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows[k] for k in sorted(self.rows))
        write_text_atomic(self.path, buffer.getvalue())
