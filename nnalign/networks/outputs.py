"""The named parts a network returns for alignment and distillation."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NetworkOutputs:
    """Everything the alignment and distillation losses read from one forward pass.

    Shapes use B batch, M modalities, R regions (WT, TC, ET), C channels and spatial dims ``*S``.

    - ``logits``: list of region logits per deep-supervision scale, highest resolution first, each (B, R, *S).
    - ``skips``: encoder features per stage, (B, C_s, *S_s); the last one is the predictor's bottleneck.
    - ``decoder_features``: last decoder features before the segmentation layer, (B, C_0, *S).
    - ``latents``: per-modality latent features Z_j, (B, M, C_z, *S_z), or None for a network without them.
    - ``latent_kl``: (B, M) float32, each modality's KL divergence to N(0, 1) for the normal anchor, else None.
    - ``present``: (B, M) bool, which modalities were present for each sample, or None.
    """

    logits: list[torch.Tensor]
    skips: list[torch.Tensor]
    decoder_features: torch.Tensor
    latents: torch.Tensor | None = None
    latent_kl: torch.Tensor | None = None
    present: torch.Tensor | None = None

    @property
    def bottleneck(self) -> torch.Tensor:
        """The predictor's deepest encoder features (B, C, *S)."""
        return self.skips[-1]

    @property
    def final_logits(self) -> torch.Tensor:
        """Full-resolution region logits (B, R, *S)."""
        return self.logits[0]
