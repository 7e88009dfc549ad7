"""Finding trained models and choosing one for a case's modality subset.

A model is an nnU-Net training output folder ``{Trainer}__{plans}__{configuration}`` with ``fold_*/checkpoint_*.pth``,
``dataset.json`` and ``plans.json``. What it can segment follows from its trainer name alone:

- student (``nnAlignStudent_<subset>_...``): exactly its modality subset;
- teacher (``nnAlignTeacher_...``): every modality; any non-empty subset too if it was trained with modality
  dropout (``_drop<p>``), the absent modalities' latents then being filled by its anchor;
- original (``nnAlignOriginal...``, and any other nnU-Net trainer): every modality only.

:func:`select_model` applies the selection rules of ``nnalign_predict`` (see ``documentation/predict.md``). Nothing
here imports torch or nnU-Net.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from nnalign.errors import NnalignError
from nnalign.evaluation.validation import read_validation_summary
from nnalign.modalities import modalities_from_dataset_json, subset_tag
from nnalign.model_folders import (FINAL_CHECKPOINT, FOLD_RE, ORIGINAL, STUDENT, TEACHER, ModelFolder, fold_folder,
                                    model_folder_parts, parse_fold)
from nnalign.plans_check import PlansError, check_model_folder
from nnalign.training.record import check_method_version

FALLBACK_LABEL_CONVENTION = "brats2018"


class ModelError(NnalignError):
    """A model folder that cannot be used; the message is one line naming the folder."""


class NoModelError(NnalignError):
    """No model serves a case's modalities; the message is one line listing the models and what they serve."""


@dataclass(frozen=True)
class Model(ModelFolder):
    """A usable trained model: its folder and what its trainer name says (:class:`ModelFolder`, ``kind`` one of
    STUDENT, TEACHER, ORIGINAL or NNUNET), the folds to ensemble and their Dice."""

    modalities: tuple[str, ...]  # the dataset's channels, in channel order (dataset.json)
    subset: tuple[str, ...]  # the channels it reads: a student's subset, else all of ``modalities``
    modality_dropout: float
    folds: tuple[int | str, ...]
    mean_dice: float | None  # nnU-Net's validation foreground-mean Dice averaged over ``folds``; None if none found
    checkpoint: str = FINAL_CHECKPOINT
    dataset_json: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def any_subset(self) -> bool:
        """A teacher or a plain baseline trained with modality dropout: it serves every non-empty subset of its
        modalities (the teacher fills the absent ones from its anchor, the baseline sees them zeroed, as it
        trained)."""
        return self.kind in (TEACHER, ORIGINAL) and self.modality_dropout > 0

    def serves(self, present: Sequence[str]) -> bool:
        """Whether this model can segment a case with exactly the modalities ``present``."""
        wanted = set(present)
        if not wanted or not wanted <= set(self.modalities):
            return False
        return wanted == set(self.subset) or self.any_subset

    def serves_description(self) -> str:
        """What it serves, for messages: ``T1ce+T2``, ``all modalities (T1+T1ce+T2+FLAIR)`` or ``any subset``."""
        if self.any_subset:
            return f"any subset of {'+'.join(self.modalities)}"
        if set(self.subset) == set(self.modalities):
            return f"all modalities ({'+'.join(self.modalities)})"
        return "+".join(self.subset)

    def channel_indices(self, present: Sequence[str]) -> tuple[int, ...]:
        """Indices of ``present`` among the model's input channels, in channel order."""
        return tuple(i for i, m in enumerate(self.modalities) if m in set(present))

    @property
    def source_label_convention(self) -> str:
        """The label convention of the data the model was trained on (dataset.json ``nnalign``), else brats2018."""
        info = self.dataset_json.get("nnalign") or {}
        convention = info.get("source_label_convention") if isinstance(info, dict) else None
        return convention if convention in ("brats2018", "brats2023", "brats2024") else FALLBACK_LABEL_CONVENTION


def validation_dice(folder: Path, folds: Sequence[int | str]) -> float | None:
    """Mean over ``folds`` of nnU-Net's validation ``foreground_mean`` Dice (folds without a finite one left out)."""
    summaries = [read_validation_summary(fold_folder(folder, f)) for f in folds]
    values = [s.foreground_dice for s in summaries if s is not None and s.foreground_dice is not None]
    return sum(values) / len(values) if values else None


