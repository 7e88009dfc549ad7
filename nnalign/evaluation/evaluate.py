"""``nnalign_evaluate``'s engine: score every case, aggregate, and write the CSV, the JSON and a Markdown summary.

The label convention is given, or detected once for the whole evaluation from the label values of every reference
and prediction (:func:`nnalign.evaluation.metrics.resolve_convention`): a value of no convention stops it before
anything is written, with one line naming the case, and so does a prediction that ``nnalign_predict``'s log says it
wrote in a convention whose tumour regions sit on other labels. A case whose files cannot be read, whose prediction
is not on the reference's voxel grid (shape, spacing, origin, direction; axes saved in another order or flipped are
reordered), or whose labels do not fit the given convention is reported as one line naming both files and left out;
the others are still scored and written. A reference case without a prediction is scored as the BraTS parser does:
Dice 0 and HD95 373.13 on every region. RC is scored where the convention has the resection cavity and a reference
or prediction holds it. With ``lesionwise``, the official package adds its lesion-wise scores
(:mod:`nnalign.evaluation.lesionwise`).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from nnalign.atomic import check_writable, write_texts_atomic
from nnalign.data.case_checks import voxel_problem
from nnalign.data.labels import CONVENTIONS, RC, REGION_NAMES, check_labels, label_values, region_labels
from nnalign.evaluation.metrics import (AGGREGATES, HD95_EMPTY, LABEL_CHOICES, aggregate, both_empty_score,
                                        case_metrics, metric_columns, missing_prediction_scores, resolve_convention)
from nnalign.evaluation.geometry import on_reference_grid
from nnalign.evaluation.pairing import CasePairs, ReferenceFile, pair_cases, recorded_conventions
from nnalign.errors import CaseError, NnalignError, one_line

METRICS_FILE = "metrics.csv"
LESIONWISE_SUFFIX = "_lesionwise"


@dataclass
class EvaluationReport:
    """What ``evaluate`` scored and wrote."""

    scores: dict[str, dict[str, float]]  # case -> metric columns, missing predictions included
    aggregates: dict[str, dict[str, float]]  # "mean" / "std" / "median" -> metric columns
    cases: dict[str, dict]  # case -> files, status, label convention, ET post-processing (the JSON's per-case part)
    missing: list[str] = field(default_factory=list)
    ignored_predictions: list[Path] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    conventions: dict[str, str] = field(default_factory=dict)  # case -> label convention (given or detected)
    lesionwise: dict[str, dict[str, float]] | None = None  # case or mean/std/median -> the package's lesion-wise
    csv_path: Path | None = None
    json_path: Path | None = None
    lesionwise_path: Path | None = None


@dataclass
class ScoredCase:
    """One case's scores (metric columns), whether ET post-processing fired and whether RC occurs in either file."""

    scores: dict[str, float]
    et_removed: bool
    has_rc: bool


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


def score_case(ref: ReferenceFile, prediction: Path, convention: str, et_min_voxels: int = 0,
               lesionwise=None) -> ScoredCase:
    """Scores of one case, both files read in ``convention``. A prediction saved with other axis order or flips is
    scored on the reference's grid; one on another grid is a CaseError
    (:func:`nnalign.evaluation.geometry.on_reference_grid`). ``lesionwise``: a
    :class:`~nnalign.evaluation.lesionwise.LesionwiseScorer` that scores the case too."""
    import SimpleITK as sitk

    ref_image, pred_image = read_label_image(ref.path), read_label_image(prediction)
    files = f"prediction {prediction}, reference {ref.path}"
    pred_arr = on_reference_grid(pred_image, ref_image, files)
    ref_arr = sitk.GetArrayFromImage(ref_image)
    ref_spacing = tuple(float(s) for s in reversed(ref_image.GetSpacing()))
    values = set()
    for path, arr in ((ref.path, ref_arr), (prediction, pred_arr)):
        try:
            found = label_values(arr)
            check_labels(found, convention)
        except ValueError as e:
            raise CaseError(f"{path}: {e}; pass the right --labels ({files})") from None
        values |= found
    result = case_metrics(ref_arr, pred_arr, ref_spacing, convention, et_min_voxels, rc=True)
    if lesionwise is not None:
        lesionwise.score(ref.case_id, ref_image, ref_arr, pred_arr, convention)
    rc = region_labels(convention).get(RC, ())
    return ScoredCase(result.scores, result.et_removed, any(v in values for v in rc))


