"""BraTS release conversion (``nnalign_convert_brats``): every naming scheme, labels, splits, and bad input.

The fixtures are tiny (8 x 9 x 10 voxels) BraTS cases written with SimpleITK. Expected outputs are worked out here
from what was written (each modality a distinct constant, a segmentation with known per-label counts) and from the
label mapping of nnU-Net's ``Dataset137_BraTS21`` conversion, never from the code under test.
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnalign.data.convert_brats import convert_brats
from nnalign.data.labels import brats_to_nnunet, nnunet_to_brats
from nnalign.data.splits import protokd_split

SIZE = (8, 9, 10)  # x, y, z as SimpleITK counts them; numpy arrays are (z, y, x)
ARRAY_SHAPE = SIZE[::-1]
SPACING = (1.0, 1.5, 2.0)
ORIGIN = (10.0, -20.0, 30.0)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

# nnU-Net's BraTS channel order, and a distinct constant per modality so the order can be read back from the output.
CHANNELS = ("T1", "T1ce", "T2", "FLAIR")
MODALITY_VALUE = {"T1": 11, "T1ce": 22, "T2": 33, "FLAIR": 44}
# BraTS label -> nnU-Net label: necrosis 1 -> 2, edema 2 -> 1, enhancing tumour 4 (2017-2021) or 3 (2023+) -> 3.
BRATS_TO_NNUNET = {0: 0, 1: 2, 2: 1, 3: 3, 4: 3}
# Voxels of each BraTS label in make_seg's segmentations ("et" stands for 4 or 3).
NECROSIS, EDEMA, ENHANCING = 7, 13, 19

# File name separator and suffixes of the two BraTS naming families.
NAMINGS = {
    "brats2018": ("_", {"T1": "t1", "T1ce": "t1ce", "T2": "t2", "FLAIR": "flair", "seg": "seg"}),
    "brats2023": ("-", {"T1": "t1n", "T1ce": "t1c", "T2": "t2w", "FLAIR": "t2f", "seg": "seg"}),
}
ET_LABEL = {"brats2018": 4, "brats2023": 3}

# name: ([(subfolder, case ID), ...], naming, file extension, segmentation dtype)
RELEASES = {
    "2018-HGG-LGG-nii": ([("HGG", "Brats18_2013_2_1"), ("LGG", "Brats18_TCIA10_103_1")], "brats2018", ".nii",
                         np.int16),
    "2019-HGG-LGG-nii": ([("HGG", "BraTS19_2013_0_1"), ("LGG", "BraTS19_TCIA09_141_1")], "brats2018", ".nii",
                         np.uint8),
    "2018-flat": ([("", "Brats18_CBICA_AAB_1"), ("", "Brats18_TCIA01_131_1")], "brats2018", ".nii.gz", np.uint8),
    "2020": ([("", "BraTS20_Training_001"), ("", "BraTS20_Training_002")], "brats2018", ".nii.gz", np.int16),
    "2021": ([("", "BraTS2021_00000"), ("", "BraTS2021_00002")], "brats2018", ".nii.gz", np.uint8),
    "2023": ([("", "BraTS-GLI-00000-000"), ("", "BraTS-GLI-00002-000")], "brats2023", ".nii.gz", np.float32),
}


# ----------------------------------------------------------------------------------------------------------------------
# fixture writers


def write_image(path: Path, array: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def make_seg(et_label: int, seed: int, dtype=np.uint8) -> np.ndarray:
    """NECROSIS voxels of 1, EDEMA of 2 and ENHANCING of ``et_label``, at random places; the rest 0."""
    flat = np.zeros(int(np.prod(ARRAY_SHAPE)), dtype=dtype)
    flat[:NECROSIS] = 1
    flat[NECROSIS:NECROSIS + EDEMA] = 2
    flat[NECROSIS + EDEMA:NECROSIS + EDEMA + ENHANCING] = et_label
    return np.random.default_rng(seed).permutation(flat).reshape(ARRAY_SHAPE)


def modality_array(kind: str, shape=ARRAY_SHAPE) -> np.ndarray:
    """The int16 image of a modality: MODALITY_VALUE with one background voxel of 0 (conversion refuses images
    without signal)."""
    array = np.full(shape, MODALITY_VALUE[kind], dtype=np.int16)
    array.flat[0] = 0
    return array


def case_file(folder: Path, case_id: str, kind: str, naming: str = "brats2018", ext: str = ".nii.gz") -> Path:
    sep, suffix = NAMINGS[naming]
    return folder / case_id / f"{case_id}{sep}{suffix[kind]}{ext}"


_DEFAULT = object()


def write_case(folder: Path, case_id: str, naming: str = "brats2018", ext: str = ".nii.gz", seg=_DEFAULT,
               seg_dtype=np.uint8, seed: int = 0, geometry: dict | None = None, skip=()) -> np.ndarray | None:
    """Write one case into ``folder/case_id/``: int16 images of MODALITY_VALUE (:func:`modality_array`) and a
    segmentation.

    ``seg``: an array to write, None for no segmentation, or by default ``make_seg``. ``geometry`` maps a kind
    (modality or ``seg``) to overrides of ``shape`` (numpy order), ``spacing``, ``origin`` or ``direction``; ``skip``
    names kinds not to write. Returns the segmentation written, or None.
    """
    geometry = geometry or {}
    if seg is _DEFAULT:
        seg = make_seg(ET_LABEL[naming], seed, seg_dtype)
    for kind in (*CHANNELS, "seg"):
        if kind in skip or (kind == "seg" and seg is None):
            continue
        over = dict(geometry.get(kind, {}))
        shape = over.pop("shape", ARRAY_SHAPE)
        array = seg if kind == "seg" else modality_array(kind, shape)
        if kind == "seg" and shape != ARRAY_SHAPE:
            array = np.zeros(shape, dtype=seg.dtype)
        write_image(case_file(folder, case_id, kind, naming, ext), array, **over)
    return seg


def expected_nnunet(seg: np.ndarray) -> np.ndarray:
    out = np.zeros(seg.shape, dtype=np.uint8)
    for brats, nnunet in BRATS_TO_NNUNET.items():
        out[seg == brats] = nnunet
    return out


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def image_names(case_ids) -> set[str]:
    return {f"{c}_{i:04d}.nii.gz" for c in case_ids for i in range(4)}


def label_names(case_ids) -> set[str]:
    return {f"{c}.nii.gz" for c in case_ids}


def run_cli(raw: Path, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "nnUNet_raw": str(raw)}
    env.pop("NNALIGN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "nnalign.cli.convert_brats", *map(str, args)], env=env,
                          cwd=cwd or raw.parent, capture_output=True, text=True, timeout=600)


def assert_clean_failure(proc: subprocess.CompletedProcess, raw: Path, *mentions: str, keep=()) -> str:
    """Non-zero exit, one stderr line naming every string in ``mentions``, no traceback, nothing new in ``raw``."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    for m in mentions:
        assert m in lines[0], f"{m!r} not in {lines[0]!r}"
    assert names(raw) == set(keep), f"left behind in nnUNet_raw: {sorted(names(raw) - set(keep))}"
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------------
# every naming scheme


