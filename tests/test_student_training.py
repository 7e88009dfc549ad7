"""Student training: trainer names, the shim, ``--kd-set`` parsing, and ``nnalign_train --role student`` end to end.

The slow part is module-scoped: one synthetic dataset (3 cases of 40^3, configuration 3d_cpu), a mixture teacher
trained by nnalign_train for 1 epoch x 2 iterations, and one student per distillation method (trained on first use,
then shared), all in one results folder, with one-, two- and three-modality subsets among them.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nnalign.errors import NnalignError
from nnalign.losses.kd.registry import kd_class
from nnalign.runs import StudentSpec, TeacherSpec, overrides_hash

DATASET_ID = 991
DATASET = "Dataset991_SyntheticBraTS"
CONFIG = "3d_cpu"
PLANS = "nnAlignPlans"
TEACHER = "nnAlignTeacher_mixture"
# Student training length. Probe runs of all five students: with 2 x 6 the epoch-2 train loss fell below epoch 1 in
# 30 of 30 (by 5.3-23 %); with 2 x 4 in 15 of 15 but by as little as 3.7 % (smunet), too close to call reliable.
EPOCHS, ITERS = 2, 6

# kd -> (--modalities as typed, the subset in channel order, the channels the student reads, extra flags)
STUDENTS = {
    "kdnet": ("T1ce", ("T1ce",), (1,), ()),
    "pmkl": ("T1,T2", ("T1", "T2"), (0, 2), ()),
    "protokd": ("FLAIR,T1ce,T2", ("T1ce", "T2", "FLAIR"), (1, 2, 3), ("--kd-set", "proto_weight=0.2")),
    "smunet": ("T2", ("T2",), (2,), ()),
    "none": ("t1c", ("T1ce",), (1,), ()),  # an alias spelling: the name still says T1ce
}
OVERRIDES = {"protokd": {"proto_weight": 0.2}}


def student_name(kd: str) -> str:
    tag = "-".join(STUDENTS[kd][1])
    suffix = f"_x{overrides_hash(OVERRIDES[kd])}" if kd in OVERRIDES else ""
    return f"nnAlignStudent_{tag}_{kd}_Teacher-mixture{suffix}"


# ----------------------------------------------------------------------------------------------------------------------
# trainer classes by name


def test_student_trainer_class_is_cached_and_rejects_other_names():
    from nnalign.training.student_trainer import nnAlignStudentTrainer, student_trainer_class

    name = "nnAlignStudent_T1-FLAIR_kdnet_Teacher-mixture_tf2"
    cls = student_trainer_class(name)
    assert cls is student_trainer_class(name)
    assert issubclass(cls, nnAlignStudentTrainer) and cls.__name__ == name
    assert cls.spec == StudentSpec(("T1", "FLAIR"), "kdnet", TeacherSpec.parse(TEACHER), "2", None)
    import nnalign.training.student_trainer as st

    assert getattr(st, name) is cls  # PEP 562 (pickling, pydoc.locate)
    for bad in ("nnAlignTeacher_mixture", "nnUNetTrainer", "nnAlignStudent_T2-T1_kdnet_Teacher-mixture",
                "nnAlignStudent_T1ce_bogus_Teacher-mixture"):
        with pytest.raises(ValueError):
            student_trainer_class(bad)
    assert not hasattr(st, "nnAlignStudent_T2-T1_kdnet_Teacher-mixture")


@pytest.mark.slow
def test_nnunet_finds_student_trainers_through_the_shim(tmp_path, monkeypatch, nnunet_env):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name  # what run_training uses

    from nnalign.training.student_trainer import nnAlignStudentTrainer, student_trainer_class

    nnunet_env(tmp_path, tmp_path / "results")
    name = "nnAlignStudent_T1ce_protokd_Teacher-mixture"
    cls = recursive_find_trainer_class_by_name(name)
    assert issubclass(cls, nnAlignStudentTrainer) and issubclass(cls, nnUNetTrainer)
    assert cls is student_trainer_class(name) and cls is recursive_find_trainer_class_by_name(name)
    assert cls.__module__ == "nnalign.training.student_trainer"
    assert cls.spec == StudentSpec(("T1ce",), "protokd", TeacherSpec.parse(TEACHER), None, None)
    with pytest.raises(RuntimeError, match="Could not find"):
        recursive_find_trainer_class_by_name("nnAlignStudent_T2-T1_protokd_Teacher-mixture")


# ----------------------------------------------------------------------------------------------------------------------
# --kd-set / --temperature


@pytest.mark.parametrize("method, assignments, temperature, expected", [
    ("kdnet", [], None, {}),
    ("kdnet", [], 4.0, {"temperature": 4.0}),
    ("protokd", ["proto_weight=0.2", " kd_weight=5"], 2.0, {"proto_weight": 0.2, "kd_weight": 5.0, "temperature": 2.0}),
    ("pmkl", ["margin=2", "temperature=3"], None, {"margin": 2.0, "temperature": 3.0}),
    ("smunet", ["ramp_epochs=5", "style_weight=1e-1"], None, {"ramp_epochs": 5, "style_weight": 0.1}),
    ("PMKL", ["rkd_weight=0"], None, {"rkd_weight": 0.0}),
])
def test_kd_overrides_parse_numbers_and_the_temperature_flag(method, assignments, temperature, expected):
    from nnalign.cli.train import parse_kd_overrides

    overrides = parse_kd_overrides(method, assignments, temperature)
    assert overrides == expected
    assert all(type(v) is (int if k.endswith("epochs") else float) for k, v in overrides.items())


@pytest.mark.parametrize("method, assignments, temperature, message", [
    ("protokd", ["bogus=1"], None,
     "protokd has no setting 'bogus' (its settings: temperature, kd_weight, proto_weight)"),
    ("kdnet", ["kd_weight=1"], None, "kdnet has no setting 'kd_weight' (its settings: temperature, imitation_weight, "
                                     "feature_weight)"),
    ("none", [], 4.0, "none has no setting 'temperature' (its settings: none)"),
    ("smunet", [], 2.0, "smunet has no setting 'temperature'"),
    ("protokd", ["kd_weight=abc"], None, "--kd-set 'kd_weight=abc': 'abc' is not a number"),
    ("protokd", ["kd_weight="], None, "'' is not a number"),
    ("protokd", ["kd_weight"], None, "expected KEY=VALUE"),
    ("protokd", ["=5"], None, "expected KEY=VALUE"),
    ("bogus", [], None, "unknown KD method 'bogus'"),
])
def test_bad_kd_overrides_are_one_line_errors(method, assignments, temperature, message):
    from nnalign.cli.train import parse_kd_overrides

    with pytest.raises(NnalignError, match=re.escape(message)):
        parse_kd_overrides(method, assignments, temperature)


# ----------------------------------------------------------------------------------------------------------------------
# the dataset, the teacher and the students shared by everything below


@pytest.fixture(scope="module")
def planned(tmp_path_factory, plan_synthetic):
    """Raw + preprocessed 3-case synthetic dataset (3 folds: 2 training cases, 1 validation case each)."""
    return plan_synthetic(tmp_path_factory.mktemp("student"), DATASET_ID, num_cases=3, shape=(40, 40, 40))


@pytest.fixture(scope="module")
def teacher(planned, run_train) -> Path:
    """The mixture teacher's model folder, trained by nnalign_train for 1 epoch x 2 iterations."""
    results = planned / "results"
    proc = run_train(planned, results, str(DATASET_ID), CONFIG, "0", "--anchor", "mixture", "--modality-dropout", "0",
                     "-device", "cpu", "--epochs", "1", "--iters-per-epoch", "2")  # named nnAlignTeacher_mixture
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model_dir = results / DATASET / f"{TEACHER}__{PLANS}__{CONFIG}"
    assert (model_dir / "fold_0" / "checkpoint_final.pth").is_file()
    return model_dir


