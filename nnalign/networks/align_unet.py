"""The aligned multi-modal teacher and the modality-subset student, built from nnU-Net's plans.

Both wrap dynamic_network_architectures' ``PlainConvUNet`` (the nnU-Net-planned predictor C*) and take the plans'
``arch_kwargs`` plus nnalign's own keywords, so ``get_network_from_plans`` builds them like any nnU-Net network.

Teacher (:class:`nnAlignTeacherUNet`)::

    x (B, M, *S) --per-modality encoder--> Z_j (B, M, C_z, *S) --anchor fills absent Z_j (mixture-scaled: and
                 scales each by its weight)--> concat (B, M*C_z, *S) --PlainConvUNet--> region logits (WT, TC, ET)

The per-modality encoder is a few conv blocks at full resolution; by default one encoder shared by all modalities,
run as a single batched pass (the modality axis folded into the batch). Its latents are what the anchor loss aligns.
They are taken at ``latent_level`` L of the planned U-Net (default 0, the input resolution). For L > 0 the encoder
adds one strided conv block per level, with the plan's kernels and strides, so Z_j has the resolution of U-Net stage
L; the fused latents are brought back to the input resolution by one transposed convolution per level (as nnU-Net's
decoder upsamples) before the planned U-Net, so the predictor and every part the students distil from keep their
shapes at any level::

    x --encoder: stem, L strided blocks--> Z_j at stage L --fill, concat--> L transposed convs --> PlainConvUNet

Student (:class:`nnAlignStudentUNet`): the planned U-Net on its own modality channels only, so at inference it is a
plain nnU-Net model; the full-modality "original" nnU-Net baseline is the student with every modality.

``forward(x)`` returns logits only, as nnU-Net's trainer, validation and predictor expect. ``forward(x,
return_parts=True)`` returns a dict that :func:`as_outputs` turns into :class:`NetworkOutputs` for the losses.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import numpy as np
import torch
from torch import nn

from nnalign.networks.anchor_registry import ALIGN_DISTANCES
from nnalign.networks.anchors import build_anchor
from nnalign.networks.normal_latents import kl_to_standard_normal, mean_and_logvar, sample_normal_latents
from nnalign.modalities import BRATS_MODALITIES
from nnalign.networks.outputs import NetworkOutputs

LATENT_DEFAULTS = {"latent_channels": 4, "latent_convs": 1, "latent_level": 0}
"""The teacher's latent-encoder settings where the plans give none; nnalign's planner writes them into every
configuration's ``arch_kwargs``."""

PLAIN_UNET_KEYS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage",
              "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs",
              "nonlin", "nonlin_kwargs", "nonlin_first")


def _plain_unet(input_channels: int, num_classes: int, deep_supervision: bool, unet_kwargs: dict) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(input_channels, num_classes=num_classes, deep_supervision=deep_supervision, **unet_kwargs)