@pytest.fixture(params=sorted(RELEASES))
def converted(request, tmp_path):
    """A two-case release of one naming scheme, converted in-process; (report, dataset folder, naming, segs)."""
    cases, naming, ext, seg_dtype = RELEASES[request.param]
    source = tmp_path / "release"
    segs = {}
    for seed, (sub, case_id) in enumerate(cases):
        segs[case_id] = write_case(source / sub, case_id, naming, ext, seg_dtype=seg_dtype, seed=seed)
    report = convert_brats(source, 1, tmp_path / "raw", num_processes=1, progress=False)
    return report, tmp_path / "raw" / "Dataset001_release", naming, segs


def test_release_becomes_nnunet_raw_layout(converted):
    report, folder, _, segs = converted
    assert report.dataset_folder == folder
    assert names(folder.parent) == {folder.name}  # no staging folder left
    assert names(folder) == {"dataset.json", "imagesTr", "labelsTr"}
    assert names(folder / "imagesTr") == image_names(segs)
    assert names(folder / "labelsTr") == label_names(segs)


def test_channels_are_t1_t1ce_t2_flair_with_voxels_and_dtype_kept(converted):
    _, folder, _, segs = converted
    for case_id in segs:
        for channel, modality in enumerate(CHANNELS):
            image = sitk.ReadImage(str(folder / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz"))
            assert image.GetPixelID() == sitk.sitkInt16, (case_id, modality)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image),
                                          modality_array(modality), err_msg=modality)


