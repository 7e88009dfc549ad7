"""``nnalign_train``: train a teacher or a student with nnU-Net's own training loop (``run_training``, DDP, ``--c``,
``--val``)."""
from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from nnalign.cli.parsing import CommandParser, add_setting_arguments, positive_int, setting_values
from nnalign.atomic import check_writable
from nnalign.errors import NnalignError, cli_entry
from nnalign.model_folders import (CHECKPOINTS, FINAL_CHECKPOINT, PLANS_NAME, fold_folder, model_folder,
                                    model_folder_parts, parse_fold)
from nnalign.losses.kd.registry import KD_METHODS
from nnalign.paths import dataset_id_of, resolve_dataset
from nnalign.plans_check import check_dataset_json, check_plans
from nnalign.networks.anchor_registry import DEFAULT_ANCHOR
from nnalign.runs import BASELINE, TEACHER_ANCHORS, TEACHER_SETTINGS, TeacherSpec, teacher_spec as make_teacher

if TYPE_CHECKING:
    from nnalign.runs import AnyTeacher, StudentSpec

PROG = "nnalign_train"


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog=PROG,
        description="Train an nnalign model on a dataset planned and preprocessed with nnalign_plan_and_preprocess. "
                    "The teacher encodes each modality into a latent, aligns the latents to an anchor and segments "
                    "WT/TC/ET with the planned nnU-Net. Results go to $nnUNet_results/DATASET/"
                    "<trainer>__nnAlignPlans__CONFIG/fold_FOLD; the trainer name encodes the settings "
                    "(e.g. nnAlignTeacher_mixture, nnAlignTeacher_modalityT1ce_w0p5_sep_drop0p3).")
    p.add_argument("dataset", help="dataset ID (e.g. 137) or name (e.g. Dataset137_BraTS2021)")
    p.add_argument("configuration", help="configuration from the plans: 3d_fullres, 3d_cpu, paper, 2d")
    p.add_argument("fold", help="cross-validation fold (0-4, or fewer for small datasets) or 'all'")
    p.add_argument("--role", choices=("teacher", "student"), default="teacher", help="what to train (default: teacher)")
    p.add_argument("--anchor", default=DEFAULT_ANCHOR, metavar="ANCHOR",
                   help=f"{' | '.join('modality:NAME' if a == 'modality' else a for a in TEACHER_ANCHORS)} "
                        f"({BASELINE}: plain nnU-Net on all modalities, the paper's Original) (default: %(default)s)")
    add_setting_arguments(p, TEACHER_SETTINGS)
    student = p.add_argument_group("student (--role student)")
    student.add_argument("--modalities", metavar="LIST",
                         help="the modalities the student sees, comma-separated (e.g. T1ce or T1,T2)")
    student.add_argument("--kd", metavar="METHOD",
                         help=f"distillation: {' | '.join(KD_METHODS)} (none: the subset baseline)")
    student.add_argument("--teacher", metavar="MODEL_DIR",
                         help="the teacher's model folder, $nnUNet_results/DATASET/<teacher>__nnAlignPlans__CONFIG")
    student.add_argument("--teacher-fold", metavar="F", help="the teacher's fold (default: the student's fold)")
    student.add_argument("--temperature", type=float, metavar="T",
                         help="distillation temperature (kdnet, pmkl, protokd)")
    student.add_argument("--kd-set", action="append", default=[], metavar="KEY=VALUE",
                         help="set a loss weight of the method, e.g. kd_weight=5 or proto_weight=0.2 (repeatable; "
                              "an unknown key lists the method's settings)")
    p.add_argument("--overwrite", action="store_true", help="train a finished run again from scratch")
    p.add_argument("-device", choices=("cpu", "cuda", "mps"), default="cuda",
                   help="device to train on (default: %(default)s)")
    p.add_argument("--num-gpus", type=positive_int, default=1, metavar="N", help="GPUs for DDP training (default: 1)")
    p.add_argument("--c", dest="continue_training", action="store_true",
                   help="continue the run with these settings from its latest checkpoint")
    p.add_argument("--val", dest="validation_only", action="store_true",
                   help="only run the final validation of a finished run")
    p.add_argument("--npz", action="store_true", help="save the validation softmax/sigmoid outputs")
    p.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                   help="number of epochs (default: nnU-Net's 1000, or the run's own when continuing)")
    p.add_argument("--iters-per-epoch", type=positive_int, default=None, metavar="N",
                   help="training iterations per epoch (default: nnU-Net's 250, or the run's own when continuing); "
                        "validation iterations become max(1, N // 5)")
    return p


