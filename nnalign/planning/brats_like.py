"""Plans for a BraTS 2018-sized dataset without its data: sizing benchmarks and what-if planning.

Writes a raw dataset folder with two tiny placeholder cases and a fingerprint that looks like BraTS 2018 (285 cases,
1 mm, brain crops of about 138 x 169 x 138 voxels), then runs a planner on it. The environment variables
``nnUNet_raw`` and ``nnUNet_preprocessed`` must point at scratch folders.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np

from nnalign.data.raw_dataset import image_filename, write_dataset_json
from nnalign.paths import dataset_name

BRATS_CASES = 285
BRATS_SHAPE_AFTER_CROP = (138, 169, 138)
INTENSITY_STATS = {"mean": 500.0, "median": 480.0, "std": 150.0, "min": 0.0, "max": 2000.0,
                   "percentile_99_5": 1500.0, "percentile_00_5": 50.0}


def write_brats_like_fingerprint(dataset_id: int, name: str = "BraTSLike") -> Path:
    """Create the placeholder raw dataset and its BraTS-like fingerprint; return the preprocessed folder."""
    import SimpleITK as sitk

    folder_name = dataset_name(dataset_id, name)
    raw = Path(os.environ["nnUNet_raw"]) / folder_name
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(exist_ok=True)
    for case in ("a", "b"):
        for c in range(4):
            sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 4, 4), np.float32)),
                            str(raw / "imagesTr" / image_filename(case, c)))
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.uint8)), str(raw / "labelsTr" / f"{case}.nii.gz"))
    write_dataset_json(raw, BRATS_CASES, name)
    pre = Path(os.environ["nnUNet_preprocessed"]) / folder_name
    pre.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = [[int(v) for v in np.array(BRATS_SHAPE_AFTER_CROP) + rng.integers(-10, 10, 3)] for _ in range(BRATS_CASES)]
    fingerprint = {"spacings": [[1.0, 1.0, 1.0]] * BRATS_CASES, "shapes_after_crop": shapes,
                   "foreground_intensity_properties_per_channel": {str(c): INTENSITY_STATS for c in range(4)},
                   "median_relative_size_after_cropping": 0.6}
    (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    return pre


def plan_brats_like(planner_cls, dataset_id: int, gpu_memory_gb: float = 8.0, plans_name: str | None = None) -> dict:
    """Run ``planner_cls`` on the BraTS-like fingerprint (written first if absent) and return its plans."""
    if not (Path(os.environ["nnUNet_raw"]) / dataset_name(dataset_id, "BraTSLike")).exists():
        write_brats_like_fingerprint(dataset_id)
    kwargs = {"plans_name": plans_name} if plans_name else {}
    with contextlib.redirect_stdout(io.StringIO()):
        return planner_cls(dataset_id, gpu_memory_target_in_gb=gpu_memory_gb, **kwargs).plan_experiment()
