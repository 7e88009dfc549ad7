"""The demo's data steps (holding cases out, per-subset inputs) and its summary (both means, collapse in words)."""
import json
from pathlib import Path

import pytest

from nnalign.data.synthetic import write_synthetic_dataset
from nnalign.demo import (EpochLines, subset_inputs, hold_out, parse_kd_methods, reference_regions, rows_markdown,
                          score_row)
from nnalign.errors import NnalignError


def test_hold_out_moves_the_last_cases_with_all_their_files(tmp_path):
    folder = write_synthetic_dataset(tmp_path, 3, num_cases=5, shape=(32, 32, 32))
    held = hold_out(folder, 0.4)
    assert held == ["SYN_0003", "SYN_0004"]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == ["SYN_0003.nii.gz", "SYN_0004.nii.gz"]
    assert len(list((folder / "imagesTs").iterdir())) == 8
    assert len(list((folder / "imagesTr").iterdir())) == 12
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 3


def testsubset_inputs_link_only_the_subset_channels(tmp_path):
    folder = write_synthetic_dataset(tmp_path / "raw", 3, num_cases=1, shape=(32, 32, 32), num_test=2)
    inputs = subset_inputs(folder, ("T1ce", "FLAIR"), tmp_path / "in")
    names = sorted(p.name for p in inputs.iterdir())
    assert names == ["SYNTS_0000_0001.nii.gz", "SYNTS_0000_0003.nii.gz", "SYNTS_0001_0001.nii.gz",
                     "SYNTS_0001_0003.nii.gz"]
    assert all(p.resolve().parent == (folder / "imagesTs").resolve() for p in inputs.iterdir())


def test_score_row_gives_both_means_and_the_case_counts_by_hand():
    regions = {"A": {"WT", "TC", "ET"}, "B": {"WT", "TC"}, "C": {"WT"}}
    scores = {"A": {"Dice_WT": 0.9, "Dice_TC": 0.6, "Dice_ET": 0.3},
              "B": {"Dice_WT": 0.7, "Dice_TC": 0.4, "Dice_ET": 1.0},  # no ET in reference or prediction: 1
              "C": {"Dice_WT": 0.8, "Dice_TC": 1.0, "Dice_ET": 1.0}}
    row, warnings = score_row("teacher", ("T1", "FLAIR"), scores, regions)
    assert row["modalities"] == "T1+FLAIR"
    assert row["Dice WT"] == pytest.approx(0.8) and row["Dice WT with"] == pytest.approx(0.8)
    assert row["cases with WT"] == 3
    assert row["Dice TC"] == pytest.approx(2.0 / 3) and row["Dice TC with"] == pytest.approx(0.5)
    assert row["cases with TC"] == 2
    assert row["Dice ET"] == pytest.approx(2.3 / 3) and row["Dice ET with"] == pytest.approx(0.3)
    assert row["cases with ET"] == 1
    assert warnings == []
    table = rows_markdown([row])
    assert table.splitlines()[2] == ("| teacher | T1+FLAIR | 0.800 / 0.800 (3) | 0.667 / 0.500 (2) | "
                                     "0.767 / 0.300 (1) | 0/0/0 |")


def test_score_row_says_in_words_when_a_model_found_no_tumour():
    regions = {"A": {"WT", "TC", "ET"}, "B": {"WT", "TC", "ET"}, "C": set()}
    scores = {"A": {"Dice_WT": 0.0, "Dice_TC": 0.0, "Dice_ET": 0.0},
              "B": {"Dice_WT": 0.5, "Dice_TC": 0.3, "Dice_ET": 0.0},
              "C": {"Dice_WT": 1.0, "Dice_TC": 1.0, "Dice_ET": 1.0}}  # no tumour: not a miss
    row, warnings = score_row("student T1ce (kdnet)", ("T1ce",), scores, regions)
    # one missed case of two is a miss, counted in the table; none found in any case is a collapse, said in words
    assert (row["missed WT"], row["missed TC"], row["missed ET"]) == (1, 1, 2)
    assert warnings == ["student T1ce (kdnet) on T1ce found no ET in any of the 2 held-out cases that have it"]
    scores["B"]["Dice_WT"] = 0.0
    _, warnings = score_row("student T1ce (kdnet)", ("T1ce",), scores, regions)
    assert warnings[0] == "student T1ce (kdnet) on T1ce found no tumour in any of the 2 held-out cases that have it"


def test_reference_regions_reads_each_cases_labels(tmp_path):
    folder = write_synthetic_dataset(tmp_path / "raw", 3, num_cases=1, shape=(32, 32, 32), num_test=2)
    regions = reference_regions(folder / "labelsTs", ".nii.gz")
    assert set(regions) == {"SYNTS_0000", "SYNTS_0001"}
    assert all("WT" in r for r in regions.values())  # every synthetic case has tumour


def test_the_demos_commands_are_the_experiment_grids():
    """One source for the command lines: the demo runs nnalign_train and nnalign_predict as the grid writes them, at
    the demo's configuration and fold 0, with this interpreter."""
    import sys

    from nnalign.demo import CONFIGURATION, TEACHER, predict_command, student_flags, train_command
    from nnalign.experiments import grid

    teacher = train_command("Dataset900_X", "cpu", 90, 10) + TEACHER.train_flags()
    assert teacher[:2] == [sys.executable, "-m"]
    assert tuple(teacher[2:]) == grid.train_command("Dataset900_X", CONFIGURATION, 0, "cpu", [
        "--epochs", "90", "--iters-per-epoch", "10", *TEACHER.train_flags()])
    assert student_flags is grid.student_flags
    predict = predict_command(Path("in"), Path("out"), Path("model"), "cpu")
    assert predict[2:] == ["nnalign.cli.predict", "-i", "in", "-o", "out", "-m", "model", "-device", "cpu", "--labels",
                           "nnunet", "--disable-tta"]  # every fold, and the modalities the input files hold


