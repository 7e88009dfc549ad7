"""nnU-Net's results layout and what a trained model folder is.

A dataset's results folder holds model folders ``{Trainer}__{plans}__{configuration}`` with ``fold_N`` / ``fold_all``
inside, and nnalign's held-out evaluations ``nnalign_evaluations/{model folder}/{subset tag}/``. A
:class:`ModelFolder` is one model folder read by its name: the trainer name says whether it holds a teacher, a
student, the plain nnU-Net baseline or another nnU-Net trainer's model (:func:`nnalign.runs.parse_trainer_name`).

Shared by ``nnalign_train``, ``nnalign_predict``, ``nnalign_report`` and the experiment grid; nothing here imports
torch or nnU-Net.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from nnalign.errors import NnalignError
from nnalign.modalities import subset_tag
from nnalign.runs import StudentSpec, parse_trainer_name

if TYPE_CHECKING:
    from nnalign.runs import TeacherSpec

FOLD_RE = re.compile(r"fold_(\d+|all)")
#: The plans nnalign's planner writes (``nnAlignPlans.json``), the middle part of its model folder names.
PLANS_NAME = "nnAlignPlans"
#: The checkpoint nnU-Net writes when a fold's training has finished.
FINAL_CHECKPOINT = "checkpoint_final.pth"
#: A fold's checkpoints, most finished first.
CHECKPOINTS: tuple[str, ...] = (FINAL_CHECKPOINT, "checkpoint_latest.pth", "checkpoint_best.pth")
#: Where held-out evaluations go in a dataset's results folder (:func:`evaluation_folder`).
EVALUATIONS_DIR = "nnalign_evaluations"
#: The scores of one evaluation, as ``nnalign_evaluate`` writes them (with a ``.csv`` of the same stem beside).
EVALUATION_FILE = "metrics.json"
#: What a model folder holds (:attr:`ModelFolder.kind`): an aligned teacher, a student, the plain nnU-Net baseline
#: (``nnAlignOriginal...``), or a model of another nnU-Net trainer.
TEACHER, STUDENT, ORIGINAL, NNUNET = "teacher", "student", "original", "nnunet"


def parse_fold(fold: str | int) -> int | str:
    """``'3'`` -> 3, ``'all'`` -> ``'all'``; NnalignError otherwise."""
    if fold == "all":
        return fold
    try:
        value = int(fold)
    except (TypeError, ValueError):
        raise NnalignError(f"fold must be an integer or 'all', got {fold!r}") from None
    if value < 0:
        raise NnalignError(f"fold must not be negative, got {value}")
    return value


def fold_sort_key(fold: int | str) -> tuple[int, int]:
    """Numbered folds in order, then ``all``."""
    return (1, 0) if fold == "all" else (0, int(fold))


def model_folder(results_dataset_folder: str | Path, trainer: str, configuration: str, plans: str = PLANS_NAME) -> Path:
    """``results_dataset_folder / {trainer}__{plans}__{configuration}``, nnU-Net's model folder of a trainer."""
    return Path(results_dataset_folder) / f"{trainer}__{plans}__{configuration}"


def fold_folder(model_folder: str | Path, fold: int | str) -> Path:
    """``model_folder / fold_{fold}``."""
    return Path(model_folder) / f"fold_{fold}"


def model_folder_parts(folder: Path) -> tuple[str, str, str] | None:
    """(trainer, plans, configuration) of a folder named like nnU-Net's model folders, else None."""
    parts = Path(folder).name.split("__")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and all(parts) else None


def folds_in(folder: Path, required_file: str | None = None) -> list[int | str]:
    """The folds of a model folder (``fold_N`` as int, ``fold_all`` as ``'all'``), sorted; with ``required_file``,
    only the folds that hold it."""
    folder = Path(folder)
    folds = []
    for sub in folder.iterdir() if folder.is_dir() else []:
        m = FOLD_RE.fullmatch(sub.name)
        if m and sub.is_dir() and (required_file is None or (sub / required_file).is_file()):
            folds.append(parse_fold(m.group(1)))
    return sorted(folds, key=fold_sort_key)


def fold_checkpoint(fold_dir: Path) -> Path | None:
    """A fold's final checkpoint, else its latest (training in progress), else its best; None if it has none."""
    return next((Path(fold_dir) / c for c in CHECKPOINTS if (Path(fold_dir) / c).is_file()), None)


def evaluation_folder(results_dataset_folder: str | Path, model_name: str, subset: Sequence[str]) -> Path:
    """``results_dataset_folder / nnalign_evaluations / model_name / {subset tag}``: where the held-out cases
    predicted by a model from ``subset`` alone and their scores (:data:`EVALUATION_FILE`) go."""
    return Path(results_dataset_folder) / EVALUATIONS_DIR / model_name / subset_tag(subset)


def kind_of(spec: object) -> str:
    """:data:`STUDENT`, :data:`ORIGINAL`, :data:`TEACHER` or :data:`NNUNET` for what
    :func:`~nnalign.runs.parse_trainer_name` returned."""
    if spec is None:
        return NNUNET
    if isinstance(spec, StudentSpec):
        return STUDENT
    return ORIGINAL if getattr(spec, "is_original", False) else TEACHER


@dataclass(frozen=True)
class ModelFolder:
    """A trained model's folder ``{trainer}__{plans}__{configuration}`` and what its trainer name says.

    ``spec``: the parsed trainer name, None for another nnU-Net trainer than nnalign's (left out of comparisons: the
    trainer name says it).
    """

    folder: Path
    trainer: str
    plans: str
    configuration: str
    spec: "TeacherSpec | StudentSpec | None" = field(compare=False)

    @classmethod
    def read(cls, folder: str | Path) -> "ModelFolder | None":
        """The model folder at ``folder`` (an instance of ``cls``); None if it is not named like one.

        Raises ValueError (one line) for a trainer name that starts like nnalign's but is not one of its names.
        """
        parts = model_folder_parts(Path(folder))
        if parts is None:
            return None
        return cls(Path(folder), *parts, parse_trainer_name(parts[0]))

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def kind(self) -> str:
        """:data:`TEACHER`, :data:`STUDENT`, :data:`ORIGINAL` or :data:`NNUNET`."""
        return kind_of(self.spec)

    @property
    def teacher(self) -> "TeacherSpec | None":
        """A teacher's or the baseline's own spec, a student's teacher's; None for another nnU-Net trainer."""
        return self.spec.teacher if isinstance(self.spec, StudentSpec) else self.spec

    @property
    def anchor(self) -> str | None:
        """The anchor of :attr:`teacher` (``original`` for the baseline); None for another nnU-Net trainer."""
        return self.teacher.anchor if self.teacher is not None else None

    def list_folds(self, required_file: str | None = None) -> list[int | str]:
        """Its folds, sorted (:func:`folds_in`)."""
        return folds_in(self.folder, required_file)
