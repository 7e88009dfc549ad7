"""Anchor alignment losses of the teacher: pull every modality's latent Z_j towards one distribution anchor (P_mix).

Shapes: B batch, M modalities, C latent channels, ``*S`` spatial dims. ``latents`` Z is (B, M, C, *S); ``present`` is a
(B, M) bool mask, at least one True per row. Every loss reads present modalities only (absent latents are zeroed
before any arithmetic, so whatever the network put there, NaN included, never leaks in), is computed in float32 (so
fp16 inputs under autocast stay finite) and returns a float32 scalar. A term with nothing to average is zero, not NaN.

Anchors, registered by name in :data:`nnalign.networks.anchor_registry.ANCHORS` and built with :func:`build_anchor`:

- ``none``: no alignment (the plain multi-modal baseline).
- ``normal`` (P^N): each Z_j ~ N(mu_j, sigma_j^2) is pulled to N(0, 1) by the VAE KL divergence.
- ``modality:NAME`` (P^k): every Z_j is pulled to the anchor modality's Z_k (default T1ce), stop-gradiented by default.
- ``mixture`` (P*, the paper's): every Z_j is pulled to p_mix = sum_j w_j Z_j, w the softmax of learnable weights
  over the present modalities; absent modalities are filled with p_mix, so the weights learn through that fill.
- ``mixture-scaled``: nnalign's extension of P*, not the paper's: the weights also scale each modality's latents on
  their way into the predictor (with a gain on their logits and a floor), so they learn without modality dropout.

The distance anchors (P^k, P*) measure the squared distance (``distance``, :data:`ALIGN_DISTANCES`): ``mse``, the
paper's plain mean squared error (the default), or ``relative``, nnalign's option, which divides each squared distance
by the per-sample *centred* energy of the present latents (:func:`latent_energy`, not detached). The relative loss does
not change when every Z_j is scaled by c > 0 or shifted by one constant per channel (shared by the modalities), so it
can be lowered neither by shrinking the latent space nor by a common offset (both of which the predictor's instance
normalisation would hardly notice), only by moving the modalities towards each other. P^N's KL needs no such care:
N(0, 1) fixes the scale and the centre itself.

Each anchor also fills absent modalities (:meth:`AnchorAlignment.fill_missing`) and gives the point estimate used by
:func:`modality_gap`, the per-epoch modality-gap log, which reports the latents' RMS and the relative gap (offset- and
scale-free) beside the absolute distances.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from itertools import combinations
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from nnalign.errors import NnalignError
from nnalign.modalities import canonical_modality
from nnalign.networks.anchor_registry import ALIGN_DISTANCES, ANCHORS, canonical_anchor



# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _check(latents: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Validate (B, M, C, *S) latents against a (B, M) mask; return the mask as bool on the latents' device."""
    if latents.dim() < 3:
        raise ValueError(f"latents must be (B, M, C, *S), got shape {tuple(latents.shape)}")
    if tuple(present.shape) != tuple(latents.shape[:2]):
        raise ValueError(f"present must be (B, M) = {tuple(latents.shape[:2])}, got shape {tuple(present.shape)}")
    return present.to(device=latents.device, dtype=torch.bool)


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, M) -> (B, M, 1, ..., 1), broadcastable against ``like`` (B, M, C, *S)."""
    return mask.reshape(*mask.shape, *([1] * (like.dim() - 2)))


def _zero_absent(latents: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Float32 copy of (B, M, C, *S) latents with absent modalities set to 0 (``torch.where``: no NaN leaks through)."""
    z = latents.float()
    return torch.where(_expand(present, z), z, torch.zeros((), dtype=z.dtype, device=z.device))


def _voxel_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared difference of (B, M, C, *S) and a broadcastable tensor, averaged over channels and voxels -> (B, M).

    ``mse_loss`` keeps its two inputs for the backward pass, tensors the step keeps anyway, where ``(a - b) ** 2``
    would keep the difference too: one latent-sized tensor less of saved activations.
    """
    return nn.functional.mse_loss(a, b.expand_as(a), reduction="none").flatten(2).mean(-1)


def latent_energy(z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Per-sample centred energy of the present latents: (B, M, C, *S) float32 latents whose absent modalities are
    zeroed -> (B,), kept in the autograd graph.

    E = mean over present j, channels c and voxels of (Z_jc - mu_c)^2, mu_c the mean of channel c over the present
    modalities and voxels. A constant added to a channel of every modality moves mu_c with it and leaves E unchanged;
    scaling the latents by c scales E by c^2, as it does every squared distance.
    """
    keep = _expand(present, z)
    count = present.sum(1).clamp_min(1).to(z.dtype)  # (B,)
    centre = z.sum(1).flatten(2).mean(-1) / count.unsqueeze(1)  # (B, C)
    deviation = torch.where(keep, z - centre.reshape(*centre.shape, *([1] * (z.dim() - 3))).unsqueeze(1), 0.0)
    return deviation.pow(2).flatten(2).mean(-1).sum(1) / count


