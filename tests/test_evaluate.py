"""Evaluation (``nnalign_evaluate``): BraTS Dice/HD95 conventions, label conventions, pairing, CSV/JSON, CLI.

Expected values are worked out by hand from masks built here (cubes, single voxels), never from the code under test.
The opt-in agreement test compares with Panoptica, the engine of the official ``brats-evaluation`` package, when it is
importable (it is not a dependency) and the real BraTS cases are present.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnalign.errors import NnalignError
from nnalign.evaluation.evaluate import aggregates_markdown, evaluate
from nnalign.evaluation.metrics import (HD95_EMPTY, LABEL_CHOICES, METRIC_COLUMNS, aggregate, case_metrics,
                                        check_labels, dice, hd95, region_masks, resolve_convention)
from nnalign.evaluation.pairing import find_references, pair_cases

SHAPE = (12, 12, 12)  # numpy (z, y, x)
CLI = [sys.executable, "-m", "nnalign.cli.evaluate"]


def cube(lo: tuple[int, int, int], size: int = 4, shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = True
    return m


def voxel(at: tuple[int, int, int], shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[at] = True
    return m


# ----------------------------------------------------------------------------------------------------------------------
# Dice and HD95 by hand


def test_hd95_empty_is_the_240_240_155_diagonal():
    assert HD95_EMPTY == pytest.approx(math.sqrt(240 ** 2 + 240 ** 2 + 155 ** 2), abs=0.005)


def test_dice_of_two_cubes_overlapping_by_three_quarters():
    # 4x4x4 cubes shifted by one voxel along axis 0: overlap 3*4*4 = 48 voxels, Dice = 2*48 / (64 + 64).
    assert dice(cube((3, 2, 2)), cube((2, 2, 2))) == pytest.approx(0.75)
    assert dice(cube((2, 2, 2)), cube((2, 2, 2))) == 1.0
    assert dice(cube((0, 0, 0)), cube((6, 6, 6))) == 0.0


@pytest.mark.parametrize("offset, spacing, expected", [
    ((1, 0, 0), (2.5, 1.0, 0.7), 2.5),  # one voxel along axis 0 counts spacing[0]
    ((0, 0, 1), (2.5, 1.0, 0.7), 0.7),  # ... along axis 2 counts spacing[2]
    ((1, 0, 1), (2.5, 1.0, 0.5), math.sqrt(2.5 ** 2 + 0.5 ** 2)),
    ((0, 3, 0), None, 3.0),  # no spacing: voxel units
])
def test_hd95_of_single_voxels_is_their_distance_in_mm(offset, spacing, expected):
    ref = voxel((5, 5, 5))
    pred = voxel(tuple(5 + o for o in offset))
    assert hd95(pred, ref, spacing) == pytest.approx(expected)
    assert hd95(ref, pred, spacing) == pytest.approx(expected)


@pytest.mark.parametrize("spacing, expected", [((3.0, 1.0, 1.0), 3.0), ((1.0, 1.0, 1.0), 1.0), ((1.0, 1.0, 3.0), 1.0)])
def test_hd95_of_cubes_shifted_along_a_coarse_axis(spacing, expected):
    # ref [2:6]^3, pred shifted +1 along axis 0; each surface has 56 voxels. Per surface: the 16 voxels of the face
    # that sticks out are 1 voxel (spacing[0] mm) from the other surface, the 4 inner voxels of the face that moved
    # inside are min(spacing) from it (a side step), the other 36 lie on both surfaces. Pooled 112 distances:
    # 72 x 0, 8 x min(spacing), 32 x spacing[0]; the 95th percentile (position 105.45 of 0..111) is spacing[0].
    assert hd95(cube((3, 2, 2)), cube((2, 2, 2)), spacing) == pytest.approx(expected)


def test_hd95_of_masks_touching_the_volume_edge_matches_medpy_on_the_uncropped_arrays():
    from medpy.metric.binary import hd95 as medpy_hd95

    rng = np.random.default_rng(0)
    for _ in range(5):
        ref = rng.random(SHAPE) < 0.08
        ref[0, :3, :3] = True  # on the edge: the crop must not change the surface there
        pred = np.roll(ref, 1, axis=1) | (rng.random(SHAPE) < 0.02)
        spacing = (1.5, 0.8, 2.0)
        assert hd95(pred, ref, spacing) == pytest.approx(medpy_hd95(pred, ref, voxelspacing=spacing), abs=1e-12)


def test_both_empty_scores_dice_1_hd95_0():
    empty = np.zeros(SHAPE, dtype=bool)
    assert dice(empty, empty) == 1.0
    assert hd95(empty, empty, (1, 1, 1)) == 0.0


def test_exactly_one_empty_scores_dice_0_hd95_373_13():
    empty, mask = np.zeros(SHAPE, dtype=bool), cube((2, 2, 2))
    for pred, ref in ((empty, mask), (mask, empty)):
        assert dice(pred, ref) == 0.0
        assert hd95(pred, ref, (1, 1, 1)) == 373.13


def test_case_metrics_per_region_nnunet_labels():
    # Reference: edema cube (1) with necrosis (2) inside and an enhancing voxel block (3). Prediction: identical
    # except the enhancing block is missing (labelled necrosis instead).
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[cube((2, 2, 2), size=6)] = 1
    ref[cube((3, 3, 3), size=4)] = 2
    ref[cube((4, 4, 4), size=2)] = 3
    pred = ref.copy()
    pred[pred == 3] = 2
    s = case_metrics(ref, pred, (1.0, 1.0, 1.0), "nnunet").scores
    assert list(s) == list(METRIC_COLUMNS)
    assert s["Dice_WT"] == 1.0 and s["HD95_WT"] == 0.0
    assert s["Dice_TC"] == 1.0 and s["HD95_TC"] == 0.0
    assert s["Dice_ET"] == 0.0 and s["HD95_ET"] == HD95_EMPTY


# ----------------------------------------------------------------------------------------------------------------------
# ET post-processing


def et_case(pred_et_voxels: int, ref_has_et: bool):
    """Tumour core cube of necrosis; the prediction has ``pred_et_voxels`` ET voxels inside it."""
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[cube((2, 2, 2), size=6)] = 2
    if ref_has_et:
        ref[cube((3, 3, 3), size=2)] = 3  # 8 voxels
    pred = np.zeros(SHAPE, dtype=np.uint8)
    pred[cube((2, 2, 2), size=6)] = 2
    pred.reshape(-1)[np.flatnonzero(pred.reshape(-1) == 2)[:pred_et_voxels]] = 3
    return ref, pred


@pytest.mark.parametrize("n_pred_et, threshold, removed", [
    (5, 6, True),    # fewer than N: removed
    (5, 5, False),   # exactly N: kept (strictly fewer, as RFNet's "< 500")
    (5, 0, False),   # 0: off
    (5, 1, False),
    (0, 6, False),   # nothing to remove
])
def test_small_predicted_et_is_scored_as_empty_and_stays_in_tc_and_wt(n_pred_et, threshold, removed):
    ref, pred = et_case(n_pred_et, ref_has_et=False)
    result = case_metrics(ref, pred, (1, 1, 1), "nnunet", et_min_voxels=threshold)
    assert result.et_removed is removed
    s = result.scores
    # TC and WT are the 6^3 cube in both, whatever happens to ET.
    assert (s["Dice_TC"], s["HD95_TC"], s["Dice_WT"], s["HD95_WT"]) == (1.0, 0.0, 1.0, 0.0)
    if removed or n_pred_et == 0:
        assert (s["Dice_ET"], s["HD95_ET"]) == (1.0, 0.0)  # both empty
    else:
        assert (s["Dice_ET"], s["HD95_ET"]) == (0.0, HD95_EMPTY)  # a false-positive ET


def test_removing_a_small_et_against_a_reference_et_costs_dice_0():
    ref, pred = et_case(3, ref_has_et=True)
    kept = case_metrics(ref, pred, (1, 1, 1), "nnunet", et_min_voxels=0).scores
    removed = case_metrics(ref, pred, (1, 1, 1), "nnunet", et_min_voxels=500).scores
    assert kept["Dice_ET"] == 0.0 and kept["HD95_ET"] < HD95_EMPTY  # 3 voxels, no overlap with the 8 reference voxels
    assert (removed["Dice_ET"], removed["HD95_ET"]) == (0.0, HD95_EMPTY)


# ----------------------------------------------------------------------------------------------------------------------
# label conventions


# One voxel per label 1..4, in a row; expected region membership of each voxel per convention.
LABEL_ROW = np.array([[[0, 1, 2, 3, 4]]], dtype=np.uint8)
EXPECTED_REGIONS = {
    "nnunet": {"WT": [0, 1, 1, 1, 0], "TC": [0, 0, 1, 1, 0], "ET": [0, 0, 0, 1, 0]},
    "brats2018": {"WT": [0, 1, 1, 0, 1], "TC": [0, 1, 0, 0, 1], "ET": [0, 0, 0, 0, 1]},
    "brats2023": {"WT": [0, 1, 1, 1, 0], "TC": [0, 1, 0, 1, 0], "ET": [0, 0, 0, 1, 0]},
}


@pytest.mark.parametrize("convention", list(EXPECTED_REGIONS))
def test_region_masks_per_convention(convention):
    masks = region_masks(LABEL_ROW, convention)
    assert list(masks) == ["WT", "TC", "ET"]
    for region, expected in EXPECTED_REGIONS[convention].items():
        assert masks[region].reshape(-1).astype(int).tolist() == expected, region


def test_same_tumour_in_three_conventions_scores_identically():
    nn = np.zeros(SHAPE, dtype=np.uint8)
    nn[cube((2, 2, 2), size=6)] = 1
    nn[cube((3, 3, 3), size=4)] = 2
    nn[cube((4, 4, 4), size=2)] = 3
    shifted = np.roll(nn, 1, axis=2)
    as_brats = {"brats2018": {1: 2, 2: 1, 3: 4}, "brats2023": {1: 2, 2: 1, 3: 3}}
    reference = case_metrics(nn, shifted, (1, 2, 3), "nnunet").scores
    for convention, mapping in as_brats.items():
        lut = np.array([0, mapping[1], mapping[2], mapping[3]], dtype=np.uint8)
        assert case_metrics(lut[nn], lut[shifted], (1, 2, 3), convention).scores == reference, convention


@pytest.mark.parametrize("values_by_case, naming, expected", [
    ({"a": {0, 1, 2, 4}}, "nnunet", "brats2018"),  # flat: 4 without 3 is a BraTS 2018 ET
    ({"a": {0, 1, 2, 4}, "b": {0, 1, 2, 3}}, "nnunet", "nnunet"),  # flat with 3: nnU-Net labels, 4 the cavity
    ({"a": {0, 1, 2, 3}}, "nnunet", "nnunet"),
    ({"a": {0, 1, 2, 4}}, "brats2018", "brats2018"),
    ({"a": {0, 1, 2, 3}}, "brats2018", "brats2023"),
    ({"a": {0}}, "brats2018", "brats2018"),
    ({"a": {0, 1, 2, 3}}, "brats2023", "brats2023"),
    ({"a": {0}}, "brats2023", "brats2023"),
    ({"a": {0, 1, 2, 3}, "b": {0, 2, 4}}, "brats2023", "brats2024"),  # 2023+ names: 4 is the resection cavity
    ({"a": {0, 1, 2, 4}}, "brats2023", "brats2024"),
])
def test_resolve_convention_over_all_cases_of_one_naming(values_by_case, naming, expected):
    assert resolve_convention(values_by_case, naming) == expected


@pytest.mark.parametrize("values_by_case, naming, mentions", [
    ({"ok": {0, 1}, "bad": {0, 5}}, "nnunet", ("bad", "[5]")),
    ({"ok": {0, 1}, "bad": {0, 7}}, "brats2023", ("bad", "[7]")),
    ({"a": {0, 1, 3}, "b": {0, 4}}, "brats2018", ("a has label 3", "b has label 4")),
])
def test_resolve_convention_names_the_case_that_fits_none(values_by_case, naming, mentions):
    with pytest.raises(ValueError) as e:
        resolve_convention(values_by_case, naming)
    for m in mentions:
        assert m in str(e.value)


def test_labels_outside_the_convention_are_rejected():
    check_labels({0, 1, 2, 4}, "brats2018")
    check_labels({0, 1, 2, 3, 4}, "nnunet")  # 4: the resection cavity
    with pytest.raises(ValueError, match=r"\[5\].*nnunet"):
        check_labels({0, 1, 5}, "nnunet")
    with pytest.raises(ValueError, match=r"\[3\].*brats2018"):
        check_labels({0, 3}, "brats2018")
    with pytest.raises(ValueError, match=r"\[4\].*brats2023"):
        check_labels({0, 4}, "brats2023")
    with pytest.raises(ValueError, match=r"\[7\]"):
        check_labels({0, 7}, "brats2024")


def test_cli_label_choices_match_the_metrics_module():
    from nnalign.cli.evaluate import LABEL_CHOICES as CLI_CHOICES

    assert CLI_CHOICES == LABEL_CHOICES


# ----------------------------------------------------------------------------------------------------------------------
# aggregates


def test_aggregate_mean_sample_std_median_by_hand():
    rows = [dict.fromkeys(METRIC_COLUMNS, v) for v in (1.0, 0.5, 0.0)]
    agg = aggregate(rows)
    assert list(agg) == ["mean", "std", "median"]
    # mean 0.5; sample std sqrt((0.25 + 0 + 0.25) / 2) = 0.5; median 0.5
    for k in METRIC_COLUMNS:
        assert agg["mean"][k] == pytest.approx(0.5)
        assert agg["std"][k] == pytest.approx(0.5)
        assert agg["median"][k] == pytest.approx(0.5)
    single = aggregate(rows[:1])
    assert single["std"]["Dice_WT"] == 0.0 and single["mean"]["Dice_WT"] == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# files: pairing, CSV, JSON


def write_seg(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    """Write ``arr`` (numpy z, y, x) as NIfTI; ``spacing`` in SimpleITK's x, y, z order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def nnunet_tumour(lo=(2, 2, 2)) -> np.ndarray:
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[cube(lo, size=6)] = 1
    seg[cube(tuple(v + 1 for v in lo), size=4)] = 2
    seg[cube(tuple(v + 2 for v in lo), size=2)] = 3
    return seg


