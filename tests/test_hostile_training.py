"""Hostile and careless input around training and the settings record: a U-Net too shallow for nnU-Net's deep
supervision weights, a loss that stops being a number, a dataset.json that names a modality twice, a read-only or
full ``nnUNet_results``, settings records that are not records (a list, a truncated file, a version that is a string
or from a newer nnalign) met by ``nnalign_train --c``, ``nnalign_predict`` and a student's teacher, and checkpoint
refusals that name what they refuse.

The end-to-end tests share one synthetic dataset small enough (6 cases of 32^3) that ``3d_cpu`` plans a 2-stage
U-Net, and a mixture teacher trained on it for 2 epochs x 2 iterations; tests that change it work on copies.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nnalign.errors import NnalignError
from nnalign.training.record import METHOD_VERSION, SETTINGS_RECORD

DATASET_ID = 927
DATASET = "Dataset927_SyntheticBraTS"
CONFIG = "3d_cpu"
SHORT = ("-device", "cpu", "--epochs", "2", "--iters-per-epoch", "2")


# ----------------------------------------------------------------------------------------------------------------------
# deep supervision of a 2-stage U-Net, and a loss that is not a number (quick)


def _trainer_with_stages(n_stages: int):
    """What nnU-Net's ``_get_deep_supervision_scales`` reads of a trainer whose U-Net has ``n_stages`` stages."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    pools = [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1)
    trainer = SimpleNamespace(enable_deep_supervision=True,
                              configuration_manager=SimpleNamespace(pool_op_kernel_sizes=pools))
    trainer._get_deep_supervision_scales = lambda: nnUNetTrainer._get_deep_supervision_scales(trainer)
    return trainer


@pytest.mark.parametrize("n_stages, supervised", [(2, False), (3, True), (5, True)])
def test_deep_supervision_is_off_for_a_unet_with_one_output(n_stages, supervised):
    from nnalign.training.common import fit_deep_supervision

    trainer = _trainer_with_stages(n_stages)
    fit_deep_supervision(trainer)
    assert trainer.enable_deep_supervision is supervised


class _Epochs:
    """nnU-Net's own per-epoch loss logging (its logger and ``on_train_epoch_end``), without a network."""

    def __init__(self) -> None:
        from nnunetv2.training.logging.nnunet_logger import MetaLogger

        self.logger = MetaLogger("/results/fold_0", resume=False)
        self.is_ddp = False
        self.current_epoch = 0
        self.output_folder = "/results/fold_0"

    def on_train_epoch_end(self, train_outputs):
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        nnUNetTrainer.on_train_epoch_end(self, train_outputs)

    def on_validation_epoch_end(self, val_outputs):
        self.logger.log("val_losses", float(np.mean([o["loss"] for o in val_outputs])), self.current_epoch)


def _guarded_epochs():
    from nnalign.training.common import FiniteLoss

    return type("Guarded", (FiniteLoss, _Epochs), {})()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("phase", ["training", "validation"])
def test_a_loss_that_is_not_a_number_stops_training(bad, phase):
    trainer = _guarded_epochs()
    steps = [{"loss": np.array(0.5)}, {"loss": np.array(bad)}]
    end = trainer.on_train_epoch_end if phase == "training" else trainer.on_validation_epoch_end
    with pytest.raises(NnalignError) as stopped:
        end(steps)
    message = str(stopped.value)
    assert message.startswith("/results/fold_0: ") and f"the {phase} loss of epoch 0 is {float(bad)}" in message
    assert "\n" not in message


def test_a_finite_loss_trains_on():
    trainer = _guarded_epochs()
    trainer.on_train_epoch_end([{"loss": np.array(0.5)}, {"loss": np.array(0.7)}])
    trainer.on_validation_epoch_end([{"loss": np.array(0.2)}])
    assert trainer.logger.get_value("train_losses", step=-1) == pytest.approx(0.6)


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_no_partial_file(tmp_path):
    from nnalign.training.common import checkpoint_write

    final, partial = tmp_path / "checkpoint_best.pth", tmp_path / "checkpoint_best.pth.partial"
    with pytest.raises(NnalignError) as stopped:
        with checkpoint_write(str(final), str(partial)):
            partial.write_bytes(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
    assert str(stopped.value).startswith(f"{final}: cannot write the checkpoint (") and not partial.exists()


# ----------------------------------------------------------------------------------------------------------------------
# channel names and settings records (quick)


def test_a_modality_named_twice_is_refused_naming_the_file():
    from nnalign.modalities import modalities_from_dataset_json

    dataset_json = {"channel_names": {"0": "T1", "1": "t1n", "2": "T2", "3": "FLAIR"}}
    with pytest.raises(NnalignError, match=r"^/x/dataset.json: channel_names name T1 twice \(channels 0 and 1\)"):
        modalities_from_dataset_json(dataset_json, "/x/dataset.json")
    assert modalities_from_dataset_json({"channel_names": {"0": "T1", "1": "T1ce"}}) == ("T1", "T1ce")
    for names in ({"first": "T1"}, {"0": 1}, ["T1", "T2"]):
        with pytest.raises(NnalignError, match=r"^/x/dataset.json: channel_names must map channel numbers"):
            modalities_from_dataset_json({"channel_names": names}, "/x/dataset.json")


def test_planning_refuses_a_modality_named_twice(tmp_path):
    from nnalign.data.dataset_checks import read_dataset_json

    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T1", "2": "T2", "3": "FLAIR"}, "labels": {"background": 0},
        "file_ending": ".nii.gz"}))
    with pytest.raises(NnalignError) as refused:
        read_dataset_json(tmp_path)
    assert str(refused.value).startswith(f"{tmp_path / 'dataset.json'}: channel_names name T1 twice")


