"""The base class every distillation loss derives from, and the Bernoulli (sigmoid-region) helpers they share.

A distillation loss compares a student's :class:`~nnalign.networks.outputs.NetworkOutputs` with the frozen teacher's
and returns its named, already weighted components plus ``"total"``. The trainer adds ``seg_weight`` times the
student's own segmentation loss (nnU-Net's Dice + BCE on the regions) to ``"total"``.

Conventions shared by every method
----------------------------------
- nnU-Net's BraTS heads are region-based sigmoids: logits (B, R, *S) with R = 3 regions WT, TC, ET (nested:
  ET ⊂ TC ⊂ WT), target a bool/float region tensor of the same shape. Each region at each voxel is a Bernoulli
  variable, so a C-class softmax distribution in the original methods becomes R independent Bernoulli
  distributions here (see each method's docstring for the exact adaptation).
- Only the full-resolution logits (``NetworkOutputs.final_logits``) are distilled; the deep-supervision scales are
  left to the segmentation loss.
- Teacher tensors are detached (the teacher runs under ``no_grad`` anyway), so no gradient reaches the teacher.
- Everything is computed in float32 with autocast disabled, whatever dtype the network produced.

Optimiser wiring for the trainer
--------------------------------
- Move the loss to the student's device (``loss.to(device)``): PMKL and SMU-Net hold small modules.
- ``student_side_parameters()`` are trained together with the student by the main optimiser (e.g. PMKL's projection
  heads). Default: all of the loss's parameters (none for most methods).
- ``adversary_parameters()`` are stepped by a separate optimiser (Adam at ``adversary_lr``) on ``adversary_loss``.
  Default: none, and ``adversary_loss`` returns None.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnalign.errors import NnalignError
from nnalign.networks.outputs import NetworkOutputs



@dataclass(frozen=True)
class NetworkShape:
    """What every method's constructor gets first from ``build_kd``: the channel counts of the networks it reads
    (they describe the network, not the method, so they are not settings).

    ``feature_channels``: the last decoder stage's; ``bottleneck_channels``: the deepest skip's; ``skip_channels``:
    every encoder stage's, shallowest first; ``num_regions``: R sigmoid region outputs (3 for WT, TC, ET).
    """

    feature_channels: int
    bottleneck_channels: int
    skip_channels: tuple[int, ...]
    num_regions: int = 3


class DistillationLoss(nn.Module):
    """Base of the distillation losses: subclasses implement :meth:`components`.

    The constructor takes a :class:`NetworkShape` first; every keyword-only argument after it is a setting: it must be
    stored on the instance under the same name, can be overridden through ``build_kd(..., name=value)``, and is
    reported by :meth:`settings`.
    """

    name: ClassVar[str] = ""
    #: Weight the trainer puts on the student's own segmentation loss.
    seg_weight: float = 1.0
    #: Learning rate of the separate optimiser for :meth:`adversary_parameters`; None for methods without one.
    adversary_lr: float | None = None
    #: Whether :meth:`components` reads the teacher's outputs (if not, the trainer skips the teacher's forward pass).
    uses_teacher: bool = True

    def forward(
        self, student: NetworkOutputs, teacher: NetworkOutputs, target: Tensor, epoch: int
    ) -> dict[str, Tensor]:
        """Named weighted components (float32 scalars) and ``"total"``, their sum.

        ``target``: the full-resolution region target (B, R, *S), bool or float. ``epoch``: the current epoch
        (0-based), for methods with a ramp-up.
        """
        with torch.autocast(device_type=student.final_logits.device.type, enabled=False):
            parts = self.components(student, teacher, target, epoch)
            total = zero_like_graph(student.final_logits)
            for value in parts.values():
                total = total + value
        return {**parts, "total": total}

    def components(
        self, student: NetworkOutputs, teacher: NetworkOutputs, target: Tensor, epoch: int
    ) -> dict[str, Tensor]:
        """The method's weighted loss terms, computed in float32; called by :meth:`forward` with autocast off."""
        raise NotImplementedError

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """Names of the constructor's overridable settings, in signature order."""
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(
            p.name for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        )

    def settings(self) -> dict[str, Any]:
        """Every weight and temperature of this loss, for the run's settings record."""
        record: dict[str, Any] = {"method": self.name, "seg_weight": float(self.seg_weight)}
        record.update({key: getattr(self, key) for key in self.setting_names()})
        return record

    def student_side_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the main optimiser trains together with the student (default: all of this loss's)."""
        return self.parameters()

    def adversary_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of a discriminator, stepped by their own optimiser on :meth:`adversary_loss` (default: none)."""
        return iter(())

    def adversary_loss(self, student: NetworkOutputs, teacher: NetworkOutputs) -> Tensor | None:
        """The discriminator's loss, which must backpropagate into the discriminator only (default: None)."""
        return None

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings().items() if k != "method")


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------


