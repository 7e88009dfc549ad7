"""Pairing reference and predicted label maps by case ID.

References (``-r``) may be laid out as a BraTS release (case folders, up to three levels deep, holding
``<case>_seg.nii.gz`` or ``<case>-seg.nii.gz`` next to the images, which are ignored) or flat as nnU-Net's
labelsTr/labelsTs (``<case>.nii.gz`` directly in the folder). Predictions (``-p``) are flat ``<case>.nii.gz`` files, as
nnU-Net writes them. ``.nii`` works wherever ``.nii.gz`` does. Either side may also be a single file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from nnalign.data.brats_layout import MAX_DEPTH, NAMING_NNUNET, parse_filename
from nnalign.errors import NnalignError

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
PREDICTION_LOG_STEM = "nnalign_predict_log"
"""``nnalign_predict``'s log in its output folder (``.csv`` and ``.json``): per case, among others, the label
convention it wrote the segmentation in."""


@dataclass(frozen=True)
class ReferenceFile:
    """A reference label map and its naming: ``nnunet`` for a flat ``<case>.nii.gz``, ``brats2018`` for
    ``<case>_seg``, ``brats2023`` for ``<case>-seg`` (:mod:`nnalign.data.brats_layout`'s NAMING_*)."""

    case_id: str
    path: Path
    naming: str

    @property
    def nnunet_naming(self) -> bool:
        return self.naming == NAMING_NNUNET


@dataclass
class CasePairs:
    """Every reference with its prediction (None when missing), and the predictions no reference claims."""

    pairs: list[tuple[ReferenceFile, Path | None]]
    ignored_predictions: list[Path] = field(default_factory=list)

    @property
    def missing(self) -> list[str]:
        """Case IDs of references without a prediction."""
        return [ref.case_id for ref, pred in self.pairs if pred is None]


def nifti_stem(name: str) -> str | None:
    """``name`` without its ``.nii.gz`` / ``.nii`` ending (any case), or None if it is not a NIfTI file name."""
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _reference_from_file(path: Path, top_level: bool) -> ReferenceFile | None:
    stem = nifti_stem(path.name)
    if stem is None or path.name.startswith("."):
        return None
    parsed = parse_filename(path.name)
    if parsed is not None and parsed[2] != NAMING_NNUNET:
        case_id, kind, naming = parsed
        return ReferenceFile(case_id, path, naming) if kind == "seg" else None
    # Flat nnU-Net labels (SYN_0000.nii.gz looks like an image channel name, but in a labels folder it is a case).
    return ReferenceFile(stem, path, NAMING_NNUNET) if top_level else None


def find_references(reference: Path) -> dict[str, ReferenceFile]:
    """The reference label maps under ``reference`` (a folder or one file), by case ID.

    Raises NnalignError if there is none, or if two files claim the same case.
    """
    reference = Path(reference)
    if reference.is_file():
        ref = _reference_from_file(reference, top_level=True)
        if ref is None:
            raise NnalignError(f"{reference}: not a reference label map (expected a .nii.gz or .nii file, not an image "
                               f"channel such as _flair or -t1c)")
        return {ref.case_id: ref}
    if not reference.is_dir():
        raise NnalignError(f"{reference}: no such file or folder")
    found: dict[str, ReferenceFile] = {}

    def walk(folder: Path, depth: int) -> None:
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if depth < MAX_DEPTH:
                    walk(entry, depth + 1)
                continue
            ref = _reference_from_file(entry, top_level=depth == 0)
            if ref is None:
                continue
            if ref.case_id in found:
                raise NnalignError(f"{entry}: case {ref.case_id} also has the reference {found[ref.case_id].path}")
            found[ref.case_id] = ref

    walk(reference, 0)
    if not found:
        raise NnalignError(f"{reference}: no reference label maps found (expected case folders with "
                           f"<case>_seg.nii.gz / <case>-seg.nii.gz, or flat <case>.nii.gz as in labelsTr)")
    return {k: found[k] for k in sorted(found)}


def find_predictions(prediction: Path) -> dict[str, Path]:
    """The predicted label maps directly in ``prediction`` (a folder or one file), by case ID (the file name stem)."""
    prediction = Path(prediction)
    if prediction.is_file():
        stem = nifti_stem(prediction.name)
        if stem is None:
            raise NnalignError(f"{prediction}: not a NIfTI file (.nii.gz or .nii)")
        return {stem: prediction}
    if not prediction.is_dir():
        raise NnalignError(f"{prediction}: no such file or folder")
    found: dict[str, Path] = {}
    for entry in sorted(prediction.iterdir()):
        stem = nifti_stem(entry.name)
        if stem is None or entry.name.startswith(".") or not entry.is_file():
            continue
        if stem in found:
            raise NnalignError(f"{entry}: case {stem} also has the prediction {found[stem]}")
        found[stem] = entry
    if not found:
        raise NnalignError(f"{prediction}: no predictions found (expected <case>.nii.gz files)")
    return found


def pair_cases(reference: Path, prediction: Path) -> CasePairs:
    """Pair references and predictions by case ID.

    Two single files are paired whatever their names. A single reference file takes its case's prediction from a
    folder (other predictions are not reported); a single prediction file is scored against its case only. Raises
    NnalignError when no prediction matches any reference at all (almost always a naming mismatch).
    """
    reference, prediction = Path(reference), Path(prediction)
    refs = find_references(reference)
    preds = find_predictions(prediction)
    if reference.is_file() and prediction.is_file():
        (ref,) = refs.values()
        return CasePairs([(ref, prediction)])
    if prediction.is_file():
        (case_id,) = preds
        if case_id not in refs:
            raise NnalignError(f"{prediction}: no reference for case {case_id} in {reference}")
        return CasePairs([(refs[case_id], preds[case_id])])
    pairs = [(ref, preds.get(case_id)) for case_id, ref in refs.items()]
    if all(pred is None for _, pred in pairs):
        raise NnalignError(f"{prediction}: no prediction matches a reference case (references like "
                           f"{next(iter(refs))}, predictions like {next(iter(preds))}.nii.gz)")
    ignored = [] if reference.is_file() else [p for case_id, p in preds.items() if case_id not in refs]
    return CasePairs(pairs, ignored)


def logged_cases(folder: Path) -> list[dict]:
    """The per-case entries (objects naming their case) of ``nnalign_predict``'s log in ``folder``; empty without a
    log (predictions of another tool, a single file) or with one that cannot be read."""
    try:
        cases = json.loads((Path(folder) / f"{PREDICTION_LOG_STEM}.json").read_text())["cases"]
    except (OSError, ValueError, TypeError, KeyError):
        return []
    if not isinstance(cases, list):
        return []
    return [c for c in cases if isinstance(c, dict) and isinstance(c.get("case"), str)]


def recorded_conventions(prediction: Path) -> dict[str, str]:
    """``{case: label convention}`` as ``nnalign_predict``'s log in the folder ``prediction`` records them."""
    return {str(c["case"]): str(c["labels"]) for c in logged_cases(prediction) if c.get("labels")}
