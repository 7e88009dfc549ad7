"""nnU-Net's results layout: folder names, fold parsing and listing, what a model folder holds, evaluations."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from nnalign.errors import NnalignError
from nnalign.model_folders import (FINAL_CHECKPOINT, NNUNET, ORIGINAL, PLANS_NAME, STUDENT, TEACHER,
                                    ModelFolder, evaluation_folder, fold_checkpoint, fold_folder, folds_in, kind_of,
                                    model_folder, model_folder_parts, parse_fold)
from nnalign.runs import StudentSpec, TeacherSpec


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


@pytest.mark.parametrize("trainer, kind, anchor", [
    ("nnAlignTeacher_mixture", TEACHER, "mixture"),
    ("nnAlignOriginal_drop0p25", ORIGINAL, "original"),
    (StudentSpec(("T1ce",), "pmkl", TeacherSpec("normal")).trainer_name(), STUDENT, "normal"),
    ("nnUNetTrainer", NNUNET, None),
])
def test_a_model_folder_is_classified_by_its_trainer_name(tmp_path, trainer, kind, anchor):
    folder = model_folder(tmp_path, trainer, "3d_cpu")
    found = ModelFolder.read(folder)
    assert (found.folder, found.trainer, found.plans, found.configuration) == (folder, trainer, PLANS_NAME, "3d_cpu")
    assert (found.name, found.kind, found.anchor) == (folder.name, kind, anchor)
    assert found.teacher == (found.spec.teacher if kind == STUDENT else found.spec)


def test_model_folder_read_refuses_what_is_not_one(tmp_path):
    assert ModelFolder.read(tmp_path / "nnalign_evaluations") is None
    with pytest.raises(ValueError, match="nnAlignTeacher_nosuchanchor"):
        ModelFolder.read(tmp_path / "nnAlignTeacher_nosuchanchor__nnAlignPlans__3d_cpu")


def test_kind_of_reads_the_baseline_flag_of_any_teacher_spec():
    assert kind_of(SimpleNamespace(is_original=True)) == ORIGINAL
    assert kind_of(SimpleNamespace()) == TEACHER  # a teacher spec without the flag
    assert kind_of(None) == NNUNET


def test_model_folder_lists_folds_and_finds_checkpoints(tmp_path):
    found = ModelFolder.read(model_folder(tmp_path, "nnAlignTeacher_none", "3d_cpu"))
    for fold, name in ((1, "checkpoint_best.pth"), (0, "checkpoint_latest.pth"), (0, FINAL_CHECKPOINT)):
        (fold_folder(found.folder, fold) / name).parent.mkdir(parents=True, exist_ok=True)
        (fold_folder(found.folder, fold) / name).touch()
    fold_folder(found.folder, 2).mkdir()
    assert found.list_folds() == [0, 1, 2] and found.list_folds(FINAL_CHECKPOINT) == [0]
    assert fold_checkpoint(fold_folder(found.folder, 0)).name == FINAL_CHECKPOINT
    assert fold_checkpoint(fold_folder(found.folder, 1)).name == "checkpoint_best.pth"
    assert fold_checkpoint(fold_folder(found.folder, 2)) is None


def test_evaluations_have_a_folder_per_model_and_subset(tmp_path):
    folder = evaluation_folder(tmp_path / "Dataset001_X", "M__nnAlignPlans__3d_cpu", ("T2", "T1ce"))
    assert folder == tmp_path / "Dataset001_X" / "nnalign_evaluations" / "M__nnAlignPlans__3d_cpu" / "T1ce-T2"