def load_model(folder: Path, folds: Sequence[int | str] | None = None,
               checkpoint: str = FINAL_CHECKPOINT) -> Model:
    """Read one model folder; ModelError (one line naming the folder) if it cannot be used.

    ``folds`` None takes every ``fold_N`` with the checkpoint, as nnU-Net's auto-detection does (``fold_all`` only
    when it is the only one); given folds must all have it.
    """
    folder = Path(folder)
    try:
        found = ModelFolder.read(folder)
    except ValueError as e:
        raise ModelError(f"{folder}: unknown nnalign trainer name: {e}") from None
    if found is None:
        raise ModelError(f"{folder}: not a model folder (expected a name like <Trainer>__<plans>__<configuration>)")
    kind, spec = found.kind, found.spec
    for required in ("dataset.json", "plans.json"):
        if not (folder / required).is_file():
            raise ModelError(f"{folder}: no {required} (not a finished nnU-Net training output)")
    try:
        dataset_json = json.loads((folder / "dataset.json").read_text())
        modalities = modalities_from_dataset_json(dataset_json)
    except (OSError, ValueError, NnalignError) as e:
        raise ModelError(f"{folder}: cannot read dataset.json ({e})") from None
    try:
        check_model_folder(folder)  # nnU-Net builds the network from names in plans.json
    except PlansError as e:
        raise ModelError(str(e)) from None
    available = found.list_folds(checkpoint)
    if folds is None:
        use = [f for f in available if f != "all"] or available
        if not use:
            raise ModelError(f"{folder}: no fold_*/{checkpoint} (not trained yet, or training not finished)")
    else:
        use = [parse_fold(f) for f in folds]
        missing = [f for f in use if f not in available]
        if missing:
            raise ModelError(f"{folder}: fold_{missing[0]} has no {checkpoint}"
                             + (f" (folds with it: {', '.join(map(str, available))})" if available else ""))
    # A settings record that cannot be read, or one of another method version, makes a model unusable
    for fold in use:
        try:
            check_method_version(fold_folder(folder, fold), "its predictions would change meaning; train it again, "
                                                             "or predict with the version that made it")
        except NnalignError as e:
            raise ModelError(str(e)) from None
    student_subset = spec.modalities if kind == STUDENT else None
    dropout = spec.modality_dropout if kind in (TEACHER, ORIGINAL) else 0.0
    if student_subset is not None and not set(student_subset) <= set(modalities):
        raise ModelError(f"{folder}: student subset {subset_tag(student_subset)} is not among the dataset's "
                         f"modalities {', '.join(modalities)}")
    subset = tuple(m for m in modalities if m in student_subset) if student_subset is not None else modalities
    return Model(**vars(found), modalities=modalities, subset=subset, modality_dropout=dropout, folds=tuple(use),
                 mean_dice=validation_dice(folder, use), checkpoint=checkpoint, dataset_json=dataset_json)


@dataclass
class ModelSet:
    """The usable models under MODELS, and a one-line problem for each model folder that cannot be used."""

    models: list[Model]
    problems: list[str] = field(default_factory=list)


def check_checkpoint_name(name: str) -> None:
    """NnalignError unless ``name`` is a plain file name: ``-chk`` names a file inside each fold folder, so that a
    model folder's predictions come from its own checkpoints only."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise NnalignError(f"-chk {name!r}: give the name of a checkpoint file inside each fold folder (e.g. "
                           f"{FINAL_CHECKPOINT}), not a path")


def discover_models(models: Path, folds: Sequence[int | str] | None = None,
                    checkpoint: str = FINAL_CHECKPOINT) -> ModelSet:
    """The models under ``models``: one model folder, or a dataset results folder holding several.

    Raises NnalignError (one line) if there is no usable model at all, or if ``checkpoint`` is not a file name.
    """
    check_checkpoint_name(checkpoint)
    models = Path(models)
    if not models.is_dir():
        raise NnalignError(f"{models}: no such folder (give a model folder <Trainer>__<plans>__<configuration> or a "
                           f"dataset results folder holding such folders)")
    single = model_folder_parts(models) is not None or any(FOLD_RE.fullmatch(p.name) for p in models.iterdir())
    candidates = [models] if single else sorted(p for p in models.iterdir()
                                                if p.is_dir() and model_folder_parts(p) is not None)
    if not candidates:
        raise NnalignError(f"{models}: no model folders in it (expected <Trainer>__<plans>__<configuration> folders "
                           f"with fold_*/{checkpoint})")
    found = ModelSet([])
    for folder in candidates:
        try:
            found.models.append(load_model(folder, folds, checkpoint))
        except ModelError as e:
            found.problems.append(str(e))
    if not found.models:
        more = f" (and {len(found.problems) - 1} other model folder(s) unusable)" if len(found.problems) > 1 else ""
        raise NnalignError(f"no usable model: {found.problems[0]}{more}")
    return found


def _best(models: list[Model]) -> Model:
    """Highest mean validation Dice first; models without one after; ties and the rest by folder name."""
    return min(models, key=lambda m: (0, -m.mean_dice, m.name) if m.mean_dice is not None else (1, 0.0, m.name))


def select_model(models: Sequence[Model], present: Sequence[str]) -> tuple[Model, str]:
    """The model for a case whose modalities are ``present``, and why it was chosen.

    1. a student whose subset is exactly ``present``; 2. for all modalities, a teacher or original model; 3. a
    teacher or baseline trained with modality dropout. Among several, the best mean validation Dice, then the folder
    name.
    Raises NoModelError listing the models and what they serve.
    """
    wanted = set(present)
    students = [m for m in models if m.kind == STUDENT and set(m.subset) == wanted and m.serves(present)]
    if students:
        return _best(students), "student for these modalities"
    full = [m for m in models if m.kind != STUDENT and set(m.modalities) == wanted]
    if full:
        return _best(full), "all modalities present"
    dropout = [m for m in models if m.any_subset and m.serves(present)]
    if dropout:
        best = _best(dropout)
        if best.kind == ORIGINAL:
            return best, "baseline trained with modality dropout (absent modalities zeroed)"
        return best, "teacher trained with modality dropout (missing-modality path)"
    raise NoModelError(f"no model for modalities {'+'.join(present)}; models: {describe_models(models)}")


def describe_models(models: Sequence[Model]) -> str:
    """``NAME serves WHAT; ...`` for messages."""
    return "; ".join(f"{m.name} serves {m.serves_description()}" for m in models) or "none"
