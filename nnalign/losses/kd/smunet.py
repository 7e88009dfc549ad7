"""``smunet``: SMU-Net, style matching: content, Gram-style, adversarial-style and consistency terms.

Source
------
R. Azad, N. Khosravi, D. Merhof, "SMU-Net: Style matching U-Net for brain tumor segmentation with missing
modalities", MIDL 2022, PMLR 172:48–62, arXiv 2204.02961. Code: ``rezazad68/smunet`` (``losses.py::unet_Co_loss``,
``models/discriminator.py``, ``train.ipynb``), itself built on ACN (``Wangyixinxin/ACN``).

**Co-training vs. a frozen teacher.** SMU-Net trains its full-modality and missing-modality U-Nets together from
scratch (one optimiser; L_cons, L_content and L_style reach both). Here the frozen, aligned multi-modal teacher
stands in for the full-modality path: its tensors are detached and only the student (and the discriminator) learn.

Formula (original)
------------------
``L_cons = Σ_c MSE(p_full[c], p_miss[c])·w(e)``, ``w(e) = 10·exp(−5(1 − min(e, 20)/20)²)``;
``L_content = 0.2·MSE(f_c^full, f_c^miss)``; ``L_style = 1e-4·Σ(G_full − G_miss)²/(4·C²·(H·W)²)`` with
``G = F Fᵀ/(B·C·D·H·W)``, F = reshape(f_s, (B·C, D·H·W)); ``L_adv = 2e-4·BCE(D(f_s^miss), 0)`` ("full" = label 0);
``L_D = BCE(D(f_s^full), 0) + BCE(D(f_s^miss), 1)``.

What this module computes (teacher t = "full", student s = "missing")
---------------------------------------------------------------------
- ``content = content_weight·mean((h_s − h_t)²)`` on the bottleneck ``skips[-1]`` (B, C, *S); weight 0.2.
- ``style = style_weight·mean_{scales} mean((G(F_s) − G(F_t))²)`` over the three deepest skips (all of them if
  fewer), ``G(F) = F Fᵀ/(C·N)`` per sample for F (B, C, N), N the voxels of that scale. The original's style
  features are a 1×1-conv fusion of three encoder scales, which a plain nnU-Net encoder does not have, so the Gram
  matrices are matched per scale instead, and averaged so that the term is one style map's worth, as the original's.
  ``F Fᵀ/(C·N)`` is a per-voxel average of channel products: the same value for any patch or batch size.
- ``style_weight`` = :data:`ORIGINAL_STYLE_WEIGHT` = 1e-4/(4·480²) ≈ 1.085e-10, the original's own scale. At
  batch 1 (the original's) its Gram is this ``G`` and Σ(ΔG)² = C²·mean(ΔG²), so
  ``L_style = 1e-4·mean(ΔG²)/(4·(H·W)²)``: C cancels, and on its style map, (1, 128, 20, 24, 16), the 160×192×128
  crop after three stride-2 stages, H·W = 480. Only H·W enters, so the original's factor depends on its crop
  (2.5e-9 for an 80³ crop); nnalign keeps the factor of the original's map for every configuration
  (``benchmarks/kd_scale.py --smunet``: value and gradient factor 1.085e-10 on that map). On N(0, 1) features of
  that map the term's gradient is 7e-17 of the content term's, in the original as here: the original's style
  matching is carried by its adversarial term. ``--kd-set style_weight=3`` gives the sum over three scales at
  weight 1 (with three or more skips).
- ``adversarial = adversarial_weight·BCEwithLogits(D(F_s), 0)`` on the second-deepest skip (the only skip if there
  is one); weight 2e-4. D = Conv3d(C, 32, 3, stride 2, pad 1) – LeakyReLU(0.2) – Conv3d(32, 64, 3, 2, 1) –
  LeakyReLU(0.2) – global average pool – Linear(64, 1) (smaller than the original's 4 k4s2 convs 64/128/256/1, and
  pooled so that any patch size works). 3D features only: 4D (2D-configuration) features raise NnalignError.
  This term is evaluated with a detached copy of D's parameters (``torch.func.functional_call``), so the main
  backward pass gives gradients to the student only and never touches D's ``.grad``.
- ``adversary_loss = BCE(D(F_t.detach()), 0) + BCE(D(F_s.detach()), 1)``: backpropagates into D only. The trainer
  steps ``adversary_parameters()`` (D's) with their own Adam at ``adversary_lr`` = 1e-4.
  ``student_side_parameters()`` excludes D, so the main optimiser never updates it.
- ``consistency = w(e)·Σ_r mean_{b,i} (σ(z_s) − σ(z_t))²`` on the full-resolution region probabilities (SMU-Net's
  head is already sigmoid, so no adaptation), ``w(e) = consistency_max·exp(−5(1 − min(e, R)/R)²)``,
  ``consistency_max`` = 10, R = ``ramp_epochs`` = 20.

Segmentation: SMU-Net weights the two paths' Dice 0.4/0.6; with a frozen teacher only the student's term remains,
so ``seg_weight`` = 1. Float32 with autocast off; finite for finite inputs.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from nnalign.errors import NnalignError
from nnalign.losses.kd.base import (
    NetworkShape,
    DistillationLoss,
    as_student,
    as_teacher,
    check_nonnegative,
    check_positive,
    check_same_shape,
)
from nnalign.losses.kd.registry import register_kd
from nnalign.networks.outputs import NetworkOutputs

STYLE_SCALES = 3
ORIGINAL_STYLE_MAP = (20, 24, 16)
"""The original's style map (D, H, W) at its 160×192×128 training crop, after three stride-2 stages."""
ORIGINAL_STYLE_WEIGHT = 1e-4 / (4 * (ORIGINAL_STYLE_MAP[0] * ORIGINAL_STYLE_MAP[1]) ** 2)
"""The original's ``1e-4/(4·(H·W)²)`` on its style map, ≈ 1.085e-10: its style loss per unit of mean((ΔG)²)."""


