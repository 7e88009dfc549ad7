"""One rule for a model of another method version: nnalign_predict, nnalign_train --c / --val, a student's --teacher
and nnalign_report refuse it with one line that names its version, what changed since, and what to do; a model of
this version is used as before."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nnalign.training.record import METHOD_VERSION, SETTINGS_RECORD, is_current_method

DATASET_ID = 981
DATASET = "Dataset981_SyntheticBraTS"
CONFIG = "3d_cpu"
TEACHER = f"nnAlignTeacher_mixture__nnAlignPlans__{CONFIG}"  # P* without modality dropout: a name of every version


def _student(teacher: str) -> dict:
    return {"role": "student", "kd": "pmkl", "teacher": {"trainer": teacher}}


@pytest.mark.parametrize("record, current", [
    ({"method_version": METHOD_VERSION, "settings": {"anchor": "mixture"}}, True),
    ({"method_version": METHOD_VERSION, "role": "teacher", "anchor": "original"}, True),
    ({"method_version": METHOD_VERSION - 1, "role": "teacher", "anchor": "none"}, False),  # one rule: every model
    ({"method_version": 2, **_student("nnAlignTeacher_none_drop0p25")}, False),
    ({"method_version": METHOD_VERSION + 1, "role": "teacher", "anchor": "none"}, False),  # from a newer nnalign
    ({"role": "teacher", "anchor": "none"}, False),  # no key: version 1
])
def test_only_this_method_versions_runs_are_current(record, current):
    assert METHOD_VERSION == 5
    assert is_current_method(record) is current


@pytest.mark.parametrize("record, says", [
    ({"method_version": 3, "nnalign_version": "0.2.1", **_student("nnAlignTeacher_none"), "kd": "protokd"},
     "(method version 3; this nnalign trains version 5, which changed ProtoKD's logit-term weight; P* to the paper's "
     "form"),
    ({"method_version": 2, **_student("nnAlignTeacher_mixture"), "kd": "protokd"},
     "which changed P*'s weights (their floor) and KD-Net's loss; ProtoKD's logit-term weight; P* to the paper's "
     "form"),
    ({"method_version": 4, "nnalign_version": "0.2.2", "role": "teacher", "anchor": "original"},
     "(method version 4; this nnalign trains version 5, which changed P* to the paper's form"),
    ({"method_version": 4, "nnalign_version": "0.2.2", "role": "teacher", "anchor": "mixture"},
     "(method version 4; this nnalign trains version 5, which changed P* to the paper's form and the P^k and P* losses "
     "to plain MSE (the earlier P* is anchor mixture-scaled, the earlier loss --align-distance relative)"),
    ({"method_version": 9, "nnalign_version": "0.9.0", "role": "teacher", "anchor": "none"},
     "made by a newer nnalign 0.9.0 (method version 9; this nnalign, "),
])
def test_the_refusal_names_what_changed_since_the_run(record, says, tmp_path):
    from nnalign.errors import NnalignError
    from nnalign.training.record import check_method_version

    (tmp_path / SETTINGS_RECORD).write_text(json.dumps(record))
    with pytest.raises(NnalignError) as refused:
        check_method_version(tmp_path, "train it again")
    assert says in str(refused.value) and str(tmp_path) in str(refused.value)


@pytest.fixture(scope="module")
def old_and_new(tmp_path_factory, plan_synthetic, run_train):
    """A P* teacher trained for 1 epoch x 2 iterations, a copy whose settings record says nothing of its method
    version, as every record written before version 2, and a copy of method version 4, before P* became the paper's
    (each in its own results folder)."""
    root = plan_synthetic(tmp_path_factory.mktemp("version"), DATASET_ID, num_cases=3, shape=(40, 40, 40))
    new = root / "new"
    proc = run_train(root, new, str(DATASET_ID), CONFIG, "0", "--anchor", "mixture", "--modality-dropout", "0",
                     "--epochs", "1", "--iters-per-epoch", "2", "-device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((new / DATASET / TEACHER / "fold_0" / SETTINGS_RECORD).read_text())
    assert record["method_version"] == METHOD_VERSION
    v4 = root / "v4"
    shutil.copytree(new, v4)
    (v4 / DATASET / TEACHER / "fold_0" / SETTINGS_RECORD).write_text(json.dumps({**record, "method_version": 4}))
    old = root / "old"
    shutil.copytree(new, old)
    del record["method_version"]
    record["nnalign_version"] = "0.1.0"
    (old / DATASET / TEACHER / "fold_0" / SETTINGS_RECORD).write_text(json.dumps(record))
    images = root / "raw" / DATASET / "imagesTr"
    case = root / "case"
    case.mkdir()
    for image in images.glob("SYN_0000_*.nii.gz"):
        shutil.copyfile(image, case / image.name)
    return {"root": root, "old": old, "v4": v4, "new": new, "case": case}


def _command(module: str, *args: str, results: Path, root: Path) -> subprocess.CompletedProcess:
    environ = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
               "nnUNet_results": str(results), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
               "nnUNet_compile": "f"}
    environ.pop("NNALIGN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=environ,
                          timeout=600)


def _one_line(proc: subprocess.CompletedProcess, prog: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
    return lines[0]


@pytest.mark.slow
def test_predict_refuses_an_older_mixture_teacher_and_uses_this_versions(old_and_new, tmp_path):
    root, case = old_and_new["root"], old_and_new["case"]
    proc = _command("nnalign.cli.predict", "-i", str(case), "-o", str(tmp_path / "old_out"), "-m",
                    str(old_and_new["old"] / DATASET / TEACHER), "-device", "cpu", "--disable-tta",
                    results=old_and_new["old"], root=root)
    line = _one_line(proc, "nnalign_predict")
    assert "method version 1" in line and "fold_0" in line
    assert not any((tmp_path / "old_out").glob("*.nii.gz"))
    proc = _command("nnalign.cli.predict", "-i", str(case), "-o", str(tmp_path / "new_out"), "-m",
                    str(old_and_new["new"] / DATASET / TEACHER), "-device", "cpu", "--disable-tta",
                    results=old_and_new["new"], root=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "new_out" / "SYN_0000.nii.gz").is_file()


@pytest.mark.slow
def test_train_continue_and_validate_refuse_an_older_run(old_and_new, run_train):
    for flag in ("--c", "--val"):
        proc = run_train(old_and_new["root"], old_and_new["old"], str(DATASET_ID), CONFIG, "0", "--anchor",
                         "mixture", "--modality-dropout", "0", flag, "-device", "cpu")
        line = _one_line(proc, "nnalign_train")
        assert "method version 1" in line and "--overwrite" in line


@pytest.mark.slow
def test_report_refuses_a_results_folder_holding_an_older_run(old_and_new, tmp_path):
    proc = _command("nnalign.cli.report", str(old_and_new["old"] / DATASET), "-o", str(tmp_path / "report"),
                    results=old_and_new["old"], root=old_and_new["root"])
    line = _one_line(proc, "nnalign_report")
    assert "method version 1" in line and "move it out" in line
    assert not (tmp_path / "report").exists()


@pytest.mark.slow
def test_every_command_refuses_a_version_4_mixture_teacher_in_one_line(old_and_new, run_train, tmp_path):
    """A P* teacher of method version 4 scaled its latents by its weights: the name now means the paper's P*, so
    nnalign_predict, a student's --teacher, --c and the report refuse it, naming the version and what to do."""
    root, v4 = old_and_new["root"], old_and_new["v4"]
    teacher = v4 / DATASET / TEACHER
    proc = _command("nnalign.cli.predict", "-i", str(old_and_new["case"]), "-o", str(tmp_path / "out"), "-m",
                    str(teacher), "-device", "cpu", "--disable-tta", results=v4, root=root)
    line = _one_line(proc, "nnalign_predict")
    assert "method version 4" in line and "mixture-scaled" in line and "train it again" in line
    proc = run_train(root, v4, str(DATASET_ID), CONFIG, "0", "--role", "student", "--modalities", "T1ce", "--kd",
                     "none", "--teacher", str(teacher), "--epochs", "1", "--iters-per-epoch", "1", "-device", "cpu")
    line = _one_line(proc, "nnalign_train")
    assert "method version 4" in line and "train it again" in line
    assert not any(p.name.startswith("nnAlignStudent") for p in (v4 / DATASET).iterdir())
    proc = run_train(root, v4, str(DATASET_ID), CONFIG, "0", "--anchor", "mixture", "--modality-dropout", "0", "--c",
                     "-device", "cpu")
    line = _one_line(proc, "nnalign_train")
    assert "method version 4" in line and "--overwrite" in line
    proc = _command("nnalign.cli.report", str(v4 / DATASET), "-o", str(tmp_path / "report"), results=v4, root=root)
    line = _one_line(proc, "nnalign_report")
    assert "method version 4" in line and "move it out" in line
