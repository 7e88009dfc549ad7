"""The torch device a command runs on, checked and set up the same way for training and prediction."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from nnalign.errors import NnalignError

if TYPE_CHECKING:
    import torch


def setup_device(device: str, num_gpus: int = 1) -> "torch.device":
    """Check that ``device`` (``cpu``, ``cuda`` or ``mps``) is there and set torch's threads as nnU-Net's commands do.

    CPU: every core; CUDA: one thread (the GPU does the work), and ``num_gpus`` must be visible. Raises NnalignError
    (one line) for a device that is not available. torch is imported here, so that ``--help`` stays fast.
    """
    import torch

    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    elif device == "cuda":
        if not torch.cuda.is_available():
            raise NnalignError("-device cuda: no CUDA GPU is available (use -device cpu)")
        if num_gpus > torch.cuda.device_count():
            raise NnalignError(f"--num-gpus {num_gpus}: only {torch.cuda.device_count()} GPUs are visible")
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    elif not torch.backends.mps.is_available():
        raise NnalignError("-device mps: MPS is not available (use -device cpu)")
    return torch.device(device)
