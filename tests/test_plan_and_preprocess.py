"""nnalign_plan_and_preprocess end to end on tiny synthetic data, and its bad-input messages."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nnalign.data.synthetic import write_synthetic_dataset

DATASET_ID = 7


@pytest.fixture
def nnunet_env(tmp_path):
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "res"), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}
    return env


def run_cli(env, *args):
    return subprocess.run([sys.executable, "-m", "nnalign.cli.plan_and_preprocess", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[0]


@pytest.mark.slow
def test_plans_and_preprocesses_synthetic_data_loadable_by_nnunet(nnunet_env, tmp_path):
    write_synthetic_dataset(tmp_path / "raw", DATASET_ID, num_cases=3, shape=(40, 40, 40))
    result = run_cli(nnunet_env, "-d", str(DATASET_ID), "-c", "3d_cpu", "-np", "1")
    assert result.returncode == 0, result.stderr
    assert "| 3d_cpu |" in result.stdout and "| 3d_fullres |" in result.stdout
    assert "3-fold split" in result.stdout  # fewer than 5 cases: a split that fits, with a warning
    pre = tmp_path / "pre" / f"Dataset{DATASET_ID:03d}_SyntheticBraTS"
    plans = json.loads((pre / "nnAlignPlans.json").read_text())
    assert set(plans["configurations"]) >= {"3d_fullres", "3d_cpu", "paper", "2d"}
    splits = json.loads((pre / "splits_final.json").read_text())
    assert len(splits) == 3 and all(len(s["val"]) == 1 for s in splits)

    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = pre / plans["configurations"]["3d_cpu"]["data_identifier"]
    dataset = infer_dataset_class(str(folder))(str(folder))
    data, seg, _, props = dataset.load_case("SYN_0000")
    assert data.shape[0] == 4
    # 40 voxels at 1 mm resampled to the 2 mm CPU spacing: about 20 voxels per axis (cropped to the brain)
    assert all(s <= 21 for s in data.shape[1:])
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "raw" / pre.name / "labelsTr" / "SYN_0000.nii.gz")))
    assert set(np.unique(seg)) - {-1} <= set(np.unique(source))


@pytest.mark.slow
def test_unknown_dataset_is_one_line(nnunet_env):
    assert_one_line_error(run_cli(nnunet_env, "-d", "42"), "no raw dataset with ID 42")


@pytest.mark.slow
def test_unknown_configuration_is_one_line(nnunet_env, tmp_path):
    write_synthetic_dataset(tmp_path / "raw", DATASET_ID, num_cases=1, shape=(32, 32, 32))
    assert_one_line_error(run_cli(nnunet_env, "-d", str(DATASET_ID), "-c", "3d_huge"), "unknown configuration '3d_huge'")


@pytest.mark.slow
def test_a_bad_label_value_is_one_line_without_verify(nnunet_env, tmp_path):
    folder = write_synthetic_dataset(tmp_path / "raw", DATASET_ID, num_cases=2, shape=(32, 32, 32))
    label_file = folder / "labelsTr" / "SYN_0001.nii.gz"
    seg = sitk.ReadImage(str(label_file))
    arr = sitk.GetArrayFromImage(seg)
    arr[0, 0, 0] = 7
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(seg)
    sitk.WriteImage(bad, str(label_file))
    for verify in ([], ["--verify"]):  # nnalign's checks run by default, before nnU-Net's
        assert_one_line_error(run_cli(nnunet_env, "-d", str(DATASET_ID), *verify, "-np", "1"), folder.name,
                              "SYN_0001: SYN_0001.nii.gz: label value 7 not in dataset.json's labels (0, 1, 2, 3)")
