"""``nnalign_experiment``: SPEC parsing and presets, the grid's runs and names, state files and the lock, one-line
errors, and (slow) a tiny grid run to the end with the local executor, resumed, and with a failing run.

The slow part uses one synthetic dataset (3 cases of 40^3, ``3d_cpu``): a mixture teacher and a T1ce KD-Net
student, 2 epochs x 2 iterations each, evaluated on the training cases (the synthetic set has no held-out cases),
and the report.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnalign.errors import NnalignError
from nnalign.experiments.grid import build_grid
from nnalign.experiments.spec import preset_names, read_spec
from nnalign.experiments.state import StateStore, resolve_states
from nnalign.runs import BaselineSpec, StudentSpec, TeacherSpec

P_STAR = TeacherSpec("mixture").trainer_name()  # nnAlignTeacher_mixture_drop0p5: P*'s default dropout

PRESETS = ("paper-table-I", "paper-table-III", "paper-table-IV", "paper-all", "cpu-evidence", "demo")
RECIPE_PRESETS = tuple(f"{name}-recipe" for name in PRESETS[:4])


@pytest.fixture
def paper_data(tmp_path, monkeypatch, fake_dataset, folders_env) -> Path:
    fake_dataset(tmp_path)
    for var, value in folders_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    return tmp_path


# ----------------------------------------------------------------------------------------------------------------------
# SPEC, presets, grid


def test_every_preset_is_shipped_and_plans(paper_data):
    assert set(PRESETS + RECIPE_PRESETS) == set(preset_names())
    sizes = {}
    for preset in PRESETS[:4]:
        grid = build_grid(read_spec(preset))
        sizes[preset] = sum(r.kind == "train" for r in grid.steps.values())
        assert "--tsne-cases" not in grid.steps["report"].commands[0]  # nnalign_report's default: no [report] key
        assert all(d in grid.steps and list(grid.steps).index(d) < list(grid.steps).index(k)
                   for k, r in grid.steps.items() for d in r.deps)  # dependency order
    # 5 teachers; 4 singles x 5 KD settings x 5 teachers; 15 subsets x 2 teachers; the union shares 8 students
    assert sizes == {"paper-table-IV": 5, "paper-table-I": 105, "paper-table-III": 32, "paper-all": 127}


def test_paper_table_III_distils_pmkl_students(paper_data):
    # the paper's Table III distils its students of every subset with PMKL, from the none and mixture teachers
    single_kd = {"paper-table-III": {"pmkl"}, "paper-all": {"none", "kdnet", "pmkl", "protokd", "smunet"}}
    for preset, kd in single_kd.items():
        grid = build_grid(read_spec(preset))
        students = {StudentSpec.parse(r.key.split(".")[1]) for r in grid.steps.values()
                    if r.kind == "train" and r.key.split(".")[1].startswith("nnAlignStudent")}
        subsets = {s for s in students if len(s.modalities) > 1}
        assert len(subsets) == 11 * 2 and {s.kd for s in subsets} == {"pmkl"}
        assert {s.kd for s in students if len(s.modalities) == 1} == kd  # paper-all: Table I's singles too
        assert grid.spec.report.kd == "pmkl"


def _plan_paper_configuration(root: Path) -> None:
    """Add nnalign's paper configuration (as the planner writes it, as far as plan reads it) to the fake plans."""
    plans_file = root / "pre" / "Dataset018_BraTS2018" / "nnAlignPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["paper"] = {"patch_size": [80, 80, 80], "batch_size": 4, "nnalign_training": {
        "optimizer": "adam", "initial_lr": 1e-3, "final_lr": 1e-5, "weight_decay": 1e-5}}
    plans_file.write_text(json.dumps(plans))
    data = root / "pre" / "Dataset018_BraTS2018" / "nnAlignPlans_paper"
    data.mkdir()
    (data / "case.pkl").touch()


