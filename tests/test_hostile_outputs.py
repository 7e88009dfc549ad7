"""Hostile outputs and geometry, round two: ``nnalign_report -o`` that cannot be written, ``nnalign_evaluate`` on a
full disk (the CSV/JSON pair stays a pair), and predictions whose voxel grid is shifted, flipped or permuted against
the reference. Each failure is one line naming the file; nothing half-written is left behind.

Read-only and full folders are tmpfs mounts where the tests run as root (skipped where nothing can be mounted).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnalign.errors import NnalignError

SHAPE = (8, 9, 10)  # numpy (z, y, x); no two axes alike, so a wrong transpose cannot pass


def tumour() -> np.ndarray:
    """An asymmetric BraTS 2018 tumour (edema 2 around necrosis 1 and enhancing 4), off-centre on every axis."""
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[1:6, 1:5, 1:7] = 2
    seg[2:5, 2:4, 2:4] = 1
    seg[2:4, 2:3, 4:6] = 4
    return seg


def write_seg(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
              direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)) -> Path:
    """``array`` (numpy z, y, x) as a label map with SimpleITK's spacing, origin and direction (x, y, z)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# nnalign_report -o


def fake_results(base: Path, monkeypatch) -> Path:
    """A results folder holding one validated mixture teacher (nnU-Net's folder variables set under ``base``)."""
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        monkeypatch.setenv(var, str(base / sub))
    results = base / "res" / "Dataset991_Fake"
    write_seg(base / "pre" / results.name / "gt_segmentations" / "C0.nii.gz", tumour())
    model = results / "nnAlignTeacher_mixture__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
                                                    "labels": {}}))
    seg = tumour()
    write_seg(model / "fold_0" / "validation" / "C0.nii.gz", np.select([seg == 2, seg == 1, seg == 4], [1, 2, 3]))
    return results


def test_report_into_a_read_only_folder_or_onto_a_file_is_one_line(tmp_path, monkeypatch, read_only):
    from nnalign.reporting.report import build_report

    results = fake_results(tmp_path, monkeypatch)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(NnalignError, match=f"^{a_file}: cannot write the report there .*(exists|not a directory)"):
        build_report(results, output=a_file, tsne=False)
    assert a_file.read_text() == "keep me"
    with read_only(tmp_path / "ro") as folder:
        for out in (folder, folder / "sub"):
            with pytest.raises(NnalignError, match=f"^{out}: cannot write the report there"):
                build_report(results, output=out, tsne=False)
        assert not any(folder.iterdir())


@pytest.mark.slow
def test_report_cli_onto_a_file_is_one_line_exit_1(tmp_path, monkeypatch, run_module, assert_one_line_error):
    results = fake_results(tmp_path, monkeypatch)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    proc = run_module("report", results, "-o", a_file, "--no-tsne")
    assert_one_line_error(proc, str(a_file), "cannot write the report", prog="nnalign_report")
    assert a_file.read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------------------------
# nnalign_evaluate on a full disk


