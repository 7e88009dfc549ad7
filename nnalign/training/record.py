"""The settings record saved beside every trained model: ``nnalign_settings.json`` in the fold folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

SETTINGS_RECORD = "nnalign_settings.json"


def read_settings_record(fold_folder: str | os.PathLike) -> dict | None:
    """The record of a fold folder, or None if it has none (or it cannot be parsed)."""
    path = Path(fold_folder) / SETTINGS_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
