"""The per-case report of nnalign_predict: volumes worked out by hand on tiny label maps, each warning's trigger, the
expected Dice from fake model folders' validation files, and the run's CSV table."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from nnalign.data.label_volumes import merge_ranges, region_volumes_ml, volume_range, volume_warnings
from nnalign.inference.case_report import CSV_COLUMNS, ReportTable, case_report, case_warnings, expected_dice
from nnalign.inference.models import load_model
from nnalign.modalities import BRATS_MODALITIES

PLANS_CONFIG = "nnAlignPlans__3d_cpu"
TEACHER = "nnAlignTeacher_mixture_drop0p5"
STUDENT = "nnAlignStudent_T1ce-T2_protokd_Teacher-mixture"


def label_map() -> np.ndarray:
    """4 x 4 x 4, nnU-Net labels: 10 edema (1), 5 necrosis (2), 3 enhancing (3), 2 resection cavity (4)."""
    seg = np.zeros(64, dtype=np.uint8)
    seg[:10], seg[10:15], seg[15:18], seg[18:20] = 1, 2, 3, 4
    return seg.reshape(4, 4, 4)


@pytest.mark.parametrize("spacing, rc, expected", [
    ((10.0, 10.0, 10.0), False, {"WT": 18.0, "TC": 8.0, "ET": 3.0}),  # 1 mL per voxel
    ((10.0, 10.0, 10.0), True, {"WT": 18.0, "TC": 8.0, "ET": 3.0, "RC": 2.0}),
    ((1.0, 1.0, 2.5), False, {"WT": 0.045, "TC": 0.02, "ET": 0.0075}),  # 2.5 mm^3 = 0.0025 mL per voxel
])
def test_region_volumes_in_millilitres(spacing, rc, expected):
    assert region_volumes_ml(label_map(), spacing, rc=rc) == pytest.approx(expected)


@pytest.mark.parametrize("volumes, used, fragments", [
    ({"WT": 5.0, "TC": 2.0, "ET": 1.0}, ("FLAIR", "T2"), ["predicted without T1ce"]),
    ({"WT": 5.0, "TC": 2.0, "ET": 1.0}, ("T1ce", "FLAIR"), []),
    ({"WT": 0.0, "TC": 0.0, "ET": 0.0}, ("FLAIR",), ["no tumour predicted"]),
    ({"WT": 5.0, "TC": 0.0, "ET": 0.0}, ("T1ce",), ["TC is empty", "ET is empty"]),
    ({"WT": 5.0, "TC": 2.0, "ET": 0.0}, ("T1ce",), ["ET is empty"]),
])
def test_each_warning_has_its_trigger(volumes, used, fragments):
    found = case_warnings(volumes, used)
    assert len(found) == len(fragments), found
    for warning, fragment in zip(found, fragments):
        assert fragment in warning


def test_training_volume_range_and_what_lies_far_outside_it():
    volumes = {"a": {"WT": 40.0, "TC": 10.0, "ET": 0.0}, "b": {"WT": 100.0, "TC": 30.0, "ET": 5.0},
               "c": {"WT": 60.0, "TC": 20.0, "ET": 2.0}}
    found = volume_range(volumes)
    assert found == {"ET": {"max": 5.0, "min_nonzero": 2.0, "cases": 3}, "TC": {"max": 30.0, "min_nonzero": 10.0,
                                                                               "cases": 3},
                     "WT": {"max": 100.0, "min_nonzero": 40.0, "cases": 3}}
    assert volume_warnings({"WT": 200.0, "TC": 5.0, "ET": 1.0}, found) == []  # 2x the largest, half the smallest
    warned = volume_warnings({"WT": 200.1, "TC": 4.9, "ET": 0.0}, found)  # an empty region is its own warning
    assert len(warned) == 2 and warned[0].startswith("WT 200.1 mL is far above the training cases' range "
                                                      "(40-100 mL, 3 cases)")
    assert warned[1].startswith("TC 4.9 mL is far below the training cases' range (10-30 mL, 3 cases)")
    other_fold = {"WT": {"max": 300.0, "min_nonzero": 50.0, "cases": 4}, "TC": "garbage",
                  "ET": {"max": True, "min_nonzero": 1.0, "cases": 4}}
    merged = merge_ranges([found, other_fold])
    assert merged["WT"] == {"max": 300.0, "min_nonzero": 40.0, "cases": 4} and merged["TC"] == found["TC"]
    assert merged["ET"] == found["ET"]  # a malformed entry of a record is ignored
    assert case_warnings({"WT": 700.0, "TC": 20.0, "ET": 3.0}, ("T1ce",), merged, ["T2 resampled"]) == [
        "T2 resampled", "WT 700 mL is far above the training cases' range (40-300 mL, 4 cases): check the segmentation"]


def model_folder(root: Path, trainer: str, summaries: dict[int, tuple[dict, int]]) -> Path:
    """A model folder with empty checkpoints and, per fold, nnU-Net's summary.json with region Dice and n cases."""
    folder = root / f"{trainer}__{PLANS_CONFIG}"
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps(
        {"channel_names": {str(i): m for i, m in enumerate(BRATS_MODALITIES)}, "labels": {"background": 0}}))
    (folder / "plans.json").write_text("{}")
    for fold, (dice, n) in summaries.items():
        (folder / f"fold_{fold}" / "validation").mkdir(parents=True)
        (folder / f"fold_{fold}" / "checkpoint_final.pth").touch()
        means = {key: {"Dice": dice[r]} for key, r in (("(1, 2, 3)", "WT"), ("(2, 3)", "TC"), ("(3,)", "ET"))}
        summary = {"foreground_mean": {"Dice": sum(dice.values()) / 3}, "mean": means,
                   "metric_per_case": [{}] * n}
        (folder / f"fold_{fold}" / "validation" / "summary.json").write_text(json.dumps(summary))
    return folder