def detect_labels(pairing: CasePairs) -> dict[str, str]:
    """``{case: convention}``, detected for all references of one naming together (flat, ``_seg``, ``-seg``) from
    every reference's and prediction's label values (read once here); files that cannot be read are left to the
    scoring, which reports them. NnalignError naming the case whose values fit no convention."""
    groups: dict[str, dict[str, set[int]]] = {}
    for ref, pred in pairing.pairs:
        values = groups.setdefault(ref.naming, {}).setdefault(ref.case_id, set())
        for path in (ref.path, pred):
            try:
                if path is not None:
                    values.update(_values_of(path))
            except (CaseError, ValueError):
                continue
    conventions = {}
    for naming, values in groups.items():
        try:
            conventions.update(dict.fromkeys(values, resolve_convention(values, naming)))
        except ValueError as e:
            raise NnalignError(f"case {e}; nothing written (pass --labels if the convention is known)") from None
    return conventions


def _values_of(path: Path) -> set[int]:
    import SimpleITK as sitk

    return label_values(sitk.GetArrayFromImage(read_label_image(path)))


def default_output(prediction: Path) -> Path:
    """``PRED/metrics.csv``, or ``metrics.csv`` beside a single prediction file."""
    prediction = Path(prediction)
    return (prediction if prediction.is_dir() else prediction.parent) / METRICS_FILE


def check_written_conventions(pairing: CasePairs, conventions: dict[str, str], written: dict[str, str],
                              detected: bool) -> None:
    """NnalignError when a prediction's tumour regions sit on other labels in the convention ``nnalign_predict``
    wrote it in (``written``, from its log) than in the one the case is read in: its TC and ET would be scored on
    the wrong labels without any other sign."""
    for ref, pred in pairing.pairs:
        convention = written.get(ref.case_id)
        if pred is None or convention not in CONVENTIONS:
            continue
        used = conventions[ref.case_id]
        if region_labels(convention, rc=False) != region_labels(used, rc=False):
            how = "detected from the labels" if detected else "as --labels says"
            raise NnalignError(f"{pred}: nnalign_predict wrote it in the {convention} label convention (its log "
                               f"says), but the cases are read in {used} ({how}); run nnalign_predict with --labels "
                               f"{used}, or evaluate against references in {convention}; nothing written")


def evaluate(reference: str | os.PathLike, prediction: str | os.PathLike, labels: str = "auto",
             et_min_voxels: int = 0, output: str | os.PathLike | None = None, progress: bool = True,
             on_case_error=None, lesionwise: bool = False) -> EvaluationReport:
    """Score every reference case against its prediction and write the CSV and the JSON (same stem) atomically, as a
    pair: both are replaced, or (a full disk) neither. With ``lesionwise`` the official BraTS package's lesion-wise
    CSV is written with them (``<stem>_lesionwise.csv``), its temporary files in a hidden folder beside the CSV.

    ``on_case_error(case_id, message)`` is called as each bad case is met (the CLI prints it). Raises NnalignError
    when nothing can be paired, when no case at all could be scored, when the label convention cannot be detected or
    differs from the one ``nnalign_predict`` wrote a prediction in, or (``lesionwise``) when brats-evaluation is not
    installed.
    """
    from tqdm import tqdm

    if labels not in LABEL_CHOICES:
        raise NnalignError(f"unknown label convention '{labels}' (known: {', '.join(LABEL_CHOICES)})")
    if et_min_voxels < 0:
        raise NnalignError(f"--et-min-voxels must be 0 or more, not {et_min_voxels}")
    if lesionwise:
        from nnalign.evaluation.lesionwise import package_version

        package_version()
    reference, prediction = Path(reference), Path(prediction)
    pairing = pair_cases(reference, prediction)
    csv_path = Path(output) if output is not None else default_output(prediction)
    if csv_path.is_dir():
        csv_path = csv_path / METRICS_FILE
    check_writable(csv_path.parent, "the metrics")
    conventions = detect_labels(pairing) if labels == "auto" else {ref.case_id: labels for ref, _ in pairing.pairs}
    check_written_conventions(pairing, conventions, recorded_conventions(prediction), labels == "auto")
    report = EvaluationReport({}, {}, {}, pairing.missing, pairing.ignored_predictions, conventions=conventions)
    workdir = Path(tempfile.mkdtemp(prefix=f".{csv_path.stem}.lesionwise.", dir=csv_path.parent)) if lesionwise \
        else None
    try:
        scorer = None
        if workdir is not None:
            from nnalign.evaluation.lesionwise import LesionwiseScorer

            scorer = LesionwiseScorer(workdir)
        has_rc = False
        # disable=None: a bar only on a terminal.
        for ref, pred in tqdm(pairing.pairs, desc="Evaluating cases", unit="case",
                              disable=None if progress else True):
            entry = {"reference": str(ref.path), "prediction": None if pred is None else str(pred)}
            if pred is None:
                report.cases[ref.case_id] = {**entry, "status": "missing prediction"}
                continue
            try:
                scored = score_case(ref, pred, conventions[ref.case_id], et_min_voxels, scorer)
            except CaseError as e:
                report.errors[ref.case_id] = f"case {ref.case_id}: {e}"
                if on_case_error is not None:
                    on_case_error(ref.case_id, report.errors[ref.case_id])
                continue
            has_rc |= scored.has_rc
            report.scores[ref.case_id] = scored.scores
            report.cases[ref.case_id] = {**entry, "status": "ok", "labels": conventions[ref.case_id],
                                         "et_removed": scored.et_removed}
        if not report.scores:
            raise NnalignError(f"no prediction could be evaluated ({len(report.errors)} with errors); nothing written")
        columns = metric_columns([*REGION_NAMES, *([RC] if has_rc else [])])
        rows = {case: report.scores.get(case) or missing_prediction_scores(columns) for case in report.cases}
        # RC where it is in no file: a case of a convention without it, or none of the cases holds it
        report.scores = {case: {k: row.get(k, both_empty_score(k)) for k in columns} for case, row in rows.items()}
        report.aggregates = aggregate(list(report.scores.values()))
        report.warnings = _warnings(report, labels)
        report.csv_path, report.json_path = csv_path, csv_path.with_suffix(".json")
        texts = {report.csv_path: metrics_csv(report.scores, report.aggregates)}
        if scorer is not None:
            from nnalign.evaluation.lesionwise import lesionwise_scores

            table = scorer.table(report.missing)
            report.lesionwise = lesionwise_scores(table, has_rc)
            report.lesionwise_path = csv_path.with_name(f"{csv_path.stem}{LESIONWISE_SUFFIX}.csv")
            texts[report.lesionwise_path] = table
            if scorer.not_1mm:
                report.warnings.append(f"brats-evaluation measures HD95 in voxels, not mm, and {len(scorer.not_1mm)} "
                                       f"case(s) do not have 1 mm voxels, so their lesion-wise HD95 is in voxels: "
                                       f"{_listing(scorer.not_1mm)}")
        texts[report.json_path] = json.dumps(_json_payload(report, reference, prediction, labels, et_min_voxels,
                                                           scorer), indent=2) + "\n"
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    try:  # all or none: a full disk must not leave a new CSV beside an old JSON
        write_texts_atomic(texts)
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
    used = sorted(set(report.conventions.values()))
    if labels == "auto" and "nnunet" in used and len(used) > 1:
        out.append(f"--labels auto chose different label conventions for flat and BraTS-named references "
                   f"({', '.join(used)}); pass --labels to be sure necrosis and edema are read right")
    return out


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more (all in the JSON)"


