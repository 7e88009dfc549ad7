"""The demo's data steps (holding cases out), its grid (the preset ``demo`` with its options, the commands of
before), its progress lines, and its summary (both means, collapse in words)."""
import json
from pathlib import Path

import pytest

import nnalign.demo as demo
from nnalign.data.synthetic import write_synthetic_dataset
from nnalign.demo import (DemoOptions, EpochLines, TrainingLogs, demo_models, demo_spec, evaluation_scores, hold_out,
                          parse_kd_methods, reference_regions, rows_markdown, score_row)
from nnalign.errors import NnalignError
from nnalign.experiments import grid as grid_module
from nnalign.runs import StudentSpec, TeacherSpec

DEMO_TEACHER = "nnAlignTeacher_mixture_drop0p5_bal"
"""The demo's teacher since before the demo was a preset: its models (and students' names) must stay the same."""


def test_hold_out_moves_the_last_cases_with_all_their_files(tmp_path):
    folder = write_synthetic_dataset(tmp_path, 3, num_cases=5, shape=(32, 32, 32))
    held = hold_out(folder, 0.4)
    assert held == ["SYN_0003", "SYN_0004"]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == ["SYN_0003.nii.gz", "SYN_0004.nii.gz"]
    assert len(list((folder / "imagesTs").iterdir())) == 8
    assert len(list((folder / "imagesTr").iterdir())) == 12
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 3


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


@pytest.fixture
def demo_grid(tmp_path, monkeypatch):
    """The demo's grid (default options, dataset 951) on 2 + 1 tiny synthetic cases, its data made, nothing planned."""
    from nnalign.experiments.grid import build_grid

    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "results")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    opts = DemoOptions(dataset_id=951, cases=2, test_cases=1, shape=(32, 32, 32))
    demo._prepare_data(opts, tmp_path / "raw", 2, lambda m: None)
    return build_grid(demo_spec(opts))


def test_the_demo_runs_its_preset_with_the_commands_of_before(demo_grid):
    """The preset's grid: plan and preprocess, the demo's teacher (same name, flags, 90 x 10), its PMKL and
    no-distillation T1ce students (50 x 10), the teacher evaluated with all modalities, T1ce and FLAIR, each student
    with T1ce, every fold of the model, no test-time mirroring, then the report with t-SNE of one case."""
    from nnalign.experiments.local import run_env
    from nnalign.model_folders import evaluation_folder, model_folder

    g = demo_grid
    teacher = TeacherSpec("mixture", modality_dropout=0.5, subset_sampling="balanced")
    assert teacher.trainer_name() == DEMO_TEACHER
    students = [StudentSpec(("T1ce",), kd, teacher).trainer_name() for kd in ("pmkl", "none")]
    assert list(g.steps) == ["preprocess", f"train.{DEMO_TEACHER}.fold_0", *(f"train.{s}.fold_0" for s in students),
                             *(f"evaluate.{DEMO_TEACHER}.{tag}" for tag in ("T1-T1ce-T2-FLAIR", "T1ce", "FLAIR")),
                             *(f"evaluate.{s}.T1ce" for s in students), "report"]
    assert g.steps["preprocess"].commands == (("nnalign.cli.plan_and_preprocess", "-d", "951", "-c", "3d_cpu", "-np",
                                               "2"),)
    length = {"teacher": ["--epochs", "90", "--iters-per-epoch", "10"],
              "student": ["--epochs", "50", "--iters-per-epoch", "10"]}
    assert g.steps[f"train.{DEMO_TEACHER}.fold_0"].commands == (grid_module.train_command(
        g.dataset, "3d_cpu", 0, "cpu", [*teacher.train_flags(), *length["teacher"]]),)
    teacher_folder = model_folder(g.results, DEMO_TEACHER, "3d_cpu")
    for name, kd in zip(students, ("pmkl", "none")):
        assert g.steps[f"train.{name}.fold_0"].commands == (grid_module.train_command(
            g.dataset, "3d_cpu", 0, "cpu", [*grid_module.student_flags(("T1ce",), kd, teacher_folder),
                                            *length["student"]]),)
    student = model_folder(g.results, students[0], "3d_cpu")
    out = evaluation_folder(g.results, student.name, ("T1ce",))
    raw = Path(g.folders["nnUNet_raw"]) / g.dataset
    assert g.steps[f"evaluate.{students[0]}.T1ce"].commands == (
        ("nnalign.cli.predict", "-i", str(raw / "imagesTs"), "-o", str(out / "predictions"), "-m", str(student), "-f",
         "0", "-device", "cpu", "--modalities", "T1ce",
         "--labels", "nnunet", "--disable-tta"),
        ("nnalign.cli.evaluate", "-r", str(raw / "labelsTs"), "-p", str(out / "predictions"), "--labels", "nnunet",
         "-o", str(out / "metrics.csv")))
    report = g.steps["report"].commands[0]
    assert report[report.index("--tsne-cases") + 1] == "1" and "--no-tsne" not in report
    assert run_env(g)["nnUNet_n_proc_DA"] == "2"