def test_expected_dice_weights_the_folds_by_their_cases(tmp_path):
    student = load_model(model_folder(tmp_path, STUDENT, {0: ({"WT": 0.9, "TC": 0.8, "ET": 0.7}, 2),
                                                         1: ({"WT": 0.6, "TC": 0.5, "ET": 0.4}, 3)}))
    dice, source = expected_dice(student, ("T1ce", "T2"))
    assert dice == pytest.approx({"WT": 0.72, "TC": 0.62, "ET": 0.52, "n": 5})  # (2 * 0.9 + 3 * 0.6) / 5 ...
    assert "fold(s) 0, 1" in source and "summary.json" in source


def test_no_expected_dice_where_the_validation_saw_other_modalities(tmp_path):
    teacher = load_model(model_folder(tmp_path, TEACHER, {0: ({"WT": 0.9, "TC": 0.8, "ET": 0.7}, 2)}))
    assert expected_dice(teacher, BRATS_MODALITIES)[0] == pytest.approx({"WT": 0.9, "TC": 0.8, "ET": 0.7, "n": 2})
    dice, source = expected_dice(teacher, ("FLAIR",))
    assert dice is None and "saw T1+T1ce+T2+FLAIR, not FLAIR" in source


def test_a_held_out_evaluation_of_the_subset_gives_the_expected_dice(tmp_path):
    from nnalign.model_folders import EVALUATION_FILE, evaluation_folder

    teacher = load_model(model_folder(tmp_path, TEACHER, {0: ({"WT": 0.9, "TC": 0.8, "ET": 0.7}, 2)}))
    folder = evaluation_folder(tmp_path, teacher.name, ("T1ce", "FLAIR"))
    folder.mkdir(parents=True)
    mean = {"Dice_WT": 0.81234, "Dice_TC": 0.6, "Dice_ET": 0.5, "HD95_WT": 3.0, "HD95_TC": 4.0, "HD95_ET": 5.0}
    (folder / EVALUATION_FILE).write_text(json.dumps({"num_cases": 7, "aggregates": {"mean": mean}}))
    dice, source = expected_dice(teacher, ("FLAIR", "T1ce"))
    assert dice == {"WT": 0.8123, "TC": 0.6, "ET": 0.5, "n": 7}
    assert source.startswith("held-out evaluation from FLAIR+T1ce (") and str(folder) in source
    assert expected_dice(teacher, ("FLAIR",))[0] is None  # another subset: none