GOOD_RECORD = {"nnalign_version": "0.2.0", "method_version": METHOD_VERSION, "role": "teacher", "anchor": "mixture",
               "settings": {"anchor": "mixture"}, "epochs": 2, "iters_per_epoch": 2}
BROKEN_RECORDS = [
    ("[1, 2]", "not a settings record (a JSON array, not an object)"),
    (json.dumps({**GOOD_RECORD, "settings": []}), "'settings' is a JSON array, not an object"),
    (json.dumps(GOOD_RECORD)[:40], "not a readable settings record (truncated, or not JSON"),
    ("", "not a readable settings record (truncated, or not JSON"),
    (json.dumps({**GOOD_RECORD, "method_version": "4"}), 'method_version "4" is not a valid method version'),
    (json.dumps({**GOOD_RECORD, "method_version": True}), "method_version true is not a valid method version"),
    (json.dumps({**GOOD_RECORD, "epochs": "many"}), "epochs must be a positive integer, got 'many'"),
]


@pytest.mark.parametrize("text, problem", BROKEN_RECORDS)
def test_a_record_that_is_not_a_record_is_one_line_naming_the_file(text, problem, tmp_path):
    from nnalign.training.record import check_method_version, read_settings_record

    (tmp_path / SETTINGS_RECORD).write_text(text)
    for read in (read_settings_record, lambda f: check_method_version(f, "train it again")):
        with pytest.raises(NnalignError) as refused:
            read(tmp_path)
        assert str(refused.value).startswith(f"{tmp_path / SETTINGS_RECORD}: ") and problem in str(refused.value)


def test_an_absent_record_is_none_and_a_good_one_reads(tmp_path):
    from nnalign.training.record import check_method_version, read_settings_record

    assert read_settings_record(tmp_path) is None
    (tmp_path / SETTINGS_RECORD).write_text(json.dumps(GOOD_RECORD))
    assert read_settings_record(tmp_path) == GOOD_RECORD
    check_method_version(tmp_path, "train it again")


def test_a_record_from_a_newer_nnalign_says_so(tmp_path):
    from nnalign import __version__
    from nnalign.training.record import check_method_version

    (tmp_path / SETTINGS_RECORD).write_text(json.dumps({**GOOD_RECORD, "method_version": 99,
                                                        "nnalign_version": "9.0"}))
    with pytest.raises(NnalignError) as refused:
        check_method_version(tmp_path, "train it again")
    assert str(refused.value) == (f"{tmp_path}: made by a newer nnalign 9.0 (method version 99; this nnalign, "
                                  f"{__version__}, knows versions up to {METHOD_VERSION}): upgrade nnalign to use it")


def test_a_record_of_an_older_method_version_is_refused(tmp_path):
    from nnalign.training.record import check_method_version

    (tmp_path / SETTINGS_RECORD).write_text(json.dumps({**GOOD_RECORD, "method_version": 1}))
    with pytest.raises(NnalignError, match="method version 1; this nnalign trains version"):
        check_method_version(tmp_path, "train it again")


# ----------------------------------------------------------------------------------------------------------------------
# checkpoint refusals name what they refuse (quick)


class _Calls:
    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("function, args", [(os.system, ("true",)), (exec, ("1",)), (open, ("/nonexistent",)),
                                            (getattr, (1, "real"))])
def test_a_refused_checkpoint_names_the_global(function, args, tmp_path):
    import torch

    from nnalign.checkpoints import CheckpointError, load_checkpoint_safely

    path = tmp_path / "crafted.pth"
    torch.save({"network_weights": {}, "notes": _Calls(function, *args)}, path)
    name = f"{function.__module__}.{function.__name__}"
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint_safely(path)
    assert str(refused.value) == (f"{path}: refused: it holds {name}, which a checkpoint may not hold (only tensors, "
                                  f"numbers, strings, lists, dicts and numpy scalars)")


