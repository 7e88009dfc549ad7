"""Hostile and careless input to conversion and to nnalign_plan_and_preprocess: intensities that the NIfTI scale
factor makes infinite, blank modalities, broken dataset.json, missing channel files, bad label values and geometry,
unwritable or full nnUNet_preprocessed, and interrupted runs. Every failure is one line naming the file and the
problem, and leaves no folder that looks complete.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nnalign.errors import NnalignError

SHAPE = (10, 9, 8)  # z, y, x: the shape of write_brats_case's images (conftest's BRATS_SHAPE)
SCL_SLOPE_OFFSET = 112  # byte offset of the float32 scl_slope in a NIfTI-1 header


def set_scl_slope(path: Path, slope: float) -> Path:
    """Overwrite the ``scl_slope`` of the NIfTI-1 file ``path`` (gzipped or not) with ``slope``."""
    gz = path.name.endswith(".gz")
    data = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    assert int.from_bytes(data[:4], "little") == 348
    data[SCL_SLOPE_OFFSET:SCL_SLOPE_OFFSET + 4] = struct.pack("<f", slope)
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))
    return path


def scaled_int16(write_image, path: Path, slope: float) -> Path:
    """An int16 image (values 0..719) at ``path`` whose header scales its voxels by ``slope``."""
    return set_scl_slope(write_image(path, np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)), slope)


def header_reader(path: Path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


# ----------------------------------------------------------------------------------------------------------------------
# images: non-finite after scaling, blank


@pytest.mark.parametrize("name", ["scaled.nii.gz", "scaled.nii"])
def test_the_scale_factor_that_makes_voxels_infinite_is_a_problem(tmp_path, write_image, name):
    import SimpleITK as sitk

    from nnalign.data.case_checks import voxel_problem

    path = scaled_int16(write_image, tmp_path / name, 1e38)
    read = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    bad = int(np.count_nonzero(~np.isfinite(read)))
    assert bad > 0  # what SimpleITK, and so nnU-Net, would read
    problem = voxel_problem(path, header_reader(path))
    assert problem == f"{bad} NaN or infinite voxels after the header's scaling (scl_slope 1e+38, scl_inter 0)", \
        problem


def test_a_finite_scale_factor_is_no_problem(tmp_path, write_image):
    from nnalign.data.case_checks import voxel_problem

    path = scaled_int16(write_image, tmp_path / "scaled.nii.gz", 2.5)
    assert voxel_problem(path, header_reader(path)) is None


def test_conversion_refuses_infinite_voxels_through_the_scale_factor(tmp_path, write_brats_case, write_image, convert,
                                                                     assert_one_line_error):
    source, raw = tmp_path / "release", tmp_path / "raw"
    case = write_brats_case(source, "Brats18_SCALED_1")
    scaled_int16(write_image, case / "Brats18_SCALED_1_t2.nii.gz", 1e38)
    assert_one_line_error(convert(raw, source, "-np", 1), "Brats18_SCALED_1: Brats18_SCALED_1_t2.nii.gz: ",
                          "NaN or infinite voxels after the header's scaling (scl_slope 1e+38",
                          prog="nnalign_convert_brats")
    assert not raw.exists() or not any(raw.iterdir())


@pytest.mark.parametrize("array", [np.zeros(SHAPE, np.float32), np.full(SHAPE, 7, np.int16)])
def test_conversion_refuses_a_blank_modality(tmp_path, write_brats_case, convert, assert_one_line_error, array):
    source, raw = tmp_path / "release", tmp_path / "raw"
    write_brats_case(source, "Brats18_BLANK_1", arrays={"FLAIR": array})
    assert_one_line_error(convert(raw, source, "-np", 1),
                          f"Brats18_BLANK_1: Brats18_BLANK_1_flair.nii.gz: no signal (every voxel is "
                          f"{array.flat[0]:g})", prog="nnalign_convert_brats")
    assert not raw.exists() or not any(raw.iterdir())


def test_an_empty_label_map_is_no_blank_modality(tmp_path, write_brats_case, convert):
    source, raw = tmp_path / "release", tmp_path / "raw"
    write_brats_case(source, "Brats18_HEALTHY_1", arrays={"seg": np.zeros(SHAPE, np.uint8)})
    proc = convert(raw, source, "-np", 1)
    assert proc.returncode == 0, proc.stderr