@pytest.fixture
def flat_dataset(tmp_path):
    """labelsTs-style references SYN_0000..2 and predictions: perfect, ET missing (predicted necrosis), none."""
    ref_dir, pred_dir = tmp_path / "labelsTs", tmp_path / "pred"
    ref = nnunet_tumour()
    for i in range(3):
        write_seg(ref_dir / f"SYN_{i:04d}.nii.gz", ref)
    write_seg(pred_dir / "SYN_0000.nii.gz", ref)
    no_et = ref.copy()
    no_et[no_et == 3] = 2
    write_seg(pred_dir / "SYN_0001.nii.gz", no_et)
    return ref_dir, pred_dir


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_evaluate_writes_csv_and_json_with_hand_computed_values(flat_dataset):
    ref_dir, pred_dir = flat_dataset
    report = evaluate(ref_dir, pred_dir, progress=False)
    assert report.csv_path == pred_dir / "metrics.csv" and report.json_path == pred_dir / "metrics.json"
    assert report.missing == ["SYN_0002"]
    rows = read_csv(report.csv_path)
    assert rows[0] == ["case", "Dice_WT", "Dice_TC", "Dice_ET", "HD95_WT", "HD95_TC", "HD95_ET"]
    table = {r[0]: [float(v) for v in r[1:]] for r in rows[1:]}
    assert [r[0] for r in rows[1:]] == ["SYN_0000", "SYN_0001", "SYN_0002", "mean", "std", "median"]
    assert table["SYN_0000"] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert table["SYN_0001"] == [1.0, 1.0, 0.0, 0.0, 0.0, HD95_EMPTY]  # ET predicted empty
    assert table["SYN_0002"] == [0.0, 0.0, 0.0, HD95_EMPTY, HD95_EMPTY, HD95_EMPTY]  # missing prediction
    # Dice_WT over cases: 1, 1, 0 -> mean 2/3, sample std sqrt((1/9 + 1/9 + 4/9) / 2) = sqrt(1/3), median 1.
    # HD95_ET: 0, 373.13, 373.13 -> mean 2/3 * 373.13, std 373.13 * sqrt(1/3), median 373.13.
    assert table["mean"][0] == pytest.approx(2 / 3)
    assert table["std"][0] == pytest.approx(math.sqrt(1 / 3))
    assert table["median"][0] == 1.0
    assert table["mean"][5] == pytest.approx(2 / 3 * HD95_EMPTY)
    assert table["std"][5] == pytest.approx(HD95_EMPTY * math.sqrt(1 / 3))
    assert table["median"][5] == pytest.approx(HD95_EMPTY)

    payload = json.loads(report.json_path.read_text())
    assert payload["num_cases"] == 3 and payload["labels"] == "auto" and payload["hd95_empty"] == HD95_EMPTY
    assert payload["missing_predictions"] == ["SYN_0002"] and payload["errors"] == {}
    assert payload["cases"]["SYN_0001"]["labels"] == "nnunet"  # auto: flat nnU-Net naming, no label 4
    assert payload["cases"]["SYN_0001"]["Dice_ET"] == 0.0
    assert payload["cases"]["SYN_0002"]["status"] == "missing prediction"
    assert payload["aggregates"]["mean"]["Dice_WT"] == pytest.approx(2 / 3)
    assert not [p for p in pred_dir.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files


def test_markdown_table_has_one_row_per_region():
    agg = aggregate([dict.fromkeys(METRIC_COLUMNS, 0.5)])
    lines = aggregates_markdown(agg).splitlines()
    assert lines[0].startswith("| region | Dice mean |") and len(lines) == 5
    assert lines[2] == "| WT | 0.5000 | 0.0000 | 0.5000 | 0.50 | 0.00 | 0.50 |"


def test_brats_layout_reference_both_namings_and_anisotropic_spacing(tmp_path):
    # BraTS 2018 labels (ET 4) under HGG/ with _seg, BraTS 2023 labels under a -seg case folder; images are ignored.
    nn = nnunet_tumour()
    to_2018 = np.array([0, 2, 1, 4], dtype=np.uint8)[nn]
    to_2023 = np.array([0, 2, 1, 3], dtype=np.uint8)[nn]
    spacing_xyz = (1.0, 1.0, 2.0)  # numpy axis 0 (z) is 2 mm
    write_seg(tmp_path / "ref/HGG/Brats18_X_1/Brats18_X_1_seg.nii.gz", to_2018, spacing_xyz)
    write_seg(tmp_path / "ref/HGG/Brats18_X_1/Brats18_X_1_flair.nii.gz", nn, spacing_xyz)
    write_seg(tmp_path / "ref/BraTS-GLI-00001-000/BraTS-GLI-00001-000-seg.nii.gz", to_2023, spacing_xyz)
    write_seg(tmp_path / "ref/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2f.nii.gz", nn, spacing_xyz)
    # Predictions: the same tumour one slice further along z, in each case's own convention.
    write_seg(tmp_path / "pred/Brats18_X_1.nii.gz", np.roll(to_2018, 1, axis=0), spacing_xyz)
    write_seg(tmp_path / "pred/BraTS-GLI-00001-000.nii.gz", np.roll(to_2023, 1, axis=0), spacing_xyz)
    write_seg(tmp_path / "pred/stray.nii.gz", nn, spacing_xyz)
    report = evaluate(tmp_path / "ref", tmp_path / "pred", progress=False, output=tmp_path / "out/m.csv")
    assert report.json_path == tmp_path / "out/m.json"
    assert [p.name for p in report.ignored_predictions] == ["stray.nii.gz"]
    assert report.cases["Brats18_X_1"]["labels"] == "brats2018"
    assert report.cases["BraTS-GLI-00001-000"]["labels"] == "brats2023"
    for case in ("Brats18_X_1", "BraTS-GLI-00001-000"):
        s = report.scores[case]
        # WT 6^3 shifted one slice: overlap 5/6 -> Dice 5/6; the outer faces are one 2 mm slice apart (see the cube
        # test: the 95th percentile is the shift along the shifted axis).
        assert s["Dice_WT"] == pytest.approx(5 / 6)
        assert s["HD95_WT"] == pytest.approx(2.0)
        assert s["Dice_ET"] == pytest.approx(0.5)  # 2^3 block shifted by 1 of 2 slices


def test_pairing_takes_flat_names_that_look_like_image_channels_and_rejects_duplicates(tmp_path):
    write_seg(tmp_path / "ref/SYN_0000.nii.gz", nnunet_tumour())
    write_seg(tmp_path / "ref/case_flair.nii.gz", nnunet_tumour())  # a BraTS image, not a reference
    refs = find_references(tmp_path / "ref")
    assert list(refs) == ["SYN_0000"] and refs["SYN_0000"].nnunet_naming
    write_seg(tmp_path / "ref/SYN_0000.nii", nnunet_tumour())
    with pytest.raises(NnalignError, match="SYN_0000"):
        find_references(tmp_path / "ref")


def test_pairing_single_files_and_no_match(tmp_path):
    ref = write_seg(tmp_path / "ref/A.nii.gz", nnunet_tumour())
    pred = write_seg(tmp_path / "pred/other_name.nii.gz", nnunet_tumour())
    pairs = pair_cases(ref, pred)  # two files pair whatever their names
    assert [(r.case_id, p) for r, p in pairs.pairs] == [("A", pred)]
    with pytest.raises(NnalignError, match="no prediction matches"):
        pair_cases(tmp_path / "ref", tmp_path / "pred")


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def run_cli(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_help_imports_neither_numpy_nor_torch():
    code = ("import sys; sys.argv = ['nnalign_evaluate', '--help']\n"
            "from nnalign.cli import evaluate\n"
            "try:\n    evaluate.build_parser().parse_args()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('numpy', 'torch', 'nnunetv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("[]"), out.stdout + out.stderr


@pytest.mark.slow
def test_cli_success_with_missing_prediction_warning(flat_dataset, tmp_path):
    ref_dir, pred_dir = flat_dataset
    out = run_cli("-r", ref_dir, "-p", pred_dir, "-o", tmp_path / "metrics.csv", "--labels", "nnunet")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert "| WT |" in out.stdout and "3 cases (1 without prediction)" in out.stdout
    warning = [line for line in out.stderr.splitlines() if "no prediction" in line]
    assert len(warning) == 1 and "SYN_0002" in warning[0] and "373.13" in warning[0]
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "metrics.json").is_file()


@pytest.mark.slow
def test_cli_geometry_mismatch_and_unreadable_file_are_one_line_each_and_exit_1(flat_dataset):
    ref_dir, pred_dir = flat_dataset
    write_seg(pred_dir / "SYN_0002.nii.gz", nnunet_tumour(), spacing=(1.0, 1.0, 1.5))  # spacing differs
    (pred_dir / "SYN_0001.nii.gz").write_bytes(b"not a nifti")
    out = run_cli("-r", ref_dir, "-p", pred_dir)
    assert out.returncode == 1
    assert "Traceback" not in out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("nnalign_evaluate: error: case")]
    assert len(errors) == 2, out.stderr
    spacing_line = next(line for line in errors if "SYN_0002" in line)
    assert "spacing" in spacing_line
    assert str(pred_dir / "SYN_0002.nii.gz") in spacing_line and str(ref_dir / "SYN_0002.nii.gz") in spacing_line
    assert any("SYN_0001" in line and "cannot read" in line for line in errors)
    # The good case is still written, the bad ones are not in it.
    rows = read_csv(pred_dir / "metrics.csv")
    assert [r[0] for r in rows[1:]] == ["SYN_0000", "mean", "std", "median"]


@pytest.mark.slow
def test_cli_shape_mismatch_names_both_files(tmp_path):
    ref = write_seg(tmp_path / "ref/A.nii.gz", nnunet_tumour())
    pred = write_seg(tmp_path / "pred/A.nii.gz", np.zeros((12, 12, 11), dtype=np.uint8))
    out = run_cli("-r", tmp_path / "ref", "-p", tmp_path / "pred")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    line = next(line for line in out.stderr.splitlines() if "case A" in line)
    assert "shape" in line and str(ref) in line and str(pred) in line


@pytest.mark.slow
def test_cli_wrong_labels_and_bad_folder_are_one_line_errors(flat_dataset, tmp_path):
    ref_dir, pred_dir = flat_dataset
    out = run_cli("-r", ref_dir, "-p", pred_dir, "--labels", "brats2018")  # nnU-Net labels hold 3: nothing scored
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "[3] are not in the brats2018 convention" in out.stderr
    assert "nothing written" in out.stderr and not (pred_dir / "metrics.csv").exists()
    out = run_cli("-r", tmp_path / "nowhere", "-p", pred_dir)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and "no such file or folder" in out.stderr


def write_prediction_log(pred_dir: Path, labels: str) -> None:
    """nnalign_predict's log as it writes it: one entry per case with the label convention of its segmentation."""
    cases = [{"case": p.name[:-len(".nii.gz")], "status": "ok", "labels": labels} for p in pred_dir.glob("*.nii.gz")]
    (pred_dir / "nnalign_predict_log.json").write_text(json.dumps({"cases": cases}))


def test_a_prediction_written_in_another_convention_is_refused_not_scored(flat_dataset):
    # nnalign_predict's default writes the source convention (here brats2023: necrosis 1, edema 2) while labelsTs
    # references are nnU-Net's (edema 1, necrosis 2): read as nnunet, TC would be scored on edema + ET
    ref_dir, pred_dir = flat_dataset
    for path in pred_dir.glob("*.nii.gz"):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        write_seg(path, np.array([0, 2, 1, 3], dtype=np.uint8)[seg])  # edema <-> necrosis
    write_prediction_log(pred_dir, "brats2023")
    with pytest.raises(NnalignError, match=r"SYN_0000.nii.gz: nnalign_predict wrote it in the brats2023 label "
                                           r"convention .* read in nnunet \(detected from the labels\); run "
                                           r"nnalign_predict with --labels nnunet"):
        evaluate(ref_dir, pred_dir, progress=False)
    assert not (pred_dir / "metrics.csv").exists()
    out = run_cli("-r", ref_dir, "-p", pred_dir, "--labels", "nnunet")
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and "(as --labels says)" in out.stderr
    assert "Traceback" not in out.stderr and not (pred_dir / "metrics.csv").exists()


@pytest.mark.parametrize("logged", ["nnunet", "not-a-convention"])
def test_a_prediction_log_that_agrees_or_says_nothing_known_changes_nothing(flat_dataset, logged):
    ref_dir, pred_dir = flat_dataset
    write_prediction_log(pred_dir, logged)
    report = evaluate(ref_dir, pred_dir, progress=False)
    assert report.scores["SYN_0000"]["Dice_TC"] == 1.0 and report.scores["SYN_0001"]["Dice_ET"] == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# agreement with the official engine (opt-in: Panoptica is not a dependency)


def brats_data() -> Path:
    return Path(os.environ.get("NNALIGN_BRATS_DATA", Path(__file__).resolve().parents[2] / "shared/data/brats"))


# (release folder, case, segmentation file suffix, enhancing-tumour label)
AGREEMENT_CASES = (("BraTS2018", "Brats18_CBICA_AQN_1", "_seg", 4), ("BraTS2018", "Brats18_TCIA01_425_1", "_seg", 4),
                   ("BraTS2018", "Brats18_CBICA_ABM_1", "_seg", 4), ("BraTS2023", "BraTS-GLI-00000-000", "-seg", 3))


def perturbations(seg: np.ndarray, et_label: int) -> dict[str, np.ndarray]:
    """Plausible imperfect predictions of a BraTS label map (1 necrosis, 2 edema, ET 4 or 3): shifted, eroded,
    relabelled."""
    from scipy import ndimage

    shifted = np.zeros_like(seg)
    shifted[2:, :-1, 1:] = seg[:-2, 1:, :-1]
    eroded = seg.copy()
    eroded[~ndimage.binary_erosion(seg > 0, iterations=2)] = 0
    et = seg == et_label
    eroded[ndimage.binary_dilation(et, iterations=1) & (eroded > 0)] = et_label  # ET grows into the eroded tumour
    relabelled = seg.copy()
    half = np.zeros(seg.shape, dtype=bool)
    half[:, :, : int(np.median(np.nonzero(np.isin(seg, (1, et_label)))[2]))] = True  # split through the core
    relabelled[half & (seg == 1)] = 2  # necrosis called edema on one side: TC and ET differ, WT does not
    relabelled[half & (seg == et_label)] = 1  # and enhancing called necrosis there
    return {"shifted": shifted, "eroded": eroded, "relabelled": relabelled}


def panoptica_global_scores(pred_2023: np.ndarray, ref_2023: np.ndarray) -> dict[str, float]:
    """Global Dice and HD95 per region from Panoptica, set up like brats-evaluation's config_gli (labels 1/2/3)."""
    from panoptica import (ConnectedComponentsInstanceApproximator, InputType, MaxBipartiteMatching, Metric,
                           Panoptica_Evaluator)
    from panoptica.utils.edge_case_handling import EdgeCaseHandler, EdgeCaseResult, MetricZeroTPEdgeCaseHandling
    from panoptica.utils.label_group import LabelMergeGroup
    from panoptica.utils.segmentation_class import SegmentationClassGroups

    # As config_gli: no overlap gives DSC 0 and HD95 inf, nothing in either mask NaN (the parser maps inf to 373).
    edge_cases = EdgeCaseHandler({
        Metric.DSC: MetricZeroTPEdgeCaseHandling(no_instances_result=EdgeCaseResult.NAN,
                                                 default_result=EdgeCaseResult.ZERO),
        Metric.HD95: MetricZeroTPEdgeCaseHandling(no_instances_result=EdgeCaseResult.NAN,
                                                  default_result=EdgeCaseResult.INF)})
    evaluator = Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC, edge_case_handler=edge_cases,
        instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=MaxBipartiteMatching(matching_metric=Metric.DSC, matching_threshold=1e-6),
        segmentation_class_groups=SegmentationClassGroups({
            "wt": LabelMergeGroup([1, 2, 3]), "tc": LabelMergeGroup([1, 3]), "et": LabelMergeGroup([3])}),
        instance_metrics=[Metric.DSC], global_metrics=[Metric.DSC, Metric.HD95])
    results = evaluator.evaluate(pred_2023, ref_2023, verbose=False, log_times=False)
    out = {}
    for region in ("WT", "TC", "ET"):
        r = results[region.lower()]
        out[f"Dice_{region}"], out[f"HD95_{region}"] = float(r.global_bin_dsc), float(r.global_bin_hd95)
    return out


