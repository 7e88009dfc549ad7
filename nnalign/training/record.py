"""What a run is told and what it made, apart, in its fold folder:

- ``nnalign_inputs.json`` (:data:`INPUTS_FILE`): what ``nnalign_train`` tells the run before training (its trainer
  name and settings, its length, its distillation settings); read-only, read by the trainer in every DDP rank and on
  ``--c``, rewritten only by ``nnalign_train`` (a continued run may be given a new length).
- ``nnalign_settings.json`` (:data:`SETTINGS_RECORD`): how the model was made, written by the trainer as training
  goes: the method version, the data, the optimizer, the epochs done, and what it measured (mixture weights, the
  alignment series, warnings).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from nnalign import __version__
from nnalign.atomic import write_json_atomic
from nnalign.errors import NnalignError
from nnalign.runs import TRAINING_ONLY

SETTINGS_RECORD = "nnalign_settings.json"
INPUTS_FILE = "nnalign_inputs.json"
TRAINING_VOLUMES = "training_volumes_ml"
"""The record's key for the range of the training cases' region volumes (:mod:`nnalign.data.label_volumes`)."""

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


VERSION_CHANGES: dict[int, str] = {
    2: "the P* forward and the alignment and distillation losses",
    3: "P*'s weights (their floor) and KD-Net's loss",
    4: "ProtoKD's logit-term weight",
    5: "P* to the paper's form and the P^k and P* losses to plain MSE (the earlier P* is anchor mixture-scaled, the "
       "earlier loss --align-distance relative), and SMU-Net's style-term weight",
}
"""What each method version changed, as a refusal names it; CHANGELOG.md describes each version in full."""


def is_current_method(record: dict) -> bool:
    """Whether a run of this record was trained with this version's method (:data:`METHOD_VERSION`)."""
    return method_version(record) == METHOD_VERSION


def check_method_version(fold_folder: str | os.PathLike, what_to_do: str) -> None:
    """The one rule for a trained model: a one-line :class:`NnalignError` unless the fold's settings record can be
    read (:func:`read_settings_record`) and was written by this method version. A newer version's model asks for an
    upgrade; an older one's names what changed since and ends with ``what_to_do`` (e.g. "train it again with this
    version"). A folder without a record passes (nnU-Net's own models).
    """
    record = read_settings_record(fold_folder)
    if record is None or is_current_method(record):
        return
    version = method_version(record)
    if version > METHOD_VERSION:
        made = record.get("nnalign_version")
        raise NnalignError(f"{fold_folder}: made by a newer nnalign{f' {made}' if isinstance(made, str) else ''} "
                           f"(method version {version}; this nnalign, {__version__}, knows versions up to "
                           f"{METHOD_VERSION}): upgrade nnalign to use it")
    changes = [VERSION_CHANGES[v] for v in range(max(version, 1) + 1, METHOD_VERSION + 1)]
    raise NnalignError(f"{fold_folder}: made by nnalign {record.get('nnalign_version', 'before 0.2')} (method version "
                       f"{version}; this nnalign trains version {METHOD_VERSION}, which changed "
                       f"{'; '.join(changes)}): {what_to_do}")


def read_training_inputs(fold_folder: str | os.PathLike) -> dict:
    """What the run of a fold folder was told (:data:`INPUTS_FILE`; {} for none); a one-line :class:`NnalignError`
    naming the file for one that cannot be read or holds a bad length or settings. A run made before the inputs had
    their own file keeps them in its settings record: they are read from there."""
    path = Path(fold_folder) / INPUTS_FILE
    if not path.is_file():
        record = read_settings_record(fold_folder) or {}
        return {k: record[k] for k in TRAINING_ONLY if k in record}
    try:
        inputs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise NnalignError(f"{path}: not readable run inputs ({getattr(e, 'strerror', None) or e})") from None
    check_settings_record(inputs, path)  # the same keys have the same types
    return inputs


def write_training_inputs(fold_folder: str | os.PathLike, inputs: dict, continuing: bool) -> None:
    """Write what the run is told (``inputs``: trainer, settings and :data:`nnalign.runs.TRAINING_ONLY`) before
    training, read-only: merged into what a continued or validated run was told, else new. Atomic."""
    merged = {**(read_training_inputs(fold_folder) if continuing else {}), **inputs}
    path = Path(fold_folder) / INPUTS_FILE
    Path(fold_folder).mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, merged)
    path.chmod(0o444)