def metrics_csv(scores: dict[str, dict[str, float]], aggregates: dict[str, dict[str, float]]) -> str:
    """CSV text: a header, one row per case, then the rows ``mean``, ``std`` and ``median``."""
    columns = list(aggregates["mean"])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", *columns])
    for name, row in [*scores.items(), *((a, aggregates[a]) for a in AGGREGATES)]:
        writer.writerow([name, *(repr(float(row[k])) for k in columns)])
    return buf.getvalue()


def _json_payload(report: EvaluationReport, reference: Path, prediction: Path, labels: str,
                  et_min_voxels: int, scorer) -> dict:
    cases = {case: {**report.cases[case], **report.scores[case]} for case in report.scores}
    payload = {
        "reference": str(reference),
        "prediction": str(prediction),
        "labels": labels,
        "conventions": sorted(set(report.conventions.values())),
        "et_min_voxels": et_min_voxels,
        "hd95_empty": HD95_EMPTY,
        "num_cases": len(report.scores),
        "aggregates": report.aggregates,
        "cases": cases,
        "missing_predictions": report.missing,
        "ignored_predictions": [str(p) for p in report.ignored_predictions],
        "errors": report.errors,
    }
    if report.lesionwise is not None:
        from nnalign.evaluation.lesionwise import CONFIG, PACKAGE

        for case in cases:
            cases[case]["lesionwise"] = report.lesionwise.get(case)
        payload["lesionwise"] = {"package": f"{PACKAGE} {scorer.version}", "config": CONFIG,
                                 "csv": report.lesionwise_path.name,
                                 "aggregates": {a: report.lesionwise[a] for a in AGGREGATES}}
    return payload


def aggregates_markdown(aggregates: dict[str, dict[str, float]]) -> str:
    """A Markdown table of the aggregates: one row per region, mean / std / median of Dice and HD95 (mm)."""
    head = ["region", *(f"{m} {a}" for m in ("Dice", "HD95 (mm)") for a in AGGREGATES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for region in (*REGION_NAMES, RC):
        if f"Dice_{region}" not in aggregates["mean"]:
            continue
        cells = [f"{aggregates[a][f'Dice_{region}']:.4f}" for a in AGGREGATES]
        cells += [f"{aggregates[a][f'HD95_{region}']:.2f}" for a in AGGREGATES]
        lines.append("| " + " | ".join([region, *cells]) + " |")
    return "\n".join(lines)