# ----------------------------------------------------------------------------------------------------------------------
# checks before training


def _data_identifier(configurations: dict, name: str) -> str | None:
    seen = set()
    while name in configurations and name not in seen:
        seen.add(name)
        cfg = configurations[name]
        if cfg.get("data_identifier"):
            return cfg["data_identifier"]
        name = cfg.get("inherits_from")
    return None


def check_preprocessed(dataset_folder: Path, configuration: str) -> tuple[dict, dict]:
    """(plans, dataset.json) of a preprocessed dataset, checked for ``configuration``; one-line errors otherwise."""
    dataset_id = dataset_id_of(dataset_folder.name)
    plans_file = dataset_folder / f"{PLANS_NAME}.json"
    how = f"run nnalign_plan_and_preprocess -d {dataset_id} -c {configuration}"
    if not plans_file.is_file():
        raise NnalignError(f"{dataset_folder} has no {PLANS_NAME}.json (not planned by nnalign): {how}")
    try:
        plans = json.loads(plans_file.read_text())
        dataset_json = json.loads((dataset_folder / "dataset.json").read_text())
    except (OSError, ValueError) as e:
        raise NnalignError(f"{dataset_folder}: cannot read the plans or dataset.json ({e}): {how}") from None
    check_plans(plans, plans_file)  # nnU-Net builds the networks from names in the plans
    check_dataset_json(dataset_json, dataset_folder / "dataset.json")
    if plans.get("dataset_name") != dataset_folder.name:
        raise NnalignError(f"{plans_file} belongs to dataset {plans.get('dataset_name')!r}, not {dataset_folder.name}: "
                           f"{how}")
    configurations = plans.get("configurations", {})
    if configuration not in configurations:
        raise NnalignError(f"configuration {configuration!r} is not in {plans_file.name} "
                           f"(it has {', '.join(configurations)})")
    identifier = _data_identifier(configurations, configuration)
    data_folder = dataset_folder / identifier if identifier else None
    if data_folder is None or not data_folder.is_dir() or not any(data_folder.glob("*.pkl")):
        raise NnalignError(f"configuration {configuration} of {dataset_folder.name} is not preprocessed "
                           f"(no {data_folder or 'data folder'}): {how}")
    return plans, dataset_json


TEACHER_OPTIONS = ("anchor", *(s.dest for s in TEACHER_SETTINGS))
STUDENT_OPTIONS = ("modalities", "kd", "teacher", "teacher_fold", "temperature", "kd_set")


def teacher_spec(args: argparse.Namespace) -> AnyTeacher:
    """The teacher (or baseline) that parsed ``nnalign_train`` arguments describe (one-line NnalignError for bad
    settings)."""
    return make_teacher(args.anchor, **setting_values(args, TEACHER_SETTINGS))


def check_role_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line error for an option of the other role (a student takes its teacher's settings from --teacher)."""
    other, role = (STUDENT_OPTIONS, "student") if args.role == "teacher" else (TEACHER_OPTIONS, "teacher")
    for dest in other:
        if getattr(args, dest) != parser.get_default(dest):
            raise NnalignError(f"--{dest.replace('_', '-')} applies to --role {role} only")


def _is_whole(value) -> bool:
    """An int, not a bool (JSON's true and false are neither counts nor levels)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_latent_settings(plans: dict, plans_file: Path, configuration: str, level: int | None) -> None:
    """One-line errors for the latent encoder's settings of a teacher run: ``--latent-level`` (``level``, None when
    not given) and the configuration's ``arch_kwargs`` in the plans, which users may edit as nnU-Net's plans."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnalign.networks.align_unet import LATENT_DEFAULTS

    kwargs = {**LATENT_DEFAULTS, **PlansManager(plans).get_configuration(configuration).network_arch_init_kwargs}
    n_stages = kwargs["n_stages"]
    if level is not None and level >= n_stages:
        raise NnalignError(f"--latent-level {level}: the {configuration} U-Net has stages 0 to {n_stages - 1}")
    where = f"{plans_file}: configuration {configuration}"
    for key in ("latent_channels", "latent_convs"):
        if not (_is_whole(kwargs[key]) and kwargs[key] >= 1):
            raise NnalignError(f"{where}: {key} must be a whole number >= 1, got {kwargs[key]!r}")
    planned_level = kwargs["latent_level"]
    if not (_is_whole(planned_level) and 0 <= planned_level < n_stages):
        raise NnalignError(f"{where}: latent_level must be a stage of the U-Net, 0 to {n_stages - 1}, "
                           f"got {planned_level!r}")


