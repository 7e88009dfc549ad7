"""``nnalign_report``'s engine: gather a results folder's metrics, write the tables, the figures and ``report.md``.

Every output file is written to a temporary file and renamed, so a reader never sees half a file. A figure that
cannot be drawn (no teacher, no preprocessed data, no validation predictions, no checkpoint) is left out with a note
in ``report.md``, and a stale copy from an earlier report is removed so the folder matches the report.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from nnalign import __version__
from nnalign.errors import NnalignError, one_line
from nnalign.atomic import check_writable, write_text_atomic
from nnalign.evaluation.validation import validation_predictions
from nnalign.modalities import BRATS_MODALITIES, all_subsets, modalities_from_dataset_json
from nnalign.losses.kd.registry import KD
from nnalign.reporting.collect import FULL_SUBSET, TEACHER, Results, Run, anchor_order_key, kd_order_key
from nnalign.reporting.figures import FigureResult, OverlayModel
from nnalign.reporting.tables import Table, runs_table, subset_label, table_i, table_iii, table_iv, table_v
from nnalign.runs import BASELINE

REPORT_DIR = "nnalign_report"
TABLE_ORDER = ("III", "I", "IV", "V")
TSNE_FILE, OVERLAYS_FILE, CURVES_FILE = "tsne_latents.png", "overlays.png", "training_curves.png"
MAX_OVERLAY_MODELS = 6


@dataclass
class Report:
    """What :func:`build_report` wrote."""

    output: Path
    report_md: Path
    kd: str | None
    tables: dict[str, Table]
    figures: dict[str, FigureResult]
    notes: list[str] = field(default_factory=list)


def _predictions(run: Run) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for fold_dir in run.fold_dirs():
        for case, path in validation_predictions(fold_dir).items():
            found.setdefault(case, path)
    return found


def overlay_runs(res: Results, kd: str | None) -> tuple[tuple[str, ...], list[Run]]:
    """The subset with the most students that have validation predictions, its teacher first (mixture preferred)
    and its students (``kd`` first, then the paper's KD order and anchor order), at most 6 models."""
    with_preds = [r for r in res.runs if _predictions(r)]
    teachers = sorted((r for r in with_preds if r.role == TEACHER),
                      key=lambda r: (r.anchor != "mixture", not r.is_default, anchor_order_key(r.anchor), r.name))
    by_subset: dict[tuple[str, ...], list[Run]] = {}
    for r in with_preds:
        if r.role != TEACHER:
            by_subset.setdefault(tuple(r.subset), []).append(r)
    if not by_subset:
        return FULL_SUBSET, teachers[:MAX_OVERLAY_MODELS]
    order = {s: i for i, s in enumerate(all_subsets(BRATS_MODALITIES))}
    subset = min(by_subset, key=lambda s: (-len(by_subset[s]), order.get(s, len(order))))
    students = sorted(by_subset[subset], key=lambda r: (r.kd != kd, kd_order_key(r.kd), anchor_order_key(r.anchor),
                                                        not r.is_default, r.name))
    return subset, (teachers[:1] + students)[:MAX_OVERLAY_MODELS]


def _raw_image_finder(res: Results, modality: str = "FLAIR") -> Callable[[str], Path | None]:
    """``case -> {nnUNet_raw}/{dataset}/imagesTr|imagesTs/{case}_{channel:04d}.nii.gz`` of ``modality``, if found."""
    from nnalign.paths import resolve_folders

    raw = Path(resolve_folders()["nnUNet_raw"]) / res.dataset
    modalities = BRATS_MODALITIES
    for run in res.runs:
        try:
            modalities = modalities_from_dataset_json(json.loads((run.folder / "dataset.json").read_text()))
            break
        except (OSError, ValueError, NnalignError):
            continue
    if modality not in modalities:
        return lambda case: None
    channel = modalities.index(modality)

    def find(case: str) -> Path | None:
        for sub in ("imagesTr", "imagesTs"):
            for ending in (".nii.gz", ".nii"):
                path = raw / sub / f"{case}_{channel:04d}{ending}"
                if path.is_file():
                    return path
        return None

    return find


def _remove_stale(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def tsne_figure(res: Results, path: Path, cases: int, samples: int) -> FigureResult:
    from nnalign.reporting.figures import plot_latent_tsne, teacher_latents

    by_anchor: dict[str, Run] = {}
    for anchor in sorted({r.anchor for r in res.teachers if r.anchor != BASELINE}, key=anchor_order_key):
        candidates = [r for r in res.teachers if r.anchor == anchor and any(r.checkpoint(d) for d in r.fold_dirs())]
        if candidates:
            by_anchor[anchor] = min(candidates, key=lambda r: (not r.is_default, r.name))
    if not by_anchor:
        return FigureResult(None, notes=["t-SNE skipped: no trained teacher with per-modality latents"])
    if res.preprocessed is None:
        return FigureResult(None, notes=[f"t-SNE skipped: no preprocessed data for {res.dataset} "
                                         f"(set nnUNet_preprocessed)"])
    panels = {}
    for anchor, run in by_anchor.items():
        fold_dir = next(d for d in run.fold_dirs() if run.checkpoint(d))
        title = anchor if run.is_default else f"{anchor} ({run.variant})"
        panels[title] = functools.partial(teacher_latents, run.folder, fold_dir.name.removeprefix("fold_"),
                                          res.preprocessed, sorted(validation_predictions(fold_dir)), cases,
                                          run.checkpoint(fold_dir).name)
    return plot_latent_tsne(panels, path, per_modality=samples)


def training_logs(res: Results) -> dict[str, dict]:
    """``{label: logging}`` from each run's first fold checkpoint (teachers first)."""
    from nnalign.reporting.figures import read_training_log

    logs = {}
    ordered = sorted(res.runs, key=lambda r: (r.role != TEACHER, anchor_order_key(r.anchor), r.subset,
                                               kd_order_key(r.kd), r.name))
    for run in ordered:
        fold_dir = next((d for d in run.fold_dirs() if run.checkpoint(d)), None)
        if fold_dir is None:
            continue
        try:
            log = read_training_log(run.checkpoint(fold_dir))
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is a note, not a failed report
            res.notes.append(f"{run.name}: cannot read {run.checkpoint(fold_dir).name}: {one_line(e)}")
            continue
        if log is not None:
            logs[f"{run.label} ({fold_dir.name})"] = log
    return logs


def build_report(results: str | os.PathLike, output: str | os.PathLike | None = None, kd: str | None = None,
                 tsne: bool = True, configuration: str | None = None, plans: str | None = None,
                 preprocessed: str | os.PathLike | None = None, tsne_cases: int = 2, tsne_samples: int = 300,
                 progress: Callable[[str], None] | None = None) -> Report:
    """Write the tables (Markdown and CSV), the figures and ``report.md`` for a results folder.

    Raises NnalignError (one line) for a missing folder, a folder without nnalign models, an unknown ``kd``, or an
    output folder that cannot be written (read-only, a file in the way), before anything is written.
    """
    from nnalign.reporting.figures import plot_overlays, plot_training_curves

    res = Results.load(results, configuration=configuration, plans=plans, preprocessed=preprocessed,
                       progress=progress)
    if kd is not None:
        kd = KD.check(kd)
    kd_reason = "chosen with --kd"
    if kd is None:
        kd = res.default_kd()
        counts = res.student_counts()
        kd_reason = (f"the method with the most student runs ({counts[kd]})" if kd else "no student runs found")
    out = Path(output) if output is not None else res.folder / REPORT_DIR
    check_writable(out, "the report")

    tables = {"III": table_iii(res, kd), "I": table_i(res), "IV": table_iv(res), "V": table_v(res)}
    for key, table in tables.items():
        write_text_atomic(out / f"table_{key}.md", table.markdown_with_notes())
        write_text_atomic(out / f"table_{key}.csv", table.csv())

    figures: dict[str, FigureResult] = {}
    if tsne:
        if progress is not None:
            progress("t-SNE of the teachers' latents")
        figures[TSNE_FILE] = tsne_figure(res, out / TSNE_FILE, tsne_cases, tsne_samples)
    else:
        figures[TSNE_FILE] = FigureResult(None, notes=["t-SNE skipped (--no-tsne)"])
    subset, models = overlay_runs(res, kd)
    figures[OVERLAYS_FILE] = plot_overlays(
        [OverlayModel(r.label, _predictions(r)) for r in models], res.gt_folder, out / OVERLAYS_FILE,
        image_for=_raw_image_finder(res),
        title=f"Validation cases, subset {subset_label(subset)}, on the FLAIR image where found")
    if not models:
        figures[OVERLAYS_FILE].notes[:] = ["overlays skipped: no model has validation predictions"]
    logs = training_logs(res)
    figures[CURVES_FILE] = plot_training_curves(logs, out / CURVES_FILE)
    if not logs:
        figures[CURVES_FILE].notes.append("training curves skipped: no checkpoint with a training log")
    for name, fig in figures.items():
        if fig.path is None:
            _remove_stale(out / name)

    report_md = out / "report.md"
    write_text_atomic(report_md, _report_markdown(res, kd, kd_reason, tables, figures))
    return Report(out, report_md, kd, tables, figures, list(res.notes))


def _report_markdown(res: Results, kd: str | None, kd_reason: str, tables: dict[str, Table],
                     figures: dict[str, FigureResult]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# nnalign report: {res.dataset}", "",
             f"Results `{res.folder}`, plans `{res.plans}`, configuration `{res.configuration}`; "
             f"{sum(r.role == TEACHER for r in res.runs)} teacher(s), {len(res.students)} student(s). "
             f"Generated by nnalign {__version__} on {stamp}.", "",
             f"Dice in %, HD95 in mm, means over cases. Metrics per model: `nnalign_evaluations/<model>/<subset>/"
             f"metrics.json` (held-out cases) when present, else the folds' validation predictions scored against "
             f"`gt_segmentations` (cached in `fold_*/validation/nnalign_metrics.json`). \"–\" marks a missing run. "
             f"KD method of Table III: **{kd or 'none found'}** ({kd_reason}).", ""]
    titles = {"III": "Table III: alignment for every modality subset", "I": "Table I: KD methods x anchors",
              "IV": "Table IV: teachers by anchor", "V": "Table V: single-modality models on every modality"}
    for key in TABLE_ORDER:
        lines += [f"## {titles[key]}", "", tables[key].markdown_with_notes(),
                  f"Files: [table_{key}.md](table_{key}.md), [table_{key}.csv](table_{key}.csv)", ""]
        if tables[key].sources:
            lines += ["<details><summary>Models used</summary>", "",
                      *(f"- {cell}: `{name}`" for cell, name in tables[key].sources.items()), "", "</details>", ""]
    lines += ["## Figures", ""]
    captions = {TSNE_FILE: "t-SNE of the per-modality latent features of each teacher, coloured by modality",
                OVERLAYS_FILE: "Ground truth and predictions on the axial slice with the largest tumour "
                               "(green edema, red necrosis, yellow enhancing; white: ground-truth whole tumour)",
                CURVES_FILE: "Training curves from the checkpoints' logs"}
    for name, fig in figures.items():
        if fig.path is not None:
            lines += [f"**{captions[name]}.**", "", f"![{name}]({name})", ""]
        lines += [f"- {n}" for n in fig.notes]
        if fig.notes:
            lines.append("")
    lines += ["## Models", "", runs_table(res).markdown(), ""]
    if res.notes:
        lines += ["## Notes", "", *(f"- {n}" for n in res.notes), ""]
    return "\n".join(lines)