# ----------------------------------------------------------------------------------------------------------------------
# end to end on a dataset whose 3d_cpu U-Net has 2 stages (slow)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, plan_synthetic, run_train) -> tuple[Path, subprocess.CompletedProcess]:
    """The data root (raw/, pre/, results/ with the mixture teacher) and the teacher's training."""
    root = plan_synthetic(tmp_path_factory.mktemp("training"), DATASET_ID, num_cases=6, shape=(32, 32, 32))
    return root, run_train(root, root / "results", str(DATASET_ID), CONFIG, "0", "--anchor", "mixture", *SHORT)


@pytest.fixture
def root(trained) -> Path:
    data, proc = trained
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data


@pytest.fixture
def results(root, tmp_path) -> Path:
    """A copy of the trained results folder, for a test to damage."""
    copy = tmp_path / "results"
    shutil.copytree(root / "results", copy)
    return copy


def teacher_folder(results: Path) -> Path:
    """The mixture teacher's model folder (its name also holds the anchor's default settings)."""
    found = sorted((results / DATASET).glob(f"nnAlignTeacher_mixture*__nnAlignPlans__{CONFIG}"))
    assert len(found) == 1, found
    return found[0]


def teacher_fold(results: Path) -> Path:
    return teacher_folder(results) / "fold_0"


