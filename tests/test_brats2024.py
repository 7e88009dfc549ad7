"""BraTS 2024+ GLI labels (1 NETC, 2 SNFH, 3 ET, 4 resection cavity RC) in conversion, prediction labels and
evaluation; the convention detected per release; the official lesion-wise scores (``--lesionwise``).

Expected values are worked out here from what the fixtures hold (BraTS 2024: WT = 1+2+3, TC = 1+3, ET = 3, RC = 4,
RC in no tumour region; nnU-Net: edema 1, necrosis 2, ET 3, RC 4), never from the code under test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnalign.data.convert_brats import convert_brats
from nnalign.data.labels import detect_convention, nnunet_to_brats, relabel
from nnalign.errors import CaseError, NnalignError
from nnalign.evaluation.evaluate import evaluate

SHAPE = (10, 12, 14)  # numpy (z, y, x)
MODALITIES = {"T1": "t1n", "T1ce": "t1c", "T2": "t2w", "FLAIR": "t2f"}
NNUNET_OF_2024 = {0: 0, 1: 2, 2: 1, 3: 3, 4: 4}


def seg_2024(rc: bool = True, et: bool = True) -> np.ndarray:
    """SNFH (2) box with NETC (1) and ET (3) inside, and a resection cavity (4) apart from the tumour."""
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[1:7, 1:7, 1:7] = 2
    seg[2:5, 2:5, 2:5] = 1
    if et:
        seg[3:5, 3:5, 3:5] = 3
    if rc:
        seg[6:9, 8:11, 9:13] = 4
    return seg


def write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def write_case_2023_names(root: Path, case_id: str, seg: np.ndarray) -> None:
    """``<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (BraTS 2023+ names)."""
    for i, suffix in enumerate(MODALITIES.values()):
        image = np.full(SHAPE, 10 * (i + 1), dtype=np.int16)
        image.flat[0] = 0
        write(root / case_id / f"{case_id}-{suffix}.nii.gz", image)
    write(root / case_id / f"{case_id}-seg.nii.gz", seg)


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ----------------------------------------------------------------------------------------------------------------------
# label conventions


def test_2024_labels_map_to_nnunet_with_rc_as_label_4_and_back():
    seg = seg_2024()
    nnunet = relabel(seg, "brats2024", "nnunet")
    expected = np.vectorize(NNUNET_OF_2024.get)(seg)
    np.testing.assert_array_equal(nnunet, expected)
    np.testing.assert_array_equal(nnunet_to_brats(nnunet, "brats2024"), seg)


@pytest.mark.parametrize("target", ["brats2018", "brats2023"])
def test_rc_has_no_label_in_older_conventions(target):
    with pytest.raises(ValueError, match="resection cavity.*no label in " + target):
        nnunet_to_brats(relabel(seg_2024(), "brats2024", "nnunet"), target)
    # without RC voxels the older conventions are fine
    nnunet_to_brats(relabel(seg_2024(rc=False), "brats2024", "nnunet"), target)


@pytest.mark.parametrize("values_by_case, new_naming, expected", [
    ({"a": {0, 1, 2, 3, 4}}, True, "brats2024"),
    ({"a": {0, 1, 2, 3}, "b": {0, 1, 2, 4}}, True, "brats2024"),  # b: RC without ET
    ({"a": {0, 1, 2, 3}}, True, "brats2023"),  # = 2024 without RC
    ({"a": {0, 1, 2, 4}}, False, "brats2018"),  # 4 under 2018-2021 names is ET
    ({"a": {0, 1, 2}}, False, "brats2018"),
    ({"a": {0, 1, 2}}, True, "brats2023"),
])
def test_detection_over_the_whole_release(values_by_case, new_naming, expected):
    assert detect_convention(values_by_case, new_naming) == expected


@pytest.mark.parametrize("values_by_case, new_naming, mentions", [
    ({"good": {0, 1, 2, 3}, "odd": {0, 1, 6}}, True, ("odd", "[6]", "no BraTS convention")),
    ({"x": {0, 1, 2, 3, 4}}, False, ("x has both", "--labels brats2024")),
])
def test_detection_names_the_case_that_fits_no_convention(values_by_case, new_naming, mentions):
    with pytest.raises(ValueError) as e:
        detect_convention(values_by_case, new_naming)
    assert all(m in str(e.value) for m in mentions), str(e.value)


def test_prediction_labels_brats2024_writes_rc_as_4_and_brats2018_refuses_it_for_the_case():
    from nnalign.inference.predict import LABEL_OPTIONS, convert_labels

    assert "brats2024" in LABEL_OPTIONS
    nnunet = relabel(seg_2024(), "brats2024", "nnunet")
    np.testing.assert_array_equal(convert_labels(nnunet, "brats2024"), seg_2024())
    with pytest.raises(CaseError, match="--labels brats2018.*resection cavity"):
        convert_labels(nnunet, "brats2018")


def test_cli_label_choices_match_the_modules():
    from nnalign.cli.convert_brats import LABEL_CHOICES as CONVERT_CLI
    from nnalign.data.convert_brats import LABEL_CHOICES as CONVERT

    assert CONVERT_CLI == CONVERT
    assert "brats2024" in CONVERT


# ----------------------------------------------------------------------------------------------------------------------
# conversion


def test_2024_release_converts_with_rc_as_its_own_region(tmp_path):
    source = tmp_path / "release"
    segs = {"BraTS-GLI-02000-100": seg_2024(), "BraTS-GLI-02001-100": seg_2024(et=False),  # RC, no ET
            "BraTS-GLI-02002-100": seg_2024(rc=False)}
    for case_id, seg in segs.items():
        write_case_2023_names(source, case_id, seg)
    report = convert_brats(source, 24, tmp_path / "raw", num_processes=1, progress=False)
    assert report.label_convention == "brats2024"
    folder = tmp_path / "raw" / "Dataset024_release"
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                            "enhancing tumor": [3], "resection cavity": [4]}
    assert dj["regions_class_order"] == [1, 2, 3, 4]
    assert dj["nnalign"]["source_label_convention"] == "brats2024"
    for case_id, seg in segs.items():
        np.testing.assert_array_equal(read(folder / "labelsTr" / f"{case_id}.nii.gz"),
                                      np.vectorize(NNUNET_OF_2024.get)(seg))
    # nnU-Net reads it as four sigmoid regions, RC last, and finds the dataset whole
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    manager = LabelManager(dj["labels"], dj["regions_class_order"])
    assert manager.has_regions and manager.num_segmentation_heads == 4
    assert [tuple(r) for r in manager.foreground_regions] == [(1, 2, 3), (2, 3), (3,), (4,)]
    verify_dataset_integrity(str(folder), num_processes=1)


def test_explicit_labels_override_detection(tmp_path):
    source = tmp_path / "release"
    seg = seg_2024(et=False)  # labels 1, 2, 4 under 2023+ names: detected as 2024 (4 = RC)
    write_case_2023_names(source, "BraTS-GLI-03000-000", seg)
    auto = convert_brats(source, 25, tmp_path / "raw", num_processes=1, progress=False)
    assert auto.label_convention == "brats2024"
    given = convert_brats(source, 26, tmp_path / "raw", num_processes=1, progress=False, labels="brats2018")
    assert given.label_convention == "brats2018"
    out = read(tmp_path / "raw" / "Dataset026_release" / "labelsTr" / "BraTS-GLI-03000-000.nii.gz")
    assert np.count_nonzero(out == 3) == np.count_nonzero(seg == 4)  # 4 read as 2018's enhancing tumour
    assert not np.any(out == 4)


def run_module(module: str, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NNALIGN_DEBUG"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_conversion_with_a_label_of_no_convention_is_one_line_and_writes_nothing(tmp_path):
    source, raw = tmp_path / "release", tmp_path / "raw"
    write_case_2023_names(source, "BraTS-GLI-04000-000", seg_2024())
    bad = seg_2024()
    bad[0, 0, 0] = 5
    write_case_2023_names(source, "BraTS-GLI-04001-000", bad)
    proc = subprocess.run([sys.executable, "-m", "nnalign.cli.convert_brats", "-i", str(source), "-d", "27",
                           "-np", "1"], env={**os.environ, "nnUNet_raw": str(raw)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert "BraTS-GLI-04001-000" in line and "[5]" in line and "no BraTS convention" in line
    assert not raw.exists() or not any(raw.iterdir())


# ----------------------------------------------------------------------------------------------------------------------
# evaluation


def brats_2024_folders(tmp_path: Path) -> tuple[Path, Path]:
    """A BraTS-named reference folder of two 2024 cases and their predictions (RC half found in case 1)."""
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    for case_id, rc in (("BraTS-GLI-05000-000", True), ("BraTS-GLI-05001-000", False)):
        seg = seg_2024(rc=rc)
        write(ref_dir / case_id / f"{case_id}-seg.nii.gz", seg)
        pred = seg.copy()
        if rc:
            pred[6:9, 8:11, 11:13] = 0  # half the cavity (18 of 36 voxels) missed
        write(pred_dir / f"{case_id}.nii.gz", pred)
    return ref_dir, pred_dir


def test_evaluation_detects_2024_and_reports_rc_on_its_own(tmp_path):
    ref_dir, pred_dir = brats_2024_folders(tmp_path)
    report = evaluate(ref_dir, pred_dir, progress=False)
    assert set(report.conventions.values()) == {"brats2024"}
    first, second = report.scores["BraTS-GLI-05000-000"], report.scores["BraTS-GLI-05001-000"]
    assert first["Dice_RC"] == pytest.approx(2 * 18 / (36 + 18))
    assert (second["Dice_RC"], second["HD95_RC"]) == (1.0, 0.0)  # no RC in either: both empty
    for case in (first, second):  # RC is in no tumour region: the tumour is predicted perfectly
        assert [case[f"Dice_{r}"] for r in ("WT", "TC", "ET")] == [1.0, 1.0, 1.0]
    header = (pred_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == ["case", "Dice_WT", "Dice_TC", "Dice_ET", "Dice_RC", "HD95_WT", "HD95_TC", "HD95_ET", "HD95_RC"]


def test_evaluation_without_rc_anywhere_keeps_the_three_tumour_regions(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    write(ref_dir / "C" / "C-seg.nii.gz", seg_2024(rc=False))
    write(pred_dir / "C.nii.gz", seg_2024(rc=False))
    report = evaluate(ref_dir, pred_dir, progress=False, labels="brats2024")
    assert list(report.scores["C"]) == ["Dice_WT", "Dice_TC", "Dice_ET", "HD95_WT", "HD95_TC", "HD95_ET"]


def test_evaluation_with_a_label_of_no_convention_names_the_case_and_writes_nothing(tmp_path):
    ref_dir, pred_dir = brats_2024_folders(tmp_path)
    bad = seg_2024()
    bad[0, 0, 0] = 9
    write(ref_dir / "BraTS-GLI-05001-000" / "BraTS-GLI-05001-000-seg.nii.gz", bad)
    with pytest.raises(NnalignError, match=r"BraTS-GLI-05001-000: label value\(s\) \[9\].*nothing written"):
        evaluate(ref_dir, pred_dir, progress=False)
    assert sorted(p.name for p in pred_dir.iterdir()) == ["BraTS-GLI-05000-000.nii.gz", "BraTS-GLI-05001-000.nii.gz"]


def test_lesionwise_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    ref_dir, pred_dir = brats_2024_folders(tmp_path)
    monkeypatch.setitem(sys.modules, "brats_evaluation", None)  # import fails as if not installed
    with pytest.raises(NnalignError, match=r"pip install 'nnalign\[lesionwise\]'"):
        evaluate(ref_dir, pred_dir, progress=False, lesionwise=True)
    assert not (pred_dir / "metrics.csv").exists()


def lesion_case(tmp_path: Path) -> tuple[Path, Path]:
    """ET in two lesions A and B (64 voxels each); the prediction finds A exactly, misses B and adds a false-positive
    lesion of 64 voxels; the cavity is predicted with 2 of its 3 columns (48 of 72 voxels)."""
    ref = np.zeros((20, 30, 30), np.uint8)
    ref[2:6, 2:6, 2:6] = 3
    ref[12:16, 20:24, 20:24] = 3
    ref[2:6, 20:26, 2:5] = 4
    pred = np.zeros_like(ref)
    pred[2:6, 2:6, 2:6] = 3
    pred[14:18, 2:6, 2:6] = 3
    pred[2:6, 20:26, 2:4] = 4
    write(tmp_path / "ref" / "BraTS-GLI-06000-000" / "BraTS-GLI-06000-000-seg.nii.gz", ref)
    write(tmp_path / "pred" / "BraTS-GLI-06000-000.nii.gz", pred)
    return tmp_path / "ref", tmp_path / "pred"


def test_lesionwise_scores_come_from_brats_evaluation_and_whole_image_scores_agree_with_it(tmp_path):
    pytest.importorskip("brats_evaluation", reason="brats-evaluation is not installed (pip install nnalign[test])")
    import csv

    ref_dir, pred_dir = lesion_case(tmp_path)
    report = evaluate(ref_dir, pred_dir, progress=False, lesionwise=True)
    case = "BraTS-GLI-06000-000"
    # whole image: ET Dice 2*64/(128+128) = 0.5; RC 2*48/(72+48) = 0.8
    assert report.scores[case]["Dice_ET"] == pytest.approx(0.5)
    assert report.scores[case]["Dice_RC"] == pytest.approx(0.8)
    # brats-evaluation 0.0.10: the mean over matched lesions only (A, found exactly): 1 and 0 mm, although B was
    # missed and a false positive was added (they count in its tp/fp/fn columns)
    assert report.lesionwise[case]["Dice_ET"] == pytest.approx(1.0)
    assert report.lesionwise[case]["HD95_ET"] == pytest.approx(0.0)
    assert report.lesionwise[case]["Dice_RC"] == pytest.approx(0.8)
    table = {row["subject_id"]: row for row in csv.DictReader(report.lesionwise_path.open())}
    assert [float(table[case][f"all_instance_{k}_et"]) for k in ("tp", "fp", "fn")] == [1.0, 1.0, 1.0]
    for region in ("wt", "tc", "et", "rc"):  # its whole-image scores are ours
        assert float(table[case][f"global_dsc_{region}"]) == pytest.approx(report.scores[case][f"Dice_{region.upper()}"])
        assert float(table[case][f"global_hd95_{region}"]) == pytest.approx(
            report.scores[case][f"HD95_{region.upper()}"])
    payload = json.loads(report.json_path.read_text())
    assert payload["lesionwise"]["package"].startswith("brats-evaluation ")
    assert payload["cases"][case]["lesionwise"]["Dice_ET"] == pytest.approx(1.0)
    # the temporary NIfTI files are gone
    assert sorted(p.name for p in pred_dir.iterdir()) == [f"{case}.nii.gz", "metrics.csv", "metrics.json",
                                                           "metrics_lesionwise.csv"]


def test_lesionwise_warns_that_the_package_measures_hd95_in_voxels_off_a_1mm_grid(tmp_path):
    pytest.importorskip("brats_evaluation", reason="brats-evaluation is not installed (pip install nnalign[test])")
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:10, 5:10, 5:10] = 3
    pred = np.roll(ref, 1, axis=0)  # one voxel along z, 3 mm
    for arr, path in ((ref, tmp_path / "ref" / "C" / "C-seg.nii.gz"), (pred, tmp_path / "pred" / "C.nii.gz")):
        path.parent.mkdir(parents=True, exist_ok=True)
        image = sitk.GetImageFromArray(arr)
        image.SetSpacing((1.0, 1.0, 3.0))
        sitk.WriteImage(image, str(path))
    report = evaluate(tmp_path / "ref", tmp_path / "pred", progress=False, lesionwise=True)
    assert report.scores["C"]["HD95_ET"] == pytest.approx(3.0)
    assert report.lesionwise["C"]["HD95_ET"] == pytest.approx(1.0)
    assert any("in voxels" in w and "C" in w for w in report.warnings)


@pytest.mark.slow
def test_cli_lesionwise_example_of_the_readme(tmp_path):
    pytest.importorskip("brats_evaluation", reason="brats-evaluation is not installed (pip install nnalign[test])")
    ref_dir, pred_dir = lesion_case(tmp_path)
    proc = run_module("nnalign.cli.evaluate", "-r", ref_dir, "-p", pred_dir, "--lesionwise")
    assert proc.returncode == 0, proc.stderr
    assert "Lesion-wise" in proc.stdout and "| RC |" in proc.stdout
    assert "metrics_lesionwise.csv" in proc.stdout and "labels brats2024" in proc.stdout


@pytest.mark.slow
def test_cli_bad_label_is_one_line_and_exit_1(tmp_path):
    ref_dir, pred_dir = brats_2024_folders(tmp_path)
    bad = seg_2024()
    bad[0, 0, 0] = 9
    write(ref_dir / "BraTS-GLI-05000-000" / "BraTS-GLI-05000-000-seg.nii.gz", bad)
    proc = run_module("nnalign.cli.evaluate", "-r", ref_dir, "-p", pred_dir)
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert "BraTS-GLI-05000-000" in line and "[9]" in line and "Traceback" not in proc.stderr
    assert not (pred_dir / "metrics.csv").exists()
