"""Hostile and careless input around trained models: crafted and broken checkpoints met by nnalign_predict,
nnalign_train --c, a student's teacher and nnalign_report; bad images and unwritable or full output folders in
nnalign_predict; folds outside the split; failed starts; trainings killed at a random step and continued with --c.

One module-scoped synthetic dataset (3 cases of 40^3, 3d_cpu, a 3-fold split) with a mixture teacher and a KD-Net
student trained for 1 epoch x 2 iterations. Tests that change a model work on a copy of the results folder.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nnalign.runs import StudentSpec, TeacherSpec

pytestmark = pytest.mark.slow

DATASET_ID = 963
DATASET = "Dataset963_SyntheticBraTS"
CONFIG = "3d_cpu"
TEACHER = f"{TeacherSpec('mixture').trainer_name()}__nnAlignPlans__{CONFIG}"
STUDENT_ARGS = ("--role", "student", "--modalities", "T1ce", "--kd", "kdnet")
STUDENT_PREFIX = StudentSpec(("T1ce",), "kdnet", TeacherSpec("mixture")).trainer_name()
SHORT = ("-device", "cpu", "--epochs", "1", "--iters-per-epoch", "2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, plan_synthetic, run_train) -> Path:
    """The data root: raw/, pre/ and results/ holding the teacher and a student, both finished."""
    root = plan_synthetic(tmp_path_factory.mktemp("hostile"), DATASET_ID, num_cases=3, shape=(40, 40, 40))
    proc = run_train(root, root / "results", str(DATASET_ID), CONFIG, "0", "--anchor", "mixture", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    teacher = root / "results" / DATASET / TEACHER
    proc = run_train(root, root / "results", str(DATASET_ID), CONFIG, "0", *STUDENT_ARGS, "--teacher", str(teacher),
                     *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture
def results(trained, tmp_path) -> Path:
    """A copy of the trained results folder, for a test to damage."""
    copy = tmp_path / "results"
    shutil.copytree(trained / "results", copy)
    return copy


def teacher_checkpoint(results: Path) -> Path:
    return results / DATASET / TEACHER / "fold_0" / "checkpoint_final.pth"


def student_folders(results: Path) -> list[Path]:
    return sorted((results / DATASET).glob(f"{STUDENT_PREFIX}*"))


def case_files(trained: Path, folder: Path, case: str = "SYN_0000", name: str | None = None) -> Path:
    """Copy a training case's four nnU-Net-named images into ``folder`` (as case ``name``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for src in (trained / "raw" / DATASET / "imagesTr").glob(f"{case}_000?.nii.gz"):
        shutil.copyfile(src, folder / src.name.replace(case, name or case))
    return folder


@pytest.fixture
def student(run_train):
    """``nnalign_train`` of the module's student from its teacher, with more flags."""
    def train(trained: Path, results: Path, *more: str) -> subprocess.CompletedProcess:
        teacher = results / DATASET / TEACHER
        return run_train(trained, results, str(DATASET_ID), CONFIG, "0", *STUDENT_ARGS, "--teacher", str(teacher),
                         "-device", "cpu", *more)
    return train


# ----------------------------------------------------------------------------------------------------------------------
# real checkpoints load weights-only


def test_every_checkpoint_training_writes_loads_with_the_allow_list(trained):
    from nnalign.checkpoints import load_checkpoint_safely

    paths = sorted((trained / "results").rglob("*.pth"))
    names = {p.name for p in paths}
    assert {"checkpoint_final.pth", "checkpoint_best.pth", "nnalign_kd_state.pth"} <= names, names
    for path in paths:
        assert isinstance(load_checkpoint_safely(path), dict), path


# ----------------------------------------------------------------------------------------------------------------------
# a crafted checkpoint runs no code


