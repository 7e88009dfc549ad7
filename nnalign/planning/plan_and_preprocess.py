"""Fingerprint -> plan -> preprocess through nnU-Net's API functions, with nnalign's extractor and planner."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from nnalign.data.raw_dataset import find_dataset_folder
from nnalign.errors import NnalignError, one_line
from nnalign.paths import setup_env

CONFIGURATIONS = ("2d", "3d_fullres", "3d_cpu", "paper")
DEFAULT_CONFIGURATIONS = ("3d_fullres", "3d_cpu")
MIN_CASES_FOR_5FOLD = 5


def raw_dataset_folder(dataset_id: int) -> Path:
    """The raw dataset folder for an ID, or a one-line error saying how to make one."""
    raw_root = Path(setup_env()["nnUNet_raw"])
    folder = find_dataset_folder(raw_root, dataset_id)
    if folder is None:
        raise NnalignError(f"no raw dataset with ID {dataset_id} in {raw_root} "
                           f"(make one with nnalign_convert_brats or nnalign_synth)")
    if not (folder / "dataset.json").is_file():
        raise NnalignError(f"{folder}: no dataset.json")
    return folder


def _training_ids(folder: Path, dataset_json: dict) -> list[str]:
    ending = dataset_json.get("file_ending", ".nii.gz")
    return sorted(p.name[: -len(ending)] for p in (folder / "labelsTr").glob(f"*{ending}"))


def ensure_small_dataset_split(raw_folder: Path, preprocessed_folder: Path, warn: Callable[[str], None]) -> None:
    """With fewer than 5 training cases, write a cross-validation split that fits, and say so."""
    dataset_json = json.loads((raw_folder / "dataset.json").read_text())
    ids = _training_ids(raw_folder, dataset_json)
    splits_file = preprocessed_folder / "splits_final.json"
    if len(ids) >= MIN_CASES_FOR_5FOLD or splits_file.exists():
        return
    if len(ids) < 2:
        warn(f"only {len(ids)} training case: train with fold 'all' (train and validate on all cases)")
        return
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from nnalign.data.splits import write_splits_file

    write_splits_file(splits_file, generate_crossval_split(ids, seed=12345, n_splits=len(ids)))
    warn(f"only {len(ids)} training cases: wrote a {len(ids)}-fold split (folds 0-{len(ids) - 1}); "
         f"fold 'all' trains on every case")


def plan_and_preprocess(dataset_id: int, configurations: Sequence[str] = DEFAULT_CONFIGURATIONS,
                        gpu_memory_gb: float = 8.0, num_processes: int = 2, verify: bool = False,
                        plan_only: bool = False, warn: Callable[[str], None] = print) -> dict:
    """Fingerprint, plan (all configurations) and preprocess ``configurations`` of a raw dataset; return the plans.

    nnU-Net's verbose planner output goes to ``nnalign_planning.log`` in the preprocessed dataset folder.
    """
    unknown = [c for c in configurations if c not in CONFIGURATIONS]
    if unknown:
        raise NnalignError(f"unknown configuration '{unknown[0]}' (choose from {', '.join(CONFIGURATIONS)})")
    if gpu_memory_gb <= 0:
        raise NnalignError(f"--gpu-memory must be positive, got {gpu_memory_gb}")
    raw_folder = raw_dataset_folder(dataset_id)
    dataset_json = json.loads((raw_folder / "dataset.json").read_text())
    if not _training_ids(raw_folder, dataset_json):
        raise NnalignError(f"{raw_folder}: no training cases in labelsTr (nothing to plan from)")
    os.environ.setdefault("nnUNet_n_proc_DA", str(num_processes))
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset, preprocess_dataset)

    from nnalign.planning.fingerprint import nnAlignFingerprintExtractor
    from nnalign.planning.planner import nnAlignPlanner

    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / raw_folder.name
    with tempfile.TemporaryFile("w+") as log:  # nnU-Net's printing, workers' too; progress bars stay on stderr
        try:
            try:
                with captured_stdout(log):
                    extract_fingerprint_dataset(int(dataset_id), nnAlignFingerprintExtractor, num_processes,
                                                check_dataset_integrity=verify, clean=True, verbose=False)
            except (RuntimeError, AssertionError, ValueError) as e:
                log.seek(0)
                raise NnalignError(f"{raw_folder}: nnU-Net's integrity check failed: "
                                   f"{_offending_line(log.read()) or one_line(e)}") from None
            with captured_stdout(log):
                plans, plans_id = plan_experiment_dataset(int(dataset_id), nnAlignPlanner,
                                                          gpu_memory_target_in_gb=gpu_memory_gb)
            ensure_small_dataset_split(raw_folder, preprocessed, warn)
            if not plan_only:
                with captured_stdout(log):
                    preprocess_dataset(int(dataset_id), plans_id, tuple(configurations),
                                       [num_processes] * len(configurations), verbose=False)
        finally:
            if preprocessed.is_dir():
                log.seek(0)
                (preprocessed / "nnalign_planning.log").write_text(log.read())
    return plans


@contextlib.contextmanager
def captured_stdout(stream) -> Iterator[None]:
    """Send file descriptor 1 (this process's and its workers' stdout) to ``stream`` for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(stream.fileno(), 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _offending_line(output: str) -> str | None:
    """The first line of nnU-Net's integrity-check output that says what is wrong with which file."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("Error"):
            found = next((x for x in lines[i + 1:i + 4] if x.startswith("Found")), "")
            return f"{line.removeprefix('Error: ')} {found}".strip()
    return None


def configuration_table(plans: dict) -> str:
    """A Markdown table of the planned configurations: patch, batch, stages, features, spacing, memory."""
    rows = ["| configuration | patch | batch | stages | features | spacing (mm) | est. memory (GB) |",
            "|---|---|---|---|---|---|---|"]
    for name, cfg in plans["configurations"].items():
        if "architecture" not in cfg:
            continue
        kw = cfg["architecture"]["arch_kwargs"]
        rows.append(f"| {name} | {'x'.join(map(str, cfg['patch_size']))} | {cfg['batch_size']} | {kw['n_stages']} | "
                    f"{kw['features_per_stage'][0]}-{kw['features_per_stage'][-1]} | "
                    f"{'x'.join(f'{s:.2g}' for s in cfg['spacing'])} | {cfg.get('nnalign_estimated_memory_gb', '?')} |")
    return "\n".join(rows)
