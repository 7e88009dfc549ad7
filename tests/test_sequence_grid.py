"""One grid for a case's sequences: which grid is the reference, what is resampled and why, the field-of-view
coverage worked out by hand, what is refused, and the resampled voxels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnalign.data.case_checks import read_header
from nnalign.data.sequence_grid import coverage, resample_onto, sequence_grid
from nnalign.errors import CaseError


def write(path: Path, size=(8, 8, 8), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), array=None) -> Path:
    """A float32 image of ``size`` (x, y, z) whose voxel value is its physical x coordinate, unless ``array``."""
    image = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if array is None:
        x = origin[0] + spacing[0] * np.arange(size[0], dtype=np.float32)
        array = np.broadcast_to(x, tuple(reversed(size))).copy()
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def grid(files: dict[str, Path]):
    readers = {m: read_header("c1", p) for m, p in files.items()}
    return sequence_grid("c1", files, readers), readers


def test_one_geometry_resamples_nothing(tmp_path):
    files = {m: write(tmp_path / f"{m}.nii.gz") for m in ("T1", "T2", "FLAIR")}
    assert grid(files)[0].reference == "T1" and grid(files)[0].resampled == {}


def test_the_majority_grid_is_the_reference_and_the_other_is_named(tmp_path):
    files = {m: write(tmp_path / f"{m}.nii.gz") for m in ("T1", "T1ce", "T2")}
    files["FLAIR"] = write(tmp_path / "FLAIR.nii.gz", size=(8, 8, 4), spacing=(1.0, 1.0, 2.0))
    found, _ = grid(files)
    assert found.reference == "T1ce"  # the majority's preferred modality
    assert found.resampled == {"FLAIR": "FLAIR resampled onto T1ce's grid: its shape 8 x 8 x 4 differed from "
                                        "8 x 8 x 8"}


def test_a_tie_goes_to_the_group_with_t1ce(tmp_path):
    files = {"T1": write(tmp_path / "T1.nii.gz", spacing=(1.0, 1.0, 1.01)), "T1ce": write(tmp_path / "T1ce.nii.gz")}
    found, _ = grid(files)
    assert found.reference == "T1ce" and list(found.resampled) == ["T1"]
    assert "spacing 1 x 1 x 1.01 differed from 1 x 1 x 1" in found.resampled["T1"]


def test_coverage_by_hand(tmp_path):
    reference = read_header("c1", write(tmp_path / "a.nii.gz"))  # x from 0 to 7 mm, 9 sample points per axis
    assert coverage(reference, read_header("c1", write(tmp_path / "b.nii.gz", origin=(0.2, 0.0, 0.0)))) == 1.0
    # moved 4 mm along x: its voxels reach down to x = 3.5 mm; of the samples at x = 0, 0.875, ..., 7 those from
    # 3.5 on (5 of 9) are inside
    shifted = read_header("c1", write(tmp_path / "c.nii.gz", origin=(4.0, 0.0, 0.0)))
    assert coverage(reference, shifted) == pytest.approx(5 / 9)


def test_a_sequence_covering_too_little_is_refused_in_one_line(tmp_path):
    files = {"T1ce": write(tmp_path / "T1ce.nii.gz"), "T2": write(tmp_path / "T2.nii.gz"),
             "FLAIR": write(tmp_path / "FLAIR.nii.gz", origin=(4.0, 0.0, 0.0))}
    with pytest.raises(CaseError) as e:
        grid(files)
    assert str(e.value) == ("c1: FLAIR.nii.gz: its field of view covers 56% of T1ce's, beyond what resampling fixes "
                            "(register the sequences first)")


def test_resampling_puts_each_voxel_at_its_physical_place(tmp_path):
    reference = read_header("c1", write(tmp_path / "ref.nii.gz"))
    # 2 mm voxels holding their physical x: linear interpolation onto 1 mm gives x itself inside the field of view
    coarse = write(tmp_path / "coarse.nii.gz", size=(4, 4, 4), spacing=(2.0, 2.0, 2.0))
    moved = resample_onto(coarse, reference)
    assert moved.shape == (8, 8, 8) and moved.dtype == np.float32
    np.testing.assert_allclose(moved[2, 2, :7], np.arange(7, dtype=np.float32), atol=1e-5)
    same = resample_onto(tmp_path / "ref.nii.gz", reference)
    np.testing.assert_array_equal(same, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ref.nii.gz"))))