def gram_matrix(features: Tensor) -> Tensor:
    """``G = F Fᵀ / (C·N)`` per sample for features (B, C, *S) reshaped to F (B, C, N); returns (B, C, C), float32."""
    f = features.float().flatten(2)
    c, n = f.shape[1], f.shape[2]
    return torch.bmm(f, f.transpose(1, 2)) / (c * n)


def style_loss(skips_student: Sequence[Tensor], skips_teacher: Sequence[Tensor]) -> Tensor:
    """``mean_scales mean((G_s − G_t)²)`` over the given scales (unweighted)."""
    terms = [(gram_matrix(f_s) - gram_matrix(f_t)).pow(2).mean() for f_s, f_t in zip(skips_student, skips_teacher)]
    if not terms:
        raise ValueError("style_loss needs at least one scale")
    return torch.stack(terms).mean()


def consistency_ramp(epoch: int, ramp_epochs: int = 20, maximum: float = 10.0) -> float:
    """``maximum·exp(−5(1 − min(e, R)/R)²)``; ``maximum`` from the start when R = 0."""
    if ramp_epochs <= 0:
        return float(maximum)
    phase = 1.0 - min(max(float(epoch), 0.0), float(ramp_epochs)) / ramp_epochs
    return float(maximum) * math.exp(-5.0 * phase * phase)