@pytest.mark.realdata
def test_agreement_with_panoptica_global_metrics_on_real_cases(tmp_path, capsys):
    pytest.importorskip("panoptica", reason="Panoptica (the brats-evaluation engine) is not installed")
    root = brats_data()
    seg_files = {case: root / release / case / f"{case}{suffix}.nii.gz" for release, case, suffix, _ in AGREEMENT_CASES}
    if not all(p.is_file() for p in seg_files.values()):
        pytest.skip(f"real BraTS cases not found under {root} (set NNALIGN_BRATS_DATA)")
    pred_dirs: dict[str, Path] = {}
    for _, case, _, et_label in AGREEMENT_CASES:
        image = sitk.ReadImage(str(seg_files[case]))
        seg = sitk.GetArrayFromImage(image).astype(np.uint8)
        for name, pred in perturbations(seg, et_label).items():
            out = sitk.GetImageFromArray(pred)
            out.CopyInformation(image)
            pred_dirs.setdefault(name, tmp_path / name).mkdir(exist_ok=True)
            sitk.WriteImage(out, str(tmp_path / name / f"{case}.nii.gz"))
    to_2023 = np.array([0, 1, 2, 3, 3], dtype=np.uint8)  # brats-evaluation expects ET = 3
    max_diff = dict.fromkeys(METRIC_COLUMNS, 0.0)
    compared = 0
    for name, pred_dir in pred_dirs.items():
        # The whole nnalign path: pairing (BraTS layout, both namings), reading, spacing, labels auto-detected
        # (brats2018 where label 4 occurs, brats2023 for the -seg case); the other references count as missing.
        report = evaluate(root, pred_dir, progress=False, output=tmp_path / f"{name}.csv")
        for _, case, _, _ in AGREEMENT_CASES:
            assert report.cases[case]["labels"] == ("brats2023" if case.startswith("BraTS-") else "brats2018")
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(seg_files[case]))).astype(np.uint8)
            pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / f"{case}.nii.gz")))
            official = panoptica_global_scores(to_2023[pred], to_2023[ref])
            ours = report.scores[case]
            for k in METRIC_COLUMNS:
                assert math.isfinite(official[k]), (name, case, k, official[k])  # overlapping masks: no edge case
                max_diff[k] = max(max_diff[k], abs(ours[k] - official[k]))
                compared += 1
    with capsys.disabled():
        print(f"\nagreement with Panoptica over {len(AGREEMENT_CASES)} cases x {len(pred_dirs)} perturbations: "
              "max |diff| " + ", ".join(f"{k} {v:.3g}" for k, v in max_diff.items()))
    assert compared == len(AGREEMENT_CASES) * len(pred_dirs) * len(METRIC_COLUMNS)
    for k, v in max_diff.items():
        assert v <= (1e-9 if k.startswith("Dice") else 1e-6), (k, v)
