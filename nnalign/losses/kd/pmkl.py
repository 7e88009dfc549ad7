"""``pmkl``: PMKL, privileged multimodal knowledge: regularised pixel-level KD plus image-level contrastive KD.

Source
------
C. Chen, Q. Dou, Y. Jin, Q. Liu, P.-A. Heng, "Learning with Privileged Multimodal Knowledge for Unimodal
Segmentation", IEEE TMI 41(3):621–632, 2022, DOI 10.1109/TMI.2021.3119385. Code: ``cchen-cc/PMKL`` (TensorFlow 1.x),
``main.py::compute_losses`` and ``losses.py::kd_loss``. Total there: ``L_seg + 0.5·L_rkd + 0.5·L_ckd``.

Formula (softmax original, per voxel i)
---------------------------------------
``ℓ(i) = −Σ_c q_t,c·log clip(q_s,c, 0.005, 1)`` with ``q = softmax(z/T)``, T = 10;
``m(i) = stopgrad(ReLU(CE_s(i) − CE_t(i))·1[argmax z_t(i) = y(i)])`` with plain (T = 1) cross-entropies;
``L_rkd = Σ_i m·ℓ / Σ_i m`` (no T²). Contrastive: projection heads g_s, g_t on the last decoder features,
``L_ckd = mean over B² pairs [y·d² + (1−y)·max(0, 1 − d)²]``, d the Euclidean distance, (i, i) positive.

Sigmoid-region adaptation (what this module computes)
-----------------------------------------------------
Each region r at each voxel i is a two-class (Bernoulli) distribution, so the sum over classes becomes the two
terms of a binary cross-entropy and every (b, r, i) is one "pixel" of the original:

- ``q = σ(z/T)`` on the full-resolution logits (B, R, *S);
  ``ℓ = −[q_t·log clip(q_s) + (1−q_t)·log clip(1−q_s)]``, clip to [0.005, 1];
- ``CE_s``, ``CE_t`` = binary cross-entropy with logits (T = 1) against the region target (B, R, *S);
- the teacher is correct where ``(σ(z_t) > 0.5) == target`` (region-wise, replacing the argmax test);
- ``m = stopgrad(ReLU(CE_s − CE_t)·1[teacher correct])``;
  ``L_rkd = Σ_{b,r,i} m·ℓ / (Σ_{b,r,i} m + 1e-8)``: one weighted mean over the whole batch, as the original; it is 0
  (not NaN) when the mask is empty, and bounded by max ℓ ≤ −log 0.005 otherwise.
- Contrastive KD needs no head adaptation: decoder features (B, C_0, *S) → global average pool → Linear(C_0, 32) →
  ReLU → Linear(32, 16) → L2-normalise, one head for the student's features and a separate one for the (detached)
  teacher's. The original pools with a 40³ window at stride 1 and flattens, which on its 80³ crops is almost a
  global pool; a global pool is used here so the head does not depend on the patch size.
  ``L_ckd = mean_{i,j} [1[i=j]·d_ij² + 1[i≠j]·max(0, 1 − d_ij)²]``, ``d_ij = ‖g_s(f_s^i) − g_t(f_t^j)‖₂``.
  With B = 1 only the positive pair exists.

Components: ``rkd`` (0.5·L_rkd), ``ckd`` (0.5·L_ckd). ``seg_weight`` = 1 (PMKL adds the KD terms to an unweighted
segmentation loss).

Trainable parameters
--------------------
Both projection heads are ``nn.Module``s inside this loss and are trained with the student, as in the original
(its optimiser updates the student's and both ``metric`` heads' variables; the teacher backbone stays frozen):
the trainer must add ``loss.student_side_parameters()`` (here: all of ``loss.parameters()``) to the student's
optimiser. Computed in float32; finite for any finite inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnalign.losses.kd.base import (
    NetworkShape,
    DistillationLoss,
    as_student,
    as_teacher,
    check_nonnegative,
    check_positive,
    check_same_shape,
    clipped_log_sigmoid,
    region_target,
)
from nnalign.losses.kd.registry import register_kd
from nnalign.networks.outputs import NetworkOutputs


def soft_target_bce(logits_teacher: Tensor, logits_student: Tensor, temperature: float, clip_min: float) -> Tensor:
    """Element-wise ``−[q_t·log clip(q_s) + (1−q_t)·log clip(1−q_s)]``, ``q = σ(z/T)``, clip to [clip_min, 1]."""
    t = temperature
    q_t = torch.sigmoid(logits_teacher.float() / t)
    z_s = logits_student.float() / t
    return -(q_t * clipped_log_sigmoid(z_s, clip_min) + (1.0 - q_t) * clipped_log_sigmoid(-z_s, clip_min))


def regularisation_mask(logits_teacher: Tensor, logits_student: Tensor, target: Tensor) -> Tensor:
    """``stopgrad(ReLU(CE_s − CE_t)·1[(σ(z_t) > 0.5) == target])``, element-wise over (B, R, *S), float32."""
    with torch.no_grad():
        y = target.float()
        z_t, z_s = logits_teacher.float(), logits_student.float()
        ce_s = F.binary_cross_entropy_with_logits(z_s, y, reduction="none")
        ce_t = F.binary_cross_entropy_with_logits(z_t, y, reduction="none")
        teacher_correct = (z_t > 0) == (y > 0.5)  # σ(z) > 0.5 ⇔ z > 0
        return F.relu(ce_s - ce_t) * teacher_correct.float()


def regularised_kd(
    logits_teacher: Tensor, logits_student: Tensor, target: Tensor, temperature: float = 10.0, clip_min: float = 0.005
) -> Tensor:
    """``L_rkd = Σ m·ℓ / (Σ m + 1e-8)`` over all of (B, R, *S); 0 for an empty mask."""
    m = regularisation_mask(logits_teacher, logits_student, target)
    ell = soft_target_bce(logits_teacher, logits_student, temperature, clip_min)
    return (m * ell).sum() / (m.sum() + 1e-8)


def contrastive_pair_loss(emb_student: Tensor, emb_teacher: Tensor, margin: float = 1.0) -> Tensor:
    """Contrastive loss over all B² pairs (student i, teacher j) of embeddings (B, D); (i, i) are the positives.

    ``mean_{i,j} [1[i=j]·d_ij² + 1[i≠j]·max(0, margin − d_ij)²]``, d the Euclidean distance. The square is taken
    from the summed squares directly and the root is guarded (d ≥ 1e-6), so the gradient is finite at d = 0.
    """
    e_s, e_t = emb_student.float(), emb_teacher.float()
    sq_dist = (e_s[:, None, :] - e_t[None, :, :]).pow(2).sum(dim=-1)  # (B, B)
    dist = sq_dist.clamp_min(1e-12).sqrt()
    positive = torch.eye(sq_dist.shape[0], dtype=torch.bool, device=sq_dist.device)
    per_pair = torch.where(positive, sq_dist, F.relu(margin - dist).pow(2))
    return per_pair.mean()


class ProjectionHead(nn.Module):
    """Global average pool → Linear(C, hidden) → ReLU → Linear(hidden, out) → L2-normalise: (B, C, *S) → (B, out)."""

    def __init__(self, in_channels: int, hidden: int = 32, out: int = 16) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() < 3 or features.shape[1] != self.in_channels:
            raise ValueError(
                f"pmkl projection head expects decoder features (B, {self.in_channels}, *S), "
                f"got {tuple(features.shape)}"
            )
        pooled = features.flatten(2).mean(dim=2)
        return F.normalize(self.mlp(pooled), p=2.0, dim=1, eps=1e-12)


@register_kd("pmkl")
class PMKLLoss(DistillationLoss):
    """PMKL: regularised soft-target KD on the logits and contrastive KD on projected decoder features.

    Components: ``rkd`` (rkd_weight·L_rkd), ``ckd`` (ckd_weight·L_ckd). Holds trainable projection heads
    ``student_head`` and ``teacher_head``: add ``loss.student_side_parameters()`` to the student's optimiser.
    """

    def __init__(
        self,
        shape: NetworkShape,
        *,
        temperature: float = 10.0,
        rkd_weight: float = 0.5,
        ckd_weight: float = 0.5,
        clip_min: float = 0.005,
        margin: float = 1.0,
        projection_hidden: int = 32,
        projection_dim: int = 16,
    ) -> None:
        super().__init__()
        check_positive("pmkl", temperature=temperature, clip_min=clip_min, margin=margin,
                       projection_hidden=projection_hidden, projection_dim=projection_dim)
        check_nonnegative("pmkl", rkd_weight=rkd_weight, ckd_weight=ckd_weight)
        self.temperature = float(temperature)
        self.rkd_weight = float(rkd_weight)
        self.ckd_weight = float(ckd_weight)
        self.clip_min = float(clip_min)
        self.margin = float(margin)
        self.projection_hidden = int(projection_hidden)
        self.projection_dim = int(projection_dim)
        self.student_head = ProjectionHead(shape.feature_channels, self.projection_hidden, self.projection_dim)
        self.teacher_head = ProjectionHead(shape.feature_channels, self.projection_hidden, self.projection_dim)

    def components(
        self, student: NetworkOutputs, teacher: NetworkOutputs, target: Tensor, epoch: int
    ) -> dict[str, Tensor]:
        z_s, z_t = student.final_logits, teacher.final_logits
        f_s, f_t = student.decoder_features, teacher.decoder_features
        check_same_shape("logits", z_s, z_t, self.name)
        check_same_shape("decoder features", f_s, f_t, self.name)
        y = region_target(target, z_s, self.name)
        rkd = regularised_kd(as_teacher(z_t), as_student(z_s), y, self.temperature, self.clip_min)
        # The heads' weights are float32 and autocast is off, so the projections run in float32.
        e_s = self.student_head(as_student(f_s))
        e_t = self.teacher_head(as_teacher(f_t))
        ckd = contrastive_pair_loss(e_s, e_t, self.margin)
        return {"rkd": self.rkd_weight * rkd, "ckd": self.ckd_weight * ckd}
