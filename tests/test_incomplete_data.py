"""Datasets whose cases lack some modalities' files: the record in dataset.json, conversion, fingerprint and
preprocessing without invented images, presence sampling, a teacher step on a case with an absent modality, and a
student whose subset no case has.

The slow part is one module-scoped synthetic dataset (4 cases of 32^3, configuration 3d_cpu), two of them
incomplete.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from nnalign.data.missing import MISSING_KEY, missing_modalities, presence_by_case, present_channels
from nnalign.errors import NnalignError
from nnalign.modalities import BRATS_MODALITIES
from nnalign.training.presence import sample_presence

DATASET_ID = 994
DATASET = "Dataset994_SyntheticBraTS"
CONFIG = "3d_cpu"
MISSING = {"SYN_0001": ["T2"], "SYN_0002": ["T1", "FLAIR"]}


def _dataset_json(record) -> dict:
    return {"channel_names": {str(i): m for i, m in enumerate(BRATS_MODALITIES)}, "nnalign": {MISSING_KEY: record}}


# ----------------------------------------------------------------------------------------------------------------------
# the record and presence sampling


def test_record_reads_in_channel_order_and_gives_each_case_its_presence():
    dj = _dataset_json({"a": ["FLAIR", "T1"], "b": []})
    assert missing_modalities(dj) == {"a": ("T1", "FLAIR")}
    assert missing_modalities({"channel_names": dj["channel_names"]}) == {}
    assert present_channels(dj, "a") == (1, 2) and present_channels(dj, "c") == (0, 1, 2, 3)
    assert presence_by_case(dj, ["a", "c"]) == {"a": (False, True, True, False), "c": (True,) * 4}


@pytest.mark.parametrize("record, message", [
    ({"a": ["T3"]}, "T3 is not one of the dataset's modalities"),
    ({"a": list(BRATS_MODALITIES)}, "a lacks every modality"),
    ({"a": "T1"}, "a: expected a list"),
    (["a"], "must map case IDs"),
])
def test_bad_record_is_one_line(record, message):
    with pytest.raises(NnalignError, match=message) as e:
        missing_modalities(_dataset_json(record), "x/dataset.json")
    assert str(e.value).startswith("x/dataset.json: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("sampling", ["independent", "balanced"])
@pytest.mark.parametrize("dropout", [0.0, 0.5, 0.9])
def test_presence_keeps_only_what_the_case_has_and_never_nothing(sampling, dropout):
    gen = torch.Generator().manual_seed(0)
    available = torch.rand(3000, 4, generator=gen) > 0.5
    available[~available.any(1), 2] = True
    present = sample_presence(3000, 4, dropout, generator=gen, sampling=sampling, available=available)
    assert bool(present.any(1).all()) and not bool((present & ~available).any())
    if dropout == 0.0:
        assert torch.equal(present, available)
    else:
        assert bool((present != available).any())  # the dropout still acts on the available modalities
    with pytest.raises(ValueError, match="no modality available"):
        sample_presence(2, 4, dropout, available=torch.tensor([[True] * 4, [False] * 4]))


# ----------------------------------------------------------------------------------------------------------------------
# conversion


@pytest.mark.slow
def test_conversion_keeps_a_case_without_a_file_only_when_allowed(tmp_path, write_brats_case):
    from nnalign.data.convert_brats import convert_brats

    source = tmp_path / "release"
    write_brats_case(source, "Brats18_A_1")
    (write_brats_case(source, "Brats18_B_1") / "Brats18_B_1_t2.nii.gz").unlink()
    with pytest.raises(NnalignError, match="Brats18_B_1: missing T2 file .*--allow-missing"):
        convert_brats(source, 31, tmp_path / "raw", num_processes=1, progress=False)
    assert not (tmp_path / "raw" / "Dataset031_release").exists()

    report = convert_brats(source, 31, tmp_path / "raw", num_processes=1, progress=False, allow_missing=True)
    assert report.num_training == 2 and report.missing == {"Brats18_B_1": ("T2",)}
    folder = tmp_path / "raw" / "Dataset031_release"
    assert sorted(p.name for p in (folder / "imagesTr").glob("Brats18_B_1_*")) == [
        "Brats18_B_1_0000.nii.gz", "Brats18_B_1_0001.nii.gz", "Brats18_B_1_0003.nii.gz"]  # nothing invented
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["nnalign"][MISSING_KEY] == {"Brats18_B_1": ["T2"]}


# ----------------------------------------------------------------------------------------------------------------------
# fingerprint and preprocessing


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    """A synthetic dataset with two incomplete cases, planned and preprocessed (3d_cpu)."""
    root = tmp_path_factory.mktemp("incomplete")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_raw", str(root / "raw"))
        mp.setenv("nnUNet_preprocessed", str(root / "pre"))
        mp.setenv("nnUNet_results", str(root / "results"))
        mp.setenv("nnUNet_n_proc_DA", "0")
        from nnalign.data.synthetic import write_synthetic_dataset
        from nnalign.planning.plan_and_preprocess import plan_and_preprocess

        write_synthetic_dataset(root / "raw", DATASET_ID, num_cases=4, shape=(32, 32, 32), missing=MISSING)
        plan_and_preprocess(DATASET_ID, [CONFIG], num_processes=1, warn=lambda m: None)
    return root


@pytest.fixture
def env(planned, tmp_path, nnunet_env):
    nnunet_env(planned, tmp_path / "results")
    return planned


def _preprocessed_case(root: Path, case: str) -> np.ndarray:
    import blosc2

    folder = next((root / "pre" / DATASET).glob(f"*_{CONFIG}"))
    return blosc2.open(str(folder / f"{case}.b2nd"))[:]


@pytest.mark.slow
def test_planning_invents_no_file_and_zeroes_absent_channels(planned):
    images = planned / "raw" / DATASET / "imagesTr"
    for case, absent in MISSING.items():
        have = sorted(int(p.name[-11:-7]) for p in images.glob(f"{case}_*.nii.gz"))
        assert have == [c for c, m in enumerate(BRATS_MODALITIES) if m not in absent]
    dataset_json = json.loads((planned / "pre" / DATASET / "dataset.json").read_text())
    assert dataset_json["nnalign"][MISSING_KEY] == MISSING  # the record travels beside the preprocessed data
    for case, absent in {**MISSING, "SYN_0000": []}.items():
        data = _preprocessed_case(planned, case)
        assert data.shape[0] == 4 and np.isfinite(data).all()
        for c, m in enumerate(BRATS_MODALITIES):
            assert (np.abs(data[c]).max() == 0) == (m in absent), (case, m)


@pytest.mark.slow
def test_fingerprint_pools_each_channel_over_the_cases_that_have_it(planned):
    fingerprint = json.loads((planned / "pre" / DATASET / "dataset_fingerprint.json").read_text())
    stats = fingerprint["foreground_intensity_properties_per_channel"]
    assert sorted(stats) == ["0", "1", "2", "3"] and len(fingerprint["spacings"]) == 4
    # the synthetic tumour is bright in every modality: a zero-filled channel would pull the minimum to 0
    assert all(s["min"] > 0 for s in stats.values()), stats


@pytest.mark.slow
def test_normalisation_of_a_case_ignores_its_absent_channel(env):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnalign.planning.preprocessor import nnAlignPreprocessor

    pre = env / "pre" / DATASET
    plans = PlansManager(str(pre / "nnAlignPlans.json"))
    dataset_json = json.loads((pre / "dataset.json").read_text())
    files = sorted(str(p) for p in (env / "raw" / DATASET / "imagesTr").glob("SYN_0000_*.nii.gz"))
    label = str(env / "raw" / DATASET / "labelsTr" / "SYN_0000.nii.gz")
    run = nnAlignPreprocessor(verbose=False).run_case
    full, _, _ = run(files, label, plans, plans.get_configuration(CONFIG), dataset_json)
    partial, _, _ = run(files[:2] + files[3:], label, plans, plans.get_configuration(CONFIG), dataset_json)
    np.testing.assert_array_equal(partial[[0, 1, 3]], full[[0, 1, 3]])
    assert not partial[2].any()


# ----------------------------------------------------------------------------------------------------------------------
# training


def _trainer(cls):
    pre = Path(os.environ["nnUNet_preprocessed"]) / DATASET
    plans = json.loads((pre / "nnAlignPlans.json").read_text())
    plans["continue_training"] = False
    return cls(plans=plans, configuration=CONFIG, fold=0, dataset_json=json.loads((pre / "dataset.json").read_text()),
               device=torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("anchor", ["mixture", "original"])
def test_train_step_fills_a_case_s_absent_modalities_like_dropped_ones(env, anchor):
    from nnalign.runs import teacher_spec
    from nnalign.training.teacher_trainer import teacher_trainer_class

    trainer = _trainer(teacher_trainer_class(teacher_spec(anchor, modality_dropout=0.0)))
    trainer.initialize()
    patch = trainer.configuration_manager.patch_size
    data = torch.randn(2, 4, *patch)
    data[0, [0, 3]] = 1e6  # whatever the absent channels hold is not used
    targets, shape = [], list(patch)
    for stride in [[1, 1, 1]] + trainer.configuration_manager.pool_op_kernel_sizes[1:-1]:
        shape = [s // k for s, k in zip(shape, stride)]
        targets.append(torch.rand(2, 3, *shape) > 0.7)
    target = targets if trainer.enable_deep_supervision else targets[0]
    seen = {}
    forward = trainer.network.forward

    def spy(x, present=None, return_parts=False):
        seen.update(x=x.detach().clone(), present=present)
        return forward(x, present, return_parts)

    trainer.network.forward = spy
    out = trainer.train_step({"data": data, "target": target, "keys": np.array(["SYN_0002", "SYN_0000"])})
    assert np.isfinite(out["loss"]) and all(np.isfinite(v).all() for v in out.values())
    assert seen["present"].tolist() == [[False, True, True, False], [True] * 4]
    assert not seen["x"][0, [0, 3]].any() and torch.equal(seen["x"][1], data[1])
    # a batch of complete cases without dropout: no mask, so the network skips the anchor fill
    trainer.train_step({"data": data, "target": target, "keys": np.array(["SYN_0000", "SYN_0003"])})
    assert seen["present"] is None


@pytest.mark.slow
def test_validation_step_tells_the_teacher_what_each_case_has(env):
    from nnalign.runs import teacher_spec
    from nnalign.training.teacher_trainer import teacher_trainer_class

    trainer = _trainer(teacher_trainer_class(teacher_spec("mixture", modality_dropout=0.5)))
    trainer.initialize()
    trainer.network.eval()
    patch = trainer.configuration_manager.patch_size
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(2, 4, *patch, generator=gen)
    data[0, [0, 3]] = 0  # SYN_0002 lacks T1 and FLAIR: preprocessing leaves their channels zero
    target = (torch.rand(2, 3, *patch, generator=gen) > 0.7).float()  # the three regions
    trainer.set_deep_supervision_enabled(False)
    trainer.enable_deep_supervision = False
    batch = {"data": data, "target": target, "keys": np.array(["SYN_0002", "SYN_0000"])}
    with torch.no_grad():
        told = trainer.validation_step(batch)["loss"]
        garbage = data.clone()
        garbage[0, [0, 3]] = 1e3 * torch.randn(2, *patch, generator=gen)  # unread when the teacher is told
        assert trainer.validation_step({**batch, "data": garbage})["loss"] == pytest.approx(told, rel=1e-6)
        untold = trainer.validation_step({**batch, "keys": np.array(["SYN_0000", "SYN_0000"])})["loss"]
    assert abs(untold - told) > 1e-6  # zero channels taken for real images give another loss
    assert trainer.net._assumed_presence is None


@pytest.mark.slow
def test_final_validation_predicts_each_case_from_what_it_has(env):
    from nnalign.runs import teacher_spec
    from nnalign.training.teacher_trainer import teacher_trainer_class

    trainer = _trainer(teacher_trainer_class(teacher_spec("mixture", modality_dropout=0.5)))
    trainer.initialize()
    trainer.do_split = lambda: (["SYN_0000", "SYN_0003"], ["SYN_0001", "SYN_0002", "SYN_0003"])
    net, seen = trainer.net, []
    forward = net.forward

    def spy(x, present=None, return_parts=False):
        seen.append(net.present_modalities)
        return forward(x, present, return_parts)

    net.forward = spy
    trainer.perform_actual_validation()
    assert sorted(set(seen)) == [(0, 1, 2, 3), (0, 1, 3), (1, 2)]  # SYN_0001 lacks T2, SYN_0002 T1 and FLAIR
    assert net.present_modalities == (0, 1, 2, 3)
    assert len(list((Path(trainer.output_folder) / "validation").glob("SYN_*.nii.gz"))) == 3


@pytest.mark.slow
def test_student_trains_on_the_cases_with_its_subset_and_refuses_none(env):
    from nnalign.training.student_trainer import student_trainer_class

    cls = student_trainer_class("nnAlignStudent_T1-T2_kdnet_Teacher-mixture")
    trainer = _trainer(cls)
    train, val = trainer.do_split()
    assert "SYN_0001" not in train + val and "SYN_0002" not in train + val  # they lack T2 and T1
    assert trainer.subset_cases["train"] == len(train) and trainer.settings_record()["cases"] == trainer.subset_cases
    assert trainer.subset_cases["train_without_subset"] + trainer.subset_cases["val_without_subset"] == 2

    trainer.dataset_json["nnalign"][MISSING_KEY] = {f"SYN_{i:04d}": ["T1"] for i in range(4)}
    with pytest.raises(NnalignError) as e:
        trainer.do_split()
    assert str(e.value).startswith("no training case of fold 0 has T1+T2") and "\n" not in str(e.value)


@pytest.mark.slow
def test_the_student_s_teacher_is_told_what_each_case_has(env):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnalign.training.student_trainer import student_trainer_class, teacher_checkpoint
    from nnalign.training.teacher_trainer import teacher_trainer_class

    cls = student_trainer_class("nnAlignStudent_T1ce_pmkl_Teacher-mixture-drop0p5")
    pre = Path(os.environ["nnUNet_preprocessed"]) / DATASET
    plans = PlansManager(str(pre / "nnAlignPlans.json"))
    teacher = teacher_trainer_class(cls.spec.teacher).build_network_architecture(
        plans, plans.get_configuration(CONFIG), 4, 3, False)
    path = teacher_checkpoint(Path(os.environ["nnUNet_results"]) / DATASET, cls.spec.teacher_trainer,
                              plans.plans_name, CONFIG, 0)
    path.parent.mkdir(parents=True)
    torch.save({"network_weights": teacher.state_dict()}, path)
    trainer = _trainer(cls)
    trainer.initialize()
    seen = {}
    forward = trainer.teacher.forward

    def spy(x, present=None, return_parts=False):
        seen["present"] = present
        return forward(x, present, return_parts)

    trainer.teacher.forward = spy
    patch = trainer.configuration_manager.patch_size
    targets, shape = [], list(patch)
    for stride in [[1, 1, 1]] + trainer.configuration_manager.pool_op_kernel_sizes[1:-1]:
        shape = [s // k for s, k in zip(shape, stride)]
        targets.append(torch.rand(2, 3, *shape) > 0.7)
    target = targets if trainer.enable_deep_supervision else targets[0]
    data = torch.randn(2, 4, *patch)
    out = trainer.train_step({"data": data, "target": target, "keys": np.array(["SYN_0001", "SYN_0000"])})
    assert np.isfinite(out["loss"])
    assert seen["present"].tolist() == [[True, True, False, True], [True] * 4]  # SYN_0001 lacks T2
    trainer.train_step({"data": data, "target": target, "keys": np.array(["SYN_0000", "SYN_0003"])})
    assert seen["present"] is None