def run_folder(results_root: Path, dataset: str, trainer: str, configuration: str, fold) -> Path:
    """nnU-Net's output folder of a run."""
    return fold_folder(model_folder(results_root / dataset, trainer, configuration), fold)


def existing_runs(results_root: Path, dataset: str, configuration: str, fold) -> list[str]:
    """Trainer names of the nnalign runs with a checkpoint for this dataset, configuration and fold."""
    from nnalign.runs import parse_trainer_name

    base = results_root / dataset
    runs = []
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        trainer, plans, config = model_folder_parts(folder) or ("", "", "")
        if (plans, config) != (PLANS_NAME, configuration) or not any(
                (fold_folder(folder, fold) / c).is_file() for c in CHECKPOINTS):
            continue
        try:
            if parse_trainer_name(trainer) is not None:
                runs.append(trainer)
        except ValueError:
            continue
    return runs


def check_fold_in_split(dataset_folder: Path, fold: int | str) -> None:
    """One-line error for a fold that ``splits_final.json`` lacks (nnU-Net would train on a random 80:20 split)."""
    from nnalign.data.splits import NNUNET_FOLDS, read_splits_file

    if fold == "all":
        return
    splits_file = dataset_folder / "splits_final.json"
    if not splits_file.is_file():
        if fold >= NNUNET_FOLDS:
            raise NnalignError(f"fold {fold}: {dataset_folder.name} has no splits_final.json yet, and nnU-Net makes "
                               f"{NNUNET_FOLDS} folds (0-{NNUNET_FOLDS - 1}) or 'all'")
        return
    splits = read_splits_file(splits_file)
    if fold >= len(splits):
        folds = f"0-{len(splits) - 1}" if len(splits) > 1 else ("0" if splits else "none")
        raise NnalignError(f"fold {fold} is not in {splits_file} (its folds: {folds}; or 'all')")


def check_kd_settings(kd: str, overrides: dict, plans: dict, configuration: str) -> None:
    """One-line error for distillation settings the loss rejects (e.g. ``--temperature -1``), before training."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnalign.losses.kd import build_kd

    features = list(PlansManager(plans).get_configuration(configuration).network_arch_init_kwargs["features_per_stage"])
    build_kd(kd, feature_channels=features[0], bottleneck_channels=features[-1], skip_channels=features, **overrides)


def check_checkpoint_to_load(folder: Path, args) -> None:
    """One-line error if the checkpoint ``--c`` or ``--val`` will load (nnU-Net's choice: final, latest, best for
    ``--c``; final for ``--val``) is empty, truncated, or holds more than weights (:mod:`nnalign.checkpoints`)."""
    from nnalign.checkpoints import check_checkpoint

    names = CHECKPOINTS if args.continue_training else (FINAL_CHECKPOINT,) if args.validation_only else ()
    path = next((folder / n for n in names if (folder / n).is_file()), None)
    if path is not None:
        check_checkpoint(path)


def remove_failed_start(created: list[Path]) -> None:
    """Remove the run folders a failed start created (``created``: the model folder and/or fold folder that did not
    exist before, outermost first), unless training got as far as a checkpoint."""
    import shutil

    if not created:
        return
    fold_dir = created[-1]
    if any((fold_dir / c).is_file() for c in CHECKPOINTS):
        return
    shutil.rmtree(fold_dir, ignore_errors=True)
    model_dir = created[0]
    if model_dir != fold_dir and model_dir.is_dir() and not any(p.is_dir() for p in model_dir.iterdir()):
        shutil.rmtree(model_dir, ignore_errors=True)  # only nnU-Net's copies of the plans and dataset.json left


def check_run_state(folder: Path, settings, trainer: str, args, results_root: Path, dataset: str) -> dict:
    """One-line errors for ``--c`` / ``--val`` that cannot work; returns what the run was told before (its inputs),
    {} for a new run."""
    from nnalign.training.record import check_method_version, read_settings_record, read_training_inputs

    if args.continue_training and args.validation_only:
        raise NnalignError("--c and --val cannot be combined (--c also runs the final validation)")
    # a new run replaces whatever the folder holds; --c and --val refuse a record or inputs they cannot read
    continuing = args.continue_training or args.validation_only
    record = read_settings_record(folder) if continuing else None
    told = read_training_inputs(folder) if continuing else {}
    if continuing:
        check_method_version(folder, "it cannot be continued or validated with this version; train it again "
                                     "(--overwrite) or use the nnalign version that made it")
    if args.continue_training and not any((folder / c).is_file() for c in CHECKPOINTS):
        runs = existing_runs(results_root, dataset, args.configuration, args.fold)
        listing = ", ".join(runs) if runs else "none"
        raise NnalignError(f"--c: no checkpoint of {trainer} in {folder}; runs with a checkpoint for "
                           f"{args.configuration} fold {args.fold}: {listing}")
    if args.validation_only and not (folder / FINAL_CHECKPOINT).is_file():
        raise NnalignError(f"--val: {folder} has no checkpoint_final.pth (train it first, or finish it with --c)")
    then = told.get("settings") or (record or {}).get("settings")
    if settings is not None and then is not None:
        # a setting newer than the run (e.g. align_distance) counts as what that run did: its default
        recorded = {k: then.get(k, v) for k, v in settings.model_settings().items()}
        if recorded != settings.model_settings():
            diff = ", ".join(f"{k} {recorded[k]!r} != {v!r}" for k, v in settings.model_settings().items()
                             if recorded[k] != v)
            raise NnalignError(f"{folder} was trained with other settings ({diff})")
    return told


def parse_kd_overrides(method: str, assignments: list[str], temperature: float | None) -> dict:
    """``KEY=VALUE`` flags (and ``--temperature``) as the method's loss-setting overrides, checked against it."""
    from nnalign.losses.kd.registry import kd_class

    cls = kd_class(method)
    known = cls.setting_names()
    overrides: dict = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise NnalignError(f"--kd-set {item!r}: expected KEY=VALUE")
        try:
            overrides[key] = float(value)
        except ValueError:
            raise NnalignError(f"--kd-set {item!r}: {value!r} is not a number") from None
    if temperature is not None:
        overrides["temperature"] = temperature
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise NnalignError(f"{method} has no setting {unknown[0]!r} (its settings: {', '.join(known) or 'none'})")
    return {k: int(v) if k.endswith("epochs") else v for k, v in overrides.items()}