@pytest.mark.parametrize("preset", RECIPE_PRESETS)
def test_recipe_presets_are_their_table_with_the_papers_configuration(paper_data, preset):
    _plan_paper_configuration(paper_data)
    spec, table = read_spec(preset), read_spec(preset.removesuffix("-recipe"))
    assert (spec.name, spec.configuration, table.configuration) == (preset, "paper", "3d_fullres")
    assert dataclasses.replace(spec, name=table.name, source=table.source, configuration=table.configuration) == table
    grid, table_grid = build_grid(spec), build_grid(table)
    trainings = [r.commands[0] for r in grid.steps.values() if r.kind == "train"]
    assert len(trainings) == sum(r.kind == "train" for r in table_grid.steps.values())
    assert {c[2] for c in trainings} == {"paper"}
    assert grid.state_dir.name == preset  # its own state and runs: the model folders are the configuration's


def test_plan_names_the_recipe_of_every_run(paper_data, capsys):
    from nnalign.cli.experiment import plan

    _plan_paper_configuration(paper_data)
    plan("paper-table-III-recipe")
    assert "recipe of every run: paper, patch 80x80x80, batch 4, adam lr 0.001 to 1e-05\n" in capsys.readouterr().out
    plan("paper-table-III")
    assert "recipe of every run: 3d_fullres, patch 112x128x112, batch 2, nnU-Net's SGD\n" in capsys.readouterr().out


def test_cpu_evidence_preset_is_the_real_data_protocol(tmp_path, monkeypatch, folders_env):
    for var, value in folders_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    with pytest.raises(NnalignError, match='dataset 218 is in neither .* of a SPEC with extends = "cpu-evidence"'):
        build_grid(read_spec("cpu-evidence"))  # opt-in: the release is the user's to name
    spec = tmp_path / "mine.toml"
    spec.write_text('name = "cpu-evidence"\nextends = "cpu-evidence"\n[dataset]\nconvert = "BraTS2018"\n')
    with pytest.raises(NnalignError, match=r"mine.toml: \[dataset\] convert: .*BraTS2018 is not a folder"):
        build_grid(read_spec(str(spec)))
    (tmp_path / "BraTS2018").mkdir()
    grid = build_grid(read_spec(str(spec)))
    kinds = [r.kind for r in grid.steps.values()]
    assert kinds[:2] == ["convert", "preprocess"] and kinds[-1] == "report"
    trainers = {r.key.split(".")[1] for r in grid.steps.values() if r.kind == "train"}
    students = {StudentSpec((m,), kd, TeacherSpec("mixture")).trainer_name() for m in ("FLAIR", "T1ce")
                for kd in ("none", "kdnet", "protokd")}
    # Table I's Original column: the same KD students of the original teacher (kd none does not use its teacher)
    students |= {StudentSpec((m,), kd, BaselineSpec()).trainer_name() for m in ("FLAIR", "T1ce")
                 for kd in ("kdnet", "protokd")}
    assert trainers == {"nnAlignOriginal", "nnAlignTeacher_none", TeacherSpec("mixture").trainer_name()} | students
    train = grid.steps[f"train.{TeacherSpec('mixture').trainer_name()}.fold_0"].commands[0]
    assert train[:4] == ("nnalign.cli.train", "Dataset218_BraTS2018", "3d_cpu", "0")
    assert "--epochs" in train and train[train.index("--epochs") + 1] == "15"
    assert grid.state_dir == tmp_path / "results" / "Dataset218_BraTS2018" / "nnalign_experiments" / "cpu-evidence"


@pytest.mark.parametrize("spec", [
    TeacherSpec("mixture"), TeacherSpec("modality:T1ce", align_weight=0.5, shared_encoder=False,
                                        modality_dropout=0.3, stop_gradient=False),
    TeacherSpec("normal", latent_level=2), BaselineSpec(modality_dropout=0.25), TeacherSpec("none"),
    TeacherSpec("mixture", modality_dropout=0.5, subset_sampling="balanced"),
    TeacherSpec("mixture", modality_dropout=0.0), TeacherSpec("mixture-scaled", align_distance="relative"),
    TeacherSpec("modality:T1ce", align_distance="relative", stop_gradient=False),
])
def test_teacher_flags_make_the_same_run_as_nnalign_train(spec):
    from nnalign.cli.train import build_parser, teacher_spec

    assert teacher_spec(build_parser().parse_args(["18", "3d_fullres", "0", *spec.train_flags()])) == spec


