"""Distillation losses from the frozen multi-modal teacher to a missing-modality student, one method per module,
selected by name through one registry::

    from nnalign.losses.kd import build_kd, KD_METHODS
    loss = build_kd("protokd", feature_channels=32, bottleneck_channels=320, skip_channels=[32, 64, 128, 256, 320, 320])
    parts = loss(student_outputs, teacher_outputs, region_target, epoch)   # {..., "total": tensor}
    (loss.seg_weight * seg_loss + parts["total"]).backward()

Methods: ``none``, ``kdnet`` (KD-Net), ``pmkl`` (PMKL), ``protokd`` (ProtoKD), ``smunet`` (SMU-Net). All are adapted
to nnU-Net's region-based sigmoid heads (WT, TC, ET); each module's docstring gives its source and exact formula.
Trainer contract: move the loss to the student's device, add ``loss.student_side_parameters()`` to the student's
optimiser, and step ``loss.adversary_parameters()`` on ``loss.adversary_loss(...)`` with their own optimiser.
"""
# Importing the method modules registers them; the order here is KD_METHODS' order.
# isort: off
from nnalign.losses.kd import none, kdnet, pmkl, protokd, smunet  # noqa: F401
# isort: on
from nnalign.losses.kd.base import DistillationLoss
from nnalign.losses.kd.registry import KD_METHODS, build_kd, register_kd

__all__ = ["KD_METHODS", "DistillationLoss", "build_kd", "register_kd"]
