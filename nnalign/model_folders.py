"""nnU-Net's results layout: model folders ``{Trainer}__{plans}__{configuration}`` holding ``fold_N`` / ``fold_all``.

Shared by ``nnalign_train``, ``nnalign_predict`` and ``nnalign_report``; nothing here imports torch or nnU-Net.
"""
from __future__ import annotations

import re
from pathlib import Path

from nnalign.errors import NnalignError

FOLD_RE = re.compile(r"fold_(\d+|all)")
#: The plans nnalign's planner writes (``nnAlignPlans.json``), the middle part of its model folder names.
PLANS_NAME = "nnAlignPlans"
#: The checkpoint nnU-Net writes when a fold's training has finished.
FINAL_CHECKPOINT = "checkpoint_final.pth"
#: A fold's checkpoints, most finished first.
CHECKPOINTS: tuple[str, ...] = (FINAL_CHECKPOINT, "checkpoint_latest.pth", "checkpoint_best.pth")


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