def test_the_report_warns_of_a_volume_outside_the_range_its_folds_recorded(tmp_path):
    from nnalign.training.record import SETTINGS_RECORD, TRAINING_VOLUMES

    teacher = load_model(model_folder(tmp_path, TEACHER, {0: ({"WT": 0.9, "TC": 0.8, "ET": 0.7}, 2)}))
    ranges = {"WT": {"max": 5.0, "min_nonzero": 1.0, "cases": 4}, "TC": {"max": 4.0, "min_nonzero": 1.0, "cases": 4},
              "ET": {"max": 3.0, "min_nonzero": 1.0, "cases": 4}}
    (teacher.folder / "fold_0" / SETTINGS_RECORD).write_text(json.dumps({TRAINING_VOLUMES: ranges}))
    report = case_report("c1", BRATS_MODALITIES, BRATS_MODALITIES, teacher, "all", "brats2023", label_map(),
                         (10.0, 10.0, 10.0))  # WT 18 mL > 2 x 5
    assert [w for w in report["warnings"] if "training cases' range" in w] == [
        "WT 18 mL is far above the training cases' range (1-5 mL, 4 cases): check the segmentation"]


def test_report_and_its_csv_row(tmp_path):
    teacher = load_model(model_folder(tmp_path / "models", TEACHER, {0: ({"WT": 0.9, "TC": 0.8, "ET": 0.7}, 2)}))
    report = case_report("c1", ["T2", "FLAIR"], ["T2", "FLAIR"], teacher, "missing-modality path", "brats2023",
                         label_map(), (10.0, 10.0, 10.0))
    assert report["modalities_missing"] == ["T1", "T1ce"]
    assert report["volumes_ml"] == {"WT": 18.0, "TC": 8.0, "ET": 3.0}  # no RC: the model has no such label
    assert report["expected_dice"] is None
    assert len(report["warnings"]) == 1 and "without T1ce" in report["warnings"][0]
    json.dumps(report)  # written as JSON as it is

    out = tmp_path / "out"
    out.mkdir()
    ReportTable(out).update(report)
    table = ReportTable(out)  # a later run reads the earlier rows back
    table.update({**report, "case": "c0", "warnings": []})
    rows = list(csv.DictReader((out / "nnalign_predict_report.csv").open()))
    assert [r["case"] for r in rows] == ["c0", "c1"] and list(rows[0]) == list(CSV_COLUMNS)
    assert rows[1]["volume_WT_ml"] == "18.0" and rows[1]["volume_RC_ml"] == "" and rows[1]["expected_dice_n"] == ""
    assert rows[1]["modalities_missing"] == "T1,T1ce" and "without T1ce" in rows[1]["warnings"]


# ----------------------------------------------------------------------------------------------------------------------
# the files of one case: predict_case with a segmenter that returns a fixed segmentation


