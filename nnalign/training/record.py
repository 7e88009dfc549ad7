"""The settings record saved beside every trained model: ``nnalign_settings.json`` in the fold folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

from nnalign.errors import NnalignError

SETTINGS_RECORD = "nnalign_settings.json"

METHOD_VERSION = 2
"""The version of the method's definition a run was trained with, written into every record. Version 2 (nnalign
0.2.0): P*'s weights scale each modality's latents into the predictor, relative (scale-free) MSE anchors, a loss
weight per anchor, and the sigmoid-head distillation terms at a bounded scale. A record without the key is version 1."""


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


def check_method_version(fold_folder: str | os.PathLike, what_to_do: str) -> None:
    """Raise a one-line :class:`NnalignError` when the fold's run was trained under another method version.

    ``what_to_do`` ends the message (e.g. "train it again with this version"). A folder without a record passes.
    """
    record = read_settings_record(fold_folder)
    if record is None or method_version(record) == METHOD_VERSION:
        return
    raise NnalignError(f"{fold_folder}: made by nnalign {record.get('nnalign_version', 'before 0.2')} (method version "
                       f"{method_version(record)}; this nnalign trains version {METHOD_VERSION}, whose P* weights, "
                       f"alignment and distillation losses differ): {what_to_do}")
