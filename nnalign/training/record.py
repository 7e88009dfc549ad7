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

METHOD_VERSION = 5
"""The version of the method's definition a run was trained with, written into every record (see
:data:`VERSION_CHANGES`). A record without the key is version 1."""


def read_settings_record(fold_folder: str | os.PathLike) -> dict | None:
    """The record of a fold folder, or None if it has none; a one-line :class:`NnalignError` naming the file for a
    record that cannot be read, is not JSON (e.g. truncated) or does not hold what a record holds
    (:func:`check_settings_record`): an unreadable record is not an absent one."""
    path = Path(fold_folder) / SETTINGS_RECORD
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise NnalignError(f"{path}: cannot read the settings record ({getattr(e, 'strerror', None) or e})") from None
    try:
        record = json.loads(text)
    except ValueError as e:
        raise NnalignError(f"{path}: not a readable settings record (truncated, or not JSON: {e})") from None
    check_settings_record(record, path)
    return record


#: Keys of a record that hold a JSON object when present.
_OBJECT_KEYS = ("settings", "kd_overrides", "teacher", "optimizer", "latent", "mixture_weights")


def check_settings_record(record, path: str | os.PathLike) -> None:
    """One-line :class:`NnalignError` naming ``path`` unless ``record`` is a JSON object whose keys that nnalign
    reads have their types: a whole-number ``method_version`` of 1 or more, objects for :data:`_OBJECT_KEYS`, and a
    training length of positive whole numbers."""
    from nnalign.runs import TrainingLength

    if not isinstance(record, dict):
        raise NnalignError(f"{path}: not a settings record (a JSON {_json_type(record)}, not an object)")
    if "method_version" in record:
        version = record["method_version"]
        if not (isinstance(version, int) and not isinstance(version, bool) and version >= 1):
            raise NnalignError(f"{path}: method_version {json.dumps(version)} is not a valid method version (a whole "
                               f"number, 1 or more)")
    for key in _OBJECT_KEYS:
        if record.get(key) is not None and not isinstance(record[key], dict):
            raise NnalignError(f"{path}: {key!r} is a JSON {_json_type(record[key])}, not an object")
    try:
        TrainingLength.from_record(record)
    except NnalignError as e:
        raise NnalignError(f"{path}: {e}") from None


def _json_type(value) -> str:
    """The JSON name of a parsed value's type (array, string, number, ...)."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def method_version(record: dict) -> int:
    """The method version a settings record was written by (1 when it does not say; the record is checked by
    :func:`check_settings_record`)."""
    return record.get("method_version", 1)


def involves_mixture(record: dict) -> bool:
    """Whether a run's record names P*: a P* teacher, or a student of one (an unreadable teacher name counts)."""
    from nnalign.runs import TeacherSpec

    if record.get("role") != "student":
        return record.get("anchor") == "mixture"
    try:
        return TeacherSpec.parse(str((record.get("teacher") or {}).get("trainer"))).anchor_kind == "mixture"
    except ValueError:
        return True


def _student_of(record: dict, kd: str) -> bool:
    """Whether a run's record is a student distilled with ``kd``."""
    return record.get("role") == "student" and record.get("kd") == kd


def _touched_by_version_3(record: dict) -> bool:
    """Version 3 changed P* (its weights' floor) and KD-Net's loss (the soft-label Dice)."""
    return involves_mixture(record) or _student_of(record, "kdnet")


def _touched_by_version_4(record: dict) -> bool:
    """Version 4 changed ProtoKD's default ``kd_weight`` (10 to 0.5): ProtoKD students that did not set it."""
    return _student_of(record, "protokd") and "kd_weight" not in (record.get("kd_overrides") or {})


def _touched_by_version_5(record: dict) -> bool:
    """Version 5 made P* the paper's and the P^k and P* losses plain MSE: those teachers and their students."""
    teacher = record.get("anchor") if record.get("role") != "student" else (record.get("teacher") or {}).get("trainer")
    return (involves_mixture(record) or str(teacher).startswith(("modality", "nnAlignTeacher_modality"))
            or _student_of(record, "smunet"))  # its style term: a mean over scales, at the original's weight


VERSION_CHANGES: dict[int, tuple[str, Callable[[dict], bool] | None]] = {
    2: ("the P* forward and the alignment and distillation losses", None),
    3: ("P*'s weights (their floor) and KD-Net's loss", _touched_by_version_3),
    4: ("ProtoKD's logit-term weight", _touched_by_version_4),
    5: ("P* to the paper's form and the P^k and P* losses to plain MSE (the earlier P* is anchor mixture-scaled, the "
        "earlier loss --align-distance relative), and SMU-Net's style-term weight", _touched_by_version_5),
}
"""What each method version changed (the phrase a refusal names) and the test of whether the change touches a run's
record (None: every run). CHANGELOG.md describes each version's changes in full."""


def _changes_since(record: dict) -> list[str]:
    """The later versions' changes that touch the run of ``record``."""
    later = range(max(method_version(record), 1) + 1, METHOD_VERSION + 1)
    return [what for v in later for what, touched in [VERSION_CHANGES[v]] if touched is None or touched(record)]


def is_current_method(record: dict) -> bool:
    """Whether a run of this record computes what this version trains: the same method version, or an older one
    that no later change (:data:`VERSION_CHANGES`) touches."""
    return method_version(record) <= METHOD_VERSION and not _changes_since(record)


def check_method_version(fold_folder: str | os.PathLike, what_to_do: str, older: bool = True) -> None:
    """Raise a one-line :class:`NnalignError` when the fold's settings record cannot be read
    (:func:`read_settings_record`), was written by a newer nnalign (a method version this one does not know), or,
    with ``older``, by an older method version that computes otherwise (:func:`is_current_method`).

    ``what_to_do`` ends the message of an older version (e.g. "train it again with this version"). A folder without
    a record passes.
    """
    record = read_settings_record(fold_folder)
    if record is None:
        return
    version = method_version(record)
    if version > METHOD_VERSION:
        made = record.get("nnalign_version")
        raise NnalignError(f"{fold_folder}: made by a newer nnalign{f' {made}' if isinstance(made, str) else ''} "
                           f"(method version {version}; this nnalign, {__version__}, knows versions up to "
                           f"{METHOD_VERSION}): upgrade nnalign to use it")
    if not older or is_current_method(record):
        return
    raise NnalignError(f"{fold_folder}: made by nnalign {record.get('nnalign_version', 'before 0.2')} (method version "
                       f"{version}; this nnalign trains version {METHOD_VERSION}, which changed "
                       f"{'; '.join(_changes_since(record))}): {what_to_do}")


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
