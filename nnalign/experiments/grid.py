"""The steps an experiment SPEC needs (the "runs" that ``nnalign_experiment`` lists and keeps state for), in dependency
order: convert -> plan and preprocess -> teachers -> their students -> evaluation of held-out cases -> report.

Each step is a list of the commands a user would type (``python -m nnalign.cli.train ...``, ``nnalign.cli.predict``,
``nnalign.cli.evaluate``, ``nnalign.cli.report``); model names, model folders and fold folders come from
:mod:`nnalign.runs` and :mod:`nnalign.model_folders` only. A step is *done* when its result is on disk (a final
checkpoint, an evaluation's ``metrics.json``, ...), whoever made it, so results of earlier commands are reused.
Nothing here imports torch or nnU-Net.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nnalign.errors import NnalignError
from nnalign.experiments.spec import ExperimentSpec
from nnalign.modalities import BRATS_MODALITIES, subset_tag
from nnalign.model_folders import FINAL_CHECKPOINT, PLANS_NAME, fold_folder, model_folder
from nnalign.paths import dataset_folders, dataset_name, resolve_folders
from nnalign.planning.status import (configuration_value, missing_preprocessed, read_plans,
                                     training_cases)
from nnalign.runs import StudentSpec, TrainingLength

EXPERIMENTS_DIR = "nnalign_experiments"
"""Experiments keep their state in ``{nnUNet_results}/DatasetXXX_NAME/nnalign_experiments/<name>/``."""
NNUNET_LENGTH = TrainingLength(1000, 250)
"""nnU-Net's default training length, for runs whose SPEC gives none."""
REFERENCE_STEP_S = {"teacher": 0.079, "plain": 0.059}
"""Seconds per training iteration measured on an H100 (documentation/benchmarks.md, GPU section: ``3d_fullres``,
patch 112x128x112, batch 2, fp16): an nnalign teacher, and stock nnU-Net (for ``original`` and students without
distillation)."""
REFERENCE_VOXELS = 112 * 128 * 112 * 2
KD_STEP_FACTOR = 1.5
"""A distilling student's step against a plain one (1.45-1.55x measured on the CPU, 1.38x on the H100)."""
ESTIMATE_BASIS = ("H100 step times of documentation/benchmarks.md (teacher 0.079 s, plain nnU-Net 0.059 s, "
                  f"distilling student x{KD_STEP_FACTOR}) at 3d_fullres 112x128x112 x 2, scaled by this plan's patch "
                  "voxels x batch size, times epochs x iterations; validation and prediction not counted")


@dataclass(frozen=True)
class Step:
    """One unit of work: ``commands`` (module and arguments, run as ``python -m``) after the steps ``deps``.

    ``done_file`` exists when the step's result does (None for the report, whose state file says it, and for
    preprocessing, done when ``complete()`` says every training case is preprocessed); ``folder`` is a training's
    fold folder (where ``--c`` continues from); ``gpu_hours`` the estimate for trainings.
    """

    key: str
    kind: str
    title: str
    commands: tuple[tuple[str, ...], ...]
    deps: tuple[str, ...] = ()
    done_file: Path | None = None
    folder: Path | None = None
    gpu_hours: float | None = None
    complete: Callable[[], bool] | None = None

    def is_done(self) -> bool | None:
        """Whether the step's result is there; None for a step whose state file says it (the report)."""
        if self.complete is not None:
            return self.complete()
        return self.done_file.is_file() if self.done_file is not None else None


@dataclass
class Grid:
    """Every step of an experiment (in dependency order), its dataset, nnU-Net folders and state folder."""

    spec: ExperimentSpec
    dataset: str
    folders: dict[str, str]
    state_dir: Path
    steps: dict[str, Step]

    @property
    def results(self) -> Path:
        """The dataset's results folder."""
        return Path(self.folders["nnUNet_results"]) / self.dataset


