"""Per-sample modality presence for training with modality dropout and with cases that lack modalities."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

MAX_RESAMPLES = 100


def case_presence(incomplete_cases: Mapping[str, Sequence[bool]], keys, num_modalities: int) -> torch.Tensor | None:
    """(B, M) bool: the modalities the case of each sample (``keys``: a batch's case IDs) has, from
    ``incomplete_cases`` (:func:`nnalign.data.missing.presence_by_case` of the incomplete cases); None when every
    one has all."""
    if not any(str(k) in incomplete_cases for k in keys):
        return None
    complete = (True,) * num_modalities
    return torch.tensor([tuple(incomplete_cases.get(str(k), complete)) for k in keys], dtype=torch.bool)


def sample_presence(batch_size: int, num_modalities: int, dropout: float, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None, sampling: str = "independent",
                    available: torch.Tensor | None = None) -> torch.Tensor:
    """A (B, M) bool mask of the modalities each training sample keeps; never none. ``dropout = 0`` gives all True.

    ``sampling`` (:data:`nnalign.runs.SUBSET_SAMPLINGS`):

    - ``independent``: each modality of each sample is absent with probability ``dropout``. Rows with every modality
      dropped are drawn again, so each row follows the dropout distribution conditioned on at least one modality
      being present (after :data:`MAX_RESAMPLES` rounds a leftover empty row keeps one modality chosen uniformly).
    - ``balanced``: with probability ``dropout`` a sample keeps one of the 2^M - 2 proper non-empty subsets, drawn
      uniformly, else all M. All modalities stay frequent and every subset, a single modality too, gets the same
      share (at dropout 0.5 and M = 4: all four 50 %, each single modality 3.6 %, against 32 % and 1.2 % of
      ``independent`` at dropout 0.25).

    ``available`` (B, M) bool: the modalities each sample's case has (None: all). A sample keeps only available
    ones: the draw is ANDed with it, and a row left empty is drawn again as above (conditioned on keeping at least
    one available modality; the leftover fallback picks an available one). Without dropout the result is
    ``available``. ValueError for a row with nothing available.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if sampling not in ("independent", "balanced"):
        raise ValueError(f"unknown subset sampling {sampling!r}")
    if available is None:
        available = torch.ones(batch_size, num_modalities, dtype=torch.bool)
    available = available.to("cpu", torch.bool)
    if not bool(available.any(1).all()):
        raise ValueError("a sample has no modality available")
    if dropout == 0.0:
        return available.to(device)

    def draw(n: int) -> torch.Tensor:
        if sampling == "balanced":
            return _balanced_presence(n, num_modalities, dropout, generator)
        return torch.rand(n, num_modalities, generator=generator) >= dropout

    present = draw(batch_size) & available
    for _ in range(MAX_RESAMPLES):
        empty = ~present.any(1)
        if not bool(empty.any()):
            break
        present[empty] = draw(int(empty.sum())) & available[empty]
    empty = ~present.any(1)
    if bool(empty.any()):
        keep = torch.multinomial(available[empty].float(), 1, generator=generator)[:, 0]
        present[empty.nonzero()[:, 0], keep] = True
    return present.to(device)


def _balanced_presence(batch_size: int, num_modalities: int, dropout: float,
                       generator: torch.Generator | None) -> torch.Tensor:
    """``balanced`` sampling (see :func:`sample_presence`), on the CPU. With one modality every sample keeps it."""
    present = torch.ones(batch_size, num_modalities, dtype=torch.bool)
    proper = 2 ** num_modalities - 2  # subsets coded 1 .. 2^M - 2: bit j set = modality j kept
    if proper < 1:
        return present
    drop = torch.rand(batch_size, generator=generator) < dropout
    codes = torch.randint(1, proper + 1, (int(drop.sum()),), generator=generator)
    bits = 2 ** torch.arange(num_modalities)
    present[drop] = (codes.unsqueeze(1) & bits) != 0
    return present


def zero_absent(data: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Input (B, M, *S) with the channels of absent modalities set to 0."""
    return data * present.reshape(*present.shape, *([1] * (data.dim() - 2))).to(data.dtype)
