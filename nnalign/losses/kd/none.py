"""``none``: no distillation, the student trains on its own segmentation loss only (the unimodal baseline).

``total`` is a float32 scalar 0 on the student's device, attached to the student's graph (with zero gradient), so
a trainer can always call ``(seg_weight·L_seg + total).backward()`` without special cases.
"""
from __future__ import annotations

from torch import Tensor

from nnalign.losses.kd.base import DistillationLoss, NetworkShape
from nnalign.losses.kd.registry import register_kd
from nnalign.networks.outputs import NetworkOutputs


@register_kd("none")
class NoDistillation(DistillationLoss):
    """No distillation term: ``{"total": 0}``; ``seg_weight`` = 1. The teacher is not run (``teacher`` may be None)."""

    uses_teacher = False

    def __init__(self, shape: NetworkShape) -> None:
        super().__init__()

    def components(
        self, student: NetworkOutputs, teacher: NetworkOutputs, target: Tensor, epoch: int
    ) -> dict[str, Tensor]:
        return {}
