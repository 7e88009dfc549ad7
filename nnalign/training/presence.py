"""Per-sample modality presence for training with modality dropout."""
from __future__ import annotations

import torch

MAX_RESAMPLES = 100


def sample_presence(batch_size: int, num_modalities: int, dropout: float, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """A (B, M) bool mask: each modality of each sample is absent with probability ``dropout``, never all of a sample.

    Rows with every modality dropped are drawn again, so each row follows the dropout distribution conditioned on at
    least one modality being present (after :data:`MAX_RESAMPLES` rounds a leftover empty row keeps one modality
    chosen uniformly). ``dropout = 0`` gives all True.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if dropout == 0.0:
        return torch.ones(batch_size, num_modalities, dtype=torch.bool, device=device)
    present = torch.rand(batch_size, num_modalities, generator=generator) >= dropout
    for _ in range(MAX_RESAMPLES):
        empty = ~present.any(1)
        if not bool(empty.any()):
            break
        present[empty] = torch.rand(int(empty.sum()), num_modalities, generator=generator) >= dropout
    empty = ~present.any(1)
    if bool(empty.any()):
        keep = torch.randint(num_modalities, (int(empty.sum()),), generator=generator)
        present[empty.nonzero()[:, 0], keep] = True
    return present.to(device)


def zero_absent(data: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Input (B, M, *S) with the channels of absent modalities set to 0."""
    return data * present.reshape(*present.shape, *([1] * (data.dim() - 2))).to(data.dtype)
