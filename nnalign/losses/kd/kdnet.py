"""``kdnet``: KD-Net, generalized distillation from a multi-modal teacher to a mono-modal student.

Source
------
M. Hu, M. Maillard, Y. Zhang, T. Ciceri, G. La Barbera, I. Bloch, P. Gori, "Knowledge distillation from multi-modal
to mono-modal segmentation networks", MICCAI 2020, LNCS pp. 772–781, arXiv 2106.09564: "an adaptation of the
generalized distillation framework where the student network is trained on a subset (1 modality) of the teacher's
inputs". Generalized distillation (D. Lopez-Paz, L. Bottou, B. Schölkopf, V. Vapnik, "Unifying distillation and
privileged information", ICLR 2016): learn the teacher, compute its soft labels s = σ(f_t(x*)/T) at temperature T,
then train the student on ``(1−λ)·ℓ(y, σ(f_s(x))) + λ·ℓ(s, σ(f_s(x)))`` with the imitation parameter λ ∈ [0, 1] and
the *same* loss ℓ on the hard and the soft labels; the student's output is not softened and there is no T² factor.
KD-Net adds a KL term on intermediate features; the feature term follows the third-party reimplementation
``CityU-AIM-Group/MultiModal-learning``, ``MIA 2022/distiller_zoo/feats_KL.py``. No official code was found, and the
KD-Net paper's method and experiments sections could not be retrieved from any stored copy, so **its λ, β and T are
unverified**: λ = 0.75 and β = 0.1 are kept from an unverified recollection of "λ large, β small", and T = 1.
Treat all three as hyperparameters and report them.

Formula (softmax original, as generalized distillation)
--------------------------------------------------------
``L = (1−λ)·L_seg(student, y) + λ·L_seg(student, softmax(z_t/T)) + β·KL(softmax_c(h_t) ‖ softmax_c(h_s))``, where
KD-Net's segmentation loss on the soft labels is written as their cross-entropy.

Sigmoid-region adaptation (what this module computes)
-----------------------------------------------------
nnU-Net's BraTS head gives R independent sigmoid regions, so each region at each voxel is one Bernoulli
distribution:

- ``logit_kl = λ·mean_{b, r, i} KL(Bern(σ(z_t/T)) ‖ Bern(σ(z_s)))`` over the full-resolution logits z (B, R, *S):
  the soft-label cross-entropy of generalized distillation less the teacher's entropy (same gradient,
  λ·(σ(z_s) − σ(z_t/T)) per element, bounded by λ as BCE's by 1; zero when the student matches the soft label).
- ``soft_dice = λ·(1 − soft Dice(σ(z_s), σ(z_t/T)))``, per sample and region, averaged (nnU-Net's
  ``MemoryEfficientSoftDiceLoss`` with the soft labels as its target): the other half of nnU-Net's segmentation
  loss, so that ℓ is the same on both labels, as generalized distillation has it. Without it the soft labels are
  learnt through a cross-entropy alone, a mean over every voxel of the patch, while the Dice term, normalised by the
  region's size, that makes nnU-Net segment small regions is weighted by 1 − λ = 0.25 only.
- ``feature_kl = β·mean_{b, i} Σ_c p_t,c(i)·(log p_t,c(i) − log p_s,c(i))`` with ``p = softmax_c(h)`` over the
  channels of the bottleneck h = ``skips[-1]`` (B, C, *S_bottleneck), per voxel: KL summed over channels, averaged
  over voxels and batch. (feats_KL.py sums over voxels and divides by the batch size; the voxel mean used here keeps
  β independent of the patch size. This term needs no adaptation: it never involved the output head.)
- ``seg_weight = 1 − λ``: the trainer scales the student's own segmentation loss by it.

Why not Hinton's form, λ·T²·KL(Bern(σ(z_t/T)) ‖ Bern(σ(z_s/T))) at a high T such as 10: a sigmoid region head's
logits are unbounded and confident (a trained teacher's background sits at −10 to −20), and at high T that term is a
logit regression with gradient λ·T·(σ(z_s/T) − σ(z_t/T)) per element, up to λ·T = 7.5 where BCE's is at most 1, so it
outweighs the segmentation loss and pushes the student's logits towards background. Under the student's ambiguity
(one modality) a logit regression also aims at the teacher's mean logit, which the confident background drags below
0; the soft-label form aims at the teacher's mean probability instead. ``benchmarks/kd_gradients.py`` measures each
term's gradient at the student's logits against the segmentation loss's.

The teacher is frozen; its tensors are detached. Computed in float32; finite for any finite inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nnalign.errors import NnalignError
from nnalign.losses.kd.base import (
    NetworkShape,
    DistillationLoss,
    as_student,
    as_teacher,
    bernoulli_kl,
    check_nonnegative,
    check_positive,
    check_same_shape,
)
from nnalign.losses.kd.registry import register_kd
from nnalign.networks.outputs import NetworkOutputs


SOFT_DICE_SMOOTH = 1e-5
"""The smoothing of the soft-label Dice, nnU-Net's for its own Dice + BCE loss."""


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
    """KD-Net: generalized distillation's soft-label term on the logits and channel-softmax KL on the bottleneck.

    Components: ``logit_kl`` (λ·KL to the teacher's soft labels at T), ``soft_dice`` (λ·(1 − their soft Dice)),
    ``feature_kl`` (β·…). ``seg_weight`` = 1 − λ.
    """

    def __init__(
        self,
        shape: NetworkShape,
        *,
        temperature: float = 1.0,
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
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        # nnU-Net's Dice of its region trainers (-Dice, per sample and region), with the soft labels as the target
        self._soft_dice_loss = MemoryEfficientSoftDiceLoss(apply_nonlin=torch.sigmoid, batch_dice=False, do_bg=True,
                                                           smooth=SOFT_DICE_SMOOTH, ddp=False)

    def components(
        self, student: NetworkOutputs, teacher: NetworkOutputs, target: Tensor, epoch: int
    ) -> dict[str, Tensor]:
        z_s, z_t = student.final_logits, teacher.final_logits
        h_s, h_t = student.bottleneck, teacher.bottleneck
        check_same_shape("logits", z_s, z_t, self.name)
        check_same_shape("bottleneck", h_s, h_t, self.name)
        soft_labels = torch.sigmoid(as_teacher(z_t) / self.temperature)
        kl = bernoulli_kl(soft_labels, as_student(z_s)).mean()
        return {
            "logit_kl": self.imitation_weight * kl,
            "soft_dice": self.imitation_weight * (1.0 + self._soft_dice_loss(as_student(z_s).float(), soft_labels)),
            "feature_kl": self.feature_weight * channel_softmax_kl(as_teacher(h_t), as_student(h_s)),
        }
