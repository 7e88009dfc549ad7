"""Writing nnU-Net raw datasets: dataset.json, case files, and an all-or-nothing build folder."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from nnalign.data.labels import nnunet_dataset_labels
from nnalign.data.missing import MISSING_KEY
from nnalign.errors import NnalignError
from nnalign.modalities import BRATS_MODALITIES
from nnalign.paths import DATASET_NAME_RE, dataset_folders, dataset_name

FILE_ENDING = ".nii.gz"


def find_dataset_folder(root: Path, dataset_id: int) -> Path | None:
    """The existing ``DatasetXXX_*`` folder with this ID under ``root``, if any."""
    matches = dataset_folders(root, dataset_id)
    return matches[0] if matches else None


def check_dataset_id(dataset_id: int) -> None:
    """Reject IDs nnU-Net cannot name (it uses three digits)."""
    if not 1 <= int(dataset_id) <= 999:
        raise NnalignError(f"dataset ID {dataset_id} is out of range (nnU-Net uses 1-999)")


STAGING_RE = re.compile(rf"\.{DATASET_NAME_RE.pattern}\.partial-(?P<pid>\d+)")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_staging(raw_root: Path) -> list[Path]:
    """Remove the staging folders (``.DatasetXXX_name.partial-PID``) of processes that no longer run (a killed
    conversion's debris) and return them. Staging folders of running processes are left alone."""
    removed = []
    for path in Path(raw_root).iterdir():
        m = STAGING_RE.fullmatch(path.name)
        if m and path.is_dir() and int(m["pid"]) != os.getpid() and not _process_alive(int(m["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _unwritable(raw_root: Path, e: OSError) -> NnalignError:
    return NnalignError(f"{raw_root}: cannot write the dataset there ({e.strerror or e}); nothing was written")


@contextlib.contextmanager
def build_dataset_folder(raw_root: Path, dataset_id: int, name: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``raw_root/DatasetXXX_name`` in one rename.

    If the body raises, the staging folder is removed and nothing is left behind (an OSError, such as a full disk,
    becomes a one-line NnalignError). An existing dataset with the same ID is an error unless ``overwrite``. Staging
    folders that killed runs left behind are removed first.
    """
    check_dataset_id(dataset_id)
    raw_root = Path(raw_root)
    if raw_root.exists() and not raw_root.is_dir():
        raise NnalignError(f"{raw_root}: not a folder (nnUNet_raw must name a folder for the raw datasets)")
    existing = find_dataset_folder(raw_root, dataset_id)
    if existing is not None and not overwrite:
        raise NnalignError(f"{existing}: dataset ID {dataset_id} already exists (use --overwrite to replace it)")
    final = raw_root / dataset_name(dataset_id, name)
    staging = raw_root / f".{final.name}.partial-{os.getpid()}"
    try:
        raw_root.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(raw_root)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    except OSError as e:
        raise _unwritable(raw_root, e) from None
    try:
        yield staging
        if existing is not None:
            shutil.rmtree(existing)
        os.replace(staging, final)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise _unwritable(raw_root, e) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_dataset_json(folder: Path, num_training: int, dataset_name: str, *,
                       modalities: Sequence[str] = BRATS_MODALITIES, description: str = "",
                       source_label_convention: str | None = None, reference: str = "",
                       extra: dict | None = None, cavity: bool = False,
                       missing: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Write nnU-Net's dataset.json for a BraTS-style region dataset and return it.

    ``source_label_convention`` (``brats2018``, ``brats2023`` or ``brats2024``) is recorded under ``nnalign`` so that
    predictions can be written back in the convention of the release the data came from. ``cavity``: the labels hold
    the resection cavity (4), trained as the region RC after WT, TC and ET. ``missing``: ``{case: modalities}`` of
    the cases that have no file for some modalities (:mod:`nnalign.data.missing`).
    """
    info = {"modalities": list(modalities)}
    if source_label_convention:
        info["source_label_convention"] = source_label_convention
    if missing:
        info[MISSING_KEY] = {case: list(names) for case, names in sorted(missing.items())}
    if extra:
        info.update(extra)
    labels, regions_class_order = nnunet_dataset_labels(cavity)
    dataset_json = {
        "channel_names": {str(i): m for i, m in enumerate(modalities)},
        "labels": labels,
        "regions_class_order": regions_class_order,
        "numTraining": int(num_training),
        "file_ending": FILE_ENDING,
        "name": dataset_name,
        "description": description,
        "reference": reference,
        "nnalign": info,
    }
    (Path(folder) / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return dataset_json


def image_filename(case: str, channel: int) -> str:
    """nnU-Net's image file name for one channel of a case."""
    return f"{case}_{channel:04d}{FILE_ENDING}"