def zero_like_graph(reference: Tensor) -> Tensor:
    """A float32 scalar 0 on ``reference``'s device, attached to its graph when it requires grad."""
    # ``where`` with a False condition is exactly 0 even when ``reference`` holds inf or NaN (0·inf would be NaN),
    # and its gradient into ``reference`` is exactly 0.
    total = reference.float().sum()
    zero = torch.where(torch.zeros((), dtype=torch.bool, device=total.device), total, torch.zeros_like(total))
    return zero if reference.requires_grad else zero.detach()


def as_student(t: Tensor) -> Tensor:
    """A student tensor in float32 (gradient kept)."""
    return t.float()


def as_teacher(t: Tensor) -> Tensor:
    """A teacher tensor in float32, detached: the teacher is a constant."""
    return t.detach().float()


def bernoulli_kl(p_teacher: Tensor, logits_student: Tensor) -> Tensor:
    """Element-wise KL(Bern(p_teacher) ‖ Bern(σ(logits_student))), in float32, same shape as the inputs.

    ``KL = p·log p + (1−p)·log(1−p) − p·logσ(z) − (1−p)·logσ(−z)``. The entropy terms use ``xlogy`` (0·log 0 = 0),
    the cross terms ``logsigmoid``, so the result is finite for any finite logits (no log of a rounded 0).
    """
    p = p_teacher.float()
    z = logits_student.float()
    q = 1.0 - p
    neg_entropy = torch.xlogy(p, p) + torch.xlogy(q, q)
    cross = p * F.logsigmoid(z) + q * F.logsigmoid(-z)
    return neg_entropy - cross


def bernoulli_kl_at_temperature(logits_teacher: Tensor, logits_student: Tensor, temperature: float) -> Tensor:
    """Element-wise KL(Bern(σ(z_t/T)) ‖ Bern(σ(z_s/T))) in float32 (no T² factor)."""
    p_teacher = torch.sigmoid(logits_teacher.float() / temperature)
    return bernoulli_kl(p_teacher, logits_student.float() / temperature)


def clipped_log_sigmoid(logits: Tensor, clip_min: float) -> Tensor:
    """``log(clip(σ(z), clip_min, 1))`` computed as ``max(logσ(z), log clip_min)``: same value, same (zero when
    clipped) gradient as clipping the probability, but without forming σ(z) first."""
    return torch.clamp(F.logsigmoid(logits.float()), min=math.log(clip_min))


def region_target(target: Tensor, like: Tensor, method: str) -> Tensor:
    """The region target as float32, checked to have the logits' shape (B, R, *S)."""
    if target.shape != like.shape:
        raise ValueError(
            f"{method}: the region target has shape {tuple(target.shape)} but the logits have {tuple(like.shape)}; "
            "pass the full-resolution region target (B, R, *S)"
        )
    return target.float()


def check_same_shape(what: str, student: Tensor, teacher: Tensor, method: str) -> None:
    """Raise NnalignError when a student tensor and its teacher counterpart differ in shape."""
    if student.shape != teacher.shape:
        raise NnalignError(
            f"{method}: the student's {what} {tuple(student.shape)} and the teacher's {tuple(teacher.shape)} differ "
            "in shape; the teacher must be trained with the same plans and configuration as the student"
        )


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_nonnegative(method: str, **values: float) -> None:
    """Raise NnalignError for a negative (or non-finite) weight."""
    for key, value in values.items():
        if not (_is_number(value) and value >= 0):
            raise NnalignError(f"{method}: {key} must be a finite number >= 0, got {value!r}")


def check_positive(method: str, **values: float) -> None:
    """Raise NnalignError for a setting that must be > 0 (temperatures, margins, sizes)."""
    for key, value in values.items():
        if not (_is_number(value) and value > 0):
            raise NnalignError(f"{method}: {key} must be a finite number > 0, got {value!r}")