def copy_preprocessed(root: Path, tmp_path: Path) -> Path:
    """A data root whose raw/ is ``root``'s and whose pre/ is a copy, for a test to change."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "raw").symlink_to(root / "raw")
    shutil.copytree(root / "pre", data / "pre")
    return data


@pytest.mark.slow
def test_a_two_stage_unet_trains_to_finite_losses(trained):
    root, proc = trained
    plans = json.loads((root / "pre" / DATASET / "nnAlignPlans.json").read_text())
    assert plans["configurations"][CONFIG]["architecture"]["arch_kwargs"]["n_stages"] == 2  # the case under test
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(line.split()[-1]) for line in proc.stdout.splitlines() if "train_loss" in line]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), proc.stdout[-3000:]
    record = json.loads((teacher_fold(root / "results") / SETTINGS_RECORD).read_text())
    weights = [w["normalised"] for w in record["mixture_weights"].values()]
    assert len(weights) == 4 and all(math.isfinite(w) for w in weights), record["mixture_weights"]


@pytest.mark.slow
def test_a_loss_that_turns_nan_stops_training_and_leaves_no_run(root, tmp_path, run_train, assert_one_line_error):
    data = copy_preprocessed(root, tmp_path)
    plans_file = data / "pre" / DATASET / "nnAlignPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"][CONFIG]["nnalign_training"] = {"optimizer": "adam", "initial_lr": 1e30}
    plans_file.write_text(json.dumps(plans))
    results = tmp_path / "results"
    proc = run_train(data, results, str(DATASET_ID), CONFIG, "0", "--anchor", "original", *SHORT)
    line = assert_one_line_error(proc, "/fold_0: the training loss of epoch 0 is nan (not a finite number): "
                                       "training stopped")
    assert f"{results / DATASET}/nnAlignOriginal" in line, line
    assert not list(results.glob(f"{DATASET}/*"))


@pytest.mark.slow
def test_train_refuses_a_modality_named_twice(root, tmp_path, run_train, assert_one_line_error):
    data = copy_preprocessed(root, tmp_path)
    dataset_file = data / "pre" / DATASET / "dataset.json"
    dataset_json = json.loads(dataset_file.read_text())
    dataset_json["channel_names"] = {"0": "T1", "1": "T1", "2": "T2", "3": "FLAIR"}
    dataset_file.write_text(json.dumps(dataset_json))
    results = tmp_path / "results"
    proc = run_train(data, results, str(DATASET_ID), CONFIG, "0", *SHORT)
    assert_one_line_error(proc, f"{dataset_file}: channel_names name T1 twice (channels 0 and 1)")
    assert not results.exists() or not list(results.rglob("*"))


@pytest.mark.slow
def test_train_into_read_only_results_is_one_line(root, tmp_path, run_train, read_only, assert_one_line_error):
    with read_only(tmp_path / "ro") as results:
        proc = run_train(root, results, str(DATASET_ID), CONFIG, "0", *SHORT)
        assert_one_line_error(proc, "cannot write the run there")
        assert not list(results.rglob("*"))


@pytest.mark.slow
def test_train_into_full_results_is_one_line_and_leaves_no_run(root, tmp_path, run_train, tmpfs, fill_up,
                                                              assert_one_line_error):
    with tmpfs(tmp_path / "full", size_kib=256) as results:
        fill_up(results)
        proc = run_train(root, results, str(DATASET_ID), CONFIG, "0", *SHORT)
        assert_one_line_error(proc, "No space left on device")
        assert not list(results.glob(f"{DATASET}/*"))


@pytest.mark.slow
@pytest.mark.parametrize("text, problem", [
    ("[1, 2]", "not a settings record (a JSON array, not an object)"),
    ('{"settings": []}', "'settings' is a JSON array, not an object"),
    ("truncated", "not a readable settings record (truncated, or not JSON"),
    ('{"method_version": "4"}', 'method_version "4" is not a valid method version'),
])
def test_train_continue_refuses_a_record_that_is_not_a_record(results, root, text, problem, run_train,
                                                              assert_one_line_error):
    path = teacher_fold(results) / SETTINGS_RECORD
    path.write_text(path.read_text()[:60] if text == "truncated" else text)
    before = sorted(p.name for p in path.parent.iterdir())
    proc = run_train(root, results, str(DATASET_ID), CONFIG, "0", "--anchor", "mixture", "--c", "--epochs", "3",
                     "-device", "cpu")
    assert_one_line_error(proc, f"{path}: {problem}")
    assert sorted(p.name for p in path.parent.iterdir()) == before


@pytest.mark.slow
def test_train_continue_refuses_a_run_of_a_newer_nnalign(results, root, run_train, assert_one_line_error):
    path = teacher_fold(results) / SETTINGS_RECORD
    path.write_text(json.dumps({**json.loads(path.read_text()), "method_version": 99}))
    proc = run_train(root, results, str(DATASET_ID), CONFIG, "0", "--anchor", "mixture", "--c", "--epochs", "3",
                     "-device", "cpu")
    assert_one_line_error(proc, f"{path.parent}: made by a newer nnalign", "(method version 99;",
                          "upgrade nnalign to use it")


@pytest.mark.slow
@pytest.mark.parametrize("text, problem", [
    ("[1, 2]", "not a settings record (a JSON array, not an object)"),
    ("truncated", "not a readable settings record (truncated, or not JSON"),
    ("newer", "made by a newer nnalign"),
])
def test_predict_reports_a_model_with_a_broken_record(results, root, tmp_path, text, problem, run_module,
                                                      error_lines):
    path = teacher_fold(results) / SETTINGS_RECORD
    record = path.read_text()
    path.write_text({"truncated": record[:60], "newer": json.dumps({**json.loads(record), "method_version": 99})}
                    .get(text, text))
    source = tmp_path / "in"
    source.mkdir()
    for image in (root / "raw" / DATASET / "imagesTr").glob("SYN_0000_000?.nii.gz"):
        shutil.copyfile(image, source / image.name)
    out = tmp_path / "out"
    proc = run_module("predict", "-i", source, "-o", out, "-m", results / DATASET, "-device", "cpu",
                      "--disable-tta")
    lines = error_lines(proc, "nnalign_predict")
    assert len(lines) == 1 and problem in lines[0] and str(teacher_fold(results)) in lines[0], lines
    assert not list(out.glob("*.nii.gz"))


@pytest.mark.slow
def test_a_student_refuses_a_teacher_of_a_newer_nnalign_before_writing(results, root, run_train,
                                                                       assert_one_line_error):
    path = teacher_fold(results) / SETTINGS_RECORD
    path.write_text(json.dumps({**json.loads(path.read_text()), "method_version": 99}))
    proc = run_train(root, results, str(DATASET_ID), CONFIG, "0", "--role", "student", "--modalities", "T1ce",
                     "--kd", "kdnet", "--teacher", str(teacher_folder(results)), *SHORT)
    assert_one_line_error(proc, f"{path.parent}: made by a newer nnalign", "upgrade nnalign")
    assert sorted(p.name for p in (results / DATASET).iterdir()) == [teacher_folder(results).name]


@pytest.mark.slow
def test_train_continue_names_a_forbidden_global(results, root, run_train, assert_one_line_error):
    import torch

    path = teacher_fold(results) / "checkpoint_final.pth"
    payload = torch.load(path, map_location="cpu", weights_only=False)
    payload["notes"] = _Calls(os.system, "true")
    torch.save(payload, path)
    proc = run_train(root, results, str(DATASET_ID), CONFIG, "0", "--anchor", "mixture", "--c", "--epochs", "3",
                     "-device", "cpu")
    assert_one_line_error(proc, f"{path}: refused: it holds {os.system.__module__}.system, which a checkpoint may "
                                "not hold")
