"""Published data splits bundled with nnalign, and nnU-Net's ``splits_final.json``."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Sequence

SPLIT_PARTS = ("train", "val", "test")


def protokd_split() -> dict[str, list[str]]:
    """The ProtoKD BraTS 2018 split (200 train / 28 val / 57 test subject IDs), as used by the paper."""
    folder = resources.files("nnalign.data") / "splits"
    return {part: (folder / f"protokd_brats18_{part}.txt").read_text().split() for part in SPLIT_PARTS}


def write_splits_file(path: Path, folds: Sequence[dict[str, list[str]]]) -> None:
    """Write nnU-Net's ``splits_final.json``: a list of ``{"train": [...], "val": [...]}``, one per fold."""
    Path(path).write_text(json.dumps([{"train": sorted(f["train"]), "val": sorted(f["val"])} for f in folds], indent=2))


NNUNET_FOLDS = 5
"""The folds of the split nnU-Net makes itself (on a dataset's first training, when it has no ``splits_final.json``)."""


def read_splits_file(path: Path) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json``; a one-line NnalignError naming it when it cannot be read or is not a list of
    ``{"train": [...], "val": [...]}``."""
    from nnalign.errors import NnalignError

    try:
        splits = json.loads(Path(path).read_text())
        if not isinstance(splits, list) or not all(isinstance(s, dict) and "train" in s and "val" in s
                                                   for s in splits):
            raise ValueError("expected a list of {'train': [...], 'val': [...]}")
    except (OSError, ValueError) as e:
        raise NnalignError(f"{path}: cannot read the split ({e})") from None
    return splits
