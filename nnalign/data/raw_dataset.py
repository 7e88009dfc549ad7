"""Writing nnU-Net raw datasets: dataset.json, case files, and an all-or-nothing build folder."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

from nnalign.data.labels import NNUNET_LABELS, REGIONS_CLASS_ORDER
from nnalign.errors import NnalignError
from nnalign.modalities import BRATS_MODALITIES
from nnalign.paths import dataset_name

FILE_ENDING = ".nii.gz"


def find_dataset_folder(root: Path, dataset_id: int) -> Path | None:
    """The existing ``DatasetXXX_*`` folder with this ID under ``root``, if any."""
    if not root.is_dir():
        return None
    matches = sorted(p for p in root.glob(f"Dataset{int(dataset_id):03d}_*") if p.is_dir())
    return matches[0] if matches else None


def check_dataset_id(dataset_id: int) -> None:
    """Reject IDs nnU-Net cannot name (it uses three digits)."""
    if not 1 <= int(dataset_id) <= 999:
        raise NnalignError(f"dataset ID {dataset_id} is out of range (nnU-Net uses 1-999)")


@contextlib.contextmanager
def build_dataset_folder(raw_root: Path, dataset_id: int, name: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``raw_root/DatasetXXX_name`` in one rename.

    If the body raises, the staging folder is removed and nothing is left behind. An existing dataset with the same
    ID is an error unless ``overwrite``.
    """
    check_dataset_id(dataset_id)
    raw_root = Path(raw_root)
    existing = find_dataset_folder(raw_root, dataset_id)
    if existing is not None and not overwrite:
        raise NnalignError(f"{existing}: dataset ID {dataset_id} already exists (use --overwrite to replace it)")
    final = raw_root / dataset_name(dataset_id, name)
    raw_root.mkdir(parents=True, exist_ok=True)
    staging = raw_root / f".{final.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if existing is not None:
        shutil.rmtree(existing)
    os.replace(staging, final)


def write_dataset_json(folder: Path, num_training: int, dataset_name: str, *,
                       modalities: Sequence[str] = BRATS_MODALITIES, description: str = "",
                       source_label_convention: str | None = None, reference: str = "",
                       extra: dict | None = None) -> dict:
    """Write nnU-Net's dataset.json for a BraTS-style region dataset and return it.

    ``source_label_convention`` (``brats2018`` or ``brats2023``) is recorded under ``nnalign`` so that predictions
    can be written back in the convention of the release the data came from.
    """
    info = {"modalities": list(modalities)}
    if source_label_convention:
        info["source_label_convention"] = source_label_convention
    if extra:
        info.update(extra)
    dataset_json = {
        "channel_names": {str(i): m for i, m in enumerate(modalities)},
        "labels": NNUNET_LABELS,
        "regions_class_order": REGIONS_CLASS_ORDER,
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