def _relative(dist: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """(B, M) squared distances divided by each sample's latent energy (B,); a sample of equal latents gives 0."""
    return dist / energy.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)


def present_mean(latents: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean of the present modalities' latents per sample: (B, M, C, *S) -> (B, C, *S), float32.

    A row with no present modality (not expected) gives zeros.
    """
    present = _check(latents, present)
    z = _zero_absent(latents, present)
    count = present.sum(1).clamp_min(1).to(z.dtype)
    return z.sum(1) / count.reshape(-1, *([1] * (z.dim() - 2)))


# ----------------------------------------------------------------------------------------------------------------------
# anchors


class AnchorAlignment(nn.Module, ABC):
    """Base of the anchors: an alignment loss, a fill for absent modalities and a point estimate of the anchor."""

    name: str = ""
    """The CLI spec string (``none``, ``normal``, ``modality:T1ce``, ``mixture``, ``mixture-scaled``)."""
    uses_gaussian_latents: bool = False
    """True when the encoder must output a mean and log-variance per modality (only the normal anchor)."""

    @classmethod
    def for_model(cls, modality: str | None, modalities: Sequence[str]) -> "AnchorAlignment":
        """The anchor for a model whose latents follow ``modalities`` (channel order); ``modality``: the canonical
        name after ``modality:``, None for the other kinds."""
        return cls()

    @abstractmethod
    def alignment_loss(self, parts: Mapping[str, Any]) -> torch.Tensor:
        """The anchor loss of one teacher forward pass, a float32 scalar.

        ``parts`` is what the teacher returns with ``return_parts=True``: ``latents`` (B, M, C, *S), ``present``
        (B, M) and, for the normal anchor, ``latent_kl`` (B, M).
        """

    @abstractmethod
    def anchor_center(self, latents: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The anchor's point estimate per sample from the present modalities: (B, C, *S), float32."""

    def scale_for_predictor(self, latents: torch.Tensor) -> torch.Tensor:
        """The (filled) latents (B, M, C, *S) as the predictor reads them: unchanged, except for ``mixture-scaled``."""
        return latents

    def fill_missing(self, latents: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Latents (B, M, C, *S) with every absent Z_j replaced by :meth:`anchor_center`, in the latents' dtype.

        Present entries are returned unchanged (``torch.where``), so gradients flow to them, and through the anchor
        into the present latents (and the mixture weights) from the filled ones.
        """
        present = _check(latents, present)
        center = self.anchor_center(latents, present).to(latents.dtype).unsqueeze(1)
        return torch.where(_expand(present, latents), latents, center)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class LatentDistanceAnchor(AnchorAlignment):
    """An anchor whose loss is a distance between the latents themselves (none, modality, mixture)."""

    distance: str = ALIGN_DISTANCES[0]
    """``mse`` (the paper's) or ``relative`` (nnalign's, over the centred energy); :func:`build_anchor` sets it."""

    def _distance(self, dist: torch.Tensor, z_energy: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, M) squared distances as :attr:`distance` says: unchanged, or over the centred energy of ``z_energy``."""
        if self.distance not in ALIGN_DISTANCES:
            raise ValueError(f"unknown alignment distance {self.distance!r} (one of {', '.join(ALIGN_DISTANCES)})")
        return _relative(dist, latent_energy(z_energy, present)) if self.distance == "relative" else dist

    def alignment_loss(self, parts: Mapping[str, Any]) -> torch.Tensor:
        """:meth:`loss` of the parts' ``latents`` and ``present``."""
        return self.loss(parts["latents"], parts["present"])

    @abstractmethod
    def loss(self, latents: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Alignment loss of latents (B, M, C, *S) with presence mask (B, M): a float32 scalar."""


@ANCHORS.register("none")
class NoAnchor(LatentDistanceAnchor):
    """No alignment: the loss is zero; absent modalities are filled with the mean of the present ones."""


    def loss(self, latents: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Zero (float32 scalar), kept in the autograd graph of the present latents."""
        present = _check(latents, present)
        return _zero_absent(latents, present).sum() * 0.0

    def anchor_center(self, latents: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Mean of the present latents: (B, C, *S)."""
        return present_mean(latents, present)


@ANCHORS.register("normal")
class NormalAnchor(AnchorAlignment):
    """P^N: every modality's latent distribution N(mu_j, sigma_j^2) is pulled to N(0, 1).

    loss = mean over samples of sum over present j of KL_j, KL_j the mean over (C, *S) of
    0.5 (mu^2 + sigma^2 - log sigma^2 - 1), log sigma^2 clamped to ``normal_latents.LOGVAR_RANGE``. The teacher
    computes the KL_j along with its latent sample (:func:`nnalign.networks.normal_latents.sample_normal_latents`).
    Absent modalities are filled with zeros, the anchor's mean.
    """

    uses_gaussian_latents = True

    def alignment_loss(self, parts: Mapping[str, Any]) -> torch.Tensor:
        """:meth:`kl_loss` of the parts' ``latent_kl`` and ``present``."""
        if parts.get("latent_kl") is None:
            raise ValueError("the normal anchor needs the network's per-modality KL (latent_kl, (B, M))")
        return self.kl_loss(parts["latent_kl"], parts["present"])

    @staticmethod
    def kl_loss(kl: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Per-modality KL (B, M) summed over the present modalities, averaged over samples: float32 scalar.

        Absent entries are ignored, whatever they hold (NaN included).
        """
        if kl.dim() != 2 or tuple(present.shape) != tuple(kl.shape):
            raise ValueError(f"kl and present must both be (B, M), got {tuple(kl.shape)} and {tuple(present.shape)}")
        present = present.to(device=kl.device, dtype=torch.bool)
        return torch.where(present, kl.float(), 0.0).sum(1).mean()

    def anchor_center(self, latents: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Zeros (B, C, *S): the anchor's mean."""
        _check(latents, present)
        return torch.zeros_like(latents[:, 0], dtype=torch.float32)


@ANCHORS.register("modality")
class ModalityAnchor(LatentDistanceAnchor):
    """P^k: every other modality is pulled to the anchor modality k.

    loss = sum over j != k of [mean over the samples where j and k are both present of mean over (C, *S) of
    (Z_j - sg(Z_k))^2], divided by the sample's centred latent energy E (:func:`latent_energy`) for the ``relative``
    distance (the anchor's stop-gradient holds in E too). Samples without k contribute
    nothing; a pair present in no sample contributes 0. With
    ``stop_gradient`` the anchor Z_k is detached, so it is not pulled towards the others. Absent modalities are filled
    with Z_k where k is present, else with the mean of the present modalities.
    """

    def __init__(self, anchor_index: int, stop_gradient: bool = True, anchor_name: str | None = None) -> None:
        """``anchor_index``: channel of the anchor modality; ``anchor_name`` only sets :attr:`name`."""
        super().__init__()
        if anchor_index < 0:
            raise ValueError(f"anchor_index must be >= 0, got {anchor_index}")
        self.anchor_index = int(anchor_index)
        self.stop_gradient = bool(stop_gradient)
        self.name = f"modality:{anchor_name if anchor_name is not None else anchor_index}"

    @classmethod
    def for_model(cls, modality: str | None, modalities: Sequence[str]) -> "ModalityAnchor":
        """The anchor on ``modality``'s channel among ``modalities`` (any spelling :func:`canonical_modality` knows);
        NnalignError for a modality the model does not have."""
        available = [_canonical_or_same(m) for m in modalities]
        if modality not in available:
            raise NnalignError(f"anchor 'modality:{modality}': modality {modality} is not one of this model's "
                               f"modalities ({', '.join(modalities)})")
        return cls(available.index(modality), anchor_name=modality)

    def _index(self, latents: torch.Tensor) -> int:
        if self.anchor_index >= latents.shape[1]:
            raise ValueError(f"anchor modality {self.anchor_index} is out of range for {latents.shape[1]} modalities")
        return self.anchor_index

    def loss(self, latents: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Squared distance to the anchor modality (see the class docstring): float32 scalar."""
        present = _check(latents, present)
        k = self._index(latents)
        z = _zero_absent(latents, present)
        zk = z[:, k : k + 1]
        if self.stop_gradient:
            zk = zk.detach()
        not_k = torch.ones(z.shape[1], dtype=torch.bool, device=z.device)
        not_k[k] = False
        pair = present & present[:, k : k + 1] & not_k  # (B, M): j and k both present, j != k
        # a stop-gradiented anchor is a constant in the energy too (else the loss would pay Z_k to grow)
        z_energy = torch.where(_expand(~not_k, z), z.detach(), z) if self.stop_gradient else z
        dist = torch.where(pair, self._distance(_voxel_mse(z, zk), z_energy, present), 0.0)
        per_modality = dist.sum(0) / pair.sum(0).clamp_min(1)  # (M,): mean over the samples holding the pair
        return per_modality.sum()

    def anchor_center(self, latents: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Z_k where k is present, else the mean of the present latents: (B, C, *S)."""
        present = _check(latents, present)
        k = self._index(latents)
        has_k = present[:, k].reshape(-1, *([1] * (latents.dim() - 2)))
        return torch.where(has_k, latents[:, k].float(), present_mean(latents, present))


@ANCHORS.register("mixture")
class MixtureAnchor(LatentDistanceAnchor):
    """P*, as the paper and its authors' code define it: every modality is pulled to a learnable mixture of them.

    w = softmax(``raw_weights``) (the parameter, zero at the start: uniform), restricted per sample to the present
    modalities and renormalised over them (a masked softmax; a free weight would collapse to w -> 0);
    p_mix = sum over present j of w_j Z_j, not detached, so the loss reaches both the weights and the latents;
    loss = mean over samples of sum over present j of mean over (C, *S) of (Z_j - p_mix)^2 (divided by the sample's
    centred latent energy for the ``relative`` distance, :func:`latent_energy`). Absent modalities are filled with
    p_mix (:meth:`fill_missing`); present ones enter the predictor as they are, in training and at inference alike.

    The weights learn through that fill (and the alignment term, which alone is minimised by uniform weights), so a
    P* teacher learns them only when it trains with missing modalities (``--modality-dropout``). p_mix mixes the
    present modalities only, in training as at inference: an absent modality's latent is the encoding of a zeroed
    channel, and its own real features are what a missing modality cannot offer at test time.
    """

    WEIGHT_GAIN: float = 1.0
    """Factor from ``raw_weights`` to the softmax logits (1: the paper's weights)."""
    WEIGHT_FLOOR: float = 0.0
    """Share f of each weight given uniformly, w = f / n + (1 - f) softmax (0: the paper's weights)."""

    @classmethod
    def for_model(cls, modality: str | None, modalities: Sequence[str]) -> "MixtureAnchor":
        """One weight per modality of the model."""
        if not modalities:
            raise NnalignError(f"anchor {cls.name!r} needs at least one modality")
        return cls(len(modalities))

    def __init__(self, num_modalities: int) -> None:
        """``num_modalities``: M, the number of raw weights (initialised to zero, i.e. uniform)."""
        super().__init__()
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
        self.raw_weights = nn.Parameter(torch.zeros(num_modalities))

    def normalised_weights(self) -> torch.Tensor:
        """The weights when every modality is present: (M,), float32, sums to 1."""
        return self._floored(torch.softmax(self.logits(), dim=0), self.raw_weights.numel())

    def _floored(self, shares: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
        """Softmax shares (..., M) over ``count`` present modalities -> f / count + (1 - f) shares."""
        if not self.WEIGHT_FLOOR:
            return shares
        return self.WEIGHT_FLOOR / count + (1.0 - self.WEIGHT_FLOOR) * shares

    def logits(self) -> torch.Tensor:
        """The weights' logits, ``WEIGHT_GAIN`` x ``raw_weights``: (M,), float32."""
        return self.WEIGHT_GAIN * self.raw_weights.float()

    def sample_weights(self, present: torch.Tensor) -> torch.Tensor:
        """The masked softmax of the weights over each sample's present modalities: (B, M) -> (B, M), float32.

        Absent entries are 0 and each row sums to 1 (a row with nothing present, not expected, is all 0).
        """
        present = present.to(device=self.raw_weights.device, dtype=torch.bool)
        if present.dim() != 2 or present.shape[1] != self.raw_weights.numel():
            raise ValueError(f"present must be (B, {self.raw_weights.numel()}), got shape {tuple(present.shape)}")
        raw = self.logits().unsqueeze(0).expand(present.shape[0], -1)
        logits = raw.masked_fill(~present, torch.finfo(torch.float32).min)  # finite: an all-absent row cannot NaN
        shares = torch.softmax(logits, dim=1) * present
        shares = shares / shares.sum(1, keepdim=True).clamp_min(1e-12)
        count = present.sum(1, keepdim=True).clamp_min(1).to(shares.dtype)
        return self._floored(shares, count) * present

    def mixture(self, latents: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """p_mix = sum_j w_j Z_j over the present modalities: (B, M, C, *S) -> (B, C, *S), float32."""
        present = _check(latents, present)
        return self._mix(_zero_absent(latents, present), present)

    def _mix(self, z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """p_mix of float32 latents ``z`` whose absent modalities are zeroed: one weighted sum (a batched matrix
        product, no (B, M, ...) temporary), kept in float32 under autocast."""
        with torch.autocast(z.device.type, enabled=False):
            return torch.einsum("bm,bm...->b...", self.sample_weights(present).to(z.device), z)

    def loss(self, latents: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Squared distance of each present Z_j to p_mix (see the class docstring): float32 scalar."""
        present = _check(latents, present)
        z = _zero_absent(latents, present)
        dist = self._distance(_voxel_mse(z, self._mix(z, present).unsqueeze(1)), z, present)
        return torch.where(present, dist, 0.0).sum(1).mean()

    def anchor_center(self, latents: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """p_mix of the present modalities: (B, C, *S)."""
        return self.mixture(latents, present)

    def weights_dict(self, names: Sequence[str]) -> dict[str, dict[str, float]]:
        """``{name: {"raw": logit, "normalised": weight}}`` for logging; ``names`` in channel order, one per weight."""
        if len(names) != self.raw_weights.numel():
            raise ValueError(f"{len(names)} names for {self.raw_weights.numel()} mixture weights")
        raw = self.logits().detach().cpu()
        normalised = self.normalised_weights().detach().cpu()
        return {n: {"raw": float(raw[i]), "normalised": float(normalised[i])} for i, n in enumerate(names)}


@ANCHORS.register("mixture-scaled")
class ScaledMixtureAnchor(MixtureAnchor):
    """nnalign's extension of P*, not the paper's: :class:`MixtureAnchor` whose weights also scale each modality's
    (present or filled) latents on their way into the predictor, by s_j = M w_j (:meth:`scale_for_predictor`; 1 at
    the uniform start, mean 1 always), so the segmentation trains them with every modality present.

    Two more inventions make that work: the logits are ``WEIGHT_GAIN`` x ``raw_weights`` (four scalars would hardly
    move against the predictor's first convolution, which can rescale a modality through thousands of weights), and
    each weight keeps the floor f / n (``WEIGHT_FLOOR``), so each s_j stays in [f, f + M (1 - f)] and no modality is
    switched off by the feedback of the scaling. documentation/training.md ("nnalign's scaled P*") explains both.
    """

    WEIGHT_GAIN: float = 5.0
    WEIGHT_FLOOR: float = 0.5

    def predictor_scales(self) -> torch.Tensor:
        """s = M w (:meth:`normalised_weights`): (M,), float32, mean 1, each in [f, f + M (1 - f)]; each modality's
        factor on its way into the predictor."""
        return self.raw_weights.numel() * self.normalised_weights()

    def scale_for_predictor(self, latents: torch.Tensor) -> torch.Tensor:
        """Modality j's latents (B, M, C, *S) times s_j (:meth:`predictor_scales`), in the latents' dtype."""
        scales = self.predictor_scales().to(latents.dtype)
        return latents * scales.reshape(1, -1, *([1] * (latents.dim() - 2)))


# ----------------------------------------------------------------------------------------------------------------------
# building by name, and logging


def _canonical_or_same(name: str) -> str:
    try:
        return canonical_modality(name)
    except NnalignError:
        return name


def build_anchor(spec: str, modalities: Sequence[str], stop_gradient: bool = True,
                 distance: str = ALIGN_DISTANCES[0]) -> AnchorAlignment:
    """The anchor named by ``spec`` (``none | normal | modality[:NAME] | mixture | mixture-scaled``, case-insensitive,
    read by :func:`~nnalign.networks.anchor_registry.canonical_anchor`) for a model whose latents follow
    ``modalities`` (channel order), with the run's ``stop_gradient`` (the modality anchor) and alignment
    ``distance`` (the distance anchors). One-line NnalignError for an unknown spec, an unknown modality, or one the
    model does not have.
    """
    kind, _, modality = canonical_anchor(spec).partition(":")
    anchor = ANCHORS.get(kind).for_model(modality or None, modalities)
    if isinstance(anchor, ModalityAnchor):
        anchor.stop_gradient = bool(stop_gradient)
    if isinstance(anchor, LatentDistanceAnchor):
        if distance not in ALIGN_DISTANCES:
            raise NnalignError(f"unknown alignment distance {distance!r} (one of {', '.join(ALIGN_DISTANCES)})")
        anchor.distance = distance
    return anchor


@torch.no_grad()
def modality_gap(latents: torch.Tensor, present: torch.Tensor, anchor: AnchorAlignment) -> dict:
    """Modality-gap summary of a batch, for the per-epoch log.

    Each modality's centroid is its latent (B, M, C, *S) averaged over the samples where it is present and over space
    (a C-vector); the anchor centroid is ``anchor``'s centre averaged over all samples and space. Every anchor's centre
    is a per-sample weighted sum of the modalities' latents, so it is computed from the spatial means (B, M, C) alone,
    with no second pass over the full-resolution latents. Returns plain floats: ``{"to_anchor": {modality index:
    Euclidean distance of its centroid to the anchor centroid}, "pairwise_mean": mean Euclidean distance between the
    centroids of modality pairs both present somewhere in the batch (the absolute gap), "rms": {modality index: root
    mean square of its latents where present}, "relative_gap": pairwise_mean / the latents' centred RMS}``, the centred
    RMS being the square root of the per-sample centred energy (:func:`latent_energy`) averaged over the samples.

    The RMS shows whether the latent space keeps its size. The relative gap is the alignment that neither shrinking
    (it is of degree 0 in the latents) nor a common offset per channel (it moves every centroid alike and is centred
    out of the RMS) can fake. Modalities absent from the whole batch are left out; with fewer than two,
    ``pairwise_mean`` and ``relative_gap`` are 0.0.
    """
    present = _check(latents, present)
    b, m, c = latents.shape[:3]
    flat = latents.detach().reshape(b, m, c, -1)
    per_sample = flat.mean(-1, dtype=torch.float32)  # (B, M, C)
    # (B, M) mean of Z^2, accumulated in float32 without a float32 copy of the latents
    mean_square = (torch.linalg.vector_norm(flat, dim=(2, 3), dtype=torch.float32).pow(2) / flat[0, 0].numel()).cpu()
    anchor_centroid = anchor.anchor_center(per_sample.unsqueeze(-1), present).mean((0, 2))  # (C,)
    per_sample, anchor_centroid, present = per_sample.cpu(), anchor_centroid.cpu(), present.cpu()
    centroids = {j: per_sample[present[:, j], j].mean(0) for j in range(m) if bool(present[:, j].any())}
    to_anchor = {j: float(torch.linalg.vector_norm(cj - anchor_centroid)) for j, cj in centroids.items()}
    pairs = [float(torch.linalg.vector_norm(centroids[i] - centroids[j])) for i, j in combinations(centroids, 2)]
    rms = {j: float(mean_square[present[:, j], j].mean().sqrt()) for j in centroids}
    pairwise = sum(pairs) / len(pairs) if pairs else 0.0
    # centred energy per sample from the (B, M, C) means: E = mean of Z^2 over present j - mean over c of mu_c^2
    count = present.sum(1).clamp_min(1).double()
    channel_mean = torch.where(present.unsqueeze(-1), per_sample.double(), 0.0).sum(1) / count.unsqueeze(1)  # (B, C)
    energy = torch.where(present, mean_square.double(), 0.0).sum(1) / count - channel_mean.pow(2).mean(1)
    spread = float(energy[present.any(1)].clamp_min(0).mean().sqrt()) if bool(present.any()) else 0.0
    return {"to_anchor": to_anchor, "pairwise_mean": pairwise, "rms": rms,
            "relative_gap": pairwise / spread if pairs and spread > 0 else 0.0}