@pytest.mark.parametrize("keys, spec", [
    ("anchor = 'mixture'\n", TeacherSpec("mixture")),
    ("anchor = 'mixture'\nmodality_dropout = 0.0\n", TeacherSpec("mixture", modality_dropout=0.0)),
    ("anchor = 'mixture-scaled'\nalign_distance = 'relative'\n",
     TeacherSpec("mixture-scaled", align_distance="relative")),
    ("anchor = 'modality:T1ce'\nalign_distance = 'mse'\n", TeacherSpec("modality:T1ce")),
])
def test_spec_teacher_keys_make_the_same_run_as_nnalign_train(tmp_path, fake_dataset, folders_env, monkeypatch, keys,
                                                               spec):
    fake_dataset(tmp_path)
    for var, value in folders_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    (tmp_path / "mine.toml").write_text(f"[dataset]\nid = 18\n[[teachers]]\n{keys}")
    assert read_spec("mine.toml", cwd=tmp_path).teachers[0].spec == spec


def test_spec_alignment_distance_errors(tmp_path, fake_dataset, folders_env, monkeypatch):
    fake_dataset(tmp_path)
    for var, value in folders_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    for keys, message in (("anchor = 'normal'\nalign_distance = 'relative'\n", "no distance loss"),
                          ("align_distance = 'cosine'\n", "unknown alignment distance 'cosine'")):
        (tmp_path / "mine.toml").write_text(f"[dataset]\nid = 18\n[[teachers]]\n{keys}")
        with pytest.raises(NnalignError, match=message):
            read_spec("mine.toml", cwd=tmp_path)


def test_extends_overrides_a_preset_key_by_key(tmp_path, monkeypatch, fake_dataset, folders_env):
    fake_dataset(tmp_path, 7, "Other", "3d_lowres")
    for var, value in folders_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    (tmp_path / "mine.toml").write_text('extends = "paper-table-IV"\n[dataset]\nid = 7\nconfiguration = "3d_lowres"\n'
                                        '[training]\nepochs = 5\n')
    spec = read_spec("mine.toml", cwd=tmp_path)
    assert (spec.name, spec.dataset_id, spec.configuration, spec.folds) == ("mine", 7, "3d_lowres", (0,))
    assert len(spec.teachers) == 5 and spec.teacher_length.epochs == 5 and spec.device == "cuda"
    assert build_grid(spec).dataset == "Dataset007_Other"


BAD_SPECS = [
    ("[dataset]\nid = 18\nfold = [0]\n", "unknown key 'fold'"),
    ("[dataset]\nid = 18\n[[teachers]]\nanchor = 'mixture'\ncolour = 1\n", "teachers[0]: unknown key 'colour'"),
    ("[dataset]\nid = 18\n[[teachers]]\nanchor = 'gaussian'\n", "gaussian"),
    ("[dataset]\nid = 18\n[[teachers]]\n[[students]]\nmodalities = ['T1ce']\nkd = ['distil']\n", "distil"),
    ("[dataset]\nid = 18\n[[teachers]]\n[[students]]\nmodalities = ['DWI']\n", "DWI"),
    ("[dataset]\nid = 18\n[[teachers]]\n[[students]]\nmodalities = ['T1']\nteachers = ['P*']\n",
     "no teacher named 'P*'"),
    ("extends = 'paper-table-II'\n", "unknown preset 'paper-table-II'"),
    ("[dataset]\nid = 18\nfolds = [0]\n[training]\nepochs = 0\n[[teachers]]\n", "epochs must be 1 or more"),
    ("[dataset]\nid = 18\n[[teachers]]\n[slurm]\nsbatch = ['constraint=a100']\n", "not of the form --option"),
    ("[dataset]\nid = 18\n[[teachers]\n", "not valid TOML"),
    ("[dataset]\nid = 19\n[[teachers]]\n", "dataset 19 is in neither"),
    ("[dataset]\nid = 18\n[[teachers]]\n[report]\ntsne_cases = 0\n", "tsne_cases must be 1 or more"),
]


