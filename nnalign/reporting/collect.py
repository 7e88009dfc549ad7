"""Find the trained models of a results folder, classify them by their trainer names, and gather their metrics.

A results folder is nnU-Net's ``{nnUNet_results}/DatasetXXX_NAME/`` holding model folders
``{Trainer}__{plans}__{configuration}/fold_{f}/``. The trainer name says what a model is (read with
:func:`nnalign.runs.parse_trainer_name`):

- teacher ``nnAlignTeacher_<anchor>[_<variant>]`` (and ``nnAlignOriginal``, plain nnU-Net on every modality): all
  modalities, anchor ``none | normal | modality:NAME | mixture | original``;
- student ``nnAlignStudent_<subset>_<kd>_<teacher>[_tf<F>][_x<hash>]``: its subset, its KD method and the anchor of
  the teacher it was distilled from.

Metrics of a model on a modality subset come from, in this order:

1. ``RESULTS/nnalign_evaluations/{model folder}/{subset tag}/metrics.json`` as ``nnalign_evaluate`` writes it
   (held-out cases, that exact subset);
2. for the model's own subset only: its folds' validation predictions ``fold_*/validation/<case>.nii.gz`` scored with
   :mod:`nnalign.evaluation.validation` against ``{nnUNet_preprocessed}/{dataset}/gt_segmentations`` (nnU-Net
   labels), pooled over folds and cached per fold as ``fold_*/validation/nnalign_metrics.json``;
3. without ground truth: nnU-Net's own ``validation/summary.json`` (Dice only).

Nothing here imports torch or nnU-Net.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Sequence

from nnalign.data.labels import REGION_NAMES
from nnalign.errors import NnalignError
from nnalign.evaluation.validation import (Metrics, is_scored, read_evaluation, read_validation_summary,
                                           score_validation_fold, validation_predictions)
from nnalign.losses.kd.registry import KD_METHODS
from nnalign.modalities import BRATS_MODALITIES, subset_tag
from nnalign.model_folders import (EVALUATION_FILE, NNUNET, STUDENT, TEACHER, ModelFolder, evaluation_folder,
                                    fold_checkpoint, fold_folder, model_folder_parts)
from nnalign.paths import dataset_id_of, resolve_folders
from nnalign.runs import BASELINE, TEACHER_ANCHORS
from nnalign.training.record import check_method_version

STANDARD_ANCHORS: tuple[str, ...] = ("none", "normal", "modality:T1ce", "mixture")
"""The teacher anchors of the paper's tables: N(0,1), one modality (T1ce), the learned mixture P*, and no anchor."""
FULL_SUBSET: tuple[str, ...] = BRATS_MODALITIES


def anchor_order_key(anchor: str | None) -> tuple:
    """Sort key: the anchors in :data:`nnalign.runs.TEACHER_ANCHORS` order (``modality:NAME`` in channel order),
    then anything else."""
    if anchor is None:
        return (len(TEACHER_ANCHORS) + 1, 0, "")
    kind, _, name = anchor.partition(":")
    rank = TEACHER_ANCHORS.index(kind) if kind in TEACHER_ANCHORS else len(TEACHER_ANCHORS)
    sub = BRATS_MODALITIES.index(name) if name in BRATS_MODALITIES else len(BRATS_MODALITIES)
    return (rank, sub, anchor)


def kd_order_key(kd: str | None) -> tuple:
    """Sort key: the KD methods in the paper's order (:data:`nnalign.losses.kd.registry.KD_METHODS`)."""
    return (KD_METHODS.index(kd), "") if kd in KD_METHODS else (len(KD_METHODS), kd or "")


