"""``nnalign_evaluate``'s engine: score every case, aggregate, and write the CSV, the JSON and a Markdown summary.

A case whose files cannot be read, whose prediction is not on the reference's voxel grid (shape, spacing, origin,
direction; axes saved in another order or flipped are reordered), or whose labels do not fit the label convention
is reported as one line naming both files and left out; the others are still scored and written. A reference case
without a prediction is scored as the BraTS parser does: Dice 0 and HD95 373.13 on every region.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from nnalign.atomic import check_writable, write_texts_atomic
from nnalign.data.case_checks import voxel_problem
from nnalign.data.labels import REGION_NAMES
from nnalign.evaluation.metrics import (AGGREGATES, HD95_EMPTY, LABEL_CHOICES, METRIC_COLUMNS, aggregate, case_metrics,
                                        check_labels, label_values, missing_prediction_scores, resolve_convention)
from nnalign.evaluation.geometry import on_reference_grid
from nnalign.evaluation.pairing import ReferenceFile, pair_cases
from nnalign.errors import CaseError, NnalignError, one_line

METRICS_FILE = "metrics.csv"


@dataclass
class EvaluationReport:
    """What ``evaluate`` scored and wrote."""

    scores: dict[str, dict[str, float]]  # case -> METRIC_COLUMNS, missing predictions included
    aggregates: dict[str, dict[str, float]]  # "mean" / "std" / "median" -> METRIC_COLUMNS
    cases: dict[str, dict]  # case -> files, status, label convention, ET post-processing (the JSON's per-case part)
    missing: list[str] = field(default_factory=list)
    ignored_predictions: list[Path] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    csv_path: Path | None = None
    json_path: Path | None = None


def read_label_image(path: Path):
    """A label map as a SimpleITK image; CaseError if it cannot be read, is truncated (the check
    nnalign_convert_brats and nnalign_predict run on their inputs) or holds NaN or infinite values."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        problem = voxel_problem(Path(path), reader)
        if problem:
            raise CaseError(f"{path}: {problem}")
        return reader.Execute()
    except RuntimeError as e:
        raise CaseError(f"cannot read {path}: {one_line(e)}") from None


def score_case(ref: ReferenceFile, prediction: Path, labels: str = "auto", et_min_voxels: int = 0
               ) -> tuple[dict[str, float], str, bool]:
    """Scores (METRIC_COLUMNS), the label convention used and whether ET post-processing fired, for one case. A
    prediction saved with other axis order or flips is scored on the reference's grid; one on another grid is a
    CaseError (:func:`nnalign.evaluation.geometry.on_reference_grid`)."""
    import SimpleITK as sitk

    ref_image, pred_image = read_label_image(ref.path), read_label_image(prediction)
    files = f"prediction {prediction}, reference {ref.path}"
    pred_arr = on_reference_grid(pred_image, ref_image, files)
    ref_arr = sitk.GetArrayFromImage(ref_image)
    ref_spacing = tuple(float(s) for s in reversed(ref_image.GetSpacing()))
    values = {}
    for what, path, arr in (("reference", ref.path, ref_arr), ("prediction", prediction, pred_arr)):
        try:
            values[what] = label_values(arr)
        except ValueError as e:
            raise CaseError(f"{path}: {e}") from None
    convention = resolve_convention(labels, values["reference"] | values["prediction"], ref.nnunet_naming)
    for what, path in (("reference", ref.path), ("prediction", prediction)):
        try:
            check_labels(values[what], convention)
        except ValueError as e:
            how = "detected" if labels == "auto" else "given"
            raise CaseError(f"{path}: {e} (convention {how}; {files})") from None
    result = case_metrics(ref_arr, pred_arr, ref_spacing, convention, et_min_voxels)
    return result.scores, convention, result.et_removed


def default_output(prediction: Path) -> Path:
    """``PRED/metrics.csv``, or ``metrics.csv`` beside a single prediction file."""
    prediction = Path(prediction)
    return (prediction if prediction.is_dir() else prediction.parent) / METRICS_FILE