def test_bad_specs_are_one_line_errors(tmp_path, fake_dataset, folders_env, experiment, assert_one_line_error):
    fake_dataset(tmp_path)
    env = folders_env(tmp_path)
    for i, (text, fragment) in enumerate(BAD_SPECS):
        (tmp_path / f"bad{i}.toml").write_text(text)
        assert_one_line_error(experiment("plan", str(tmp_path / f"bad{i}.toml"), env=env), fragment,
                              prog="nnalign_experiment")
    assert_one_line_error(experiment("plan", "paper-table-II", env=env), "unknown preset", "paper-table-I",
                          prog="nnalign_experiment")


def test_an_unpreprocessed_dataset_is_a_one_line_error(tmp_path, folders_env, experiment, assert_one_line_error):
    (tmp_path / "raw" / "Dataset018_BraTS2018").mkdir(parents=True)
    assert_one_line_error(experiment("plan", "paper-table-IV", env=folders_env(tmp_path)),
                          "Dataset018_BraTS2018 is not preprocessed", "nnalign_plan_and_preprocess -d 18",
                          "preprocess = true", prog="nnalign_experiment")


def test_slurm_without_sbatch_is_a_one_line_error(tmp_path, fake_dataset, folders_env, experiment,
                                                  assert_one_line_error):
    fake_dataset(tmp_path)
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = experiment("run", "paper-table-IV", "--executor", "slurm", env={**folders_env(tmp_path), "PATH": str(empty)})
    assert_one_line_error(proc, "sbatch is not on PATH", prog="nnalign_experiment")
    assert not (tmp_path / "results" / "Dataset018_BraTS2018" / "nnalign_experiments" / "paper-table-IV" / "runs"
                ).exists()


