"""Loading checkpoints without running code they may hold.

A ``.pth`` file is a pickle, and unpickling can call any function the file names. nnalign loads every checkpoint with
``torch.load(..., weights_only=True)`` and allows, besides what PyTorch's weights-only loader accepts (tensors,
numbers, strings, lists, tuples, dicts, ``torch.device``), only the few types nnU-Net's checkpoints hold:
``numpy.dtype`` with its numeric dtype classes, and numpy scalars (the logged Dice values and the best EMA), under
their numpy 2 and numpy 1 names.
A file holding anything else is refused with one line naming the file and the type.

nnU-Net's own loads (its predictor, and its trainer when continuing a run) go through the same loader while
:func:`safe_torch_load` is active; nnalign's commands enter it, ``nnUNetv2_predict`` and ``nnUNetv2_train`` keep
nnU-Net's behaviour.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
from typing import Any, Iterator

from nnalign.errors import NnalignError

#: What the refusal message says a checkpoint may hold.
ALLOWED_DESCRIPTION = "tensors, numbers, strings, lists, dicts and numpy scalars"
#: How PyTorch's weights-only loader names what it refused: a global it does not allow, a global of a blocked module
#: (``os``, ``sys``), an object of a class it cannot build.
_REFUSED = (re.compile(r"Unsupported global: GLOBAL (\S+)"), re.compile(r"unsupported GLOBAL (\S+) whose module"),
            re.compile(r"but got <class '([^']+)'>"))
#: numpy's dtype classes a pickled ``numpy.dtype`` names (numbers and booleans only).
_NUMPY_DTYPES = ("BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType", "UInt16DType",
                 "UInt32DType", "UInt64DType", "Float16DType", "Float32DType", "Float64DType")


class CheckpointError(NnalignError):
    """A checkpoint that cannot or must not be loaded; the message is one line, ``PATH: REASON``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):
        return type(self), (self.path, self.reason)


def allowed_globals() -> list:
    """The types and functions nnU-Net checkpoints need beyond PyTorch's weights-only defaults."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    dtype_classes = [getattr(np.dtypes, n) for n in _NUMPY_DTYPES if hasattr(getattr(np, "dtypes", None), n)]
    return [np.dtype, *dtype_classes, scalar, (scalar, "numpy.core.multiarray.scalar"),
            (scalar, "numpy._core.multiarray.scalar")]


def _first_sentence(e: BaseException) -> str:
    text = " ".join(str(e).split())
    text = text.split(". ")[0].rstrip(".") if text else type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def refusal_reason(e: pickle.UnpicklingError) -> str:
    """What the weights-only loader refused, from its (multi-line) message: ``it holds builtins.exec, ...``."""
    text = str(e)
    for pattern in _REFUSED:
        found = pattern.search(text)
        if found:
            name = found.group(1).rstrip(".,")
            name = name if "." in name else f"builtins.{name}"  # PyTorch drops the module of builtins
            return f"it holds {name}, which a checkpoint may not hold (only {ALLOWED_DESCRIPTION})"
    detail = text.split("WeightsUnpickler error:", 1)[-1]
    paragraphs = [p for p in detail.split("\n\n") if p.strip()
                  and not p.strip().startswith(("Weights only load failed", "Check the documentation"))]
    return f"its contents are not plain data ({_first_sentence(Exception(paragraphs[0] if paragraphs else detail))})"


def load_checkpoint_safely(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, map_location, weights_only=True)`` with :func:`allowed_globals`; CheckpointError (one line
    naming ``path``) for a file that holds anything else, or that is empty, truncated or not a checkpoint."""
    import torch

    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else repr(path)
    if isinstance(path, (str, os.PathLike)):
        try:
            if os.path.getsize(path) == 0:
                raise CheckpointError(name, "empty file, not a checkpoint")
        except OSError as e:
            raise CheckpointError(name, f"cannot read the checkpoint ({e.strerror or e})") from None
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            # torch.serialization.load, not torch.load: the latter may be this module's guard (safe_torch_load)
            return torch.serialization.load(path, map_location=map_location, weights_only=True, mmap=mmap or None)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(name, f"refused: {refusal_reason(e)}") from None
        raise CheckpointError(name, f"not a readable checkpoint (truncated or corrupt: {_first_sentence(e)})") from None
    except OSError as e:
        raise CheckpointError(name, f"cannot read the checkpoint ({e.strerror or _first_sentence(e)})") from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise CheckpointError(name, f"not a readable checkpoint (truncated or corrupt: {type(e).__name__}: "
                                    f"{_first_sentence(e)})") from None


def check_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless ``path`` loads with :func:`load_checkpoint_safely` (memory-mapped, so cheap)."""
    import zipfile

    # only the zip format (torch.save's default since 1.6) can be memory-mapped
    load_checkpoint_safely(path, "cpu", mmap=zipfile.is_zipfile(path))


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Within the block, every ``torch.load`` (nnU-Net's predictor and trainer included) is
    :func:`load_checkpoint_safely`, whatever ``weights_only`` the caller asks for."""
    import torch

    original = torch.load

    def guarded(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        return load_checkpoint_safely(f, map_location, mmap=bool(mmap))

    torch.load = guarded
    try:
        yield
    finally:
        torch.load = original