def evaluate(reference: str | os.PathLike, prediction: str | os.PathLike, labels: str = "auto",
             et_min_voxels: int = 0, output: str | os.PathLike | None = None, progress: bool = True,
             on_case_error=None) -> EvaluationReport:
    """Score every reference case against its prediction and write the CSV and the JSON (same stem) atomically, as a
    pair: both are replaced, or (a full disk) neither.

    ``on_case_error(case_id, message)`` is called as each bad case is met (the CLI prints it). Raises NnalignError
    when nothing can be paired, or when no case at all could be scored.
    """
    from tqdm import tqdm

    if labels not in LABEL_CHOICES:
        raise NnalignError(f"unknown label convention '{labels}' (known: {', '.join(LABEL_CHOICES)})")
    if et_min_voxels < 0:
        raise NnalignError(f"--et-min-voxels must be 0 or more, not {et_min_voxels}")
    reference, prediction = Path(reference), Path(prediction)
    pairing = pair_cases(reference, prediction)
    csv_path = Path(output) if output is not None else default_output(prediction)
    if csv_path.is_dir():
        csv_path = csv_path / METRICS_FILE
    check_writable(csv_path.parent, "the metrics")
    report = EvaluationReport({}, {}, {}, pairing.missing, pairing.ignored_predictions)
    # disable=None: a bar only on a terminal.
    for ref, pred in tqdm(pairing.pairs, desc="Evaluating cases", unit="case", disable=None if progress else True):
        entry = {"reference": str(ref.path), "prediction": None if pred is None else str(pred)}
        if pred is None:
            report.scores[ref.case_id] = missing_prediction_scores()
            report.cases[ref.case_id] = {**entry, "status": "missing prediction"}
            continue
        try:
            scores, convention, et_removed = score_case(ref, pred, labels, et_min_voxels)
        except CaseError as e:
            report.errors[ref.case_id] = f"case {ref.case_id}: {e}"
            if on_case_error is not None:
                on_case_error(ref.case_id, report.errors[ref.case_id])
            continue
        report.scores[ref.case_id] = scores
        report.cases[ref.case_id] = {**entry, "status": "ok", "labels": convention, "et_removed": et_removed}
    if not any(c["status"] == "ok" for c in report.cases.values()):
        raise NnalignError(f"no prediction could be evaluated ({len(report.errors)} with errors); nothing written")
    report.aggregates = aggregate(list(report.scores.values()))
    report.warnings = _warnings(report, labels)

    report.csv_path, report.json_path = csv_path, csv_path.with_suffix(".json")
    try:  # both or neither: a full disk must not leave a new CSV beside an old JSON
        write_texts_atomic({report.csv_path: metrics_csv(report.scores, report.aggregates),
                            report.json_path: json.dumps(_json_payload(report, reference, prediction, labels,
                                                                       et_min_voxels), indent=2) + "\n"})
    except OSError as e:
        raise NnalignError(f"{csv_path.parent}: cannot write the metrics ({e.strerror or e})") from None
    return report


def _warnings(report: EvaluationReport, labels: str) -> list[str]:
    out = []
    if report.missing:
        out.append(f"{len(report.missing)} reference case(s) have no prediction and are scored Dice 0, HD95 "
                   f"{HD95_EMPTY:g} on every region: {_listing(report.missing)}")
    if report.ignored_predictions:
        out.append(f"{len(report.ignored_predictions)} prediction(s) have no reference and are ignored: "
                   f"{_listing([p.name for p in report.ignored_predictions])}")
    used = sorted({c["labels"] for c in report.cases.values() if "labels" in c})
    if labels == "auto" and "nnunet" in used and len(used) > 1:
        out.append(f"--labels auto chose different label conventions for different cases ({', '.join(used)}); "
                   f"pass --labels to be sure necrosis and edema are read right")
    return out


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more (all in the JSON)"


def metrics_csv(scores: dict[str, dict[str, float]], aggregates: dict[str, dict[str, float]]) -> str:
    """CSV text: a header, one row per case, then the rows ``mean``, ``std`` and ``median``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", *METRIC_COLUMNS])
    for name, row in [*scores.items(), *((a, aggregates[a]) for a in AGGREGATES)]:
        writer.writerow([name, *(repr(float(row[k])) for k in METRIC_COLUMNS)])
    return buf.getvalue()


def _json_payload(report: EvaluationReport, reference: Path, prediction: Path, labels: str,
                  et_min_voxels: int) -> dict:
    cases = {case: {**report.cases[case], **report.scores[case]} for case in report.scores}
    return {
        "reference": str(reference),
        "prediction": str(prediction),
        "labels": labels,
        "et_min_voxels": et_min_voxels,
        "hd95_empty": HD95_EMPTY,
        "num_cases": len(report.scores),
        "aggregates": report.aggregates,
        "cases": cases,
        "missing_predictions": report.missing,
        "ignored_predictions": [str(p) for p in report.ignored_predictions],
        "errors": report.errors,
    }


def aggregates_markdown(aggregates: dict[str, dict[str, float]]) -> str:
    """A Markdown table of the aggregates: one row per region, mean / std / median of Dice and HD95 (mm)."""
    head = ["region", *(f"{m} {a}" for m in ("Dice", "HD95 (mm)") for a in AGGREGATES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for region in REGION_NAMES:
        cells = [f"{aggregates[a][f'Dice_{region}']:.4f}" for a in AGGREGATES]
        cells += [f"{aggregates[a][f'HD95_{region}']:.2f}" for a in AGGREGATES]
        lines.append("| " + " | ".join([region, *cells]) + " |")
    return "\n".join(lines)
