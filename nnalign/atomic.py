"""Atomic file writes: readers never see half a file, and a failed write leaves the old file in place."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def _written_temp(path: Path, text: str | bytes) -> str:
    """A temporary file beside ``path`` holding ``text`` (or bytes), flushed to disk; removed again if writing
    fails."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        binary = isinstance(text, bytes)
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk and rename it over ``path``."""
    write_texts_atomic({path: text})


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` (a PNG) as :func:`write_text_atomic` writes text."""
    write_texts_atomic({path: data})


def write_texts_atomic(files: dict[str | os.PathLike, str | bytes]) -> None:
    """Write several files that belong together (a CSV and its JSON): each to a temporary file beside it, and only
    once every one is written rename them all over their paths, so that a failed write (a full disk) leaves every
    old file in place and no temporary file behind."""
    written: list[tuple[str, Path]] = []
    try:
        for path, text in files.items():
            written.append((_written_temp(Path(path), text), Path(path)))
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in written:
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