def test_predict_refuses_a_crafted_checkpoint(trained, results, tmp_path, write_crafted_checkpoint, run_module,
                                              error_lines):
    marker = tmp_path / "created_by_the_checkpoint"
    path = teacher_checkpoint(results)
    write_crafted_checkpoint(path, marker, like=path)
    out = tmp_path / "out"
    proc = run_module("predict", "-i", case_files(trained, tmp_path / "in"), "-o", out, "-m", results / DATASET,
                      "--modalities", "T1,T1ce,T2,FLAIR", "-device", "cpu", "--disable-tta")
    lines = error_lines(proc, "nnalign_predict")
    assert any(f"{path}: refused: it holds io.open" in line for line in lines), lines
    assert not marker.exists()
    assert not list(out.glob("*.nii.gz"))


def test_train_continue_refuses_a_crafted_checkpoint_and_keeps_the_run(trained, results, tmp_path, run_train,
                                                                        write_crafted_checkpoint,
                                                                        assert_one_line_error):
    marker = tmp_path / "created_by_the_checkpoint"
    path = teacher_checkpoint(results)
    write_crafted_checkpoint(path, marker, like=path)
    proc = run_train(trained, results, str(DATASET_ID), CONFIG, "0", "--anchor", "mixture", "--c", "--epochs", "2",
                     "-device", "cpu")
    assert_one_line_error(proc, f"{path}: refused: it holds io.open")
    assert not marker.exists() and path.is_file()


@pytest.mark.parametrize("damage, reason", [("truncate", "not a readable checkpoint (truncated or corrupt"),
                                            ("empty", "empty file, not a checkpoint")])
def test_train_continue_with_a_broken_checkpoint_is_one_line(trained, results, damage, reason, run_train,
                                                              assert_one_line_error):
    path = teacher_checkpoint(results)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"")
    proc = run_train(trained, results, str(DATASET_ID), CONFIG, "0", "--anchor", "mixture", "--c", "--epochs", "2",
                     "-device", "cpu")
    assert_one_line_error(proc, str(path), reason)


def test_a_student_refuses_a_crafted_teacher_and_leaves_no_run_folder(trained, results, tmp_path, student,
                                                                      write_crafted_checkpoint, assert_one_line_error):
    for folder in student_folders(results):
        shutil.rmtree(folder)
    marker = tmp_path / "created_by_the_checkpoint"
    path = teacher_checkpoint(results)
    write_crafted_checkpoint(path, marker, like=path)
    assert_one_line_error(student(trained, results, "--epochs", "1", "--iters-per-epoch", "1"),
                          f"{path}: refused: it holds io.open")
    assert not marker.exists() and not student_folders(results)


def test_a_truncated_teacher_is_one_line_and_leaves_no_run_folder(trained, results, student, assert_one_line_error):
    for folder in student_folders(results):
        shutil.rmtree(folder)
    path = teacher_checkpoint(results)
    path.write_bytes(path.read_bytes()[:1000])
    assert_one_line_error(student(trained, results, "--epochs", "1"), str(path), "truncated or corrupt")
    assert not student_folders(results)


def report(run_module, trained: Path, results: Path, out: Path) -> subprocess.CompletedProcess:
    """``nnalign_report`` of ``results`` into ``out``, which must succeed without a traceback."""
    proc = run_module("report", results / DATASET, "-o", out,
                      env={"nnUNet_preprocessed": str(trained / "pre"), "nnUNet_results": str(results),
                           "nnUNet_raw": str(trained / "raw")})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def test_report_refuses_a_crafted_checkpoint(trained, results, tmp_path, write_crafted_checkpoint, run_module):
    marker = tmp_path / "created_by_the_checkpoint"
    path = teacher_checkpoint(results)
    write_crafted_checkpoint(path, marker, like=path)
    out = tmp_path / "report"
    proc = report(run_module, trained, results, out)
    assert not marker.exists()
    notes = [line for line in proc.stderr.splitlines() if "refused" in line]
    assert notes and all("it holds io.open" in line and "checkpoint_final.pth" in line for line in notes), \
        proc.stderr
    assert "checkpoint_final.pth: refused: it holds io.open" in (out / "report.md").read_text()


# ----------------------------------------------------------------------------------------------------------------------
# a plans file runs no code (nnalign.plans_check)


