"""Find the trained models of a results folder, classify them by their trainer names, and gather their metrics.

A results folder is nnU-Net's ``{nnUNet_results}/DatasetXXX_NAME/`` holding model folders
``{Trainer}__{plans}__{configuration}/fold_{f}/``. The trainer name says what a model is (see
:mod:`nnalign.training.settings` and :mod:`nnalign.training.student_settings`):

- teacher ``nnAlignTeacher_<anchor>[_<variant>]`` (and ``nnAlignOriginal``, plain nnU-Net on every modality): all
  modalities, anchor ``none | normal | modality:NAME | mixture | original``;
- student ``nnAlignStudent_<subset>_<kd>_<teacher>[_tf<F>][_x<hash>]``: its subset, its KD method and the anchor of
  the teacher it was distilled from.

Metrics of a model on a modality subset come from, in this order:

1. ``RESULTS/nnalign_evaluations/{model folder}/{subset tag}/metrics.json`` as ``nnalign_evaluate`` writes it
   (held-out cases, that exact subset);
2. for the model's own subset only: its folds' validation predictions ``fold_*/validation/<case>.nii.gz`` scored with
   :mod:`nnalign.evaluation` against ``{nnUNet_preprocessed}/{dataset}/gt_segmentations`` (nnU-Net labels), pooled
   over folds and cached per fold as ``fold_*/validation/nnalign_metrics.json``;
3. without ground truth: nnU-Net's own ``validation/summary.json`` (Dice only).

Nothing here imports torch or nnU-Net.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from nnalign.data.labels import REGION_NAMES
from nnalign.errors import NnalignError
from nnalign.modalities import BRATS_MODALITIES, subset_tag
from nnalign.model_folders import CHECKPOINTS, fold_folder, folds_in, model_folder_parts
from nnalign.training.record import check_method_version

TEACHER, STUDENT = "teacher", "student"
KD_ORDER: tuple[str, ...] = ("none", "kdnet", "pmkl", "protokd", "smunet")
"""The KD methods in the paper's order (``nnalign.losses.kd.KD_METHODS``, kept here so reporting needs no torch)."""
STANDARD_ANCHORS: tuple[str, ...] = ("none", "normal", "modality:T1ce", "mixture")
"""The teacher anchors of the paper's tables: N(0,1), one modality (T1ce), the learned mixture P*, and no anchor."""
EVALUATIONS_DIR = "nnalign_evaluations"
EVALUATION_FILE = "metrics.json"
CACHE_FILE = "nnalign_metrics.json"
FULL_SUBSET: tuple[str, ...] = BRATS_MODALITIES
_NIFTI_ENDINGS = (".nii.gz", ".nii")
# nnU-Net's summary.json keys for the BraTS regions (str of the region tuple), in REGION_NAMES order.
_SUMMARY_REGION_KEYS = ("(1, 2, 3)", "(2, 3)", "(3,)")


def anchor_order_key(anchor: str | None) -> tuple:
    """Sort key: none, normal, modality:NAME (channel order), mixture, original, then anything else."""
    if anchor is None:
        return (9, "")
    kind, _, name = anchor.partition(":")
    ranks = {"none": 0, "normal": 1, "modality": 2, "mixture": 3, "original": 4}
    sub = BRATS_MODALITIES.index(name) if name in BRATS_MODALITIES else len(BRATS_MODALITIES)
    return (ranks.get(kind, 8), sub, anchor)


def kd_order_key(kd: str | None) -> tuple:
    return (KD_ORDER.index(kd), "") if kd in KD_ORDER else (len(KD_ORDER), kd or "")


