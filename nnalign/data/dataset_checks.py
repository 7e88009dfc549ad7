"""Checks on an nnU-Net raw dataset before planning: its dataset.json, the files of every training case, and the
images and label maps themselves (the checks of :mod:`nnalign.data.case_checks`, plus label values).

Each problem is one line naming the dataset folder, the case and the file. Reading the headers and one pass over the
voxels costs little against nnU-Net's preprocessing, so ``nnalign_plan_and_preprocess`` runs these on every run.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nnalign.data.brats_layout import NAMING_NNUNET, BratsCase
from nnalign.errors import NnalignError

REQUIRED_KEYS = ("channel_names", "labels", "file_ending")


def read_dataset_json(folder: Path) -> dict:
    """``folder/dataset.json`` as a dict; one-line NnalignError naming the file if it is missing, not JSON (a
    truncated copy) or lacks what nnU-Net needs."""
    path = Path(folder) / "dataset.json"
    try:
        dataset_json = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NnalignError(f"{folder}: no dataset.json") from None
    except OSError as e:
        raise NnalignError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise NnalignError(f"{path}: not valid JSON{where}: is it truncated or corrupt?") from None
    if not isinstance(dataset_json, dict):
        raise NnalignError(f"{path}: expected a JSON object, got {type(dataset_json).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in dataset_json]
    if missing:
        raise NnalignError(f"{path}: no {missing[0]!r} entry (nnU-Net needs {', '.join(REQUIRED_KEYS)})")
    if not isinstance(dataset_json["channel_names"], dict) or not dataset_json["channel_names"]:
        raise NnalignError(f"{path}: 'channel_names' must map channel numbers to names")
    from nnalign.modalities import modalities_from_dataset_json

    modalities_from_dataset_json(dataset_json, str(path))  # one line for a modality named twice
    return dataset_json


def label_values(dataset_json: dict) -> set[int]:
    """Every label value dataset.json names (region-based labels list several values per region)."""
    values: set[int] = set()
    for value in dataset_json["labels"].values():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            values.add(int(v))
    return values


def training_cases(folder: Path, dataset_json: dict) -> list[BratsCase]:
    """The training cases of a raw dataset (from ``imagesTr`` and ``labelsTr``, as nnU-Net finds them, or from
    dataset.json's ``dataset`` list), each with its channel files keyed by file name and its label map.

    Raises NnalignError naming the case and the file when a channel file or a label map is missing, unless
    dataset.json records the modality as absent for that case (:mod:`nnalign.data.missing`, ``imagesTr`` datasets
    only); then a file for it is an error.
    """
    from nnalign.data.missing import MISSING_KEY, missing_modalities, present_channels

    folder = Path(folder)
    ending = dataset_json["file_ending"]
    channels = sorted(int(c) for c in dataset_json["channel_names"])
    missing = missing_modalities(dataset_json, str(folder / "dataset.json"))
    if "dataset" in dataset_json and missing:
        raise NnalignError(f"{folder / 'dataset.json'}: nnalign.{MISSING_KEY} works with imagesTr's naming only, "
                           f"not with a 'dataset' list")
    if "dataset" in dataset_json:
        cases = []
        for case_id, entry in sorted(dataset_json["dataset"].items()):
            paths = [folder / p for p in entry["images"]]
            cases.append(BratsCase(case_id, folder, NAMING_NNUNET, {p.name: p for p in paths}, folder / entry["label"]))
            missing = [p for p in (*paths, cases[-1].seg) if not p.is_file()]
            if missing:
                raise NnalignError(f"{folder}: {case_id}: {missing[0]} does not exist (listed in dataset.json)")
        return cases
    images, labels = folder / "imagesTr", folder / "labelsTr"
    pattern = re.compile(r"(.+)_\d{4}" + re.escape(ending))
    ids = {m.group(1) for p in images.glob(f"*{ending}") if (m := pattern.fullmatch(p.name))}
    ids |= {p.name[: -len(ending)] for p in labels.glob(f"*{ending}")}
    cases = []
    for case_id in sorted(ids):
        present = present_channels(dataset_json, case_id)
        paths = [images / f"{case_id}_{c:04d}{ending}" for c in channels if c in present]
        lacking = [p.name for p in paths if not p.is_file()]
        if lacking:
            raise NnalignError(f"{folder}: {case_id}: {lacking[0]} is missing from imagesTr (dataset.json names "
                               f"{len(channels)} channels, {', '.join(dataset_json['channel_names'].values())})")
        extra = [images / f"{case_id}_{c:04d}{ending}" for c in channels if c not in present]
        extra = [p.name for p in extra if p.exists()]
        if extra:
            raise NnalignError(f"{folder}: {case_id}: {extra[0]} exists, but dataset.json's nnalign.{MISSING_KEY} "
                               f"says the case lacks that modality")
        seg = labels / f"{case_id}{ending}"
        if not seg.is_file():
            raise NnalignError(f"{folder}: {case_id}: no label map {seg.name} in labelsTr")
        cases.append(BratsCase(case_id, images, NAMING_NNUNET, {p.name: p for p in paths}, seg))
    return cases


def label_problem(path: Path, allowed: Iterable[int]) -> str | None:
    """Why the label map ``path`` cannot be trained on (values dataset.json does not name), or None."""
    import SimpleITK as sitk

    try:
        values = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    except RuntimeError:
        return "not a readable NIfTI image"
    allowed = set(allowed)
    bad = [v for v in values.tolist() if v not in allowed]
    if not bad:
        return None
    listed = ", ".join(f"{v:g}" for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
    return (f"label value{'s' if len(bad) > 1 else ''} {listed} not in dataset.json's labels "
            f"({', '.join(map(str, sorted(allowed)))})")


def case_problem(case: BratsCase, allowed_labels: Sequence[int]) -> str | None:
    """Why a training case cannot be planned from, or None: the checks of
    :func:`~nnalign.data.case_checks.check_case_images` (readable, complete, finite, one geometry, a signal in every
    channel) and label values. One line naming the case and the file."""
    from nnalign.data.case_checks import check_case_images

    try:
        check_case_images(case, list(case.images), seg=True, require_signal=True)
    except NnalignError as e:
        return str(e)
    problem = label_problem(case.seg, allowed_labels)
    return f"{case.case_id}: {case.seg.name}: {problem}" if problem else None


def _case_problem_job(args: tuple) -> str | None:
    return case_problem(*args)


def check_raw_dataset(folder: Path, dataset_json: dict, num_processes: int = 1) -> int:
    """Check every training case of a raw dataset (:func:`training_cases`, :func:`case_problem`) with
    ``num_processes`` workers and return how many there are; NnalignError naming the first bad case."""
    import multiprocessing

    from nnalign.data.missing import missing_modalities
    from nnalign.modalities import modalities_from_dataset_json

    cases = training_cases(folder, dataset_json)
    if not cases:
        raise NnalignError(f"{folder}: no training cases in imagesTr and labelsTr (nothing to plan from)")
    missing = missing_modalities(dataset_json)
    for m in modalities_from_dataset_json(dataset_json):
        if all(m in missing.get(c.case_id, ()) for c in cases):
            raise NnalignError(f"{folder}: no training case has {m} (dataset.json's nnalign.missing_modalities): "
                               f"nothing to normalise it by")
    allowed = sorted(label_values(dataset_json))
    jobs = [(case, allowed) for case in cases]
    if num_processes <= 1 or len(jobs) == 1:
        problems = map(_case_problem_job, jobs)
        bad = [p for p in problems if p]
    else:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            bad = [p for p in pool.imap(_case_problem_job, jobs) if p]
    if bad:
        more = f" (and {len(bad) - 1} more bad case{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
        raise NnalignError(f"{folder}: {bad[0]}{more}")
    return len(cases)