def plant_command(plans_file: Path, marker: Path) -> None:
    """Make the module's configuration in ``plans_file`` build its dropout layers with ``os.system("touch MARKER")``."""
    plans = json.loads(plans_file.read_text())
    plans["configurations"][CONFIG]["architecture"]["arch_kwargs"].update(
        dropout_op="os.system", dropout_op_kwargs={"command": f"touch {marker}"})
    plans_file.write_text(json.dumps(plans))


def test_the_plans_nnalign_writes_pass_the_allow_list(trained):
    from nnalign.plans_check import check_model_folder, read_checked_plans

    read_checked_plans(trained / "pre" / DATASET / "nnAlignPlans.json")
    folders = [trained / "results" / DATASET / TEACHER, *student_folders(trained / "results")]
    assert len(folders) == 2
    for folder in folders:
        check_model_folder(folder)


def test_predict_refuses_plans_that_name_a_command(trained, results, tmp_path, run_module, error_lines):
    marker = tmp_path / "created_by_the_plans"
    for folder in [results / DATASET / TEACHER, *student_folders(results)]:
        plant_command(folder / "plans.json", marker)
    out = tmp_path / "out"
    proc = run_module("predict", "-i", case_files(trained, tmp_path / "in"), "-o", out, "-m", results / DATASET,
                      "-device", "cpu", "--disable-tta")
    lines = error_lines(proc, "nnalign_predict")
    # (the line shortens the long temporary path in its middle)
    assert any("refused: dropout_op 'os.system' (configuration 3d_cpu) is not a torch.nn layer" in line
               for line in lines), lines
    assert not marker.exists()
    assert not list(out.glob("*.nii.gz"))


def test_report_refuses_plans_that_name_a_command(trained, results, tmp_path, run_module):
    marker = tmp_path / "created_by_the_plans"
    plant_command(results / DATASET / TEACHER / "plans.json", marker)
    out = tmp_path / "report"
    report(run_module, trained, results, out)
    assert not marker.exists()
    assert "plans.json: refused: dropout_op 'os.system' (configuration 3d_cpu)" in (out / "report.md").read_text()


@pytest.mark.parametrize("run", ["teacher", "teacher --c", "student"])
def test_train_refuses_plans_that_name_a_command_and_writes_nothing(trained, results, tmp_path, run, run_train,
                                                                    assert_one_line_error):
    root = tmp_path / "data"
    root.mkdir()
    (root / "raw").symlink_to(trained / "raw")
    shutil.copytree(trained / "pre", root / "pre")
    plans_file = root / "pre" / DATASET / "nnAlignPlans.json"
    marker = tmp_path / "created_by_the_plans"
    plant_command(plans_file, marker)
    teacher = results / DATASET / TEACHER
    for folder in student_folders(results):
        shutil.rmtree(folder)
    if run == "teacher":
        shutil.rmtree(teacher)
    before = sorted(p.relative_to(results) for p in results.rglob("*"))
    args = {"teacher": ("--anchor", "mixture"), "teacher --c": ("--anchor", "mixture", "--c"),
            "student": (*STUDENT_ARGS, "--teacher", str(teacher))}[run]
    proc = run_train(root, results, str(DATASET_ID), CONFIG, "0", *args, *SHORT)
    assert_one_line_error(proc, f"{plans_file}: refused: dropout_op 'os.system' (configuration 3d_cpu)")
    assert not marker.exists()
    assert sorted(p.relative_to(results) for p in results.rglob("*")) == before


# ----------------------------------------------------------------------------------------------------------------------
# nnalign_train: checks before anything is written


def test_a_fold_outside_the_split_trains_nothing(trained, tmp_path, run_train, assert_one_line_error):
    results = tmp_path / "results"
    assert_one_line_error(run_train(trained, results, str(DATASET_ID), CONFIG, "7", "--anchor", "none", *SHORT),
                          "fold 7 is not in", "splits_final.json (its folds: 0-2; or 'all')")
    assert not results.exists()


def test_a_bad_temperature_leaves_no_run_folder(trained, results, student, assert_one_line_error):
    for folder in student_folders(results):
        shutil.rmtree(folder)
    assert_one_line_error(student(trained, results, "--temperature", "-1", "--epochs", "1"),
                          "temperature must be a finite number > 0")
    assert not student_folders(results)