class FixedSegmenter:
    """Chooses ``model`` and 'segments' every case as :func:`label_map` (brats2024 labels) on a 4^3 image."""

    def __init__(self, model):
        self.model = model

    def choose(self, case, modalities=None):
        from nnalign.data.sequence_grid import SequenceGrid
        from nnalign.inference.predict import Choice

        present = sorted(case.images, key=BRATS_MODALITIES.index)
        return Choice(present, present, {}, SequenceGrid("T1ce"), self.model, "all modalities present", "brats2024")

    def run(self, case, choice):
        import SimpleITK as sitk

        from nnalign.data.labels import nnunet_to_brats
        from nnalign.inference.predict import Segmentation

        reference = sitk.Image(4, 4, 4, sitk.sitkUInt8)
        reference.SetSpacing((10.0, 10.0, 10.0))
        report = case_report(case.case_id, choice.present, choice.used, self.model, choice.reason, "brats2024",
                             label_map(), reference.GetSpacing())
        images = {m: np.arange(64, dtype=np.float32).reshape(4, 4, 4) for m in choice.used}
        return Segmentation(nnunet_to_brats(label_map(), "brats2024"), reference, report, images)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("qc_images", [False, True])
def test_predict_case_writes_the_report_and_the_qc_image_only_when_asked(tmp_path, qc_images):
    from nnalign.data.brats_layout import BratsCase
    from nnalign.inference.predict import PredictionLog, predict_case
    from nnalign.inference.qc_image import SIZE_PIXELS

    model = load_model(model_folder(tmp_path / "models", TEACHER, {0: ({"WT": 0.9, "TC": 0.8, "ET": 0.7}, 2)}))
    case = BratsCase("c1", tmp_path, "test", images={m: tmp_path / f"{m}.nii.gz" for m in BRATS_MODALITIES})
    out = tmp_path / "out"
    out.mkdir()
    record = predict_case(case, out, FixedSegmenter(model), None, False, PredictionLog(out), ReportTable(out),
                          qc_images=qc_images)
    assert record.status == "ok", record.message
    report = json.loads((out / "c1.json").read_text())
    assert report["volumes_ml"] == {"WT": 18.0, "TC": 8.0, "ET": 3.0} and report["expected_dice"]["n"] == 2
    assert (out / "c1.nii.gz").is_file() and (out / "nnalign_predict_report.csv").is_file()
    if qc_images:
        assert png_size(out / "c1.png") == SIZE_PIXELS
    else:
        assert not list(out.glob("*.png"))
    assert not list(out.glob(".*"))  # no temporary file left


def test_qc_picture_of_an_empty_segmentation():
    from nnalign.inference.qc_image import qc_png, tumour_centre

    assert tumour_centre(np.zeros((4, 6, 8), dtype=bool)) == (2, 3, 4)
    png = qc_png({"FLAIR": np.zeros((4, 6, 8), dtype=np.float32)}, np.zeros((4, 6, 8), np.uint8), "brats2023",
                 (1.0, 1.0, 3.0), "empty")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_volumes_are_read_once_and_a_read_only_or_broken_folder_is_no_error(tmp_path, read_only):
    import SimpleITK as sitk

    from nnalign.data.label_volumes import VOLUMES_FILE, case_volumes

    source = tmp_path / "pre"
    gt = source / "gt_segmentations"
    gt.mkdir(parents=True)
    image = sitk.GetImageFromArray(label_map())
    image.SetSpacing((10.0, 10.0, 10.0))
    sitk.WriteImage(image, str(gt / "a.nii.gz"))
    (gt / "b.nii.gz").write_bytes(b"not a nifti")
    found = case_volumes(source, ["a", "b", "c"], ".nii.gz")
    assert found == {"a": {"WT": 18.0, "TC": 8.0, "ET": 3.0}}
    assert json.loads((source / VOLUMES_FILE).read_text()) == {"cases": found}
    (source / VOLUMES_FILE).unlink()
    with read_only(tmp_path / "ro", fill_from=source) as folder:
        assert case_volumes(folder, ["a"], ".nii.gz") == found  # measured, not kept
        assert not (folder / VOLUMES_FILE).exists()
    (gt / "a.nii.gz").unlink()
    assert case_volumes(source, ["a"], ".nii.gz") == {}
    (source / VOLUMES_FILE).write_text(json.dumps({"cases": found}))
    assert case_volumes(source, ["a"], ".nii.gz") == found  # kept: not read again