def test_kd_methods_of_the_demo():
    assert parse_kd_methods("KDnet, pmkl,none,kdnet") == ("kdnet", "pmkl")
    with pytest.raises(NnalignError, match="unknown KD method 'fitnet'"):
        parse_kd_methods("kdnet,fitnet")


def test_epoch_lines_turn_nnunets_log_into_one_line_per_epoch():
    said = []
    lines = EpochLines(60, said.append)
    log = """2026-12-02 03:50:10.176303: 
2026-12-02 03:50:10.176390: Epoch 3
2026-12-02 03:50:10.176488: Current learning rate: 0.00955
2026-12-02 03:50:11.674636: modality_gap 0.1066
2026-12-02 03:50:11.674835: train_loss 0.0997
2026-12-02 03:50:11.674880: val_loss -0.1026
2026-12-02 03:50:11.674918: Pseudo dice [np.float32(0.0), np.float32(0.3807), np.float32(0.125)]
2026-12-02 03:50:11.674957: Epoch time: 1.5 s
2026-12-02 03:50:11.674989: Yayy! New best EMA pseudo Dice: 0.1046999990940094
2026-12-02 03:50:12.522659: Epoch 4
2026-12-02 03:50:13.710036: train_loss -0.25
2026-12-02 03:50:13.710037: Pseudo dice [0.5, 0.25, 1e-05]
2026-12-02 03:50:13.710038: Epoch time: 12.25 s
"""
    for line in log.splitlines(keepends=True):
        lines.feed(line)
    assert said == ["  epoch 4/60: train loss 0.100, pseudo-Dice WT 0.00 TC 0.38 ET 0.12, 1.5 s",
                    "  epoch 5/60: train loss -0.250, pseudo-Dice WT 0.50 TC 0.25 ET 0.00, 12.25 s"]


@pytest.mark.slow
def test_demo_runs_end_to_end_then_resumes_without_training_again(tmp_path, run_module, folders_env):
    """``nnalign_demo`` as a user runs it (tiny: 4 + 2 cases, 1 epoch of 2 iterations per model): every model is
    trained, scored and reported; a second call finds every model done and leaves their checkpoints alone."""
    env = folders_env(tmp_path)
    args = ("--cases", "4", "--test-cases", "2", "--teacher-epochs", "1", "--student-epochs", "1",
            "--iters-per-epoch", "2", "--kd", "kdnet", "-d", "951")
    first = run_module("demo", *args, env=env, cwd=tmp_path, timeout=1500)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = [line for line in first.stdout.splitlines() if line.startswith("| ") and "Dice" not in line]
    models = {line.split("|")[1].strip() for line in rows}
    assert {"teacher P* (modality dropout 0.5, balanced)", "student T1ce (kdnet)", "student T1ce (none)"} <= models
    report = Path(first.stdout.rsplit("Paper-style tables and figures: ", 1)[1].strip())
    assert report.is_file()
    checkpoints = sorted(Path(env["nnUNet_results"]).glob("Dataset951_*/*/fold_0/checkpoint_final.pth"))
    assert len(checkpoints) == 3
    written = [c.stat().st_mtime_ns for c in checkpoints]

    again = run_module("demo", *args, env=env, cwd=tmp_path, timeout=1500)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count(": done before") == 3
    assert [c.stat().st_mtime_ns for c in checkpoints] == written


@pytest.mark.parametrize("interrupted", [True, False])
def test_the_demo_plans_again_after_an_interrupted_preprocessing(tmp_path, monkeypatch, interrupted):
    """Every case preprocessed but the run that wrote them broke off (its marker is there): plan again; a finished
    folder is reused."""
    import nnalign.demo as demo
    import nnalign.planning.plan_and_preprocess as planning
    from nnalign.planning.status import INCOMPLETE_MARKER

    class Planned(Exception):
        pass

    class Trained(Exception):
        pass

    def plan(*args, **kwargs):
        raise Planned

    def train(*args, **kwargs):
        raise Trained

    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "results")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setattr(planning, "plan_and_preprocess", plan)
    monkeypatch.setattr(demo, "_run", train)
    opts = demo.DemoOptions(dataset_id=951, cases=2, test_cases=1, shape=(32, 32, 32))
    raw = demo._prepare_data(opts, tmp_path / "raw", lambda m: None)
    pre = tmp_path / "pre" / raw.name
    data = pre / f"nnAlignPlans_{demo.CONFIGURATION}"
    data.mkdir(parents=True)
    (pre / "nnAlignPlans.json").write_text(json.dumps(
        {"configurations": {demo.CONFIGURATION: {"data_identifier": data.name}}}))
    for label in (raw / "labelsTr").glob("*.nii.gz"):
        (data / f"{label.name[: -len('.nii.gz')]}.pkl").touch()
    if interrupted:
        (pre / INCOMPLETE_MARKER).touch()
    with pytest.raises(Planned if interrupted else Trained):
        demo.run_demo(opts, say=lambda m: None)
