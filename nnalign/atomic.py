"""Atomic file writes: readers never see half a file, and a failed write leaves the old file in place."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk and rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def check_writable(folder: str | os.PathLike, what: str = "files") -> None:
    """Make ``folder`` (and its parents) and try a file in it; one-line NnalignError naming the folder if it cannot
    be written (read-only, full, a file in the way), so that a run stops before it starts, not half way."""
    from nnalign.errors import NnalignError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise NnalignError(f"{folder}: cannot write {what} there ({e.strerror or e})") from None
