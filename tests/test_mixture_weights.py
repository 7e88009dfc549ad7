"""P*'s weights learn with every modality present: on synthetic cases where only FLAIR shows the tumour, a short
full-modality P* training (no modality dropout) gives FLAIR the largest weight."""
from __future__ import annotations

import json

import pytest
from conftest import run_train

from nnalign.training.record import SETTINGS_RECORD

pytestmark = pytest.mark.slow

DATASET_ID = 982
DATASET = "Dataset982_SyntheticBraTS"


@pytest.fixture(scope="module")
def flair_only(tmp_path_factory):
    """8 cases of 48^3 whose tumour shows in FLAIR alone, planned and preprocessed for 3d_cpu."""
    root = tmp_path_factory.mktemp("flair_only")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "results")):
            mp.setenv(var, str(root / sub))
        mp.setenv("nnUNet_n_proc_DA", "0")
        from nnalign.data.synthetic import write_synthetic_dataset
        from nnalign.planning.plan_and_preprocess import plan_and_preprocess

        write_synthetic_dataset(root / "raw", DATASET_ID, num_cases=8, shape=(48, 48, 48), seed=1,
                                tumour_modalities=("FLAIR",))
        plan_and_preprocess(DATASET_ID, ["3d_cpu"], num_processes=1, warn=lambda m: None)
    return root


def test_the_modality_that_shows_the_tumour_gets_the_largest_weight(flair_only):
    results = flair_only / "results"
    proc = run_train(flair_only, results, str(DATASET_ID), "3d_cpu", "0", "--anchor", "mixture", "--epochs", "30",
                     "--iters-per-epoch", "10", "-device", "cpu", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((results / DATASET / "nnAlignTeacher_mixture__nnAlignPlans__3d_cpu" / "fold_0" /
                         SETTINGS_RECORD).read_text())
    weights = {m: w["normalised"] for m, w in record["mixture_weights"].items()}
    assert max(weights, key=weights.get) == "FLAIR", weights
    assert weights["FLAIR"] > 0.25 + 0.05, weights  # clearly above the uniform start
    # the latent space kept its size while the modalities were aligned
    rms = record["alignment_log"]["latent_rms"]
    assert min(rms[-1].values()) > 0.5 * min(rms[0].values()), rms
    relative_gap = record["alignment_log"]["relative_gap"]
    assert relative_gap[-1] < relative_gap[0], relative_gap