def test_a_start_that_fails_inside_training_removes_what_it_created(tmp_path):
    from nnalign.cli.train import remove_failed_start

    model, fold = tmp_path / "T__P__C", tmp_path / "T__P__C" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "training_log.txt").write_text("started")
    (model / "plans.json").write_text("{}")
    remove_failed_start([model, fold])
    assert not model.exists()
    fold.mkdir(parents=True)
    (fold / "checkpoint_best.pth").write_bytes(b"x")
    remove_failed_start([model, fold])  # got as far as a checkpoint: kept for --c
    assert (fold / "checkpoint_best.pth").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# nnalign_predict: bad images, unwritable and full output


@pytest.fixture
def predict(run_module):
    """``predict(trained, source, out, *more)``: ``nnalign_predict`` with the module's teacher, on CPU, no TTA."""
    def run(trained: Path, source: Path, out: Path, *more) -> subprocess.CompletedProcess:
        return run_module("predict", "-i", source, "-o", out, "-m", trained / "results" / DATASET / TEACHER,
                          "-device", "cpu", "--disable-tta", *more)
    return run


def test_nan_blank_and_4d_images_are_failed_cases_naming_the_file(trained, tmp_path, predict, write_image,
                                                                  error_lines):
    import SimpleITK as sitk

    source = tmp_path / "in"
    case_files(trained, source / "GOOD", name="GOOD")
    nan = case_files(trained, source / "NAN", name="NAN")
    image = sitk.ReadImage(str(nan / "NAN_0001.nii.gz"), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[5, 5, 5] = np.nan
    write_image(nan / "NAN_0001.nii.gz", array)
    blank = case_files(trained, source / "BLANK", name="BLANK")
    write_image(blank / "BLANK_0002.nii.gz", np.zeros_like(array))
    fourd = case_files(trained, source / "FOURD", name="FOURD")
    write_image(fourd / "FOURD_0000.nii.gz", np.stack([array, array]))
    out = tmp_path / "out"
    lines = error_lines(predict(trained, source, out), "nnalign_predict")
    expected = ["NAN: NAN_0001.nii.gz: 1 NaN or infinite voxel", "BLANK: no signal in BLANK_0002.nii.gz (every voxel "
                "is 0)", "FOURD: FOURD_0000.nii.gz: expected a 3D scalar image, got a 4D image"]
    assert len(lines) == 3 and all(any(e in line for line in lines) for e in expected), lines
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["GOOD.nii.gz"]
    log = json.loads((out / "nnalign_predict_log.json").read_text())
    assert {c["case"]: c["status"] for c in log["cases"]} == {"GOOD": "ok", "NAN": "failed", "BLANK": "failed",
                                                              "FOURD": "failed"}


def test_read_only_output_is_one_line(trained, tmp_path, predict, read_only, assert_one_line_error):
    source = tmp_path / "in"
    case_files(trained, source / "ONE", name="ONE")
    first = tmp_path / "first"
    assert predict(trained, source, first).returncode == 0
    case_files(trained, source / "TWO", case="SYN_0001", name="TWO")
    with read_only(tmp_path / "ro", fill_from=first) as out:
        assert_one_line_error(predict(trained, source, out), str(out), "cannot write predictions there",
                              prog="nnalign_predict")


def test_a_full_output_folder_is_one_line_and_no_partial_file(trained, tmp_path, predict, tmpfs, fill_up,
                                                              assert_one_line_error):
    source = case_files(trained, tmp_path / "in" / "ONE", name="ONE").parent
    with tmpfs(tmp_path / "out", size_kib=64) as out:
        fill_up(out)  # so that the segmentation is what does not fit
        line = assert_one_line_error(predict(trained, source, out), prog="nnalign_predict")
        assert "cannot write" in line and ("No space left on device" in line or "ONE.nii.gz" in line), line
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
        for path in out.glob("*.nii.gz"):  # whatever has its final name is whole (it may fit where the log did not)
            assert_whole_image(path)


def assert_whole_image(path: Path) -> None:
    import SimpleITK as sitk

    from nnalign.data.case_checks import voxel_problem

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    assert voxel_problem(path, reader) is None, path


def test_a_full_disk_during_conversion_is_one_line(tmp_path, write_brats_case, tmpfs, fill_up, convert,
                                                  assert_one_line_error):
    """Conversion on a full disk (the in-process part of this check is in test_hostile_input.py)."""
    source = tmp_path / "release"
    write_brats_case(source, "Brats18_ONE_1")
    with tmpfs(tmp_path / "raw", size_kib=64) as raw:
        fill_up(raw)
        line = assert_one_line_error(convert(raw, source, "-np", 1), "cannot write", "nothing was converted",
                                     prog="nnalign_convert_brats")
        assert "No space left on device" in line or "is the disk full?" in line, line
        assert sorted(p.name for p in raw.iterdir()) == ["filler"]


# ----------------------------------------------------------------------------------------------------------------------
# fault injection: a training killed at a random step, continued with --c


def _kill_at_random_epoch(cmd_root: Path, results: Path, fold_dir: Path, args: list[str], seed: int) -> int:
    """Start ``nnalign_train ARGS``, SIGKILL it once its log reaches a random epoch (after a best checkpoint
    exists), and return that epoch."""
    env = {**os.environ, "nnUNet_raw": str(cmd_root / "raw"), "nnUNet_preprocessed": str(cmd_root / "pre"),
           "nnUNet_results": str(results), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "f"}
    for var in ("NNALIGN_DEBUG", "nnUNet_extTrainer"):
        env.pop(var, None)
    target = random.Random(seed).randint(3, 12)
    proc = subprocess.Popen([sys.executable, "-m", "nnalign.cli.train", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            logs = sorted(fold_dir.glob("training_log_*.txt"))
            text = logs[-1].read_text() if logs else ""
            if f"Epoch {target} " in text and (fold_dir / "checkpoint_best.pth").is_file():
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"training ended before epoch {target} (exit {proc.returncode})"
    assert not (fold_dir / "checkpoint_final.pth").exists()
    return target


def _check_continued(fold_dir: Path, epochs: int, killed_at: int) -> None:
    from nnalign.checkpoints import load_checkpoint_safely

    final = load_checkpoint_safely(fold_dir / "checkpoint_final.pth")
    assert final["current_epoch"] == epochs and len(final["logging"]["train_losses"]) == epochs
    record = json.loads((fold_dir / "nnalign_settings.json").read_text())
    assert record["epochs"] == epochs and record["epochs_completed"] == epochs
    logs = sorted(fold_dir.glob("training_log_*.txt"))
    assert len(logs) == 2, logs
    first_epoch = next(int(line.split("Epoch ")[1]) for line in logs[1].read_text().splitlines()
                       if "Epoch " in line and "time" not in line)
    assert 0 < first_epoch <= killed_at, first_epoch  # the continuation starts from the checkpoint, not from 0
    assert f"Epoch {epochs - 1} " in logs[1].read_text()


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_a_training_killed_at_a_random_step_continues_with_c(trained, tmp_path, role, run_train):
    results = tmp_path / "results"
    shutil.copytree(trained / "results" / DATASET / TEACHER, results / DATASET / TEACHER)
    epochs = 20
    if role == "teacher":
        args = [str(DATASET_ID), CONFIG, "0", "--anchor", "mixture", "-device", "cpu"]
        fold_dir = results / DATASET / TEACHER / "fold_1"
        args[2] = "1"
    else:
        args = [str(DATASET_ID), CONFIG, "0", *STUDENT_ARGS, "--teacher", str(results / DATASET / TEACHER),
                "-device", "cpu"]
        fold_dir = results / DATASET / f"{STUDENT_PREFIX}__nnAlignPlans__3d_cpu" / "fold_0"
    killed_at = _kill_at_random_epoch(trained, results, fold_dir, [*args, "--epochs", str(epochs),
                                                                   "--iters-per-epoch", "2"], seed=len(role))
    proc = run_train(trained, results, *args, "--c")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_continued(fold_dir, epochs, killed_at)