class StyleDiscriminator(nn.Module):
    """Style discriminator, (B, C, D, H, W) → (B, 1) logits.

    Conv3d(C, 32, 3, 2, 1) – LeakyReLU(0.2) – Conv3d(32, 64, 3, 2, 1) – LeakyReLU(0.2) – global average pool –
    Linear(64, 1).
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.convs = nn.Sequential(
            nn.Conv3d(in_channels, 32, kernel_size=3, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(32, 64, kernel_size=3, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.head = nn.Linear(64, 1)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 5:
            raise NnalignError(
                f"smunet: the style discriminator is 3D only and needs 5D skip features (B, C, D, H, W), got "
                f"{features.dim()}D {tuple(features.shape)}; train smunet students with a 3d configuration"
            )
        if features.shape[1] != self.in_channels:
            raise ValueError(
                f"smunet: the discriminator was built for {self.in_channels} channels, got features "
                f"{tuple(features.shape)}"
            )
        return self.head(self.convs(features).mean(dim=(2, 3, 4)))


@register_kd("smunet")
class SMUNetLoss(DistillationLoss):
    """SMU-Net against a frozen teacher: content MSE, Gram style, adversarial style and ramped consistency.

    Components: ``content``, ``style``, ``adversarial``, ``consistency``. Holds the discriminator
    ``discriminator`` (see :meth:`adversary_parameters`, :meth:`adversary_loss`).
    """

    def __init__(
        self,
        shape: NetworkShape,
        *,
        content_weight: float = 0.2,
        style_weight: float = ORIGINAL_STYLE_WEIGHT,
        adversarial_weight: float = 2e-4,
        consistency_max: float = 10.0,
        ramp_epochs: int = 20,
        adversary_lr: float = 1e-4,
    ) -> None:
        super().__init__()
        check_nonnegative("smunet", content_weight=content_weight, style_weight=style_weight,
                          adversarial_weight=adversarial_weight, consistency_max=consistency_max,
                          ramp_epochs=ramp_epochs)
        check_positive("smunet", adversary_lr=adversary_lr)
        if float(ramp_epochs) != int(ramp_epochs):
            raise NnalignError(f"smunet: ramp_epochs must be a whole number of epochs, got {ramp_epochs!r}")
        self.content_weight = float(content_weight)
        self.style_weight = float(style_weight)
        self.adversarial_weight = float(adversarial_weight)
        self.consistency_max = float(consistency_max)
        self.ramp_epochs = int(ramp_epochs)
        self.adversary_lr = float(adversary_lr)
        skips = shape.skip_channels
        self.discriminator = StyleDiscriminator(skips[-2] if len(skips) >= 2 else skips[-1])

    # -- optimiser wiring ---------------------------------------------------------------------------------------

    def student_side_parameters(self) -> Iterator[nn.Parameter]:
        """None of this loss's parameters: the discriminator has its own optimiser."""
        disc = {id(p) for p in self.discriminator.parameters()}
        return (p for p in self.parameters() if id(p) not in disc)

    def adversary_parameters(self) -> Iterator[nn.Parameter]:
        return self.discriminator.parameters()

    def adversary_loss(self, student: NetworkOutputs, teacher: NetworkOutputs) -> Tensor:
        """``BCE(D(F_t), 0) + BCE(D(F_s), 1)`` on detached second-deepest skips: gradients reach D only."""
        f_s, f_t = self._style_skip(student), self._style_skip(teacher)
        check_same_shape("style skip", f_s, f_t, self.name)
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            d_t = self.discriminator(as_teacher(f_t))
            d_s = self.discriminator(as_teacher(f_s))
            return (F.binary_cross_entropy_with_logits(d_t, torch.zeros_like(d_t))
                    + F.binary_cross_entropy_with_logits(d_s, torch.ones_like(d_s)))

    # -- terms ----------------------------------------------------------------------------------------------------

    def consistency_weight(self, epoch: int) -> float:
        """w(e) = consistency_max·exp(−5(1 − min(e, R)/R)²), R = ramp_epochs."""
        return consistency_ramp(epoch, self.ramp_epochs, self.consistency_max)

    @staticmethod
    def _style_skip(outputs: NetworkOutputs) -> Tensor:
        return outputs.skips[-2] if len(outputs.skips) >= 2 else outputs.skips[-1]

    def _generator_logits(self, f_s: Tensor) -> Tensor:
        """D(f_s) with detached discriminator weights: the gradient flows into f_s, never into D."""
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        frozen.update(dict(self.discriminator.named_buffers()))
        return functional_call(self.discriminator, frozen, (f_s,))

    def components(
        self, student: NetworkOutputs, teacher: NetworkOutputs, target: Tensor, epoch: int
    ) -> dict[str, Tensor]:
        z_s, z_t = student.final_logits, teacher.final_logits
        check_same_shape("logits", z_s, z_t, self.name)
        if len(student.skips) != len(teacher.skips):
            raise NnalignError(
                f"smunet: the student has {len(student.skips)} encoder stages and the teacher {len(teacher.skips)}; "
                "the teacher must be trained with the same plans"
            )
        for k, (a, b) in enumerate(zip(student.skips, teacher.skips)):
            check_same_shape(f"skip {k}", a, b, self.name)

        h_s, h_t = as_student(student.bottleneck), as_teacher(teacher.bottleneck)
        content = (h_s - h_t).pow(2).mean()

        deepest = slice(-STYLE_SCALES, None)
        style = style_loss([as_student(f) for f in student.skips[deepest]],
                           [as_teacher(f) for f in teacher.skips[deepest]])

        d_s = self._generator_logits(as_student(self._style_skip(student)))
        adversarial = F.binary_cross_entropy_with_logits(d_s, torch.zeros_like(d_s))  # "full" = label 0

        p_s, p_t = torch.sigmoid(as_student(z_s)), torch.sigmoid(as_teacher(z_t))
        per_region = (p_s - p_t).pow(2).transpose(0, 1).flatten(1).mean(dim=1)  # (R,): mean over B and voxels
        consistency = per_region.sum()

        return {
            "content": self.content_weight * content,
            "style": self.style_weight * style,
            "adversarial": self.adversarial_weight * adversarial,
            "consistency": self.consistency_weight(epoch) * consistency,
        }