class Run(ModelFolder):
    """The model folder of an nnalign teacher, student or baseline, as the report reads it.

    ``role``: :data:`STUDENT`, else :data:`TEACHER` (the baseline too, with anchor ``original``). ``teacher``: a
    teacher's own spec, or the spec of a student's teacher; ``anchor``: its anchor. ``variant``: the trainer-name
    tokens beyond the defaults (``w0p5_sep`` for a teacher; the teacher's variant plus ``tf1`` / ``x<hash>`` for a
    student), empty for the standard run. ``folds``: the ``fold_*`` folder names' suffixes, as first listed.
    """

    @property
    def role(self) -> str:
        return STUDENT if self.kind == STUDENT else TEACHER

    @property
    def subset(self) -> tuple[str, ...]:
        """The modalities it reads: a student's subset, else all of them."""
        return self.spec.modalities if self.kind == STUDENT else FULL_SUBSET

    @property
    def kd(self) -> str | None:
        """A student's KD method; None for a teacher."""
        return self.spec.kd if self.kind == STUDENT else None

    @property
    def variant(self) -> str:
        if self.kind != STUDENT:
            return self.spec.variant
        extra = (f"tf{self.spec.teacher_fold}" if self.spec.teacher_fold is not None else "",
                 f"x{self.spec.overrides_digest}" if self.spec.overrides_digest else "")
        return "_".join(v for v in (self.teacher.variant, *extra) if v)

    @cached_property
    def folds(self) -> tuple[str, ...]:
        return tuple(str(f) for f in self.list_folds())

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
        """:func:`~nnalign.model_folders.fold_checkpoint` of one of its fold folders."""
        return fold_checkpoint(fold_dir)


# ----------------------------------------------------------------------------------------------------------------------
# classification


def classify(folder: Path) -> Run | None:
    """The :class:`Run` of a model folder, or None if it is not an nnalign model folder.

    Raises ValueError (one line) for a folder whose name starts like nnalign's but cannot be read.
    """
    run = Run.read(folder)
    return run if run is not None and run.kind != NNUNET else None


# ----------------------------------------------------------------------------------------------------------------------
# the results folder


def _default_preprocessed(results: Path) -> list[Path]:
    """Where ``{nnUNet_preprocessed}`` may be: the environment (nnalign's defaults filled in), then the
    ``nnalign_preprocessed`` folder beside ``results``' parent (the layout ``nnalign.paths`` creates)."""
    user_set = bool(os.environ.get("nnUNet_preprocessed"))
    candidates = [Path(resolve_folders()["nnUNet_preprocessed"])]
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
            datasets = sorted(p.name for p in folder.iterdir() if p.is_dir() and dataset_id_of(p.name) is not None)
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
        """Where ``nnalign_evaluate`` scored ``run``'s held-out predictions from ``subset`` alone."""
        return evaluation_folder(self.folder, run.name, subset) / EVALUATION_FILE

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
                if self.progress is not None and not is_scored(fold_dir):
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
        parts = [(d.name, s) for d in folds if (s := read_validation_summary(d)) is not None
                 and s.region_dice is not None and s.num_cases > 0]
        if not parts:
            if gt is None:
                self.notes.append(f"{run.name}: no ground truth (gt_segmentations) and no summary.json; not scored")
            return None
        total = sum(s.num_cases for _, s in parts)
        dice = {r: sum(s.region_dice[r] * s.num_cases for _, s in parts) / total for r in REGION_NAMES}
        return Metrics(dice, None, total, f"nnU-Net summary.json {', '.join(name for name, _ in parts)} (Dice only)")

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
        return run.teacher.variant

    @classmethod
    def has_teacher_settings(cls, run: Run, variant: str) -> bool:
        """Whether the run's teacher has the settings ``variant`` besides its anchor; for the ``original`` teacher,
        which has no encoder, alignment or latents, only the modality dropout and its sampling are compared."""
        if run.anchor == BASELINE:
            variant = "_".join(t for t in variant.split("_") if t.startswith("drop") or t == "bal")
        return cls.teacher_variant(run) == variant

    def compared_variant(self, runs: Iterable[Run]) -> str:
        """The teacher settings that the most anchors share among ``runs`` (the defaults on a tie): what tables that
        compare anchors hold fixed."""
        anchors: dict[str, set] = {}
        for r in runs:
            if r.anchor and r.anchor != BASELINE:
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

    def training_cases(self, run: Run) -> str:
        """How many training cases each fold of a student trained on, of how many its fold had (the others lack a
        modality of its subset; the record's ``cases``), e.g. ``12 of 16``; empty where no record says."""
        from nnalign.training.record import read_settings_record

        found = []
        for fold_dir in run.fold_dirs():
            cases = (read_settings_record(fold_dir) or {}).get("cases")
            try:
                kept, left = int(cases["train"]), int(cases["train_without_subset"])
            except (KeyError, TypeError, ValueError):
                continue
            found.append(f"{kept} of {kept + left}")
        return "; ".join(found)

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
