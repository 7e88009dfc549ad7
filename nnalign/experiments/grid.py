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
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from nnalign.errors import NnalignError
from nnalign.experiments.spec import ExperimentSpec
from nnalign.modalities import subset_tag
from nnalign.model_folders import (EVALUATION_FILE, FINAL_CHECKPOINT, PLANS_NAME, evaluation_folder, fold_folder,
                                   model_folder)
from nnalign.paths import dataset_folders, dataset_name, resolve_folders
from nnalign.planning.status import (configuration_value, missing_preprocessed, read_plans,
                                     training_cases)
from nnalign.runs import StudentSpec, TrainingLength

EXPERIMENTS_DIR = "nnalign_experiments"
"""Experiments keep their state in ``{nnUNet_results}/DatasetXXX_NAME/nnalign_experiments/<name>/``."""
NNUNET_LENGTH = TrainingLength(1000, 250)
"""nnU-Net's default training length, for runs whose SPEC gives none."""
ITERATION_TIMES = Path(__file__).resolve().parent / "iteration_times.toml"
"""The measured seconds per training iteration behind the GPU-hour estimate, with their GPU, reference plan and
source."""


@dataclass(frozen=True)
class IterationTimes:
    """Seconds per training iteration of a reference plan (``configuration``, ``patch`` x ``batch``) on ``gpu``: a
    teacher, a plain nnU-Net (the original teacher, students without distillation), and a distilling student's factor
    over a plain one; ``source`` names the measurement."""

    source: str
    gpu: str
    configuration: str
    patch: tuple[int, ...]
    batch: int
    teacher_s: float
    plain_s: float
    distilling_factor: float

    @property
    def voxels(self) -> int:
        """Patch voxels x batch size of the reference plan."""
        return math.prod(self.patch) * self.batch

    def basis(self) -> str:
        """The estimate's basis in words, for ``nnalign_experiment plan``."""
        return (f"{self.gpu} times per iteration of {ITERATION_TIMES.name} (teacher {self.teacher_s:g} s, plain "
                f"nnU-Net {self.plain_s:g} s, distilling student x{self.distilling_factor:g}; {self.source}) at "
                f"{self.configuration} {'x'.join(map(str, self.patch))} x {self.batch}, scaled by this plan's patch "
                "voxels x batch size, times epochs x iterations; validation and prediction not counted")


@functools.cache
def iteration_times() -> IterationTimes:
    """:data:`ITERATION_TIMES`, read once."""
    with open(ITERATION_TIMES, "rb") as f:
        data = tomllib.load(f)
    return IterationTimes(**{**data, "patch": tuple(data["patch"])})


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

    @property
    def report_md(self) -> Path:
        """The ``report.md`` of the report run (``nnalign_report -o`` its folder)."""
        return self.state_dir / "report" / "report.md"


def length_flags(length: TrainingLength) -> list[str]:
    """``--epochs`` / ``--iters-per-epoch`` where the SPEC sets them."""
    flags = ["--epochs", str(length.epochs)] if length.epochs else []
    return flags + (["--iters-per-epoch", str(length.iters_per_epoch)] if length.iters_per_epoch else [])


def train_command(dataset: str, configuration: str, fold: int | str, device: str,
                  flags: Sequence[str]) -> tuple[str, ...]:
    """``nnalign_train`` of one fold (module and arguments); ``flags``: the role's and the length's."""
    return ("nnalign.cli.train", dataset, configuration, str(fold), "-device", device, *flags)


def student_flags(subset: Sequence[str], kd: str, teacher_folder: Path) -> list[str]:
    """The ``nnalign_train`` flags of a student that sees ``subset`` and learns from ``teacher_folder`` by ``kd``."""
    return ["--role", "student", "--modalities", ",".join(subset), "--kd", kd, "--teacher", str(teacher_folder)]


def predict_command(images: Path, predictions: Path, model: Path, device: str, label_convention: str, tta: bool,
                    folds: Sequence[int | str] = (), subset: Sequence[str] = ()) -> tuple[str, ...]:
    """``nnalign_predict`` (module and arguments) of the cases in ``images`` with the model folder ``model``:
    ``folds`` (default: every fold it has), only ``subset``'s modalities (default: those the files hold)."""
    return ("nnalign.cli.predict", "-i", str(images), "-o", str(predictions), "-m", str(model),
            *(("-f", *map(str, folds)) if folds else ()), "-device", device,
            *(("--modalities", ",".join(subset)) if subset else ()), "--labels", label_convention,
            *(() if tta else ("--disable-tta",)))


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
    """This plan's patch voxels x batch size against the reference plan of :func:`iteration_times`; None unplanned."""
    if plans is None:
        return None
    patch, batch = (configuration_value(plans, configuration, k) for k in ("patch_size", "batch_size"))
    if not patch or not batch:
        return None
    return math.prod(patch) * batch / iteration_times().voxels