def check_teacher(teacher_dir: str, dataset: str, configuration: str, results_root: Path) -> AnyTeacher:
    """The spec of a teacher model folder; one-line errors for one that cannot serve.

    The student trainer loads its teacher from ``results_root/dataset`` by name, so the folder must lie there.
    """
    folder = Path(teacher_dir).resolve()
    if not folder.is_dir():
        raise NnalignError(f"--teacher {teacher_dir}: no such folder")
    trainer, sep, rest = folder.name.partition("__")
    plans, _, teacher_config = rest.partition("__")
    try:
        spec = TeacherSpec.parse(trainer) if sep else None
    except ValueError:
        spec = None
    if spec is None:
        raise NnalignError(f"--teacher {folder}: not an nnalign teacher model folder "
                           f"(expected <nnAlignTeacher...>__{PLANS_NAME}__{configuration})")
    if folder.parent.name != dataset:
        raise NnalignError(f"--teacher {folder}: the teacher was trained on {folder.parent.name}, not {dataset}")
    if folder.parent != (results_root / dataset).resolve():
        raise NnalignError(f"--teacher {folder}: not in {results_root / dataset} ($nnUNet_results), where the student "
                           f"loads its teacher from")
    if plans != PLANS_NAME or teacher_config != configuration:
        raise NnalignError(f"--teacher {folder}: the teacher uses {plans} {teacher_config}, the student "
                           f"{PLANS_NAME} {configuration} (they must match so that features match)")
    return spec


def student_spec(args, dataset: str, modalities: tuple[str, ...], results_root: Path) -> "StudentSpec":
    """The student the command line describes (its teacher checked to be usable), with its loss-setting overrides."""
    from nnalign.checkpoints import check_checkpoint
    from nnalign.modalities import parse_modalities
    from nnalign.runs import StudentSpec
    from nnalign.training.record import check_method_version

    for flag, value in (("--modalities", args.modalities), ("--kd", args.kd), ("--teacher", args.teacher)):
        if value is None:
            raise NnalignError(f"--role student needs {flag}")
    subset = parse_modalities(args.modalities, modalities)
    teacher = check_teacher(args.teacher, dataset, args.configuration, results_root)
    teacher_fold = None if args.teacher_fold is None else str(parse_fold(args.teacher_fold))
    spec = StudentSpec(subset, args.kd, teacher, teacher_fold)  # the one check of the method's name
    spec = replace(spec, overrides=parse_kd_overrides(spec.kd, args.kd_set, args.temperature))
    teacher_fold_folder = fold_folder(Path(args.teacher).resolve(),
                                      teacher_fold if teacher_fold is not None else args.fold)
    if not (teacher_fold_folder / FINAL_CHECKPOINT).is_file():
        raise NnalignError(f"--teacher {teacher_fold_folder}: no {FINAL_CHECKPOINT} (the teacher's training for this "
                           f"fold is incomplete; use --teacher-fold to pick another fold)")
    check_checkpoint(teacher_fold_folder / FINAL_CHECKPOINT)
    check_method_version(teacher_fold_folder, "it cannot teach with this version (its outputs would differ from "
                                              "how it was trained); train it again")
    return spec


