"""MRI modality names, nnU-Net's BraTS channel order, and modality subsets.

Channel order follows nnU-Net's own BraTS conversion (``Dataset137_BraTS21``): 0 = T1, 1 = T1ce, 2 = T2, 3 = FLAIR,
so that nnalign datasets and models are interchangeable with nnU-Net's.
"""
from __future__ import annotations

from itertools import combinations
from typing import Iterable, Sequence

from nnalign.errors import NnalignError

BRATS_MODALITIES: tuple[str, ...] = ("T1", "T1ce", "T2", "FLAIR")

# Every spelling found in BraTS releases and papers, lower-cased, mapped to the canonical name.
MODALITY_ALIASES: dict[str, str] = {
    "t1": "T1", "t1n": "T1", "t1w": "T1",
    "t1ce": "T1ce", "t1c": "T1ce", "t1gd": "T1ce", "t1-ce": "T1ce",
    "t2": "T2", "t2w": "T2",
    "flair": "FLAIR", "t2f": "FLAIR", "t2-flair": "FLAIR",
}


def canonical_modality(name: str) -> str:
    """Canonical name of a modality spelling (``t1c`` -> ``T1ce``); raises NnalignError for an unknown one."""
    key = name.strip().lower()
    if key not in MODALITY_ALIASES:
        raise NnalignError(f"unknown modality '{name}' (known: {', '.join(BRATS_MODALITIES)})")
    return MODALITY_ALIASES[key]


def parse_modalities(spec: str | Iterable[str], available: Sequence[str] = BRATS_MODALITIES) -> tuple[str, ...]:
    """Parse ``'T1ce,T2'`` (or a list of names) into canonical names, ordered as in ``available``.

    Raises NnalignError for an empty subset, an unknown name, or a modality the dataset does not have.
    """
    names = [s for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise NnalignError("the modality subset is empty: name at least one of " + ", ".join(available))
    chosen = {canonical_modality(n) for n in names}
    missing = chosen.difference(available)
    if missing:
        raise NnalignError(f"modality {sorted(missing)[0]} is not in this dataset (it has {', '.join(available)})")
    return tuple(m for m in available if m in chosen)


def channel_indices(subset: Sequence[str], available: Sequence[str] = BRATS_MODALITIES) -> tuple[int, ...]:
    """Channel indices of ``subset`` in the dataset's channel order."""
    return tuple(available.index(m) for m in subset)


def subset_tag(subset: Sequence[str], available: Sequence[str] = BRATS_MODALITIES) -> str:
    """A folder- and class-name-safe tag for a subset, in channel order: ``('T2', 'T1ce')`` -> ``'T1ce-T2'``."""
    return "-".join(m for m in available if m in subset)


def all_subsets(available: Sequence[str] = BRATS_MODALITIES) -> list[tuple[str, ...]]:
    """Every non-empty subset (15 for BraTS), smallest first, each in channel order."""
    return [tuple(c) for k in range(1, len(available) + 1) for c in combinations(available, k)]


def modalities_from_dataset_json(dataset_json: dict, source: str = "dataset.json") -> tuple[str, ...]:
    """Canonical modality names in channel order from a dataset.json's ``channel_names``; a one-line NnalignError
    starting with ``source`` (the file) when it has none or names a modality twice (e.g. T1, T1, T2, FLAIR)."""
    names = dataset_json.get("channel_names") or dataset_json.get("modality")
    if not names:
        raise NnalignError(f"{source} has no 'channel_names'")
    try:
        ordered = [names[k] for k in sorted(names, key=int)]
    except (AttributeError, TypeError, ValueError):
        ordered = None
    if ordered is None or not all(isinstance(n, str) for n in ordered):
        raise NnalignError(f"{source}: channel_names must map channel numbers (0, 1, ...) to modality names")
    try:
        modalities = tuple(canonical_modality(n) for n in ordered)
    except NnalignError:
        modalities = tuple(ordered)
    for j, name in enumerate(modalities):
        if name in modalities[:j]:
            raise NnalignError(f"{source}: channel_names name {name} twice (channels {modalities.index(name)} and "
                               f"{j}); each channel must be a different modality")
    return modalities
