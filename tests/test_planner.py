"""nnalign's planner on a real-BraTS-sized fingerprint, compared with stock nnU-Net planning for the same target."""
import numpy as np
import pytest

from nnalign.planning.brats_like import plan_brats_like, write_brats_like_fingerprint

DATASET_ID = 501


@pytest.fixture
def brats_sized_dataset(tmp_path, monkeypatch):
    """nnU-Net folders in tmp_path holding a placeholder dataset with a BraTS 2018-sized fingerprint."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    write_brats_like_fingerprint(DATASET_ID)
    return DATASET_ID


def _plan(planner_cls, dataset_id, gb, plans_name):
    return plan_brats_like(planner_cls, dataset_id, gb, plans_name)


def _voxels_per_step(cfg):
    return int(np.prod(cfg["patch_size"])) * cfg["batch_size"]


@pytest.fixture
def planners():
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from nnalign.planning.planner import nnAlignPlanner
    return ExperimentPlanner, nnAlignPlanner


@pytest.mark.slow
@pytest.mark.parametrize("gb", [8, 24])
def test_teacher_aware_plan_fits_target_and_is_never_larger_than_stock(brats_sized_dataset, planners, gb):
    stock_cls, align_cls = planners
    stock = _plan(stock_cls, brats_sized_dataset, gb, "nnUNetPlans")["configurations"]["3d_fullres"]
    ours = _plan(align_cls, brats_sized_dataset, gb, "nnAlignPlans")["configurations"]["3d_fullres"]
    assert ours["architecture"]["network_class_name"].endswith("nnAlignTeacherUNet")
    assert ours["nnalign_estimated_memory_gb"] <= gb
    assert _voxels_per_step(ours) <= _voxels_per_step(stock)
    assert all(o <= s for o, s in zip(ours["patch_size"], stock["patch_size"])) or ours["batch_size"] < stock["batch_size"]


@pytest.mark.slow
def test_estimate_counts_the_teacher_and_distillation(brats_sized_dataset, planners):
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from nnalign.planning.planner import teacher_and_distillation_size

    cfg = _plan(planners[1], brats_sized_dataset, 8, "nnAlignPlans")["configurations"]["3d_fullres"]
    arch = cfg["architecture"]
    from nnalign.networks.align_unet import PLAIN_UNET_KEYS

    plain_kwargs = {k: v for k, v in arch["arch_kwargs"].items() if k in PLAIN_UNET_KEYS}
    stock = ExperimentPlanner.static_estimate_VRAM_usage(
        cfg["patch_size"], 4, 4, "dynamic_network_architectures.architectures.unet.PlainConvUNet", plain_kwargs,
        arch["_kw_requires_import"])
    ours = teacher_and_distillation_size(cfg["patch_size"], 4, 4, arch["arch_kwargs"], arch["_kw_requires_import"])
    assert ours > stock


@pytest.mark.slow
def test_larger_memory_target_gives_larger_patch_or_batch(brats_sized_dataset, planners):
    small = _plan(planners[1], brats_sized_dataset, 8, "nnAlignPlans")["configurations"]["3d_fullres"]
    large = _plan(planners[1], brats_sized_dataset, 24, "nnAlignPlans24")["configurations"]["3d_fullres"]
    assert _voxels_per_step(large) > _voxels_per_step(small)
    assert large["nnalign_estimated_memory_gb"] > small["nnalign_estimated_memory_gb"]


@pytest.mark.slow
def test_cpu_and_paper_configurations(brats_sized_dataset, planners):
    plans = _plan(planners[1], brats_sized_dataset, 8, "nnAlignPlans")
    cfgs = plans["configurations"]
    assert "3d_lowres" not in cfgs and "3d_cascade_fullres" not in cfgs
    cpu = cfgs["3d_cpu"]
    assert cpu["spacing"] == pytest.approx([2.0, 2.0, 2.0])
    assert max(cpu["patch_size"]) <= 64 and cpu["batch_size"] >= 2
    assert cpu["architecture"]["arch_kwargs"]["features_per_stage"][-1] <= 128
    assert cpu["nnalign_estimated_memory_gb"] < cfgs["3d_fullres"]["nnalign_estimated_memory_gb"]
    paper = cfgs["paper"]
    assert paper["patch_size"] == [80, 80, 80] and paper["batch_size"] == 4
    assert set(paper["normalization_schemes"]) == {"RescaleTo01Normalization"}
    assert paper["architecture"]["arch_kwargs"]["input_scale"] == [2.0, -1.0]
    assert paper["nnalign_training"]["optimizer"] == "adam"
    assert paper["data_identifier"] != cfgs["3d_fullres"]["data_identifier"]
    for cfg in cfgs.values():  # the latent encoder's settings, but not the encoder mode (a run's, in its name)
        kwargs = cfg["architecture"]["arch_kwargs"]
        assert {"latent_channels", "latent_convs", "latent_level"} <= set(kwargs) and "shared_encoder" not in kwargs


def test_fingerprint_extractor_caps_samples_for_small_datasets(brats_sized_dataset):
    from nnalign.planning.fingerprint import MAX_INTENSITY_SAMPLES_PER_CASE, nnAlignFingerprintExtractor

    fpe = nnAlignFingerprintExtractor(brats_sized_dataset, num_processes=1)
    # the raw folder holds two cases: nnU-Net would draw 1e8 / 2 samples per case
    assert fpe.num_foreground_voxels_for_intensitystats == MAX_INTENSITY_SAMPLES_PER_CASE * 2
