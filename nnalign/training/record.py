"""The settings record saved beside every trained model: ``nnalign_settings.json`` in the fold folder."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

SETTINGS_RECORD = "nnalign_settings.json"


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it over ``path`` (readers never see half a file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_settings_record(fold_folder: str | os.PathLike) -> dict | None:
    """The record of a fold folder, or None if it has none (or it cannot be parsed)."""
    path = Path(fold_folder) / SETTINGS_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
