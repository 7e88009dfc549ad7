"""A dataset with a resection cavity (BraTS 2024+ RC) trains RC as a fourth region, teachers and students alike, and
prediction and evaluation report it on its own.

One synthetic dataset (4 training cases and 1 held-out case of 32^3) gets a cavity, label 4 in nnU-Net's labels, in
a box of brain outside the tumour, and dataset.json the labels of a dataset with RC; a P* teacher (modality
dropout) and its T1ce PMKL student train for 1 epoch x 2 iterations.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

DATASET_ID = 995
DATASET = "Dataset995_SyntheticBraTS"
CONFIG = "3d_cpu"
TEACHER = "nnAlignTeacher_mixture_drop0p5__nnAlignPlans__3d_cpu"


def add_cavity(label_file: Path) -> None:
    """Label 4 on the brain voxels of a box that holds no tumour (the nnU-Net labels 1-3 are left as they are)."""
    image = sitk.ReadImage(str(label_file))
    seg = sitk.GetArrayFromImage(image)
    box = np.zeros(seg.shape, dtype=bool)
    box[4:12, 4:12, 4:12] = True
    seg[box & (seg == 0)] = 4
    out = sitk.GetImageFromArray(seg.astype(np.uint8))
    out.CopyInformation(image)
    sitk.WriteImage(out, str(label_file), True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from nnalign.data.labels import nnunet_dataset_labels
    from nnalign.data.synthetic import write_synthetic_dataset
    from nnalign.planning.plan_and_preprocess import plan_and_preprocess

    root = tmp_path_factory.mktemp("cavity")
    folders = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
               "nnUNet_results": str(root / "results"), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
               "nnUNet_compile": "f"}
    with pytest.MonkeyPatch.context() as mp:
        for var, value in folders.items():
            mp.setenv(var, value)
        raw = write_synthetic_dataset(root / "raw", DATASET_ID, num_cases=4, shape=(32, 32, 32), num_test=1)
        for label_file in [*(raw / "labelsTr").glob("*.nii.gz"), *(raw / "labelsTs").glob("*.nii.gz")]:
            add_cavity(label_file)
        dataset_json = json.loads((raw / "dataset.json").read_text())
        dataset_json["labels"], dataset_json["regions_class_order"] = nnunet_dataset_labels(cavity=True)
        (raw / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        plan_and_preprocess(DATASET_ID, [CONFIG], num_processes=1, warn=lambda m: None)
    env = {**{k: v for k, v in os.environ.items() if k not in ("NNALIGN_DEBUG", "nnUNet_extTrainer")}, **folders}
    length = ["-device", "cpu", "--epochs", "1", "--iters-per-epoch", "2"]
    results = root / "results" / DATASET
    for args in (["--role", "teacher", "--anchor", "mixture", "--modality-dropout", "0.5"],
                 ["--role", "student", "--modalities", "T1ce", "--kd", "pmkl", "--teacher", str(results / TEACHER)]):
        proc = subprocess.run([sys.executable, "-m", "nnalign.cli.train", str(DATASET_ID), CONFIG, "0", *args,
                               *length], capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "raw": raw, "results": results, "env": env}


def output_channels(model: Path) -> int:
    from nnalign.checkpoints import load_checkpoint_safely

    weights = load_checkpoint_safely(model / "fold_0" / "checkpoint_final.pth")["network_weights"]
    heads = sorted(k for k in weights if "seg_layers" in k and k.endswith(".weight"))
    return int(weights[heads[-1]].shape[0])


@pytest.mark.slow
def test_teacher_and_student_train_the_cavity_as_a_fourth_region(trained):
    models = sorted(p for p in trained["results"].iterdir() if p.is_dir())
    assert len(models) == 2 and all(output_channels(m) == 4 for m in models), models
    record = json.loads((trained["results"] / TEACHER / "fold_0" / "nnalign_settings.json").read_text())
    assert record["training_volumes_ml"]["RC"]["min_nonzero"] > 0  # every training case has its cavity


@pytest.mark.slow
def test_prediction_and_evaluation_report_the_cavity_on_its_own(trained, tmp_path):
    cases = tmp_path / "in"
    cases.mkdir()
    for i, suffix in enumerate(("t1n", "t1c", "t2w", "t2f")):  # BraTS 2023+ names, as a 2024 release has them
        src = trained["raw"] / "imagesTs" / f"SYNTS_0000_{i:04d}.nii.gz"
        (cases / f"BraTS-GLI-00001-000-{suffix}.nii.gz").write_bytes(src.read_bytes())
    out = tmp_path / "out"
    for modalities, model in ((None, TEACHER), ("T1ce", "nnAlignStudent_T1ce_pmkl")):
        target = out / (modalities or "all")
        proc = subprocess.run([sys.executable, "-m", "nnalign.cli.predict", "-i", str(cases), "-o", str(target),
                               "-m", str(trained["results"]), "-device", "cpu", "--disable-tta", "--labels",
                               "brats2024", *(["--modalities", modalities] if modalities else [])],
                              capture_output=True, text=True, env=trained["env"], timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        report = json.loads((target / "BraTS-GLI-00001-000.json").read_text())
        assert report["model"].startswith(model) and set(report["volumes_ml"]) == {"WT", "TC", "ET", "RC"}
        row = next(csv.DictReader((target / "nnalign_predict_report.csv").open()))
        assert row["volume_RC_ml"] == str(report["volumes_ml"]["RC"])
    reference = tmp_path / "ref"
    reference.mkdir()
    seg = sitk.ReadImage(str(trained["raw"] / "labelsTs" / "SYNTS_0000.nii.gz"))
    from nnalign.data.labels import nnunet_to_brats

    brats = sitk.GetImageFromArray(nnunet_to_brats(sitk.GetArrayFromImage(seg), "brats2024"))
    brats.CopyInformation(seg)
    sitk.WriteImage(brats, str(reference / "BraTS-GLI-00001-000.nii.gz"))
    # The convention is given: from flat files alone, a case without label 3 in either file reads as brats2018
    # (4 = ET), and whether this briefly trained model predicts any ET is chance.
    proc = subprocess.run([sys.executable, "-m", "nnalign.cli.evaluate", "-r", str(reference), "-p",
                           str(out / "all"), "--labels", "brats2024"], capture_output=True, text=True, env=trained["env"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header = (out / "all" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "Dice_RC" in header and "HD95_RC" in header
