"""nnU-Net's results layout: folder names, fold parsing and listing."""
from __future__ import annotations

import pytest

from nnalign.errors import NnalignError
from nnalign.model_folders import (FINAL_CHECKPOINT, PLANS_NAME, fold_folder, folds_in, model_folder, model_folder_parts,
                                    parse_fold)


@pytest.mark.parametrize("text, expected", [("0", 0), ("12", 12), (3, 3), ("all", "all")])
def test_parse_fold(text, expected):
    assert parse_fold(text) == expected


@pytest.mark.parametrize("text", ["-1", "x", "", None, "1.5"])
def test_parse_fold_rejects(text):
    with pytest.raises(NnalignError, match="fold"):
        parse_fold(text)


@pytest.mark.parametrize("name, parts", [
    ("nnAlignTeacher_mixture__nnAlignPlans__3d_cpu", ("nnAlignTeacher_mixture", "nnAlignPlans", "3d_cpu")),
    ("a__b", None), ("a__b__c__d", None), ("a____c", None), ("nnalign_report", None),
])
def test_model_folder_parts(tmp_path, name, parts):
    assert model_folder_parts(tmp_path / name) == parts


def test_folds_in_sorts_numbers_then_all_and_filters_by_file(tmp_path):
    for fold in ("10", "all", "2", "0"):
        (tmp_path / f"fold_{fold}").mkdir()
    (tmp_path / "fold_x").mkdir()
    (tmp_path / "fold_3").write_text("a file, not a fold")
    assert folds_in(tmp_path) == [0, 2, 10, "all"]
    (tmp_path / "fold_2" / "checkpoint_final.pth").write_text("")
    assert folds_in(tmp_path, "checkpoint_final.pth") == [2]
    assert folds_in(tmp_path / "missing") == []


def test_model_and_fold_folders_follow_nnunet_layout(tmp_path):
    folder = model_folder(tmp_path / "Dataset001_X", "nnAlignTeacher_none", "3d_cpu")
    assert folder == tmp_path / "Dataset001_X" / "nnAlignTeacher_none__nnAlignPlans__3d_cpu"
    assert model_folder_parts(folder) == ("nnAlignTeacher_none", PLANS_NAME, "3d_cpu")
    assert fold_folder(folder, 2) == folder / "fold_2" and fold_folder(folder, "all") == folder / "fold_all"
    for fold in (0, "all"):
        (fold_folder(folder, fold) / FINAL_CHECKPOINT).parent.mkdir(parents=True)
        (fold_folder(folder, fold) / FINAL_CHECKPOINT).touch()
    assert folds_in(folder, FINAL_CHECKPOINT) == [0, "all"]
