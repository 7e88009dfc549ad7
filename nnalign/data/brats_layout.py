"""Finding the cases of a BraTS release folder, whatever its year's naming.

Recognised layouts (file names are matched case-insensitively, ``.nii`` or ``.nii.gz``):

- BraTS 2018/2019: ``[HGG|LGG/]<case>/<case>_{flair,t1,t1ce,t2,seg}.nii``
- BraTS 2020/2021: ``BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz``, ``BraTS2021_00000/..._t1ce.nii.gz``
- BraTS 2023 onwards: ``<case>/<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz``
- nnU-Net raw naming: ``<case>_0000.nii.gz`` .. ``<case>_0003.nii.gz`` (channels T1, T1ce, T2, FLAIR)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from nnalign.errors import NnalignError
from nnalign.modalities import BRATS_MODALITIES, MODALITY_ALIASES

_BRATS_NAME = re.compile(
    r"^(?P<case>.+?)(?P<sep>[_-])(?P<kind>flair|t1ce|t1|t2|t2f|t1n|t1c|t2w|seg)\.nii(\.gz)?$", re.IGNORECASE)
_NNUNET_NAME = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")
NAMING_2023 = "brats2023"
NAMING_2018 = "brats2018"
NAMING_NNUNET = "nnunet"
MAX_DEPTH = 3


@dataclass
class BratsCase:
    """The files of one case: one path per modality found, and the segmentation if there is one."""

    case_id: str
    folder: Path
    naming: str
    images: dict[str, Path] = field(default_factory=dict)
    seg: Path | None = None

    def missing_modalities(self, required: tuple[str, ...] = BRATS_MODALITIES) -> list[str]:
        """Modalities in ``required`` that this case has no file for."""
        return [m for m in required if m not in self.images]

    def expected_file(self, modality: str) -> str:
        """The file name this case's naming scheme would use for ``modality``."""
        if self.naming == NAMING_NNUNET:
            return f"{self.case_id}_{BRATS_MODALITIES.index(modality):04d}.nii.gz"
        suffix = {NAMING_2023: {"T1": "t1n", "T1ce": "t1c", "T2": "t2w", "FLAIR": "t2f"},
                  NAMING_2018: {"T1": "t1", "T1ce": "t1ce", "T2": "t2", "FLAIR": "flair"}}[self.naming][modality]
        sep = "-" if self.naming == NAMING_2023 else "_"
        return f"{self.case_id}{sep}{suffix}.nii.gz"


def parse_filename(name: str) -> tuple[str, str, str] | None:
    """``(case_id, kind, naming)`` for a BraTS or nnU-Net image file name, where kind is a modality or ``seg``."""
    m = _BRATS_NAME.match(name)
    if m:
        raw = m.group("kind").lower()
        kind = "seg" if raw == "seg" else MODALITY_ALIASES[raw]
        naming = NAMING_2023 if raw in ("t2f", "t1n", "t1c", "t2w") or (m.group("sep") == "-" and raw == "seg") \
            else NAMING_2018
        return m.group("case"), kind, naming
    m = _NNUNET_NAME.match(name)
    if m and int(m.group("channel")) < len(BRATS_MODALITIES):
        return m.group("case"), BRATS_MODALITIES[int(m.group("channel"))], NAMING_NNUNET
    return None


def _nifti_files(root: Path, depth: int = 0, exclude: Path | None = None):
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and depth < MAX_DEPTH:
            if exclude is None or entry.resolve() != exclude:
                yield from _nifti_files(entry, depth + 1, exclude)
        elif entry.is_file() and (entry.name.lower().endswith(".nii") or entry.name.lower().endswith(".nii.gz")):
            yield entry


def find_cases(source: Path, exclude: Path | None = None) -> list[BratsCase]:
    """All cases under ``source`` (searched up to three folders deep, skipping the folder ``exclude``), sorted by ID.

    Raises NnalignError if ``source`` is not a folder, holds no recognisable BraTS files, or two folders hold a case
    with the same ID. Cases with missing files are returned as they are; the caller decides what to do.
    """
    source = Path(source)
    if not source.is_dir():
        raise NnalignError(f"{source}: no such folder")
    cases: dict[str, BratsCase] = {}
    for path in _nifti_files(source, exclude=Path(exclude).resolve() if exclude is not None else None):
        parsed = parse_filename(path.name)
        if parsed is None:
            continue
        case_id, kind, naming = parsed
        case = cases.get(case_id)
        if case is None:
            case = cases[case_id] = BratsCase(case_id, path.parent, naming)
        elif case.folder != path.parent:
            raise NnalignError(f"{path}: case {case_id} also appears in {case.folder}")
        if naming == NAMING_2023:
            case.naming = NAMING_2023
        if kind == "seg":
            case.seg = path
        elif kind in case.images:
            raise NnalignError(f"{path}: case {case_id} has two {kind} files ({case.images[kind].name})")
        else:
            case.images[kind] = path
    if not cases:
        raise NnalignError(f"{source}: no BraTS cases found (expected files like <case>_flair.nii.gz or "
                           f"<case>-t2f.nii.gz, in case folders)")
    return [cases[k] for k in sorted(cases)]