def length_flags(length: TrainingLength) -> list[str]:
    """``--epochs`` / ``--iters-per-epoch`` where the SPEC sets them."""
    flags = ["--epochs", str(length.epochs)] if length.epochs else []
    return flags + (["--iters-per-epoch", str(length.iters_per_epoch)] if length.iters_per_epoch else [])


# ----------------------------------------------------------------------------------------------------------------------
# dataset and plans


def _find(root: Path, dataset_id: int) -> str | None:
    found = [p.name for p in dataset_folders(root, dataset_id)]
    if len(found) > 1:
        raise NnalignError(f"dataset {dataset_id} matches several folders in {root}: {', '.join(found)}")
    return found[0] if found else None


def _plans(raw: Path, preprocessed: Path, configuration: str) -> dict | None:
    """The nnalign plans of a preprocessed dataset holding ``configuration``'s data for every training case, else
    None."""
    return read_plans(preprocessed, configuration) if missing_preprocessed(raw, preprocessed, configuration) == [] \
        else None


def split_folds(raw: Path, preprocessed: Path) -> tuple[int, str]:
    """How many cross-validation folds the dataset has, and what says so: its ``splits_final.json`` (preprocessed,
    else raw folder), else the split its training cases will get (nnalign_plan_and_preprocess writes one fold per
    case below nnU-Net's 5; a single case has only fold 'all'), else nnU-Net's default."""
    from nnalign.data.splits import NNUNET_FOLDS, read_splits_file

    for folder in (preprocessed, raw):
        if (folder / "splits_final.json").is_file():
            return len(read_splits_file(folder / "splits_final.json")), str(folder / "splits_final.json")
    cases = training_cases(raw)
    if not cases:
        return NNUNET_FOLDS, "nnU-Net's default split"
    n = len(cases)
    if n >= NNUNET_FOLDS:
        return NNUNET_FOLDS, f"nnU-Net's default split of its {n} training cases"
    return (n if n > 1 else 0), f"{n} training case{'s' if n > 1 else ''}, no splits_final.json yet"


def check_folds(spec: ExperimentSpec, dataset: str, raw: Path, preprocessed: Path) -> None:
    """One-line error for a fold of the SPEC that the dataset's split does not have (every training would fail)."""
    count, where = split_folds(raw, preprocessed)
    for fold in spec.folds:
        if fold != "all" and fold >= count:
            folds = "only 'all'" if count == 0 else f"fold{'s 0-' if count > 1 else ' '}{count - 1}, or 'all'"
            raise NnalignError(f"{spec.source}: [dataset] folds: fold {fold} is not in the split of {dataset} "
                               f"({where}: {folds})")


def _preprocessed(raw: Path, preprocessed: Path, configuration: str) -> bool:
    return missing_preprocessed(raw, preprocessed, configuration) == []


def step_scale(plans: dict | None, configuration: str) -> float | None:
    """This plan's patch voxels x batch size against the reference of :data:`REFERENCE_STEP_S`; None unplanned."""
    if plans is None:
        return None
    patch, batch = (configuration_value(plans, configuration, k) for k in ("patch_size", "batch_size"))
    if not patch or not batch:
        return None
    voxels = batch
    for size in patch:
        voxels *= size
    return voxels / REFERENCE_VOXELS


def gpu_hours(length: TrainingLength, step: str, distils: bool, scale: float | None) -> float | None:
    """The estimate of one training (:data:`ESTIMATE_BASIS`)."""
    if scale is None:
        return None
    epochs = length.epochs or NNUNET_LENGTH.epochs
    iters = length.iters_per_epoch or NNUNET_LENGTH.iters_per_epoch
    seconds = REFERENCE_STEP_S[step] * (KD_STEP_FACTOR if distils else 1.0) * scale * epochs * iters
    return seconds / 3600


# ----------------------------------------------------------------------------------------------------------------------
# the grid


