"""The settings record beside every trained model, ``nnalign_settings.json`` in the fold folder: the run's training-only
inputs (written by ``nnalign_train`` before training) and, as training goes, how the model was made."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from nnalign import __version__
from nnalign.atomic import write_json_atomic
from nnalign.errors import NnalignError

SETTINGS_RECORD = "nnalign_settings.json"

METHOD_VERSION = 3
"""The version of the method's definition a run was trained with, written into every record. Version 2 (nnalign
0.2.0): P*'s weights scale each modality's latents into the predictor, relative (scale-free) MSE anchors, a loss
weight per anchor, and the sigmoid-head distillation terms at a bounded scale. Version 3: P*'s weights keep a floor
of half their uniform share, and KD-Net's soft-label term adds nnU-Net's Dice to its cross-entropy. A record without
the key is version 1."""


def read_settings_record(fold_folder: str | os.PathLike) -> dict | None:
    """The record of a fold folder, or None if it has none (or it cannot be parsed)."""
    path = Path(fold_folder) / SETTINGS_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def method_version(record: dict) -> int:
    """The method version a settings record was written by (1 when it does not say)."""
    version = record.get("method_version", 1)
    return version if isinstance(version, int) and not isinstance(version, bool) else 1


def involves_mixture(record: dict) -> bool:
    """Whether a run's record names P*: a P* teacher, or a student of one (an unreadable teacher name counts)."""
    from nnalign.runs import TeacherSpec

    if record.get("role") != "student":
        return record.get("anchor") == "mixture"
    try:
        return TeacherSpec.parse(str((record.get("teacher") or {}).get("trainer"))).anchor_kind == "mixture"
    except ValueError:
        return True


def _touched_by_version_3(record: dict) -> bool:
    """Version 3 changed P* (its weights' floor) and KD-Net's loss (the soft-label Dice)."""
    return involves_mixture(record) or (record.get("role") == "student" and record.get("kd") == "kdnet")


NARROW_CHANGES: dict[int, Callable[[dict], bool]] = {3: _touched_by_version_3}
"""Method versions whose change touches some runs only, with the test of whether it touches a run's record: a run of
the version before that the change does not touch computes and means what it did."""


def is_current_method(record: dict) -> bool:
    """Whether a run of this record computes what this version trains: the same method version, or an older one
    whose later changes (:data:`NARROW_CHANGES`) do not touch it."""
    version = method_version(record)
    if version == METHOD_VERSION:
        return True
    later = range(max(version, 1) + 1, METHOD_VERSION + 1)
    return version < METHOD_VERSION and all(v in NARROW_CHANGES and not NARROW_CHANGES[v](record) for v in later)


def check_method_version(fold_folder: str | os.PathLike, what_to_do: str) -> None:
    """Raise a one-line :class:`NnalignError` when the fold's run was trained under a method version that computes
    otherwise (:func:`is_current_method`).

    ``what_to_do`` ends the message (e.g. "train it again with this version"). A folder without a record passes.
    """
    record = read_settings_record(fold_folder)
    if record is None or is_current_method(record):
        return
    also = ", as do its alignment and other distillation losses" if method_version(record) < 2 else ""
    raise NnalignError(f"{fold_folder}: made by nnalign {record.get('nnalign_version', 'before 0.2')} (method version "
                       f"{method_version(record)}; this nnalign trains version {METHOD_VERSION}, whose P* weights "
                       f"and KD-Net loss differ{also}): {what_to_do}")


def write_training_inputs(fold_folder: str | os.PathLike, inputs: dict, continuing: bool) -> None:
    """Write the training-only settings (:data:`nnalign.runs.TRAINING_ONLY`) into the fold's record before training,
    for the trainer to read in every DDP rank: merged into the record of a run being continued or validated, else a
    new record of them alone (the trainer fills in the rest when training starts). Atomic."""
    record = (read_settings_record(fold_folder) or {}) if continuing else {}
    if not continuing:
        record.update(nnalign_version=__version__, method_version=METHOD_VERSION)
    record.update(inputs)
    Path(fold_folder).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(fold_folder) / SETTINGS_RECORD, record)