@dataclass(frozen=True)
class Run:
    """One trained model folder, classified by its trainer name.

    ``anchor``: a teacher's own anchor, or the anchor of a student's teacher (None if that name cannot be read).
    ``variant``: the trainer-name tokens beyond the defaults (``w0p5_sep`` for a teacher; the teacher's variant plus
    ``tf1`` / ``x<hash>`` for a student), empty for the standard run. ``folds``: the ``fold_*`` folder names' suffixes.
    """

    folder: Path
    trainer: str
    plans: str
    configuration: str
    role: str
    anchor: str | None
    subset: tuple[str, ...]
    kd: str | None = None
    teacher_trainer: str | None = None
    variant: str = ""
    folds: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def is_default(self) -> bool:
        return not self.variant

    @property
    def label(self) -> str:
        """A short display name: ``teacher mixture``, ``T1ce kdnet <- mixture``."""
        suffix = f" [{self.variant}]" if self.variant else ""
        if self.role == TEACHER:
            return f"teacher {self.anchor}{suffix}"
        return f"{'+'.join(self.subset)} {self.kd} <- {self.anchor or '?'}{suffix}"

    def fold_dirs(self) -> list[Path]:
        """Fold folders to pool: every ``fold_N``; ``fold_all`` only when it is the only one."""
        numbered = [f for f in self.folds if f != "all"]
        return [fold_folder(self.folder, f) for f in (numbered or list(self.folds))]

    def checkpoint(self, fold_dir: Path) -> Path | None:
        """The fold's final checkpoint, else its latest (training in progress), else its best; None if it has none."""
        return next((fold_dir / c for c in CHECKPOINTS if (fold_dir / c).is_file()), None)


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
# classification


def _teacher_variant(trainer: str) -> str:
    parts = trainer.split("_")
    return "_".join(parts[1:] if parts[0] == "nnAlignOriginal" else parts[2:])


def classify(folder: Path) -> Run | None:
    """The :class:`Run` of a model folder, or None if it is not an nnalign model folder.

    Raises ValueError (one line) for a folder whose name starts like nnalign's but cannot be read.
    """
    from nnalign.training.settings import TeacherSettings
    from nnalign.training.student_settings import STUDENT_PREFIX, StudentSettings

    parts = model_folder_parts(folder)
    if parts is None:
        return None
    trainer, plans, configuration = parts
    folds = tuple(str(f) for f in folds_in(folder))
    common = dict(folder=folder, trainer=trainer, plans=plans, configuration=configuration, folds=folds)
    if trainer.split("_")[0] == STUDENT_PREFIX:
        subset = StudentSettings.subset_from_trainer_name(trainer)
        teacher, teacher_fold = StudentSettings.teacher_from_trainer_name(trainer)
        try:
            anchor, teacher_variant = TeacherSettings.from_trainer_name(teacher).anchor, _teacher_variant(teacher)
        except ValueError:
            anchor, teacher_variant = None, "unknown teacher"
        extra = [p for p in trainer.split("_")[4:] if re.fullmatch(r"tf(\d+|all)|x[0-9a-f]{8}", p)]
        variant = "_".join(v for v in (teacher_variant, *extra) if v)
        return Run(role=STUDENT, anchor=anchor, subset=subset, kd=trainer.split("_")[2].lower(),
                   teacher_trainer=teacher, variant=variant, **common)
    if trainer.startswith("nnAlign"):
        settings = TeacherSettings.from_trainer_name(trainer)
        return Run(role=TEACHER, anchor=settings.anchor, subset=FULL_SUBSET, variant=_teacher_variant(trainer),
                   **common)
    return None


# ----------------------------------------------------------------------------------------------------------------------
# validation metrics


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


def score_validation_fold(fold_dir: Path, gt_folder: Path, on_error: Callable[[str], None] | None = None
                          ) -> dict[str, dict[str, float]] | None:
    """Per-case Dice and HD95 of a fold's validation predictions against ``gt_folder`` (both nnU-Net labels).

    Uses ``validation/nnalign_metrics.json`` when it is up to date; otherwise scores every case with
    :func:`nnalign.evaluation.evaluate.score_case` and rewrites that cache atomically (the JSON layout of
    ``nnalign_evaluate``). A case that cannot be scored is reported through ``on_error`` and left out. None when the
    fold has no predictions, or none could be scored.
    """
    from nnalign.atomic import write_text_atomic
    from nnalign.evaluation.evaluate import CaseError, score_case
    from nnalign.evaluation.metrics import HD95_EMPTY, aggregate
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
            scores[case], convention, et_removed = score_case(ReferenceFile(case, ref, True), prediction, "nnunet")
        except CaseError as e:
            errors[case] = f"case {case}: {e}"
            continue
        cases[case] = {"reference": str(ref), "prediction": str(prediction), "status": "ok", "labels": convention,
                       "et_removed": et_removed, **scores[case]}
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