# ----------------------------------------------------------------------------------------------------------------------


@cli_entry(PROG)
def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    check_role_options(parser, args)
    from nnalign.modalities import modalities_from_dataset_json
    from nnalign.paths import setup_env
    from nnalign.runs import TrainingLength
    from nnalign.training.record import write_training_inputs

    folders = setup_env()
    if args.num_gpus < 1:
        raise NnalignError(f"--num-gpus must be at least 1, got {args.num_gpus}")
    if args.num_gpus > 1 and args.device != "cuda":
        raise NnalignError(f"--num-gpus {args.num_gpus} (DDP) needs -device cuda")
    args.fold = parse_fold(args.fold)
    preprocessed, results = Path(folders["nnUNet_preprocessed"]), Path(folders["nnUNet_results"])
    dataset = resolve_dataset(args.dataset, preprocessed, Path(folders["nnUNet_raw"]))
    from nnalign.planning.status import check_preprocessing_complete

    check_preprocessing_complete(preprocessed / dataset)
    plans, dataset_json = check_preprocessed(preprocessed / dataset, args.configuration)
    check_fold_in_split(preprocessed / dataset, args.fold)
    modalities = modalities_from_dataset_json(dataset_json, str(preprocessed / dataset / "dataset.json"))
    if args.role == "teacher":
        spec = teacher_spec(args)
        if spec.anchor_modality is not None and spec.anchor_modality not in modalities:
            raise NnalignError(f"anchor {spec.anchor}: {dataset} has no {spec.anchor_modality} "
                               f"(it has {', '.join(modalities)})")
        if not spec.is_original:
            check_latent_settings(plans, preprocessed / dataset / f"{PLANS_NAME}.json", args.configuration,
                                  spec.latent_level)
        inputs = {"settings": spec.model_settings()}
    else:
        spec = student_spec(args, dataset, modalities, results)
        check_kd_settings(spec.kd, spec.overrides, plans, args.configuration)
        inputs = {"kd_overrides": spec.overrides}
    trainer = spec.trainer_name()
    inputs["trainer"] = trainer
    folder = run_folder(results, dataset, trainer, args.configuration, args.fold)
    told = check_run_state(folder, spec if args.role == "teacher" else None, trainer, args, results, dataset)
    check_checkpoint_to_load(folder, args)
    continuing = args.continue_training or args.validation_only
    if not (continuing or args.overwrite) and (folder / FINAL_CHECKPOINT).is_file():
        raise NnalignError(f"{folder} holds a finished run: --c --epochs N continues it, --val validates it, "
                           f"--overwrite trains it again from scratch")
    # The training length travels in the run's inputs (read by every DDP rank); a continued run keeps its own.
    length = TrainingLength(args.epochs, args.iters_per_epoch)
    if continuing:
        recorded = TrainingLength.from_record(told)
        length = TrainingLength(length.epochs or recorded.epochs, length.iters_per_epoch or recorded.iters_per_epoch)
    inputs.update(epochs=length.epochs, iters_per_epoch=length.iters_per_epoch)

    from nnalign.device import setup_device

    device = setup_device(args.device, args.num_gpus)

    from nnunetv2.run.run_training import run_training

    from nnalign.checkpoints import safe_torch_load

    print(f"{PROG}: {trainer} on {dataset} {args.configuration} fold {args.fold} -> {folder}")
    created = [p for p in (folder.parent, folder) if not p.exists()]
    try:
        check_writable(folder, "the run")
        write_training_inputs(folder, inputs, continuing)
        with safe_torch_load(), warnings.catch_warnings():  # nnU-Net's trainer loads --c / --val weights-only
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.interface", category=FutureWarning)
            run_training(dataset, args.configuration, args.fold, trainer, PLANS_NAME, None, args.num_gpus, args.npz,
                         args.continue_training, args.validation_only, False, False, device=device)
    except OSError as e:  # a full or failing disk, half way
        remove_failed_start(created)
        where = e.filename or folder
        raise NnalignError(f"{where}: cannot write ({e.strerror or e}): training stopped") from None
    except BaseException:
        remove_failed_start(created)
        raise
    return 0


if __name__ == "__main__":
    main()
