"""``kdnet``: KD-Net, generalized distillation from a multi-modal teacher to a mono-modal student.

Source
------
M. Hu, M. Maillard, Y. Zhang, T. Ciceri, G. La Barbera, I. Bloch, P. Gori, "Knowledge distillation from multi-modal
to mono-modal segmentation networks", MICCAI 2020, LNCS pp. 772–781, arXiv 2106.09564. No official code was found;
the feature term follows the third-party reimplementation ``CityU-AIM-Group/MultiModal-learning``,
``MIA 2022/distiller_zoo/feats_KL.py``. The loss structure is from the abstract and that reimplementation;
**the default weights are unverified**: the method section could not be retrieved, so T = 10 is taken from ProtoKD's
KD term and λ = 0.75, β = 0.1 from memory of "λ large, β small". Treat all three as hyperparameters and report them.

Formula (softmax original)
--------------------------
``L = (1−λ)·L_seg(student, y) + λ·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + β·KL(softmax_c(h_t) ‖ softmax_c(h_s))``

Sigmoid-region adaptation (what this module computes)
-----------------------------------------------------
nnU-Net's BraTS head gives R independent sigmoid regions, so the C-class softmax at temperature T becomes one
Bernoulli distribution per region and voxel, ``Bern(σ(z/T))``:

- ``logit_kl = λ·T²·mean_{b, r, i} KL(Bern(σ(z_t/T)) ‖ Bern(σ(z_s/T)))`` over the full-resolution logits
  z (B, R, *S); the mean runs over batch, regions and voxels.
- ``feature_kl = β·mean_{b, i} Σ_c p_t,c(i)·(log p_t,c(i) − log p_s,c(i))`` with ``p = softmax_c(h)`` over the
  channels of the bottleneck h = ``skips[-1]`` (B, C, *S_bottleneck), per voxel: KL summed over channels, averaged
  over voxels and batch. (feats_KL.py sums over voxels and divides by the batch size; the voxel mean used here keeps
  β independent of the patch size. This term needs no adaptation: it never involved the output head.)
- ``seg_weight = 1 − λ``: the trainer scales the student's own segmentation loss by it.

The teacher is frozen; its tensors are detached. Computed in float32; finite for any finite inputs.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from nnalign.errors import NnalignError
from nnalign.losses.kd.base import (
    NetworkShape,
    DistillationLoss,
    as_student,
    as_teacher,
    bernoulli_kl_at_temperature,
    check_nonnegative,
    check_positive,
    check_same_shape,
)
from nnalign.losses.kd.registry import register_kd
from nnalign.networks.outputs import NetworkOutputs


def channel_softmax_kl(h_teacher: Tensor, h_student: Tensor) -> Tensor:
    """``mean_{b, i} KL(softmax_c(h_t(b, ·, i)) ‖ softmax_c(h_s(b, ·, i)))`` for features (B, C, *S), a scalar.

    Float32, log-softmax on both sides (no log of 0).
    """
    log_p_t = F.log_softmax(h_teacher.float(), dim=1)
    log_p_s = F.log_softmax(h_student.float(), dim=1)
    kl_per_voxel = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # (B, *S)
    return kl_per_voxel.mean()


@register_kd("kdnet")
class KDNetLoss(DistillationLoss):
    """KD-Net: temperature-scaled Bernoulli KL on the logits (×T²) and channel-softmax KL on the bottleneck.

    Components: ``logit_kl`` (λ·T²·…), ``feature_kl`` (β·…). ``seg_weight`` = 1 − λ.
    """

    def __init__(
        self,
        shape: NetworkShape,
        *,
        temperature: float = 10.0,
        imitation_weight: float = 0.75,
        feature_weight: float = 0.1,
    ) -> None:
        super().__init__()
        check_positive("kdnet", temperature=temperature)
        check_nonnegative("kdnet", imitation_weight=imitation_weight, feature_weight=feature_weight)
        if imitation_weight > 1:
            raise NnalignError(f"kdnet: imitation_weight (λ) must lie in [0, 1], got {imitation_weight!r}")
        self.temperature = float(temperature)
        self.imitation_weight = float(imitation_weight)
        self.feature_weight = float(feature_weight)
        self.seg_weight = 1.0 - self.imitation_weight

    def components(
        self, student: NetworkOutputs, teacher: NetworkOutputs, target: Tensor, epoch: int
    ) -> dict[str, Tensor]:
        z_s, z_t = student.final_logits, teacher.final_logits
        h_s, h_t = student.bottleneck, teacher.bottleneck
        check_same_shape("logits", z_s, z_t, self.name)
        check_same_shape("bottleneck", h_s, h_t, self.name)
        t = self.temperature
        kl = bernoulli_kl_at_temperature(as_teacher(z_t), as_student(z_s), t).mean()
        return {
            "logit_kl": self.imitation_weight * t * t * kl,
            "feature_kl": self.feature_weight * channel_softmax_kl(as_teacher(h_t), as_student(h_s)),
        }