def student_args(kd: str, teacher: Path, *more: str) -> list[str]:
    modalities, _, _, extra = STUDENTS[kd]
    return [str(DATASET_ID), CONFIG, "0", "--role", "student", "--modalities", modalities, "--kd", kd,
            "--teacher", str(teacher), "-device", "cpu", *extra, *more]


@pytest.fixture(scope="module")
def students(planned, teacher, run_train):
    """``students(kd)``: the student of that method (trained by nnalign_train on first use, beside the teacher)."""
    runs = {}

    def get(kd: str) -> dict:
        if kd not in runs:
            proc = run_train(planned, planned / "results",
                             *student_args(kd, teacher, "--epochs", str(EPOCHS), "--iters-per-epoch", str(ITERS)))
            model_dir = planned / "results" / DATASET / f"{student_name(kd)}__{PLANS}__{CONFIG}"
            runs[kd] = {"proc": proc, "model_dir": model_dir, "fold_dir": model_dir / "fold_0"}
        return runs[kd]

    return get


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# nnalign_train --role student end to end


@pytest.mark.slow
@pytest.mark.parametrize("kd", list(STUDENTS))
def test_every_student_trains_learns_and_records_its_teacher(students, teacher, kd):
    run = students(kd)
    proc, fold_dir = run["proc"], run["fold_dir"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{student_name(kd)}__{PLANS}__{CONFIG}" in proc.stdout
    assert (fold_dir / "checkpoint_final.pth").is_file() and (fold_dir / "validation" / "summary.json").is_file()

    ckpt = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == student_name(kd) and ckpt["current_epoch"] == EPOCHS
    log = ckpt["logging"]
    losses = [float(v) for v in log["train_losses"]]
    assert len(losses) == EPOCHS and losses[1] < losses[0], (kd, losses)
    kd_losses = [float(v) for v in log["kd_losses"]]
    assert len(kd_losses) == EPOCHS and all(np.isfinite(kd_losses)), kd_losses
    assert all(v == 0 for v in kd_losses) if kd == "none" else all(v > 0 for v in kd_losses), kd_losses

    teacher_ckpt = teacher / "fold_0" / "checkpoint_final.pth"
    record = json.loads((fold_dir / "nnalign_settings.json").read_text())
    assert record["role"] == "student" and record["trainer"] == student_name(kd)
    assert (record["dataset"], record["plans"], record["configuration"], record["fold"]) == (DATASET, PLANS, CONFIG, 0)
    assert record["modalities"] == list(STUDENTS[kd][1]) and record["kd"] == kd
    assert record["teacher"] == {"trainer": TEACHER, "path": str(teacher_ckpt), "fold": 0,
                                 "sha256": sha256(teacher_ckpt)}
    assert Path(record["teacher"]["path"]).parent.parent == teacher
    assert record["kd_settings"]["method"] == kd and record["seg_weight"] == record["kd_settings"]["seg_weight"]
    assert record["kd_overrides"] == OVERRIDES.get(kd, {})
    assert (record["epochs"], record["iters_per_epoch"], record["epochs_completed"]) == (EPOCHS, ITERS, EPOCHS)


@pytest.mark.slow
def test_kd_set_is_hashed_into_the_folder_and_recorded(students):
    run = students("protokd")
    assert run["proc"].returncode == 0, run["proc"].stderr[-3000:]
    digest = overrides_hash({"proto_weight": 0.2})
    assert run["model_dir"].name == f"nnAlignStudent_T1ce-T2-FLAIR_protokd_Teacher-mixture_x{digest}__{PLANS}__{CONFIG}"
    record = json.loads((run["fold_dir"] / "nnalign_settings.json").read_text())
    assert record["kd_overrides"] == {"proto_weight": 0.2}
    assert record["kd_settings"]["proto_weight"] == 0.2
    default = kd_class("protokd").__init__.__kwdefaults__["kd_weight"]
    assert record["kd_settings"]["kd_weight"] == default  # the method's default, not overridden


@pytest.mark.slow
def test_all_students_live_side_by_side_with_their_teacher(students, teacher):
    for kd in STUDENTS:
        assert students(kd)["proc"].returncode == 0, kd
    dataset_dir = teacher.parent
    folders = {p.name for p in dataset_dir.iterdir() if p.is_dir()}
    expected = {f"{student_name(kd)}__{PLANS}__{CONFIG}" for kd in STUDENTS} | {teacher.name}
    assert expected <= folders, folders
    for name in expected:
        assert (dataset_dir / name / "fold_0" / "checkpoint_final.pth").is_file(), name
    assert len({n.split("_")[1] for n in expected if n.startswith("nnAlignStudent")}) == 4  # subsets differ
    assert {len(STUDENTS[kd][1]) for kd in STUDENTS} == {1, 2, 3}


@pytest.mark.slow
@pytest.mark.parametrize("kd", list(STUDENTS))
def test_nnunet_predictor_loads_the_student_and_reads_only_its_modalities(students, planned, monkeypatch, kd,
                                                                          nnunet_env):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnalign.networks.align_unet import nnAlignStudentUNet

    run = students(kd)
    assert run["proc"].returncode == 0, run["proc"].stderr[-3000:]
    nnunet_env(planned, planned / "results")
    predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(run["model_dir"]), use_folds=(0,))
    network = predictor.network
    channels = STUDENTS[kd][2]
    assert isinstance(network, nnAlignStudentUNet) and network.channels == channels

    images = sorted((planned / "raw" / DATASET / "imagesTr").glob("SYN_0001_*.nii.gz"))
    img, props = SimpleITKIO().read_images([str(p) for p in images])
    brain = (img != 0).any(0)
    others = [c for c in range(img.shape[0]) if c not in channels]
    rng = np.random.default_rng(0)

    def predict(image):
        seg, probs = predictor.predict_single_npy_array(image.astype(np.float32), props, None, None, True)
        assert seg.shape == img.shape[1:] and set(np.unique(seg).tolist()) <= {0, 1, 2, 3}
        return seg, probs

    zeroed = img.copy()
    zeroed[others] = 0
    # noise only inside the brain, so nnU-Net's crop to the non-zero region and its masked normalisation of the
    # student's own channels stay exactly the same
    noisy = img.copy()
    noisy[others] = (rng.uniform(0.5, 2000.0, size=(len(others), *img.shape[1:])) * brain).astype(np.float32)
    seg0, probs0 = predict(zeroed)
    for variant in (noisy, img):
        seg, probs = predict(variant)
        assert np.array_equal(seg, seg0) and np.array_equal(probs, probs0)
    # ...while the student's own channels do matter: the same comparison fails when one of them changes
    changed = zeroed.copy()
    changed[channels[0]] *= rng.uniform(0.5, 1.5, size=img.shape[1:]).astype(np.float32)
    _, probs_changed = predict(changed)
    assert not np.allclose(probs_changed, probs0)


