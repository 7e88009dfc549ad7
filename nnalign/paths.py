"""Default data folders and the environment nnU-Net reads.

nnU-Net v2 finds its folders through ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``. nnalign fills in
``nnalign_raw_data/``, ``nnalign_preprocessed/`` and ``nnalign_results/`` (in the current directory, or under
``NNALIGN_HOME``) for any of them that is unset; a variable the user set always wins. It also registers nnalign's
trainer shim with nnU-Net's ``nnUNet_extTrainer`` discovery, so nnU-Net's own training, DDP and prediction code
find nnalign's trainers by name.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from nnalign.errors import NnalignError

DEFAULT_FOLDERS = {
    "nnUNet_raw": "nnalign_raw_data",
    "nnUNet_preprocessed": "nnalign_preprocessed",
    "nnUNet_results": "nnalign_results",
}
TRAINER_SHIM_DIR = Path(__file__).resolve().parent / "_ext"


def resolve_folders(base: str | os.PathLike | None = None) -> dict[str, str]:
    """nnU-Net's three folders: each variable's value where set, else nnalign's default, an absolute path under
    ``base`` (default: ``NNALIGN_HOME``, else the current directory). Reads the environment, never changes it."""
    base_dir = Path(base or os.environ.get("NNALIGN_HOME") or os.getcwd()).resolve()
    return {var: os.environ.get(var) or str(base_dir / sub) for var, sub in DEFAULT_FOLDERS.items()}


def setup_env(base: str | os.PathLike | None = None) -> dict[str, str]:
    """Set nnU-Net's folder variables to :func:`resolve_folders` and register the trainer shim.

    Returns the three folder paths in effect. Paths are absolute so that spawned workers and a later chdir agree.
    """
    folders = resolve_folders(base)
    os.environ.update(folders)
    shim = str(TRAINER_SHIM_DIR)
    ext = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if shim not in ext:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([shim, *ext])
    os.environ.setdefault("nnUNet_def_n_proc", str(min(8, os.cpu_count() or 1)))
    return folders


DATASET_NAME_RE = re.compile(r"Dataset(\d{3})_(.+)")
"""nnU-Net's dataset folder names, ``Dataset{id:03d}_{name}``: group 1 the ID, group 2 the name."""


def dataset_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name for a dataset: ``Dataset{id:03d}_{name}``."""
    return f"Dataset{int(dataset_id):03d}_{name}"


def dataset_glob(name: str = "*", dataset_id: int | None = None) -> str:
    """A glob for the dataset folders named ``name`` (a glob itself) with ``dataset_id``, or with any ID if None."""
    return dataset_name(dataset_id, name) if dataset_id is not None else f"Dataset[0-9][0-9][0-9]_{name}"


def dataset_id_of(folder_name: str) -> int | None:
    """The ID in an nnU-Net dataset folder name (``Dataset018_BraTS2018`` -> 18), None for any other name."""
    found = DATASET_NAME_RE.fullmatch(folder_name)
    return int(found.group(1)) if found else None


def _folders(root: str | os.PathLike, pattern: str) -> list[Path]:
    """The folders under ``root`` that match the glob ``pattern``, sorted (none when ``root`` is not a folder)."""
    root = Path(root)
    return sorted(p for p in root.glob(pattern) if p.is_dir()) if root.is_dir() else []


def dataset_folders(root: str | os.PathLike, dataset_id: int) -> list[Path]:
    """The folders ``Dataset{id:03d}_*`` under ``root``, sorted (none when ``root`` is not a folder)."""
    return _folders(root, dataset_glob("*", dataset_id))


def resolve_dataset(spec: str, preprocessed_root: Path, raw_root: Path) -> str:
    """The preprocessed dataset folder name for an ID (``18``) or name (``Dataset018_BraTS2018``, ``BraTS2018``), or a
    one-line NnalignError saying what to run: several matches, a raw dataset not preprocessed yet, or none at all."""
    spec = spec.strip()
    if re.fullmatch(r"\d+", spec):
        dataset_id, pattern = int(spec), dataset_glob("*", int(spec))
    else:
        dataset_id = dataset_id_of(spec)
        pattern = spec if dataset_id is not None else dataset_glob(spec)
    found = [p.name for p in _folders(preprocessed_root, pattern)]
    if len(found) > 1:
        raise NnalignError(f"dataset {spec!r} matches several folders in {preprocessed_root}: {', '.join(found)}")
    if found:
        return found[0]
    raw = [p.name for p in _folders(raw_root, pattern)]
    if raw:
        raw_id = dataset_id if dataset_id is not None else dataset_id_of(raw[0])
        raise NnalignError(f"dataset {raw[0]} is not preprocessed (nothing in {preprocessed_root}): run "
                           f"nnalign_plan_and_preprocess -d {raw_id}")
    raise NnalignError(f"no dataset {spec!r} in {preprocessed_root} or {raw_root} (make one with nnalign_synth or "
                       f"nnalign_convert_brats, then run nnalign_plan_and_preprocess)")