def test_plan_imports_no_torch_and_lists_state_and_estimate(tmp_path, fake_dataset, folders_env):
    fake_dataset(tmp_path)
    code = ("import sys; sys.argv = ['nnalign_experiment', 'plan', 'paper-all']\n"
            "from nnalign.cli.experiment import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules or 'nnunetv2' in sys.modules else 'no torch')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **folders_env(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("no torch")
    assert "255 runs: 0 done, 255 missing" in proc.stdout
    assert "GPU-hours for the 127 trainings not done (basis: H100 times per iteration of iteration_times.toml" \
        in proc.stdout


def test_gpu_hours_scale_the_measured_iteration_times_by_the_plans_voxels():
    """A plan of half the reference patch on each axis and the same batch: an eighth of the reference's time; a
    distilling student's iteration is a plain one's times the factor; nnU-Net's length (1000 x 250) when the SPEC gives
    none."""
    from nnalign.experiments.grid import gpu_hours, iteration_times, step_scale
    from nnalign.runs import TrainingLength

    times = iteration_times()
    assert times.source.startswith("documentation/benchmarks.md") and times.teacher_s > times.plain_s > 0
    half = [size // 2 for size in times.patch]
    plans = {"configurations": {"c": {"patch_size": half, "batch_size": times.batch}}}
    scale = step_scale(plans, "c")
    assert scale == pytest.approx(1 / 8)
    assert step_scale(None, "c") is None and gpu_hours(TrainingLength(10, 10), True, False, None) is None
    assert gpu_hours(TrainingLength(), True, False, scale) == pytest.approx(times.teacher_s * 1000 * 250 / 8 / 3600)
    assert gpu_hours(TrainingLength(100, 20), False, True, 1.0) == pytest.approx(
        times.plain_s * times.distilling_factor * 100 * 20 / 3600)


# ----------------------------------------------------------------------------------------------------------------------
# state


def test_state_lock_corrupt_file_and_a_result_removed_by_hand(paper_data):
    grid = build_grid(read_spec("paper-table-IV"))
    store = StateStore(grid.state_dir)
    assert store.runner_pid() is None
    with store.lock():
        assert store.runner_pid() == os.getpid()  # what cancel stops
        with pytest.raises(NnalignError, match=f"another nnalign_experiment run is submitting .*pid {os.getpid()} "):
            with store.lock():
                pass
    assert store.runner_pid() is None
    with store.lock():  # released
        (store.folder / "lock").write_text("pid 1 on another-host")
        assert store.runner_pid() is None  # never signal a process of another machine
    key = f"train.{P_STAR}.fold_0"
    store.write(key, {"key": key, "status": "done", "log": str(store.log(key))})
    states = resolve_states(grid, store, lambda record: None)
    assert states[key].state == "missing" and "removed by hand" in states[key].detail
    store.write(key, {"key": key, "status": "running", "executor": "local", "pid": 999999999, "host": None})
    assert resolve_states(grid, store, lambda record: None)[key].state == "failed"
    evaluation = f"evaluate.{P_STAR}.T1-T1ce-T2-FLAIR"
    assert resolve_states(grid, store, lambda record: None)[evaluation].state == "blocked"
    store.path(key).write_text("{half a")
    with pytest.raises(NnalignError, match="not a readable state file"):
        resolve_states(grid, store, lambda record: None)


def test_the_local_executor_shows_a_watcher_each_run_until_its_log_is_whole(tmp_path):
    """``watch`` gets the runs going on at every look, the last time after the run ended, with all it wrote in its
    log (what nnalign_demo's epoch lines rely on)."""
    import types

    from nnalign.experiments.grid import Grid, Step
    from nnalign.experiments.local import run_local

    (tmp_path / "in.json").write_text('{"written": "before the end"}')
    done = tmp_path / "out.json"
    step = Step("a", "train", "a run that prints", (("json.tool", str(tmp_path / "in.json")),
                                                    ("json.tool", str(tmp_path / "in.json"), str(done))), done_file=done)
    spec = types.SimpleNamespace(data_workers=None, device="cpu")
    grid = Grid(spec, "Dataset001_X", {}, tmp_path / "state", {"a": step})
    store = StateStore(grid.state_dir)
    seen = []
    failed = run_local(grid, store, 1, lambda: (lambda record: None), say=lambda m: None,
                       watch=lambda keys: seen.append(store.log("a").read_text() if keys else None))
    assert failed == [] and done.is_file()
    assert seen[-1] == store.log("a").read_text() and '"written": "before the end"' in seen[-1]


# ----------------------------------------------------------------------------------------------------------------------
# the local executor, end to end

DATASET = "Dataset983_SyntheticBraTS"
"""``tiny_data``'s dataset (conftest.py)."""


@pytest.mark.slow
def test_local_executor_runs_resumes_and_reruns_only_what_is_missing(tiny_data, tmp_path, folders_env, experiment,
                                                                     write_spec):
    env = folders_env(tiny_data, tmp_path / "results")
    spec = write_spec(tmp_path, tiny_data)
    proc = experiment("run", str(spec), "--jobs", "2", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / "results" / DATASET
    teacher, student = P_STAR, StudentSpec(("T1ce",), "kdnet", TeacherSpec("mixture")).trainer_name()
    for trainer in (teacher, student):
        assert (results / f"{trainer}__nnAlignPlans__3d_cpu" / "fold_0" / "checkpoint_final.pth").is_file()
    evaluations = results / "nnalign_evaluations"
    metrics = evaluations / f"{student}__nnAlignPlans__3d_cpu" / "T1ce" / "metrics.json"
    assert metrics.is_file()
    assert (evaluations / f"{teacher}__nnAlignPlans__3d_cpu" / "T1-T1ce-T2-FLAIR" / "metrics.json").is_file()
    state = results / "nnalign_experiments" / "tiny"
    report = (state / "report" / "report.md").read_text()
    assert student in report or "T1ce" in report

    status = experiment("status", str(spec), env=env)
    assert status.returncode == 0 and "5 runs: 5 done, 0 missing" in status.stdout, status.stdout
    again = experiment("run", str(spec), env=env)
    assert again.returncode == 0 and "started" not in again.stdout, again.stdout  # nothing run twice
    metrics.unlink()  # an evaluation removed by hand: only it (and the report) run again
    again = experiment("run", str(spec), env=env)
    assert again.returncode == 0, again.stderr
    started = [line for line in again.stdout.splitlines() if "] started:" in line]
    assert len(started) == 2 and "evaluate" in started[0] and "nnalign_report" in started[1], again.stdout
    assert metrics.is_file()


@pytest.mark.slow
def test_a_failed_run_blocks_its_dependents_and_is_retried(tiny_data, tmp_path, folders_env, experiment, write_spec,
                                                           assert_one_line_error):
    env = folders_env(tiny_data, tmp_path / "results")
    bad_teacher = '[[teachers]]\nname = "deep"\nanchor = "mixture"\nlatent_level = 9\n'
    spec = write_spec(tmp_path, tiny_data, bad_teacher)
    text = spec.read_text().replace('teachers = ["mixture"]', 'teachers = ["deep"]')
    spec.write_text(text.replace("[evaluate]", "[evaluate]\nheld_out = false").replace("[report]",
                                                                                        "[report]\nenabled = false"))
    proc = experiment("run", str(spec), env=env)
    line = assert_one_line_error(proc, "1 run(s) failed", "teacher deep", "retries them", prog="nnalign_experiment")
    assert "blocked" not in line
    assert "not started: student T1ce kdnet of deep" in proc.stdout
    status = experiment("status", str(spec), env=env)
    assert "failed: teacher deep, fold 0: train exited with 1:" in status.stdout and "latent" in status.stdout
    assert "blocked: student T1ce kdnet of deep, fold 0" in status.stdout
    record = json.loads((tmp_path / "results" / DATASET / "nnalign_experiments" / "tiny" / "runs" /
                         f"train.{TeacherSpec('mixture', latent_level=9).trainer_name()}.fold_0.json").read_text())
    assert record["status"] == "failed" and record["attempts"] == 1
    again = experiment("run", str(spec), env=env)  # retries the failed run only (it fails again)
    assert again.returncode == 1 and again.stdout.count("] started:") == 1, again.stdout


@pytest.mark.slow
def test_cancel_stops_a_local_run_before_it_starts_anything_more(tiny_data, tmp_path, folders_env, experiment,
                                                                 start_experiment, write_spec):
    env = folders_env(tiny_data, tmp_path / "results")
    spec = write_spec(tmp_path, tiny_data)
    spec.write_text(spec.read_text().replace("epochs = 2\n", "epochs = 1000\n"))  # the teacher is cancelled mid-way
    runner = start_experiment("run", str(spec), env=env)
    state = tmp_path / "results" / DATASET / "nnalign_experiments" / "tiny"
    teacher_log = state / "logs" / f"train.{P_STAR}.fold_0.log"
    deadline = time.time() + 600
    while not (teacher_log.is_file() and "Epoch 1" in teacher_log.read_text()):
        assert runner.poll() is None and time.time() < deadline, runner.communicate()
        time.sleep(0.5)

    cancelled = experiment("cancel", str(spec), env=env)
    assert cancelled.returncode == 0 and "cancelled 1 run(s): teacher mixture, fold 0" in cancelled.stdout, (
        cancelled.stdout, cancelled.stderr)
    out, err = runner.communicate(timeout=60)  # the runner stopped too, with one line
    assert runner.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["nnalign_experiment: error: cancelled (nnalign_experiment cancel, or "
                                        "SIGTERM); run starts again what was not done"], err
    student = StudentSpec(("T1ce",), "kdnet", TeacherSpec("mixture")).trainer_name()
    assert not (state / "runs" / f"train.{student}.fold_0.json").exists(), out  # nothing more was started
    status = experiment("status", str(spec), env=env)
    assert "cancelled: teacher mixture, fold 0" in status.stdout, status.stdout