def _resolve_dataset(spec: ExperimentSpec, folders: dict[str, str]) -> tuple[str, dict | None]:
    """The dataset's folder name and its plans (None while a step of the grid is still to make them)."""
    raw, pre = Path(folders["nnUNet_raw"]), Path(folders["nnUNet_preprocessed"])
    name = _find(pre, spec.dataset_id) or _find(raw, spec.dataset_id)
    if name is None and spec.convert is not None:
        name = dataset_name(spec.dataset_id, spec.dataset_name)
    if name is None:
        raise NnalignError(f"dataset {spec.dataset_id} is in neither {pre} nor {raw}: convert it (nnalign_convert_brats, "
                           f"or convert = PATH in [dataset] of {spec.source})")
    missing = missing_preprocessed(raw / name, pre / name, spec.configuration)
    if missing != [] and not spec.preprocess:
        cases = training_cases(raw / name)
        what = f": {len(missing)} of {len(cases)} training cases missing, e.g. {missing[0]}" if missing and cases \
            else ""
        raise NnalignError(f"dataset {name} is not preprocessed for {spec.configuration} (in {pre}{what}): run "
                           f"nnalign_plan_and_preprocess -d {spec.dataset_id} -c {spec.configuration}, or set "
                           f"preprocess = true in [dataset] of {spec.source}")
    return name, _plans(raw / name, pre / name, spec.configuration)


def build_grid(spec: ExperimentSpec) -> Grid:
    """Every step ``spec`` needs, keyed and in dependency order; one-line errors for a dataset that cannot be found
    or is not preprocessed (unless the SPEC makes it)."""
    from nnalign.reporting.collect import EVALUATION_FILE, EVALUATIONS_DIR

    folders = {var: str(spec.folders.get(var) or path) for var, path in resolve_folders().items()}
    dataset, plans = _resolve_dataset(spec, folders)
    raw, pre = Path(folders["nnUNet_raw"]) / dataset, Path(folders["nnUNet_preprocessed"]) / dataset
    check_folds(spec, dataset, raw, pre)
    results = Path(folders["nnUNet_results"]) / dataset
    grid = Grid(spec, dataset, folders, results / EXPERIMENTS_DIR / spec.name, {})
    add = lambda step: grid.steps.setdefault(step.key, step)  # noqa: E731 - the first description of a step wins
    prepare: tuple[str, ...] = ()
    if spec.convert is not None:
        add(Step("convert", "convert", f"convert {spec.convert}",
                (("nnalign.cli.convert_brats", "-i", str(spec.convert), "-d", str(spec.dataset_id), "-n",
                  spec.dataset_name, "--split", spec.split),), done_file=raw / "dataset.json"))
        prepare = ("convert",)
    if spec.preprocess:
        add(Step("preprocess", "preprocess", f"plan and preprocess {spec.configuration}",
                (("nnalign.cli.plan_and_preprocess", "-d", str(spec.dataset_id), "-c", spec.configuration, "-np",
                  str(spec.processes)),), prepare,
                complete=functools.partial(_preprocessed, raw, pre, spec.configuration)))
        prepare = ("preprocess",)
    scale = step_scale(plans, spec.configuration)
    train = ("nnalign.cli.train", dataset, spec.configuration)
    device = ("-device", spec.device)

    def add_training(trainer: str, fold, flags: list[str], deps: tuple[str, ...], title: str, hours) -> str:
        folder = fold_folder(model_folder(results, trainer, spec.configuration), fold)
        return add(Step(f"train.{trainer}.fold_{fold}", "train", f"{title}, fold {fold}",
                       ((*train, str(fold), *device, *flags),), deps, folder / FINAL_CHECKPOINT, folder, hours)).key

    models: dict[str, tuple[tuple[str, ...], list[str]]] = {}  # trainer -> (subsets to evaluate, training keys)
    teacher_keys: dict[tuple[str, object], str] = {}
    for teacher in spec.teachers:
        trainer = teacher.spec.trainer_name()
        hours = gpu_hours(spec.teacher_length, "plain" if teacher.spec.is_original else "teacher", False, scale)
        keys = [add_training(trainer, fold, teacher.spec.train_flags() + length_flags(spec.teacher_length), prepare,
                             f"teacher {teacher.label}", hours) for fold in spec.folds]
        teacher_keys.update({(teacher.label, fold): key for fold, key in zip(spec.folds, keys)})
        models.setdefault(trainer, (spec.evaluate.teacher_subsets, keys))
    labels = {t.label: t for t in spec.teachers}
    for block in spec.students:
        for label in block.teachers:
            teacher = labels[label]
            teacher_folder = model_folder(results, teacher.spec.trainer_name(), spec.configuration)
            for subset in block.subsets:
                for kd in block.kd:
                    trainer = StudentSpec(subset, kd, teacher.spec).trainer_name()
                    flags = ["--role", "student", "--modalities", ",".join(subset), "--kd", kd, "--teacher",
                             str(teacher_folder), *length_flags(spec.student_length)]
                    hours = gpu_hours(spec.student_length, "plain", kd != "none", scale)
                    keys = [add_training(trainer, fold, flags, (teacher_keys[(label, fold)],),
                                         f"student {'+'.join(subset)} {kd} of {label}", hours) for fold in spec.folds]
                    models.setdefault(trainer, ((subset,), keys))
    final = [key for key, step in grid.steps.items() if step.kind == "train"]
    if spec.evaluate.held_out:
        final = _add_evaluations(grid, models, raw, EVALUATIONS_DIR, EVALUATION_FILE)
    if spec.report.enabled:
        command = ["nnalign.cli.report", str(results), "-o", str(grid.state_dir / "report"), "-c", spec.configuration,
                   "-p", PLANS_NAME]
        command += [] if spec.report.tsne else ["--no-tsne"]
        command += ["--kd", spec.report.kd] if spec.report.kd else []
        add(Step("report", "report", "nnalign_report", (tuple(command),), tuple(final)))
    return grid