def summary_json_dice(fold_dir: Path) -> tuple[dict[str, float], int] | None:
    """Mean Dice per region and case count from nnU-Net's ``validation/summary.json`` (regions WT, TC, ET)."""
    try:
        summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
        dice = {r: float(summary["mean"][k]["Dice"]) for r, k in zip(REGION_NAMES, _SUMMARY_REGION_KEYS)}
        count = len(summary.get("metric_per_case") or [])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all(math.isfinite(v) for v in dice.values()) or count == 0:
        return None
    return dice, count


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
# the results folder


def _default_preprocessed(results: Path) -> list[Path]:
    """Where ``{nnUNet_preprocessed}`` may be: the environment (nnalign's defaults filled in), then the
    ``nnalign_preprocessed`` folder beside ``results``' parent (the layout ``nnalign.paths`` creates)."""
    from nnalign.paths import setup_env

    user_set = bool(os.environ.get("nnUNet_preprocessed"))
    candidates = [Path(setup_env()["nnUNet_preprocessed"])]
    if not user_set:
        candidates.append(results.resolve().parent.parent / "nnalign_preprocessed")
    return candidates


@dataclass
class Results:
    """The nnalign models of one dataset's results folder, with their metrics (computed on demand, memoised).

    Only one plans/configuration pair is reported: ``configuration`` / ``plans`` if given, else the pair with the
    most runs. ``notes`` collects one-line remarks for the report (skipped folders, cases that could not be scored).
    """

    folder: Path
    runs: list[Run]
    all_runs: list[Run]
    dataset: str
    plans: str
    configuration: str
    preprocessed: Path | None
    notes: list[str] = field(default_factory=list)
    progress: Callable[[str], None] | None = None
    _metrics: dict = field(default_factory=dict, repr=False)

    # -- discovery -----------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, folder: str | os.PathLike, configuration: str | None = None, plans: str | None = None,
             preprocessed: str | os.PathLike | None = None, progress: Callable[[str], None] | None = None
             ) -> "Results":
        """Scan ``folder``; NnalignError (one line) if it does not exist or holds no nnalign model."""
        folder = Path(folder)
        if not folder.is_dir():
            raise NnalignError(f"{folder}: no such results folder (give {{nnUNet_results}}/DatasetXXX_NAME)")
        notes: list[str] = []
        runs: list[Run] = []
        others: list[str] = []
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            try:
                run = classify(sub)
            except ValueError as e:
                notes.append(f"skipped {sub.name}: {e}")
                continue
            if run is None:
                if model_folder_parts(sub) is not None:
                    others.append(sub.name)
                continue
            for fold_dir in run.fold_dirs():
                check_method_version(fold_dir, "its numbers would be compared with runs whose losses differ; move "
                                               "it out of the results folder, or report it with the version that "
                                               "made it")
            runs.append(run)
        if others:
            notes.append(f"not nnalign models, not reported: {', '.join(others)}")
        if not runs:
            datasets = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("Dataset"))
            hint = (f"; it holds dataset folders ({', '.join(datasets[:3])}), give one of them" if datasets else
                    " (expected <Trainer>__<plans>__<configuration> folders of nnalign teachers and students)")
            raise NnalignError(f"{folder}: no nnalign models found{hint}")
        pairs: dict[tuple[str, str], int] = {}
        for r in runs:
            pairs[(r.plans, r.configuration)] = pairs.get((r.plans, r.configuration), 0) + 1
        wanted = [p for p in pairs
                  if (plans is None or p[0] == plans) and (configuration is None or p[1] == configuration)]
        if not wanted:
            found = ", ".join(f"{p}/{c}" for p, c in sorted(pairs))
            raise NnalignError(f"{folder}: no models with plans {plans or 'any'} and configuration "
                               f"{configuration or 'any'} (found plans/configuration: {found})")
        chosen = min(wanted, key=lambda p: (-pairs[p], p))
        if len(pairs) > 1:
            skipped = sum(n for p, n in pairs.items() if p != chosen)
            notes.append(f"reporting plans {chosen[0]}, configuration {chosen[1]}; {skipped} model(s) of other "
                         f"plans/configurations are left out (choose with -p / -c)")
        dataset = folder.name
        pre = None
        candidates = [Path(preprocessed)] if preprocessed is not None else _default_preprocessed(folder)
        for base in candidates:
            if (base / dataset).is_dir():
                pre = base / dataset
                break
        kept = [r for r in runs if (r.plans, r.configuration) == chosen]
        return cls(folder=folder, runs=kept, all_runs=runs, dataset=dataset, plans=chosen[0],
                   configuration=chosen[1], preprocessed=pre, notes=notes, progress=progress)

    @property
    def gt_folder(self) -> Path | None:
        """``{nnUNet_preprocessed}/{dataset}/gt_segmentations`` if it exists."""
        if self.preprocessed is None or not (self.preprocessed / "gt_segmentations").is_dir():
            return None
        return self.preprocessed / "gt_segmentations"

    @property
    def teachers(self) -> list[Run]:
        return sorted((r for r in self.runs if r.role == TEACHER), key=lambda r: (anchor_order_key(r.anchor), r.name))

    @property
    def students(self) -> list[Run]:
        return [r for r in self.runs if r.role == STUDENT]

    def kd_methods(self) -> list[str]:
        """KD methods of the students found, in the paper's order (unknown ones after)."""
        return sorted({r.kd for r in self.students if r.kd}, key=kd_order_key)

    def student_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.students:
            counts[r.kd] = counts.get(r.kd, 0) + 1
        return counts

    def default_kd(self) -> str | None:
        """The KD method with the most student runs (``none`` only if nothing else was run); ties in paper order."""
        counts = self.student_counts()
        distilled = {k: n for k, n in counts.items() if k != "none"} or counts
        if not distilled:
            return None
        return min(distilled, key=lambda k: (-distilled[k], kd_order_key(k)))

    # -- metrics -------------------------------------------------------------------------------------------------------

    def evaluation_path(self, run: Run, subset: Sequence[str]) -> Path:
        return self.folder / EVALUATIONS_DIR / run.name / subset_tag(subset) / EVALUATION_FILE

    def metrics(self, run: Run | None, subset: Sequence[str] | None = None) -> Metrics | None:
        """The model's metrics on ``subset`` (default: its own); None when there are none.

        Another subset than the model's own is only read from the evaluations layout.
        """
        if run is None:
            return None
        subset = tuple(run.subset if subset is None else subset)
        key = (run.name, subset_tag(subset))
        if key not in self._metrics:
            path = self.evaluation_path(run, subset)
            found = read_evaluation(path, f"evaluation {path.relative_to(self.folder).as_posix()}")
            if found is None and set(subset) == set(run.subset):
                found = self._validation_metrics(run)
            self._metrics[key] = found
        return self._metrics[key]

    def _validation_metrics(self, run: Run) -> Metrics | None:
        from nnalign.evaluation.metrics import aggregate

        folds = [d for d in run.fold_dirs() if validation_predictions(d)]
        if not folds:
            return None
        gt = self.gt_folder
        if gt is not None:
            rows: list[dict[str, float]] = []
            used = []
            for fold_dir in folds:
                if self.progress is not None and _read_cache(fold_dir / "validation" / CACHE_FILE,
                                                             validation_predictions(fold_dir)) is None:
                    self.progress(f"scoring {run.name}/{fold_dir.name}/validation "
                                  f"({len(validation_predictions(fold_dir))} cases)")
                scores = score_validation_fold(fold_dir, gt, on_error=lambda m: self.notes.append(f"{run.name}: {m}"))
                if scores:
                    rows.extend(scores.values())
                    used.append(fold_dir.name)
            if rows:
                mean = aggregate(rows)["mean"]
                return Metrics({r: mean[f"Dice_{r}"] for r in REGION_NAMES},
                               {r: mean[f"HD95_{r}"] for r in REGION_NAMES}, len(rows),
                               f"validation {', '.join(used)}")
        # no ground truth: nnU-Net's own Dice (its conventions: empty cases are left out of the mean)
        parts = [(d, s) for d in folds if (s := summary_json_dice(d)) is not None]
        if not parts:
            if gt is None:
                self.notes.append(f"{run.name}: no ground truth (gt_segmentations) and no summary.json; not scored")
            return None
        total = sum(n for _, (_, n) in parts)
        dice = {r: sum(s[r] * n for _, (s, n) in parts) / total for r in REGION_NAMES}
        return Metrics(dice, None, total, f"nnU-Net summary.json {', '.join(d.name for d, _ in parts)} (Dice only)")

    # -- selection -----------------------------------------------------------------------------------------------------

    def pick(self, candidates: Iterable[Run]) -> Run | None:
        """One run among several: with metrics first, then the standard (non-variant) run, more cases, the name."""
        def key(r: Run):
            m = self.metrics(r)
            return (m is None, not r.is_default, -(m.num_cases if m else 0), r.name)
        candidates = list(candidates)
        return min(candidates, key=key) if candidates else None

    @staticmethod
    def teacher_variant(run: Run) -> str:
        """The settings of a run's teacher beyond its anchor (a teacher's own variant; a student's teacher's)."""
        if run.role == TEACHER:
            return run.variant
        return _teacher_variant(run.teacher_trainer) if run.teacher_trainer else ""

    @classmethod
    def has_teacher_settings(cls, run: Run, variant: str) -> bool:
        """Whether the run's teacher has the settings ``variant`` besides its anchor; for the ``original`` teacher,
        which has no encoder, alignment or latents, only the modality dropout is compared."""
        if run.anchor == "original":
            variant = "_".join(t for t in variant.split("_") if t.startswith("drop"))
        return cls.teacher_variant(run) == variant

    def compared_variant(self, runs: Iterable[Run]) -> str:
        """The teacher settings that the most anchors share among ``runs`` (the defaults on a tie): what tables that
        compare anchors hold fixed."""
        anchors: dict[str, set] = {}
        for r in runs:
            if r.anchor and r.anchor != "original":
                anchors.setdefault(self.teacher_variant(r), set()).add(r.anchor)
        if not anchors:
            return ""
        return min(anchors, key=lambda v: (-len(anchors[v]), v != "", v))

    def teacher(self, anchor: str, variant: str | None = None) -> Run | None:
        """The teacher with ``anchor`` (and, unless None, the teacher settings ``variant``)."""
        return self.pick(r for r in self.teachers if r.anchor == anchor
                         and (variant is None or self.has_teacher_settings(r, variant)))

    def student(self, subset: Sequence[str], kd: str, anchor: str | None, variant: str | None = None) -> Run | None:
        """The student of ``subset`` distilled with ``kd`` from a teacher with ``anchor`` (any anchor if None) and,
        unless None, the teacher settings ``variant``.

        ``kd`` ``none`` (no distillation) does not depend on the teacher, so when no run names a teacher with this
        anchor and settings, any ``none`` student of the subset stands in.
        """
        pool = [r for r in self.students if set(r.subset) == set(subset) and r.kd == kd]
        exact = [r for r in pool if (anchor is None or r.anchor == anchor)
                 and (variant is None or self.has_teacher_settings(r, variant))]
        if exact or kd != "none":
            return self.pick(exact)
        return self.pick(pool)

    def mixture_weights(self, run: Run) -> dict[str, float] | None:
        """The learned, normalised mixture weights in a fold's ``nnalign_settings.json`` (first fold that has them)."""
        from nnalign.training.record import read_settings_record

        for fold_dir in run.fold_dirs():
            record = read_settings_record(fold_dir) or {}
            weights = record.get("mixture_weights")
            if isinstance(weights, dict) and weights:
                try:
                    return {m: float(w["normalised"] if isinstance(w, dict) else w) for m, w in weights.items()}
                except (KeyError, TypeError, ValueError):
                    continue
        return None