def test_labels_are_mapped_to_nnunet_with_the_source_voxel_counts(converted):
    _, folder, _, segs = converted
    for case_id, seg in segs.items():
        out = read(folder / "labelsTr" / f"{case_id}.nii.gz")
        np.testing.assert_array_equal(out, expected_nnunet(seg))
        counts = {int(v): int(c) for v, c in zip(*np.unique(out, return_counts=True))}
        assert counts == {0: out.size - NECROSIS - EDEMA - ENHANCING, 1: EDEMA, 2: NECROSIS, 3: ENHANCING}


def test_geometry_is_preserved(converted):
    _, folder, _, _ = converted
    files = sorted((folder / "imagesTr").iterdir()) + sorted((folder / "labelsTr").iterdir())
    for path in files:
        image = sitk.ReadImage(str(path))
        assert image.GetSize() == SIZE, path.name
        np.testing.assert_allclose(image.GetSpacing(), SPACING, err_msg=path.name)
        np.testing.assert_allclose(image.GetOrigin(), ORIGIN, atol=1e-4, err_msg=path.name)
        np.testing.assert_allclose(image.GetDirection(), DIRECTION, atol=1e-6, err_msg=path.name)


def test_dataset_json_is_nnunet_brats_regions_and_records_the_label_convention(converted):
    report, folder, naming, segs = converted
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert dj["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
    assert dj["regions_class_order"] == [1, 2, 3]
    assert dj["numTraining"] == len(segs) == report.num_training
    assert dj["file_ending"] == ".nii.gz"
    assert dj["nnalign"]["source_label_convention"] == naming == report.label_convention


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_segmentation_dtypes_holding_integers_are_accepted(tmp_path, dtype):
    seg = write_case(tmp_path / "src", "Brats18_X_1", seg_dtype=dtype)
    assert seg.dtype == dtype
    convert_brats(tmp_path / "src", 3, tmp_path / "raw", num_processes=1, progress=False)
    out = read(tmp_path / "raw" / "Dataset003_src" / "labelsTr" / "Brats18_X_1.nii.gz")
    np.testing.assert_array_equal(out, expected_nnunet(seg))


def test_cases_without_segmentation_go_to_imagests(tmp_path):
    source = tmp_path / "src"
    labelled = ["BraTS20_Training_001", "BraTS20_Training_002"]
    for case_id in labelled:
        write_case(source, case_id)
    write_case(source, "BraTS20_Validation_001", seg=None)
    report = convert_brats(source, 4, tmp_path / "raw", num_processes=1, progress=False)
    folder = tmp_path / "raw" / "Dataset004_src"
    assert names(folder / "imagesTr") == image_names(labelled)
    assert names(folder / "labelsTr") == label_names(labelled)
    assert names(folder / "imagesTs") == image_names(["BraTS20_Validation_001"])
    assert not (folder / "labelsTs").exists()
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2
    assert (report.num_training, report.num_test) == (2, 1)
    np.testing.assert_array_equal(read(folder / "imagesTs" / "BraTS20_Validation_001_0003.nii.gz"),
                                  modality_array("FLAIR"))


# ----------------------------------------------------------------------------------------------------------------------
# label conventions


@pytest.mark.parametrize("convention", ["brats2018", "brats2023"])
def test_brats_labels_round_trip_through_nnunet_labels(convention):
    values = [0, 1, 2, ET_LABEL[convention]]
    seg = np.random.default_rng(1).choice(values, size=(6, 7, 8)).astype(np.int16)
    assert set(np.unique(seg).tolist()) == set(values)
    nnunet = brats_to_nnunet(seg, convention)
    np.testing.assert_array_equal(nnunet, expected_nnunet(seg))
    np.testing.assert_array_equal(nnunet_to_brats(nnunet, convention), seg)
    other = "brats2023" if convention == "brats2018" else "brats2018"
    assert not np.array_equal(nnunet_to_brats(nnunet, other), seg)


# ----------------------------------------------------------------------------------------------------------------------
# ProtoKD split


def test_bundled_protokd_split_is_200_28_57_disjoint_brats18_cases():
    split = protokd_split()
    assert {k: len(v) for k, v in split.items()} == {"train": 200, "val": 28, "test": 57}
    everything = [c for ids in split.values() for c in ids]
    assert len(set(everything)) == len(everything)
    assert all(c.startswith("Brats18_") for c in everything)


@pytest.mark.slow
def test_protokd_split_writes_fold_and_moves_test_cases_to_imagests(tmp_path):
    split = protokd_split()
    chosen = {"train": split["train"][:3], "val": split["val"][:2], "test": split["test"][:2]}
    extra = "Brats18_NOTLISTED_1"
    source, raw = tmp_path / "release", tmp_path / "raw"
    segs = {case_id: write_case(source, case_id, seed=i)
            for i, case_id in enumerate([*chosen["train"], *chosen["val"], *chosen["test"], extra])}
    proc = run_cli(raw, "-i", source, "-d", 12, "--split", "protokd", "-np", 2)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    folder = raw / "Dataset012_release"
    training = [*chosen["train"], *chosen["val"], extra]
    assert json.loads((folder / "splits_final.json").read_text()) == [
        {"train": sorted([*chosen["train"], extra]), "val": sorted(chosen["val"])}]
    assert names(folder / "imagesTr") == image_names(training)
    assert names(folder / "labelsTr") == label_names(training)
    assert names(folder / "imagesTs") == image_names(chosen["test"])
    assert names(folder / "labelsTs") == label_names(chosen["test"])
    for case_id in chosen["test"]:
        np.testing.assert_array_equal(read(folder / "labelsTs" / f"{case_id}.nii.gz"), expected_nnunet(segs[case_id]))
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == len(training)
    absent = {part: len(split[part]) - len(chosen[part]) for part in split}
    listed = sum(len(ids) for ids in split.values())
    assert (f"note: ProtoKD split: {sum(absent.values())} of {listed} listed cases are not in this release "
            f"(train {absent['train']}, val {absent['val']}, test {absent['test']})") in proc.stdout


# ----------------------------------------------------------------------------------------------------------------------
# bad input: one line naming the case and the problem, exit != 0, nothing left in nnUNet_raw

BAD = "Brats18_BAD_1"


def _missing_modality(src):
    write_case(src, BAD, skip=("T1ce",))
    return BAD, f"{BAD}_t1ce.nii.gz", "missing"


def _missing_from_2023_case(src):
    write_case(src, "BraTS-GLI-00009-000", naming="brats2023", skip=("FLAIR",))
    return "BraTS-GLI-00009-000", "BraTS-GLI-00009-000-t2f.nii.gz", "missing"


def _shape(src):
    write_case(src, BAD, geometry={"T2": {"shape": (11, 9, 8)}})
    return BAD, f"{BAD}_t2.nii.gz", "shape"


def _spacing(src):
    write_case(src, BAD, geometry={"T1": {"spacing": (1.0, 1.5, 3.0)}})
    return BAD, f"{BAD}_t1.nii.gz", "spacing"


def _origin(src):
    write_case(src, BAD, geometry={"T1ce": {"origin": (10.0, -20.0, 35.0)}})
    return BAD, f"{BAD}_t1ce.nii.gz", "origin"


def _direction(src):
    write_case(src, BAD, geometry={"T2": {"direction": IDENTITY}})
    return BAD, f"{BAD}_t2.nii.gz", "direction"


def _seg_geometry(src):
    write_case(src, BAD, geometry={"seg": {"shape": (10, 9, 7)}})
    return BAD, f"{BAD}_seg.nii.gz", "shape"


def _label_5(src):
    seg = make_seg(4, 0)
    seg[0, 0, 0] = 5
    write_case(src, BAD, seg=seg)
    return BAD, f"{BAD}_seg.nii.gz", "5"


def _labels_3_and_4(src):
    seg = make_seg(4, 0)
    seg[seg == 1] = 3
    write_case(src, BAD, seg=seg)
    return BAD, "has both", "3 and 4", "2018-2021 file names", "--labels brats2024"  # 2024 labels under 2018 names


def _non_integer_float_labels(src):
    seg = make_seg(4, 0, np.float32)
    seg[seg == 2] = 1.5
    write_case(src, BAD, seg=seg)
    return BAD, f"{BAD}_seg.nii.gz", "1.5"


def _garbage_bytes(src):
    write_case(src, BAD)
    case_file(src, BAD, "T1").write_bytes(np.random.default_rng(0).bytes(400))
    return BAD, f"{BAD}_t1.nii.gz", "readable"


def _gzipped_text(src):
    write_case(src, BAD)
    case_file(src, BAD, "seg").write_bytes(gzip.compress(b"this is not a NIfTI file\n" * 40))
    return BAD, f"{BAD}_seg.nii.gz", "readable"


def _truncated_gz(src):
    write_case(src, BAD)
    path = case_file(src, BAD, "T2")
    write_image(path, np.random.default_rng(0).integers(0, 3000, ARRAY_SHAPE).astype(np.int16))
    path.write_bytes(path.read_bytes()[:-200])
    return BAD, f"{BAD}_t2.nii.gz", "truncated"


def _truncated_nii(src):
    write_case(src, BAD, ext=".nii")
    path = case_file(src, BAD, "FLAIR", ext=".nii")
    path.write_bytes(path.read_bytes()[:-100])
    return BAD, f"{BAD}_flair.nii", "truncated"


BAD_CASES = [_missing_modality, _missing_from_2023_case, _shape, _spacing, _origin, _direction, _seg_geometry,
             _label_5, _labels_3_and_4, _non_integer_float_labels, _garbage_bytes, _gzipped_text, _truncated_gz,
             _truncated_nii]


@pytest.mark.slow
@pytest.mark.parametrize("make_bad", BAD_CASES, ids=lambda f: f.__name__.strip("_"))
def test_bad_case_fails_with_one_line_and_leaves_nothing(tmp_path, make_bad):
    source, raw = tmp_path / "release", tmp_path / "raw"
    write_case(source, "Brats18_GOOD_1")
    mentions = make_bad(source)
    proc = run_cli(raw, "-i", source, "-d", 21, "-np", 1)
    assert_clean_failure(proc, raw, *mentions)


@pytest.mark.slow
def test_bad_case_fails_the_same_with_worker_processes(tmp_path):
    source, raw = tmp_path / "release", tmp_path / "raw"
    write_case(source, "Brats18_GOOD_1")
    write_case(source, "Brats18_GOOD_2")
    mentions = _origin(source)
    assert_clean_failure(run_cli(raw, "-i", source, "-d", 21, "-np", 2), raw, *mentions)


@pytest.mark.slow
def test_empty_source_folder_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    raw = tmp_path / "raw"
    assert_clean_failure(run_cli(raw, "-i", tmp_path / "empty", "-d", 22), raw, "empty", "no BraTS cases")


@pytest.mark.slow
def test_folder_without_brats_files_fails(tmp_path):
    source, raw = tmp_path / "notbrats", tmp_path / "raw"
    source.mkdir()
    (source / "README.txt").write_text("hello")
    write_image(source / "patient1" / "scan.nii.gz", np.zeros(ARRAY_SHAPE, np.int16))
    write_image(source / "patient1" / "patient1_t3.nii.gz", np.zeros(ARRAY_SHAPE, np.int16))
    assert_clean_failure(run_cli(raw, "-i", source, "-d", 22), raw, "notbrats", "no BraTS cases")


@pytest.mark.slow
def test_missing_source_path_fails(tmp_path):
    raw = tmp_path / "raw"
    assert_clean_failure(run_cli(raw, "-i", tmp_path / "nowhere", "-d", 22), raw, "nowhere", "no such folder")


@pytest.mark.slow
def test_same_case_in_two_folders_fails(tmp_path):
    source, raw = tmp_path / "release", tmp_path / "raw"
    write_case(source / "HGG", "Brats18_2013_2_1")
    write_case(source / "LGG", "Brats18_2013_2_1")
    assert_clean_failure(run_cli(raw, "-i", source, "-d", 22), raw, "Brats18_2013_2_1", "also appears")


@pytest.mark.slow
@pytest.mark.parametrize("dataset_id", [0, 1000])
def test_dataset_id_outside_1_to_999_fails(tmp_path, dataset_id):
    source, raw = tmp_path / "release", tmp_path / "raw"
    write_case(source, "Brats18_GOOD_1")
    assert_clean_failure(run_cli(raw, "-i", source, "-d", dataset_id), raw, str(dataset_id), "out of range")


@pytest.mark.slow
def test_release_mixing_et_labels_3_and_4_fails(tmp_path):
    source, raw = tmp_path / "release", tmp_path / "raw"
    write_case(source, "Brats18_GOOD_1", seg=make_seg(4, 0))
    write_case(source, "Brats18_GOOD_2", seg=make_seg(3, 1))
    assert_clean_failure(run_cli(raw, "-i", source, "-d", 22, "-np", 1), raw, "release", "Brats18_GOOD_2 has label 3, Brats18_GOOD_1 has label 4")


@pytest.mark.slow
def test_existing_dataset_id_fails_unless_overwrite_then_replaced(tmp_path):
    raw = tmp_path / "raw"
    first, second = tmp_path / "first", tmp_path / "second"
    write_case(first, "Brats18_FIRST_1")
    write_case(second, "Brats18_SECOND_1")
    assert run_cli(raw, "-i", first, "-d", 7, "-n", "Tumours", "-np", 1).returncode == 0
    folder = raw / "Dataset007_Tumours"
    assert names(folder / "labelsTr") == label_names(["Brats18_FIRST_1"])

    proc = run_cli(raw, "-i", second, "-d", 7, "-n", "Other", "-np", 1)
    assert_clean_failure(proc, raw, "Dataset007_Tumours", "already exists", keep=[folder.name])
    assert names(folder / "labelsTr") == label_names(["Brats18_FIRST_1"])  # untouched

    proc = run_cli(raw, "-i", second, "-d", 7, "-n", "Tumours", "--overwrite", "-np", 1)
    assert proc.returncode == 0, proc.stderr
    assert names(raw) == {folder.name}
    assert names(folder / "imagesTr") == image_names(["Brats18_SECOND_1"])
    assert names(folder / "labelsTr") == label_names(["Brats18_SECOND_1"])


@pytest.mark.slow
def test_skip_bad_converts_the_good_cases_and_lists_the_skipped(tmp_path):
    source, raw = tmp_path / "release", tmp_path / "raw"
    good = ["Brats18_GOOD_1", "Brats18_GOOD_2"]
    segs = {case_id: write_case(source, case_id, seed=i) for i, case_id in enumerate(good)}
    _missing_modality(source)
    seg = make_seg(4, 5)
    seg[0, 0, 0] = 5
    write_case(source, "Brats18_BAD_2", seg=seg)
    proc = run_cli(raw, "-i", source, "-d", 8, "--skip-bad", "-np", 1)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 2, proc.stdout
    assert skipped[0].startswith(f"skipped {BAD}: ") and "t1ce" in skipped[0]
    assert skipped[1].startswith("skipped Brats18_BAD_2: ") and "seg" in skipped[1]
    folder = raw / "Dataset008_release"
    assert names(raw) == {folder.name}
    assert names(folder / "imagesTr") == image_names(good)
    assert names(folder / "labelsTr") == label_names(good)
    assert not any("BAD" in p.name for p in folder.rglob("*"))
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == len(good)
    for case_id in good:
        np.testing.assert_array_equal(read(folder / "labelsTr" / f"{case_id}.nii.gz"), expected_nnunet(segs[case_id]))


@pytest.mark.slow
def test_skip_bad_with_no_good_case_fails(tmp_path):
    source, raw = tmp_path / "release", tmp_path / "raw"
    _missing_modality(source)
    proc = run_cli(raw, "-i", source, "-d", 9, "--skip-bad", "-np", 1)
    assert_clean_failure(proc, raw, "release", "no case could be converted")


# ----------------------------------------------------------------------------------------------------------------------
# real BraTS cases (opt-in: only where ../shared/data/brats or $NNALIGN_BRATS_DATA exists)


def real_data_root() -> Path:
    env = os.environ.get("NNALIGN_BRATS_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/brats"


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("release, naming", [("BraTS2018", "brats2018"), ("BraTS2023", "brats2023")])
def test_real_release_converts_and_passes_nnunet_integrity_check(tmp_path, release, naming):
    source = real_data_root() / release
    if not source.is_dir():
        pytest.skip(f"no real BraTS data at {source} (set NNALIGN_BRATS_DATA to the folder holding {release}/)")
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    raw = tmp_path / "raw"
    proc = run_cli(raw, "-i", source, "-d", 18, "-np", 2)
    assert proc.returncode == 0, proc.stderr
    folder = raw / f"Dataset018_{release}"
    verify_dataset_integrity(str(folder), num_processes=1)

    case_ids = sorted(p.name for p in source.iterdir() if p.is_dir())
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["numTraining"] == len(case_ids)
    assert dj["nnalign"]["source_label_convention"] == naming
    assert names(folder / "labelsTr") == label_names(case_ids)
    for case_id in case_ids[:3]:
        src_seg = sitk.ReadImage(str(case_file(source, case_id, "seg", naming)))
        out_seg = sitk.ReadImage(str(folder / "labelsTr" / f"{case_id}.nii.gz"))
        src, out = sitk.GetArrayFromImage(src_seg), sitk.GetArrayFromImage(out_seg)
        for brats, nnunet in ((0, 0), (1, 2), (2, 1), (ET_LABEL[naming], 3)):
            assert np.count_nonzero(out == nnunet) == np.count_nonzero(src == brats), (case_id, brats)
        assert out_seg.GetSize() == src_seg.GetSize()
        np.testing.assert_allclose(out_seg.GetOrigin(), src_seg.GetOrigin(), atol=1e-4)
        for channel, modality in enumerate(CHANNELS):
            np.testing.assert_array_equal(read(folder / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz"),
                                          read(case_file(source, case_id, modality, naming)),
                                          err_msg=f"{case_id} {modality}")