def _add_evaluations(grid: Grid, models: dict, raw: Path, evaluations_dir: str, evaluation_file: str) -> list[str]:
    """An evaluation step per model and subset (predict the held-out cases with only that subset, then score them);
    returns their keys."""
    spec = grid.spec
    images, labels = spec.evaluate.images or raw / "imagesTs", spec.evaluate.labels or raw / "labelsTs"
    if raw.is_dir() and not (images.is_dir() and labels.is_dir()):
        raise NnalignError(f"no held-out cases to evaluate: {images} or {labels} is missing (set images and labels, or "
                           f"held_out = false, in [evaluate] of {spec.source})")
    convention = ("--labels", spec.evaluate.label_convention)
    keys = []
    for trainer, (subsets, train_keys) in models.items():
        folder = model_folder(grid.results, trainer, spec.configuration)
        for subset in subsets:
            tag = subset_tag(subset, BRATS_MODALITIES)
            out = grid.results / evaluations_dir / folder.name / tag
            predict = ("nnalign.cli.predict", "-i", str(images), "-o", str(out / "predictions"), "-m", str(folder),
                       "-f", *map(str, spec.folds), "-device", spec.device, "--modalities", ",".join(subset),
                       *convention, *(() if spec.evaluate.tta else ("--disable-tta",)))
            evaluate = ("nnalign.cli.evaluate", "-r", str(labels), "-p", str(out / "predictions"), *convention, "-o",
                        str((out / evaluation_file).with_suffix(".csv")))
            step = Step(f"evaluate.{trainer}.{tag}", "evaluate", f"evaluate {trainer} on {'+'.join(subset)}",
                      (predict, evaluate), tuple(train_keys), out / evaluation_file)
            keys.append(grid.steps.setdefault(step.key, step).key)
    return keys