def run_unet(unet: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Run a PlainConvUNet keeping its parts: (encoder skips, logits per scale highest first, last decoder features).

    Uses the decoder's own modules stage by stage; logits are returned for every scale only when the decoder's
    ``deep_supervision`` is on, else a one-element list.
    """
    skips = unet.encoder(x)
    dec = unet.decoder
    lres, logits = skips[-1], []
    for s, stage in enumerate(dec.stages):
        lres = stage(torch.cat((dec.transpconvs[s](lres), skips[-(s + 2)]), 1))
        if dec.deep_supervision or s == len(dec.stages) - 1:
            logits.append(dec.seg_layers[s](lres))
    return skips, logits[::-1], lres


class PointwiseConv(nn.Module):
    """A kernel-size-1 convolution computed as a matrix product over the channel axis.

    Same parameters (``conv``'s weight and bias, initialised like any conv) and the same result as calling ``conv``,
    but several times faster for the few channels of a latent head: oneDNN's convolution kernels are slow for a 1x1x1
    kernel on a few channels (timings in documentation/benchmarks.md).
    """

    def __init__(self, conv_op: type[nn.Module], in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv_op(in_channels, out_channels, 1)

    @property
    def out_channels(self) -> int:
        """Output channels, as a convolution reports them."""
        return self.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv(x)`` for x of shape (N, C_in, *S)."""
        weight = self.conv.weight.flatten(1)
        y = torch.bmm(weight.expand(x.shape[0], *weight.shape), x.flatten(2))  # autograd saves a view of x, no copy
        return (y + self.conv.bias.to(y.dtype)[:, None]).unflatten(2, x.shape[2:])


class _ModalityFoldedConv:
    """Mixin for a convolution class: on a batch that is B samples x M modalities in a row (N = B*M, shape
    (N, C_in, *S)), run one dense convolution over (B, M*C_in, *S) with a block-diagonal kernel instead.

    The result is the same as the plain convolution of each modality's image; the dense form is faster because
    oneDNN's kernels for a few input channels are slow, forward and backward (timings in
    documentation/benchmarks.md). Other inputs fall back to the plain convolution.
    """

    num_modalities: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.num_modalities
        if self.groups != 1 or m == 1 or x.shape[0] % m:
            return super().forward(x)
        eye = torch.eye(m, dtype=self.weight.dtype, device=self.weight.device)
        # (C_out, C_in, *K) -> (M*C_out, M*C_in, *K), modality j's block at rows j*C_out.., columns j*C_in..
        block_diagonal = torch.einsum("oi...,jl->joli...", self.weight, eye).flatten(2, 3).flatten(0, 1)
        bias = None if self.bias is None else self.bias.repeat(m)
        folded = x.reshape(x.shape[0] // m, m * self.in_channels, *x.shape[2:])
        y = self._conv_forward(folded, block_diagonal, bias)
        return y.reshape(x.shape[0], self.out_channels, *y.shape[2:])


@functools.lru_cache(maxsize=None)
def modality_folded_conv(conv_op: type[nn.Module], num_modalities: int) -> type[nn.Module]:
    """A subclass of ``conv_op`` (same parameters, same results) that folds the images of ``num_modalities``
    modalities into one dense convolution; see :class:`_ModalityFoldedConv`."""
    return type(f"ModalityFolded{conv_op.__name__}", (_ModalityFoldedConv, conv_op), {"num_modalities": num_modalities})


def as_outputs(parts: dict) -> NetworkOutputs:
    """Turn the dict a network returns with ``return_parts=True`` into :class:`NetworkOutputs`."""
    return NetworkOutputs(**parts)


class _PartsNetwork(nn.Module):
    """Common behaviour: nnU-Net's ``decoder.deep_supervision`` switch and He initialisation."""

    unet: nn.Module

    @property
    def decoder(self) -> nn.Module:
        """The predictor's decoder; nnU-Net's trainer toggles ``decoder.deep_supervision`` through it."""
        return self.unet.decoder

    @staticmethod
    def initialize(module: nn.Module) -> None:
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He

        InitWeights_He(1e-2)(module)

    def _logits(self, parts: dict, return_parts: bool):
        if return_parts:
            return parts
        return parts["logits"] if self.decoder.deep_supervision else parts["logits"][0]


class nnAlignTeacherUNet(_PartsNetwork):
    """Multi-modal teacher: per-modality latent encoding, anchor alignment and fill, planned U-Net predictor.

    Extra keywords beyond PlainConvUNet's: ``modalities`` (names, channel order), ``latent_channels`` C_z,
    ``latent_convs`` (conv blocks of the modality encoder at full resolution), ``latent_level`` (the U-Net stage whose
    resolution Z_j has, 0 to n_stages - 1), ``shared_encoder`` (one encoder for all modalities, else
    one each), ``anchor`` (``none|normal|modality:NAME|mixture|mixture-scaled``), ``stop_gradient`` and
    ``align_distance`` (the run's, for :func:`~nnalign.networks.anchors.build_anchor`), ``input_scale`` (optional
    (a, b): x -> a*x + b on present channels, e.g. (2, -1) maps [0, 1] to [-1, 1]).

    ``present_modalities`` (indices) says which channels are real when ``forward`` gets no mask; nnalign_predict sets
    it for cases with missing modalities. :meth:`assume_presence` does the same per sample for callers that pass the
    data alone (nnU-Net's validation step).
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, *,
                 modalities: Sequence[str] = BRATS_MODALITIES,
                 latent_channels: int = LATENT_DEFAULTS["latent_channels"],
                 latent_convs: int = LATENT_DEFAULTS["latent_convs"],
                 latent_level: int = LATENT_DEFAULTS["latent_level"],
                 shared_encoder: bool = True, anchor: str = "none", stop_gradient: bool = True,
                 align_distance: str = ALIGN_DISTANCES[0], input_scale: Sequence[float] | None = None,
                 **unet_kwargs) -> None:
        super().__init__()
        from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp
        from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

        if len(modalities) != input_channels:
            raise ValueError(f"{input_channels} input channels but {len(modalities)} modalities {list(modalities)}")
        n_stages = unet_kwargs["n_stages"]
        if not 0 <= latent_level < n_stages:
            raise ValueError(f"latent level {latent_level} is not a stage of the {n_stages}-stage U-Net "
                             f"(0 to {n_stages - 1})")
        self.modalities = tuple(modalities)
        self.latent_channels = latent_channels
        self.latent_level = latent_level
        self.anchor = build_anchor(anchor, self.modalities, stop_gradient, align_distance)
        self.gaussian = self.anchor.uses_gaussian_latents
        self.input_scale = tuple(input_scale) if input_scale else None
        self.present_modalities: tuple[int, ...] = tuple(range(input_channels))
        self._assumed_presence: torch.Tensor | None = None
        conv_op, kernel = unet_kwargs["conv_op"], unet_kwargs["kernel_sizes"][0]
        block_kwargs = {k: unet_kwargs.get(k) for k in ("conv_bias", "norm_op", "norm_op_kwargs", "dropout_op",
                                                         "dropout_op_kwargs", "nonlin", "nonlin_kwargs")}
        head_channels = 2 * latent_channels if self.gaussian else latent_channels

        # The shared encoder sees the B x M modality images as one batch; its convolutions fold them.
        encoder_conv = modality_folded_conv(conv_op, input_channels) if shared_encoder else conv_op

        nonlin_first = unet_kwargs.get("nonlin_first", False)
        strides = unet_kwargs["strides"]

        def encoder() -> nn.Module:
            stem = StackedConvBlocks(latent_convs, encoder_conv, 1, latent_channels, kernel, 1,
                                     nonlin_first=nonlin_first, **block_kwargs)
            downsampling = [StackedConvBlocks(1, encoder_conv, latent_channels, latent_channels,
                                              unet_kwargs["kernel_sizes"][level], strides[level],
                                              nonlin_first=nonlin_first, **block_kwargs)
                            for level in range(1, latent_level + 1)]
            return nn.Sequential(stem, *downsampling, PointwiseConv(conv_op, latent_channels, head_channels))

        self.encoders = nn.ModuleList([encoder() for _ in range(1 if shared_encoder else input_channels)])
        fused_channels = input_channels * latent_channels
        transpconv = get_matching_convtransp(conv_op)
        bias = unet_kwargs.get("conv_bias")
        self.upsample = nn.Sequential(*[transpconv(fused_channels, fused_channels, strides[level], strides[level],
                                                   bias=bias) for level in range(latent_level, 0, -1)])
        self.unet = _plain_unet(fused_channels, num_classes, deep_supervision, unet_kwargs)

    @contextlib.contextmanager
    def assume_presence(self, present: torch.Tensor):
        """Within the block, a ``forward`` without a mask uses ``present`` ((B, M) bool, each sample's real
        modalities) for a batch of B samples."""
        before, self._assumed_presence = self._assumed_presence, present
        try:
            yield
        finally:
            self._assumed_presence = before

    def presence_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(B, M) bool mask: the one :meth:`assume_presence` holds, else from ``present_modalities``."""
        if self._assumed_presence is not None:
            if self._assumed_presence.shape != (x.shape[0], len(self.modalities)):
                raise ValueError(f"the assumed presence is {tuple(self._assumed_presence.shape)} for a batch of "
                                 f"{x.shape[0]} samples of {len(self.modalities)} modalities")
            return self._assumed_presence.to(x.device)
        mask = torch.zeros(x.shape[0], len(self.modalities), dtype=torch.bool, device=x.device)
        mask[:, list(self.present_modalities)] = True
        return mask

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Per-modality encoder outputs (B, M, H, *S_L) at the latent level's resolution S_L, H = C_z, or 2 C_z (mean,
        log-variance) for the normal anchor."""
        b, m, spatial = x.shape[0], x.shape[1], x.shape[2:]
        if len(self.encoders) == 1:
            out = self.encoders[0](x.reshape(b * m, 1, *spatial))
            return out.reshape(b, m, *out.shape[1:])
        return torch.stack([enc(x[:, j:j + 1]) for j, enc in enumerate(self.encoders)], 1)

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None, return_parts: bool = False):
        """Region logits (a list per scale under deep supervision), or all parts with ``return_parts``.

        ``present`` (B, M) bool marks each sample's real modalities; None means ``present_modalities`` for all.
        When every modality is known to be present the anchor fill is the identity and is skipped.
        """
        all_present = (present is None and self._assumed_presence is None
                       and len(self.present_modalities) == len(self.modalities))
        if present is None:
            present = self.presence_mask(x)
        if self.input_scale is not None:
            keep = present.reshape(*present.shape, *([1] * (x.dim() - 2)))
            x = torch.where(keep, x * self.input_scale[0] + self.input_scale[1], torch.zeros_like(x))
        encoded = self.encode(x)
        latents, kl = encoded, None
        if self.gaussian and self.training:
            latents, kl = sample_normal_latents(encoded)
        elif self.gaussian:  # evaluation: Z = mean; the KL only when the parts are asked for
            latents, logvar = mean_and_logvar(encoded)
            kl = kl_to_standard_normal(latents, logvar) if return_parts else None
        filled = latents if all_present else self.anchor.fill_missing(latents, present)
        filled = self.anchor.scale_for_predictor(filled)
        skips, logits, features = run_unet(self.unet, self.upsample(filled.flatten(1, 2)))
        parts = {"logits": logits, "skips": skips, "decoder_features": features, "latents": latents,
                 "latent_kl": kl, "present": present}
        return self._logits(parts, return_parts)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Activation voxels the planner budgets: predictor U-Net, every modality's encoder and latents, and the
        fused latents at every level on the way back to the input resolution."""
        strides = [s.initial_stride for s in self.encoders[0][1:-1]]
        sizes = [list(input_size)]
        for stride in strides:
            sizes.append([i // s for i, s in zip(sizes[-1], stride)])
        block_inputs = [sizes[0], *sizes[:-1]]  # the stem keeps the input size, each later block downsamples its input
        per_modality = sum(int(b.compute_conv_feature_map_size(size))
                           for b, size in zip(self.encoders[0][:-1], block_inputs))
        voxels = [int(np.prod(size, dtype=np.int64)) for size in sizes]
        latents = self.encoders[0][-1].out_channels * voxels[-1]
        fused = len(self.modalities) * self.latent_channels * sum(voxels)  # fused at stage L, then each upsampling
        return int(self.unet.compute_conv_feature_map_size(input_size)
                   + len(self.modalities) * (per_modality + latents) + fused)


class nnAlignStudentUNet(_PartsNetwork):
    """Subset student: the planned U-Net on the channels of ``student_modalities`` (indices into the dataset's).

    It receives the dataset's full channel stack, as nnU-Net's data loader gives it, and reads only its own channels,
    so one preprocessed dataset serves the teacher and every student.
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, *,
                 student_modalities: Sequence[int] | None = None, input_scale: Sequence[float] | None = None,
                 **unet_kwargs) -> None:
        super().__init__()
        unet_kwargs = {k: v for k, v in unet_kwargs.items() if k in PLAIN_UNET_KEYS}
        self.channels = tuple(student_modalities) if student_modalities is not None else tuple(range(input_channels))
        if not self.channels or not all(0 <= c < input_channels for c in self.channels):
            raise ValueError(f"student channels {self.channels} do not fit {input_channels} input channels")
        self.input_scale = tuple(input_scale) if input_scale else None
        self.unet = _plain_unet(len(self.channels), num_classes, deep_supervision, unet_kwargs)

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None, return_parts: bool = False):
        """Region logits from the student's own channels (``present`` is accepted for a uniform call and ignored)."""
        x = x[:, list(self.channels)]
        if self.input_scale is not None:
            x = x * self.input_scale[0] + self.input_scale[1]
        skips, logits, features = run_unet(self.unet, x)
        return self._logits({"logits": logits, "skips": skips, "decoder_features": features}, return_parts)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Activation voxels of the predictor U-Net."""
        return int(self.unet.compute_conv_feature_map_size(input_size))
