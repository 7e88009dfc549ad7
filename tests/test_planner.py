"""nnalign's planner on a real-BraTS-sized fingerprint, compared with stock nnU-Net planning for the same target."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnalign.data.raw_dataset import image_filename, write_dataset_json

DATASET_ID = 501
BRATS_CASES = 285
BRATS_SHAPE_AFTER_CROP = (138, 169, 138)


@pytest.fixture
def brats_sized_dataset(tmp_path, monkeypatch):
    """A raw dataset folder with two tiny files and a fingerprint that looks like BraTS 2018 (285 cases, 1 mm)."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    raw = tmp_path / "nnUNet_raw" / f"Dataset{DATASET_ID}_BraTSLike"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for case in ("a", "b"):
        for c in range(4):
            sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 4, 4), np.float32)), str(raw / "imagesTr" / image_filename(case, c)))
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.uint8)), str(raw / "labelsTr" / f"{case}.nii.gz"))
    write_dataset_json(raw, BRATS_CASES, "BraTSLike")
    pre = tmp_path / "nnUNet_preprocessed" / raw.name
    pre.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shapes = [list(np.array(BRATS_SHAPE_AFTER_CROP) + rng.integers(-10, 10, 3)) for _ in range(BRATS_CASES)]
    stats = {"mean": 500.0, "median": 480.0, "std": 150.0, "min": 0.0, "max": 2000.0,
             "percentile_99_5": 1500.0, "percentile_00_5": 50.0}
    fingerprint = {"spacings": [[1.0, 1.0, 1.0]] * BRATS_CASES, "shapes_after_crop": [[int(v) for v in s] for s in shapes],
                   "foreground_intensity_properties_per_channel": {str(c): stats for c in range(4)},
                   "median_relative_size_after_cropping": 0.6}
    (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    return DATASET_ID


def _plan(planner_cls, dataset_id, gb, plans_name):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return planner_cls(dataset_id, gpu_memory_target_in_gb=gb, plans_name=plans_name).plan_experiment()


def _voxels_per_step(cfg):
    return int(np.prod(cfg["patch_size"])) * cfg["batch_size"]


@pytest.fixture
def planners():
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from nnalign.planning.planner import nnAlignPlanner
    return ExperimentPlanner, nnAlignPlanner


@pytest.mark.parametrize("gb", [8, 24])
def test_teacher_aware_plan_fits_target_and_is_never_larger_than_stock(brats_sized_dataset, planners, gb):
    stock_cls, align_cls = planners
    stock = _plan(stock_cls, brats_sized_dataset, gb, "nnUNetPlans")["configurations"]["3d_fullres"]
    ours = _plan(align_cls, brats_sized_dataset, gb, "nnAlignPlans")["configurations"]["3d_fullres"]
    assert ours["architecture"]["network_class_name"].endswith("nnAlignTeacherUNet")
    assert ours["nnalign_estimated_memory_gb"] <= gb
    assert _voxels_per_step(ours) <= _voxels_per_step(stock)
    assert all(o <= s for o, s in zip(ours["patch_size"], stock["patch_size"])) or ours["batch_size"] < stock["batch_size"]


def test_estimate_counts_the_teacher_and_distillation(brats_sized_dataset, planners):
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from nnalign.planning.planner import teacher_and_distillation_size

    cfg = _plan(planners[1], brats_sized_dataset, 8, "nnAlignPlans")["configurations"]["3d_fullres"]
    arch = cfg["architecture"]
    plain_kwargs = {k: v for k, v in arch["arch_kwargs"].items()
                    if k not in ("latent_channels", "latent_convs", "shared_encoder")}
    stock = ExperimentPlanner.static_estimate_VRAM_usage(
        cfg["patch_size"], 4, 4, "dynamic_network_architectures.architectures.unet.PlainConvUNet", plain_kwargs,
        arch["_kw_requires_import"])
    ours = teacher_and_distillation_size(cfg["patch_size"], 4, 4, arch["arch_kwargs"], arch["_kw_requires_import"])
    assert ours > stock


def test_larger_memory_target_gives_larger_patch_or_batch(brats_sized_dataset, planners):
    small = _plan(planners[1], brats_sized_dataset, 8, "nnAlignPlans")["configurations"]["3d_fullres"]
    large = _plan(planners[1], brats_sized_dataset, 24, "nnAlignPlans24")["configurations"]["3d_fullres"]
    assert _voxels_per_step(large) > _voxels_per_step(small)
    assert large["nnalign_estimated_memory_gb"] > small["nnalign_estimated_memory_gb"]


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


def test_fingerprint_extractor_caps_samples_for_small_datasets(brats_sized_dataset):
    from nnalign.planning.fingerprint import MAX_INTENSITY_SAMPLES_PER_CASE, nnAlignFingerprintExtractor

    fpe = nnAlignFingerprintExtractor(brats_sized_dataset, num_processes=1)
    # the raw folder holds two cases: nnU-Net would draw 1e8 / 2 samples per case
    assert fpe.num_foreground_voxels_for_intensitystats == MAX_INTENSITY_SAMPLES_PER_CASE * 2
