"""``protokd``: ProtoKD, prototype knowledge distillation (logit KD plus intra-/inter-class feature variation).

Source
------
Wang, Yan, Zhang, Wei, Li, Li, "Prototype Knowledge Distillation for Medical Segmentation with Missing Modality",
ICASSP 2023, arXiv 2303.09830. Code: ``SakurajimaMaiii/ProtoKD`` (PyTorch), ``code/loss.py``
(``softmax_kl_loss``, ``prototype_loss``) and ``code/train_protokd.py`` (``L_seg + 10·L_kd + 0.1·L_proto``).

Formula (softmax original)
--------------------------
``L_kd = mean over (N, C, voxels) of kl_div(log_softmax(z_s/T), softmax(z_t/T))``, T = 10, no T².
``p_{b,c} = Σ_i f_b(i)·1[y_b(i)=c] / (Σ_i 1[y_b(i)=c] + 1e-5)`` per sample, separately from student and teacher
features; ``M_{b,c}(i) = cos(f_b(i), p_{b,c})`` (eps 1e-5); ``L_proto = mean_{b,c,i} (M^s − M^t)²``.

Sigmoid-region adaptation (what this module computes)
-----------------------------------------------------
- ``kd = kd_weight·mean_{b, r, i} KL(Bern(σ(z_t/T)) ‖ Bern(σ(z_s/T)))`` on the full-resolution logits (B, R, *S),
  no T² (as ProtoKD's code). Each region is one Bernoulli distribution where the original had one C-way softmax;
  the mean over (B, R, voxels) replaces the original's mean over (N, C, voxels).
- ``kd_weight`` is 0.5, not the code's 10: the weight is set so that the KL pulls on a fresh student's logits
  against nnalign's segmentation loss as hard as the original's does against its own. The original balances its KL
  against a class-weighted cross-entropy + Dice whose gradient at a fresh student's logits is 16-25x the KL's
  (tumour 4-14 % of the patch); against nnU-Net's unweighted region BCE + Dice, deep-supervised, the same weight 10
  would make the KL's gradient 0.85-1.1x the segmentation loss's, and the weight that restores the original's ratio
  is 0.37-0.72 (``benchmarks/kd_scale.py`` computes both ratios on ProtoKD's code and on this module).
- Prototypes are per *class*, so the nested region target (B, R, *S) is first turned back into nnU-Net labels:
  0 background, 1 edema = WT∖TC, 2 necrosis = TC∖ET, 3 ET; in general the label is the index (1-based) of the
  deepest region a voxel belongs to, so classes = R + 1. If the target's spatial size differs from the features',
  the label map is resized with nearest interpolation.
- ``proto = proto_weight·L_proto`` on the last decoder features f (B, C_0, *S): for each sample b and each class c
  **present in that sample** (absent classes are skipped for that sample only; ProtoKD's code instead skips a class
  unless every sample of the batch has it), prototypes from student and teacher features separately,
  ``M(i) = f(i)·p / (max(‖f(i)‖, 1e-5)·max(‖p‖, 1e-5))`` (``F.cosine_similarity`` semantics),
  ``L_proto = Σ_{present (b,c)} Σ_i (M_s − M_t)² / (#present (b,c) · #voxels)``.

Components: ``kd``, ``proto``. ``seg_weight`` = 1. Teacher tensors detached; float32; finite for finite inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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

PROTO_EPS = 1e-5


def regions_to_labels(target: Tensor) -> Tensor:
    """Nested region target (B, R, *S) → class labels (B, *S), int64: 0 outside every region, else the 1-based
    index of the deepest region containing the voxel (WT/TC/ET → 0 bg, 1 edema, 2 necrosis, 3 ET)."""
    inside = target > 0.5
    ranks = torch.arange(1, target.shape[1] + 1, device=target.device).view(1, -1, *([1] * (target.dim() - 2)))
    return (inside.long() * ranks).amax(dim=1)


def _clamped_norm(x: Tensor, dim: int) -> Tensor:
    """max(‖x‖, eps) along ``dim`` (kept), as the root of a clamped square: the gradient is finite at 0, and on a
    CPU the reduction over the channel axis is ~9x faster than ``torch.linalg.vector_norm``'s (forward + backward)."""
    return x.pow(2).sum(dim=dim, keepdim=True).clamp_min(PROTO_EPS**2).sqrt()


def _unit(x: Tensor, dim: int) -> Tensor:
    """x / max(‖x‖, eps) along ``dim``."""
    return x / _clamped_norm(x, dim)