def test_full_disk_leaves_the_old_csv_json_pair_together(tmp_path, tmpfs, fill_up):
    from nnalign.evaluation.evaluate import evaluate

    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for i in range(20):  # enough cases for a JSON of several pages and a CSV of one
        write_seg(ref / f"CASE_WITH_A_LONG_NAME_{i:04d}.nii.gz", tumour())
        write_seg(pred / f"CASE_WITH_A_LONG_NAME_{i:04d}.nii.gz", tumour())
    sizes = evaluate(ref, pred, labels="brats2018", output=tmp_path / "sizes.csv", progress=False)
    csv_pages = -(-sizes.csv_path.stat().st_size // 4096)
    assert sizes.json_path.stat().st_size > 4096 * (csv_pages + 1)  # the JSON cannot fit where the CSV did
    with tmpfs(tmp_path / "out", size_kib=512) as out:
        (out / "m.csv").write_text("old csv\n")
        (out / "m.json").write_text('{"old": true}\n')
        fill_up(out)
        os.truncate(out / "filler", (out / "filler").stat().st_size - 4096 * csv_pages)  # room for the CSV only
        with pytest.raises(NnalignError, match=f"^{out}: cannot write the metrics .*No space left"):
            evaluate(ref, pred, labels="brats2018", output=out / "m.csv", progress=False)
        assert (out / "m.csv").read_text() == "old csv\n"
        assert (out / "m.json").read_text() == '{"old": true}\n'
        assert sorted(p.name for p in out.iterdir()) == ["filler", "m.csv", "m.json"]


# ----------------------------------------------------------------------------------------------------------------------
# nnalign_evaluate: geometry of prediction and reference


FLIP_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
SWAP_XY = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
SPACING = (0.8, 1.0, 1.5)  # x, y, z


def test_a_shifted_prediction_is_refused_naming_both_files(tmp_path):
    from nnalign.evaluation.evaluate import evaluate

    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for case in ("A", "B"):
        write_seg(ref / f"{case}.nii.gz", tumour(), spacing=SPACING)
    write_seg(pred / "A.nii.gz", tumour(), spacing=SPACING)
    shifted = write_seg(pred / "B.nii.gz", tumour(), spacing=SPACING, origin=(100.0, 0.0, 0.0))
    report = evaluate(ref, pred, labels="brats2018", progress=False)
    assert list(report.scores) == ["A"] and report.scores["A"]["Dice_WT"] == 1.0
    line = report.errors["B"]
    assert "\n" not in line and str(shifted) in line and str(ref / "B.nii.gz") in line
    assert "origin" in line and "100" in line
    # a shift below half a voxel is the same grid (header rounding), scored as such
    write_seg(pred / "B.nii.gz", tumour(), spacing=SPACING, origin=(0.3, 0.0, 0.0))
    report = evaluate(ref, pred, labels="brats2018", progress=False)
    assert not report.errors and report.scores["B"]["Dice_WT"] == 1.0


def test_a_flipped_or_permuted_but_physically_identical_prediction_scores_one(tmp_path):
    from nnalign.evaluation.evaluate import evaluate

    ref, pred = tmp_path / "ref", tmp_path / "pred"
    seg = tumour()
    for case in ("FLIP", "SWAP"):
        write_seg(ref / f"{case}.nii.gz", seg, spacing=SPACING)
    # x flipped: the array reversed along x, the direction's x axis negated, the origin at the other end
    write_seg(pred / "FLIP.nii.gz", seg[:, :, ::-1], spacing=SPACING, direction=FLIP_X,
              origin=((SHAPE[2] - 1) * SPACING[0], 0.0, 0.0))
    # x and y swapped: the array transposed, the direction's first two axes swapped, the spacing with them
    write_seg(pred / "SWAP.nii.gz", seg.transpose(0, 2, 1), spacing=(SPACING[1], SPACING[0], SPACING[2]),
              direction=SWAP_XY)
    report = evaluate(ref, pred, labels="brats2018", progress=False)
    assert not report.errors, report.errors
    for case in ("FLIP", "SWAP"):
        assert [report.scores[case][f"Dice_{r}"] for r in ("WT", "TC", "ET")] == [1.0, 1.0, 1.0], case


def test_a_flipped_prediction_whose_array_was_not_flipped_is_scored_as_what_it_shows(tmp_path):
    """Direction flipped but the array not: physically the tumour is mirrored, so it is not a perfect score."""
    from nnalign.evaluation.evaluate import evaluate

    ref, pred = tmp_path / "ref", tmp_path / "pred"
    write_seg(ref / "A.nii.gz", tumour())
    write_seg(pred / "A.nii.gz", tumour(), direction=FLIP_X, origin=(SHAPE[2] - 1.0, 0.0, 0.0))
    report = evaluate(ref, pred, labels="brats2018", progress=False)
    assert report.scores["A"]["Dice_WT"] < 0.9


def test_a_prediction_on_another_grid_is_refused(tmp_path):
    from nnalign.evaluation.evaluate import evaluate

    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for case in ("A", "OBLIQUE"):
        write_seg(ref / f"{case}.nii.gz", tumour())
    write_seg(pred / "A.nii.gz", tumour())
    c, s = np.cos(0.3), np.sin(0.3)
    write_seg(pred / "OBLIQUE.nii.gz", tumour(), direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    report = evaluate(ref, pred, labels="brats2018", progress=False)
    line = report.errors["OBLIQUE"]
    assert "direction" in line and str(pred / "OBLIQUE.nii.gz") in line and str(ref / "OBLIQUE.nii.gz") in line