def test_the_demos_options_change_its_preset(monkeypatch):
    """-d, --kd, --modalities, the lengths and -device reach the SPEC; the no-distillation student is always there; a
    nnUNet_n_proc_DA of the environment wins over the preset's data workers, as before."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "5")
    opts = DemoOptions(dataset_id=7, kd=("kdnet", "pmkl"), student_modalities=("FLAIR", "T2"), teacher_epochs=3,
                       student_epochs=2, iters_per_epoch=4, device="cuda")
    spec = demo_spec(opts)
    assert (spec.dataset_id, spec.device, spec.data_workers) == (7, "cuda", None)
    assert (spec.teacher_length.epochs, spec.student_length.epochs, spec.student_length.iters_per_epoch) == (3, 2, 4)
    assert [(s.subsets, s.kd, s.teachers) for s in spec.students] == [((("FLAIR", "T2"),), ("kdnet", "pmkl", "none"),
                                                                      ("P*",))]
    models = demo_models(spec, Path("/r"))
    assert [(m.what, m.subsets, m.epochs) for m in models] == [
        ("teacher P* (modality dropout 0.5, balanced)", (("T1", "T1ce", "T2", "FLAIR"), ("T1ce",), ("FLAIR",)), 3),
        *((f"student FLAIR+T2 ({kd})", (("FLAIR", "T2"),), 2) for kd in ("kdnet", "pmkl", "none"))]
    assert models[0].folder == Path("/r") / f"{DEMO_TEACHER}__nnAlignPlans__3d_cpu"
    defaults = DemoOptions()
    assert (defaults.dataset_id, defaults.kd, defaults.student_modalities, defaults.teacher_epochs,
            defaults.student_epochs, defaults.iters_per_epoch, defaults.device) == (900, ("pmkl",), ("T1ce",), 90, 50,
                                                                                   10, "cpu")


def test_the_demo_follows_each_training_log_one_line_per_epoch(demo_grid):
    """What earlier attempts wrote is not said again; a line is said once it is whole; each training its length."""
    from nnalign.experiments.state import StateStore

    store = StateStore(demo_grid.state_dir)
    teacher = f"train.{DEMO_TEACHER}.fold_0"
    epoch = ("2026-12-02 03:50:10.1: Epoch {n}\n2026-12-02 03:50:11.6: train_loss 0.5\n"
             "2026-12-02 03:50:11.6: Pseudo dice [0.5, 0.25, 0.125]\n2026-12-02 03:50:11.6: Epoch time: 1.5 s\n")
    store.log(teacher).parent.mkdir(parents=True)
    store.log(teacher).write_text(epoch.format(n=0))
    said = []
    logs = TrainingLogs(demo_grid, store, demo_models(demo_grid.spec, demo_grid.results), said.append)
    with open(store.log(teacher), "a") as f:
        f.write(epoch.format(n=1)[:-3])
    logs([teacher])
    assert said == []
    with open(store.log(teacher), "a") as f:
        f.write(" s\n" + epoch.format(n=2))
    logs([teacher, "report"])
    assert said == [f"  epoch {n}/90: train loss 0.500, pseudo-Dice WT 0.50 TC 0.25 ET 0.12, 1.5 s" for n in (2, 3)]


def test_the_demos_table_reads_the_scores_nnalign_evaluate_wrote(tmp_path):
    """The per-case scores of an evaluation's metrics.json, where the grid's evaluation writes it."""
    from nnalign.evaluation.evaluate import evaluate
    from nnalign.model_folders import evaluation_folder

    folder = write_synthetic_dataset(tmp_path / "raw", 3, num_cases=1, shape=(32, 32, 32), num_test=2)
    model = tmp_path / "results" / "nnAlignStudent_T1ce_none__nnAlignPlans__3d_cpu"
    evaluate(folder / "labelsTs", folder / "labelsTs", labels="nnunet", progress=False,
             output=evaluation_folder(tmp_path / "results", model.name, ("T1ce",)) / "metrics.csv")
    scores = evaluation_scores(tmp_path / "results", model, ("T1ce",))
    assert set(scores) == {"SYNTS_0000", "SYNTS_0001"}
    row, warnings = score_row("student", ("T1ce",), scores, reference_regions(folder / "labelsTs", ".nii.gz"))
    assert (row["Dice WT"], row["Dice WT with"], row["cases with WT"], warnings) == (1.0, 1.0, 2, [])


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
    trained (an epoch line each), scored and reported; a second call finds every run of its grid done, runs nothing,
    leaves the checkpoints alone and prints the same table."""
    env = folders_env(tmp_path)
    args = ("--cases", "4", "--test-cases", "2", "--teacher-epochs", "1", "--student-epochs", "1",
            "--iters-per-epoch", "2", "--kd", "kdnet", "-d", "951")
    first = run_module("demo", *args, env=env, cwd=tmp_path, timeout=1500)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = [line for line in first.stdout.splitlines() if line.startswith("| ") and "Dice" not in line]
    models = {line.split("|")[1].strip() for line in rows}
    assert {"teacher P* (modality dropout 0.5, balanced)", "student T1ce (kdnet)", "student T1ce (none)"} <= models
    assert len(rows) == 5 and first.stdout.count("  epoch 1/1: train loss ") == 3
    report = Path(first.stdout.rsplit("Paper-style tables and figures: ", 1)[1].strip())
    assert report.is_file()
    checkpoints = sorted(Path(env["nnUNet_results"]).glob("Dataset951_*/*/fold_0/checkpoint_final.pth"))
    assert len(checkpoints) == 3
    written = [c.stat().st_mtime_ns for c in checkpoints]

    again = run_module("demo", *args, env=env, cwd=tmp_path, timeout=1500)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count(": done before") == 10  # preprocessing, 3 trainings, 5 evaluations, the report
    assert "started: " not in again.stdout
    assert [c.stat().st_mtime_ns for c in checkpoints] == written
    assert [line for line in again.stdout.splitlines() if line.startswith("| ") and "Dice" not in line] == rows


@pytest.mark.parametrize("interrupted", [True, False])
def test_the_demo_plans_again_after_an_interrupted_preprocessing(demo_grid, interrupted):
    """Every case preprocessed but the run that wrote them broke off (its marker is there): plan again; a finished
    folder is reused."""
    from nnalign.planning.status import INCOMPLETE_MARKER

    raw = Path(demo_grid.folders["nnUNet_raw"]) / demo_grid.dataset
    pre = Path(demo_grid.folders["nnUNet_preprocessed"]) / demo_grid.dataset
    data = pre / "nnAlignPlans_3d_cpu"
    data.mkdir(parents=True)
    (pre / "nnAlignPlans.json").write_text(json.dumps({"configurations": {"3d_cpu": {"data_identifier": data.name}}}))
    for label in (raw / "labelsTr").glob("*.nii.gz"):
        (data / f"{label.name[: -len('.nii.gz')]}.pkl").touch()
    if interrupted:
        (pre / INCOMPLETE_MARKER).touch()
    assert demo_grid.steps["preprocess"].is_done() is not interrupted
