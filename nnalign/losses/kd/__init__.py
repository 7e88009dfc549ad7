"""Distillation losses from the frozen multi-modal teacher to a missing-modality student, one method per module,
selected by name through one registry::

    from nnalign.losses.kd import build_kd, KD_METHODS
    loss = build_kd("protokd", feature_channels=32, bottleneck_channels=320, skip_channels=[32, 64, 128, 256, 320, 320])
    parts = loss(student_outputs, teacher_outputs, region_target, epoch)   # {..., "total": tensor}
    (loss.seg_weight * seg_loss + parts["total"]).backward()

Methods: ``none``, ``kdnet`` (KD-Net), ``pmkl`` (PMKL), ``protokd`` (ProtoKD), ``smunet`` (SMU-Net), one module
each, imported (with torch) when a method is first looked up. All are adapted to nnU-Net's region-based sigmoid heads
(WT, TC, ET); each module's docstring gives its source and exact formula.
Trainer contract: move the loss to the student's device, add ``loss.student_side_parameters()`` to the student's
optimiser, and step ``loss.adversary_parameters()`` on ``loss.adversary_loss(...)`` with their own optimiser.
"""
from nnalign.losses.kd.registry import KD, KD_METHODS, build_kd, kd_class, register_kd

__all__ = ["KD", "KD_METHODS", "build_kd", "kd_class", "register_kd"]
