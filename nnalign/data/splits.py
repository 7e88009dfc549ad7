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