def gpu_hours(length: TrainingLength, teacher: bool, distils: bool, scale: float | None) -> float | None:
    """The estimate of one training (:meth:`IterationTimes.basis`): a teacher of the method, or a plain nnU-Net
    (distilling or not)."""
    if scale is None:
        return None
    times = iteration_times()
    epochs = length.epochs or NNUNET_LENGTH.epochs
    iters = length.iters_per_epoch or NNUNET_LENGTH.iters_per_epoch
    seconds = (times.teacher_s if teacher else times.plain_s) * (times.distilling_factor if distils else 1.0)
    return seconds * scale * epochs * iters / 3600


# ----------------------------------------------------------------------------------------------------------------------
# the grid


def _resolve_dataset(spec: ExperimentSpec, folders: dict[str, str]) -> tuple[str, dict | None]:
    """The dataset's folder name and its plans (None while a step of the grid is still to make them)."""
    raw, pre = Path(folders["nnUNet_raw"]), Path(folders["nnUNet_preprocessed"])
    name = _find(pre, spec.dataset_id) or _find(raw, spec.dataset_id)
    if name is None and spec.convert is not None:
        name = dataset_name(spec.dataset_id, spec.dataset_name)
    if name is None:
        where = (f'a SPEC with extends = "{spec.source.removeprefix("preset:")}"' if spec.source.startswith("preset:")
                 else spec.source)
        raise NnalignError(f"dataset {spec.dataset_id} is in neither {pre} nor {raw}: convert it (nnalign_convert_brats, "
                           f"or convert = PATH in [dataset] of {where})")
    if not (raw / name / "dataset.json").is_file() and spec.convert is not None and not spec.convert.is_dir():
        raise NnalignError(f"{spec.source}: [dataset] convert: {spec.convert} is not a folder (the BraTS release to "
                           f"convert into {name})")
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

    def add_training(trainer: str, fold, flags: list[str], deps: tuple[str, ...], title: str, hours) -> str:
        folder = fold_folder(model_folder(results, trainer, spec.configuration), fold)
        command = train_command(dataset, spec.configuration, fold, spec.device, flags)
        return add(Step(f"train.{trainer}.fold_{fold}", "train", f"{title}, fold {fold}", (command,), deps,
                        folder / FINAL_CHECKPOINT, folder, hours)).key

    models: dict[str, tuple[tuple[str, ...], list[str]]] = {}  # trainer -> (subsets to evaluate, training keys)
    teacher_keys: dict[tuple[str, object], str] = {}
    for teacher in spec.teachers:
        trainer = teacher.spec.trainer_name()
        hours = gpu_hours(spec.teacher_length, not teacher.spec.is_original, False, scale)
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
                    flags = student_flags(subset, kd, teacher_folder) + length_flags(spec.student_length)
                    hours = gpu_hours(spec.student_length, False, kd != "none", scale)
                    keys = [add_training(trainer, fold, flags, (teacher_keys[(label, fold)],),
                                         f"student {'+'.join(subset)} {kd} of {label}", hours) for fold in spec.folds]
                    models.setdefault(trainer, ((subset,), keys))
    final = [key for key, step in grid.steps.items() if step.kind == "train"]
    if spec.evaluate.held_out:
        final = _add_evaluations(grid, models, raw)
    if spec.report.enabled:
        command = ["nnalign.cli.report", str(results), "-o", str(grid.report_md.parent), "-c", spec.configuration,
                   "-p", PLANS_NAME]
        command += [] if spec.report.tsne else ["--no-tsne"]
        command += [] if spec.report.tsne_cases is None else ["--tsne-cases", str(spec.report.tsne_cases)]
        command += ["--kd", spec.report.kd] if spec.report.kd else []
        add(Step("report", "report", "nnalign_report", (tuple(command),), tuple(final)))
    return grid


def _add_evaluations(grid: Grid, models: dict, raw: Path) -> list[str]:
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
            tag = subset_tag(subset)
            out = evaluation_folder(grid.results, folder.name, subset)
            predict = predict_command(images, out / "predictions", folder, spec.device, spec.evaluate.label_convention,
                                      spec.evaluate.tta, spec.folds, subset)
            evaluate = ("nnalign.cli.evaluate", "-r", str(labels), "-p", str(out / "predictions"), *convention, "-o",
                        str((out / EVALUATION_FILE).with_suffix(".csv")))
            step = Step(f"evaluate.{trainer}.{tag}", "evaluate", f"evaluate {trainer} on {'+'.join(subset)}",
                      (predict, evaluate), tuple(train_keys), out / EVALUATION_FILE)
            keys.append(grid.steps.setdefault(step.key, step).key)
    return keys