def class_sums(features: Tensor, onehot: Tensor, per_class: bool | None = None) -> Tensor:
    """``Σ_i f(i)·onehot_k(i)`` per sample and class: (B, K, C) from features (B, C, N) and ``onehot`` (B, K, N).

    One batched matrix product on a CPU (a GEMM, one pass over the features); elsewhere (``per_class``, the default
    off the CPU) one masked reduction per class: for a product whose reduction length is the voxel count cuBLAS picks
    a kernel slower than the whole rest of the loss, while on a CPU the K passes over the features and their K
    temporaries are most of the loss's time.
    """
    if per_class is None:
        per_class = features.device.type != "cpu"
    if per_class:
        return torch.stack([(features * onehot[:, k : k + 1]).sum(dim=2) for k in range(onehot.shape[1])], dim=1)
    return torch.bmm(onehot.to(features.dtype), features.transpose(1, 2))


def prototype_maps(features: Tensor, onehot: Tensor) -> Tensor:
    """Cosine-similarity maps (B, K, N) of features (B, C, N) to the per-sample class prototypes from ``onehot``
    (B, K, N); prototypes ``p = Σ f·1 / (Σ 1 + 1e-5)``."""
    counts = onehot.sum(dim=2)  # (B, K)
    protos = class_sums(features, onehot) / (counts[..., None] + PROTO_EPS)  # (B, K, C)
    # Divide the (B, K, N) products by the voxel norms rather than normalise the (B, C, N) features: no normalised
    # copy of the features is made and kept for the backward pass.
    return torch.einsum("bkc,bcn->bkn", _unit(protos, dim=2), features) / _clamped_norm(features, dim=1)


def prototype_loss(features_student: Tensor, features_teacher: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Mean over (present (b, c), voxels) of (M_s − M_t)²; features (B, C, *S), labels (B, *S) int."""
    b = features_student.shape[0]
    f_s = features_student.float().reshape(b, features_student.shape[1], -1)
    f_t = features_teacher.float().reshape(b, features_teacher.shape[1], -1)
    classes = torch.arange(num_classes, device=labels.device)
    onehot = (labels.reshape(b, 1, -1) == classes[None, :, None]).float()  # (B, K, N)
    present = (onehot.sum(dim=2) > 0).float()  # (B, K)
    sq = (prototype_maps(f_s, onehot) - prototype_maps(f_t, onehot)).pow(2)  # (B, K, N)
    n_terms = present.sum().clamp_min(1.0) * sq.shape[2]
    return (sq * present[..., None]).sum() / n_terms


@register_kd("protokd")
class ProtoKDLoss(DistillationLoss):
    """ProtoKD: Bernoulli KL at T (no T²) on the logits plus prototype-similarity matching on decoder features.

    Components: ``kd`` (kd_weight·…), ``proto`` (proto_weight·…).
    """

    def __init__(
        self,
        shape: NetworkShape,
        *,
        temperature: float = 10.0,
        kd_weight: float = 0.5,
        proto_weight: float = 0.1,
    ) -> None:
        super().__init__()
        check_positive("protokd", temperature=temperature)
        check_nonnegative("protokd", kd_weight=kd_weight, proto_weight=proto_weight)
        self.temperature = float(temperature)
        self.kd_weight = float(kd_weight)
        self.proto_weight = float(proto_weight)
        self.num_classes = shape.num_regions + 1

    def components(
        self, student: NetworkOutputs, teacher: NetworkOutputs, target: Tensor, epoch: int
    ) -> dict[str, Tensor]:
        z_s, z_t = student.final_logits, teacher.final_logits
        f_s, f_t = student.decoder_features, teacher.decoder_features
        check_same_shape("logits", z_s, z_t, self.name)
        check_same_shape("decoder features", f_s, f_t, self.name)
        if target.dim() != f_s.dim() or target.shape[0] != f_s.shape[0] or target.shape[1] != self.num_classes - 1:
            raise ValueError(
                f"protokd: expected a region target (B={f_s.shape[0]}, R={self.num_classes - 1}, *S), "
                f"got {tuple(target.shape)}"
            )
        kd = bernoulli_kl_at_temperature(as_teacher(z_t), as_student(z_s), self.temperature).mean()
        labels = regions_to_labels(target.detach())
        if labels.shape[1:] != f_s.shape[2:]:
            labels = F.interpolate(labels[:, None].float(), size=f_s.shape[2:], mode="nearest")[:, 0].long()
        proto = prototype_loss(as_student(f_s), as_teacher(f_t), labels, self.num_classes)
        return {"kd": self.kd_weight * kd, "proto": self.proto_weight * proto}