@pytest.mark.slow
def test_finished_student_is_not_trained_again_without_overwrite(students, planned, teacher, run_train,
                                                                 assert_one_line_error):
    assert students("kdnet")["proc"].returncode == 0
    line = assert_one_line_error(run_train(planned, planned / "results", *student_args("kdnet", teacher)),
                                 "holds a finished run")
    assert student_name("kdnet") in line


@pytest.mark.slow
def test_smunet_keeps_its_discriminator_and_continues_with_more_epochs(students, planned, teacher, run_train):
    """--c --epochs 3 continues the 2-epoch SMU-Net student; its discriminator and optimiser state come back too."""
    run = students("smunet")
    assert run["proc"].returncode == 0, run["proc"].stderr[-3000:]
    fold_dir = run["fold_dir"]
    state_file = fold_dir / "nnalign_kd_state.pth"
    before_state = torch.load(state_file, map_location="cpu", weights_only=False)
    assert before_state["adversary_optimizer"] is not None and before_state["adversary_optimizer"]["state"]
    assert any("discriminator" in k for k in before_state["kd"]), list(before_state["kd"])
    before = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)

    proc = run_train(planned, planned / "results", *student_args("smunet", teacher, "--c", "--epochs", "3"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert (before["current_epoch"], after["current_epoch"]) == (2, 3)
    assert len(after["logging"]["train_losses"]) == len(after["logging"]["kd_losses"]) == 3
    assert [float(v) for v in after["logging"]["train_losses"][:2]] == \
        [float(v) for v in before["logging"]["train_losses"]]
    record = json.loads((fold_dir / "nnalign_settings.json").read_text())
    assert (record["epochs"], record["epochs_completed"], record["iters_per_epoch"]) == (3, 3, ITERS)
    after_state = torch.load(state_file, map_location="cpu", weights_only=False)
    steps = [s["step"] for s in after_state["adversary_optimizer"]["state"].values()]
    before_steps = [s["step"] for s in before_state["adversary_optimizer"]["state"].values()]
    assert [float(a) for a in steps] == [float(b) + ITERS for b in before_steps]  # resumed, not restarted
    assert any(not torch.equal(after_state["kd"][k], v) for k, v in before_state["kd"].items())


# ----------------------------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit 1, no traceback


@pytest.fixture
def fake_results(planned, tmp_path) -> Path:
    """A results folder with model folders that cannot serve as this student's teacher (and one that could)."""
    results = tmp_path / "results"
    for folder in (f"{DATASET}/{TEACHER}__{PLANS}__{CONFIG}",  # passes every check
                   f"{DATASET}/nnAlignStudent_T1ce_kdnet_Teacher-mixture__{PLANS}__{CONFIG}",
                   f"Dataset992_Other/{TEACHER}__{PLANS}__{CONFIG}",
                   f"{DATASET}/{TEACHER}__{PLANS}__3d_fullres"):
        (results / folder / "fold_0").mkdir(parents=True)
        (results / folder / "fold_0" / "checkpoint_final.pth").touch()
    elsewhere = tmp_path / "elsewhere" / DATASET / f"{TEACHER}__{PLANS}__{CONFIG}" / "fold_0"
    elsewhere.mkdir(parents=True)
    (elsewhere / "checkpoint_final.pth").touch()
    return results


def _student(teacher: Path, modalities: str = "T1ce", kd: str | None = "kdnet", *more: str) -> list[str]:
    args = [str(DATASET_ID), CONFIG, "0", "--role", "student", "-device", "cpu", "--teacher", str(teacher),
            "--modalities", modalities, *more]
    if kd is not None:
        args += ["--kd", kd]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("teacher_dir, fragments", [
    (f"{DATASET}/nnAlignTeacher_none__{PLANS}__{CONFIG}", ["nnAlignTeacher_none__nnAlignPlans__3d_cpu: no such"]),
    (f"{DATASET}/nnAlignStudent_T1ce_kdnet_Teacher-mixture__{PLANS}__{CONFIG}", ["not an nnalign teacher model"]),
    (f"Dataset992_Other/{TEACHER}__{PLANS}__{CONFIG}", ["trained on Dataset992_Other, not Dataset991_SyntheticBraTS"]),
    (f"{DATASET}/{TEACHER}__{PLANS}__3d_fullres", ["the teacher uses nnAlignPlans 3d_fullres, the student "
                                                   "nnAlignPlans 3d_cpu"]),
    (f"../elsewhere/{DATASET}/{TEACHER}__{PLANS}__{CONFIG}", ["elsewhere", "not in", "($nnUNet_results)"]),
])
def test_teachers_that_cannot_serve_are_one_line_errors(planned, fake_results, teacher_dir, fragments, run_train,
                                                        assert_one_line_error):
    assert_one_line_error(run_train(planned, fake_results, *_student(fake_results / teacher_dir)), *fragments)


@pytest.mark.slow
@pytest.mark.parametrize("modalities, kd, more, fragments", [
    ("T1ce,T5", "kdnet", [], ["unknown modality 'T5'"]),
    ("", "kdnet", [], ["the modality subset is empty"]),
    ("T1ce", "bogus", [], ["unknown KD method 'bogus'", "kdnet", "smunet"]),
    ("T1ce", None, [], ["--role student needs --kd"]),
    ("T1ce", "kdnet", ["--kd-set", "bogus=1"], ["kdnet has no setting 'bogus'", "temperature, imitation_weight"]),
])
def test_bad_student_flags_are_one_line_errors(planned, fake_results, modalities, kd, more, fragments, run_train,
                                               assert_one_line_error):
    teacher_dir = fake_results / DATASET / f"{TEACHER}__{PLANS}__{CONFIG}"
    assert_one_line_error(run_train(planned, fake_results, *_student(teacher_dir, modalities, kd, *more)), *fragments)


@pytest.mark.slow
def test_missing_teacher_flag_is_a_one_line_error(planned, tmp_path, run_train, assert_one_line_error):
    args = [str(DATASET_ID), CONFIG, "0", "--role", "student", "--modalities", "T1ce", "--kd", "kdnet"]
    assert_one_line_error(run_train(planned, tmp_path, *args), "--role student needs --teacher")


@pytest.mark.slow
def test_teacher_fold_without_a_final_checkpoint_is_a_one_line_error(planned, teacher, run_train,
                                                                     assert_one_line_error):
    line = assert_one_line_error(
        run_train(planned, planned / "results", *_student(teacher, "T1ce", "kdnet", "--teacher-fold", "3")),
        "no checkpoint_final.pth", "--teacher-fold")
    assert str(teacher / "fold_3") in line
