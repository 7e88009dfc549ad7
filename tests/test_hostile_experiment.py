"""``nnalign_experiment`` against hostile input, round two: SPEC files that are not UTF-8 or nested too deep, folds
the dataset's split does not have, an unknown label convention, a results folder that cannot be written, a
configuration planned but not (or half) preprocessed, and state files with fields of the wrong type. Each is one line
naming the file, at plan time, before any run starts.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnalign.errors import NnalignError
from nnalign.experiments.grid import build_grid
from nnalign.experiments.spec import read_spec
from nnalign.experiments.state import StateStore, resolve_states
from nnalign.runs import TeacherSpec

DATASET = "Dataset018_BraTS2018"
"""``fake_dataset``'s dataset (conftest.py)."""
SPEC = """
[dataset]
id = 18
folds = {folds}
preprocess = {preprocess}
[[teachers]]
anchor = "mixture"
[evaluate]
held_out = false
label_convention = "{labels}"
[report]
enabled = false
"""


@pytest.fixture
def data(tmp_path, monkeypatch, fake_dataset, folders_env) -> Path:
    """``fake_dataset`` under ``tmp_path`` (one preprocessed case, ``case``), nnU-Net's folder variables set."""
    fake_dataset(tmp_path)
    for var, value in folders_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    return tmp_path


def write_spec(folder: Path, folds="[0]", preprocess="false", labels="nnunet", extra="") -> Path:
    path = folder / "grid.toml"
    path.write_text(SPEC.format(folds=folds, preprocess=preprocess, labels=labels) + extra)
    return path


def training_cases(root: Path, *cases: str, preprocessed: bool = True) -> None:
    """Raw training labels of ``cases`` and, if asked, their preprocessed files (empty files: only their names are
    read here)."""
    labels = root / "raw" / DATASET / "labelsTr"
    labels.mkdir(parents=True, exist_ok=True)
    for case in cases:
        (labels / f"{case}.nii.gz").touch()
        if preprocessed:
            (root / "pre" / DATASET / "nnAlignPlans_3d_fullres" / f"{case}.pkl").touch()


# ----------------------------------------------------------------------------------------------------------------------
# the SPEC file


@pytest.mark.parametrize("content, problem", [
    (b'name = "caf\xe9"\n[dataset]\nid = 18\n', "not UTF-8"),
    (b"x = " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deep"),
    (b"x = " + b"{a = " * 100_000 + b"1" + b"}" * 100_000 + b"\n", "nested too deep"),
])
def test_a_spec_not_utf8_or_nested_too_deep_is_one_line_naming_it(data, content, problem):
    path = data / "hostile.toml"
    path.write_bytes(content)
    with pytest.raises(NnalignError, match=f"^{path}: .*{problem}") as info:
        read_spec(str(path))
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


@pytest.mark.slow
def test_cli_spec_not_utf8_is_one_line(data, experiment, folders_env, assert_one_line_error):
    path = data / "latin1.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    for command in ("plan", "run", "status"):
        assert_one_line_error(experiment(command, str(path), env=folders_env(data)), str(path), "not UTF-8",
                              prog="nnalign_experiment")


def test_an_unknown_label_convention_is_refused_when_the_spec_is_read(data):
    with pytest.raises(NnalignError, match=r"grid.toml: \[evaluate\]: label_convention must be one of "
                                           r"(?=.*nnunet)(?=.*brats2018)(?=.*brats2023).*got 'bogus'"):
        read_spec(str(write_spec(data, labels="bogus")))
    for valid in ("nnunet", "brats2018", "brats2023"):
        assert read_spec(str(write_spec(data, labels=valid))).evaluate.label_convention == valid
    for one_sided in ("auto", "source"):  # nnalign_evaluate's or nnalign_predict's only: the other one refuses it
        with pytest.raises(NnalignError, match=f"got '{one_sided}'"):
            read_spec(str(write_spec(data, labels=one_sided)))


# ----------------------------------------------------------------------------------------------------------------------
# folds against the dataset's split


@pytest.mark.parametrize("folds, bad", [("[7]", 7), ("[0, 5]", 5), (str(list(range(300))), 5)])
def test_folds_beyond_nnunets_default_split_are_refused_at_plan_time(data, folds, bad):
    training_cases(data, *(f"case{i}" for i in range(6)))
    with pytest.raises(NnalignError, match=f"grid.toml: .*fold {bad} is not in the split of {DATASET} .*folds 0-4"):
        build_grid(read_spec(str(write_spec(data, folds=folds))))


def test_folds_are_checked_against_splits_final_json_and_the_number_of_training_cases(data):
    spec = read_spec(str(write_spec(data, folds='[0, 2, "all"]')))
    training_cases(data, "case", "b", "c")  # three cases: nnalign_plan_and_preprocess writes a 3-fold split
    build_grid(spec)
    with pytest.raises(NnalignError, match=r"fold 3 is not in the split .*3 training cases.*folds 0-2"):
        build_grid(read_spec(str(write_spec(data, folds="[3]"))))
    splits = data / "pre" / DATASET / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["b", "c"], "val": ["case"]}] * 2))  # the split on disk decides
    with pytest.raises(NnalignError, match=f"fold 2 is not in the split .*{splits}.*folds 0-1"):
        build_grid(spec)
    splits.write_text("{not json")
    with pytest.raises(NnalignError, match=f"{splits}: cannot read the split"):
        build_grid(spec)
    splits.unlink()
    for case in ("b", "c"):
        (data / "raw" / DATASET / "labelsTr" / f"{case}.nii.gz").unlink()
        (data / "pre" / DATASET / "nnAlignPlans_3d_fullres" / f"{case}.pkl").unlink()
    with pytest.raises(NnalignError, match=r"fold 0 is not in the split .*1 training case.*only 'all'"):
        build_grid(spec)
    build_grid(read_spec(str(write_spec(data, folds='["all"]'))))


# ----------------------------------------------------------------------------------------------------------------------
# the results folder


def run_command(spec: Path) -> None:
    """``nnalign_experiment run SPEC`` in this process (one-line errors are NnalignError)."""
    from nnalign.cli.experiment import build_parser, run

    run(build_parser().parse_args(["run", str(spec)]))


def test_a_read_only_or_unreachable_results_folder_is_one_line(data, read_only):
    a_file = data / "results_file"
    a_file.write_text("not a folder")
    for results in (a_file, a_file / "below"):
        spec = write_spec(data, extra=f'[folders]\nresults = "{results}"\n')
        with pytest.raises(NnalignError, match=f"^{results}/{DATASET}/nnalign_experiments/grid: cannot write the "
                                               f"experiment's state there"):
            run_command(spec)
    with read_only(data / "ro") as results:
        spec = write_spec(data, extra=f'[folders]\nresults = "{results}"\n')
        with pytest.raises(NnalignError, match=f"^{results}/{DATASET}/nnalign_experiments/grid: cannot write the "
                                               f"experiment's state there"):
            run_command(spec)
        assert not any(results.iterdir())
        from nnalign.cli.experiment import plan, status

        assert plan(str(spec)) == 0 and status(str(spec)) == 0  # reading needs no write access


@pytest.mark.slow
def test_cli_run_into_a_read_only_results_folder_is_one_line(data, read_only, experiment, folders_env,
                                                             assert_one_line_error):
    with read_only(data / "ro") as results:
        proc = experiment("run", str(write_spec(data)), env=folders_env(data, results))
        assert_one_line_error(proc, str(results), "cannot write the experiment's state", prog="nnalign_experiment")


# ----------------------------------------------------------------------------------------------------------------------
# preprocessing is done when every training case is preprocessed


def test_preprocessing_is_done_only_when_every_training_case_is_preprocessed(data):
    training_cases(data, "case")
    training_cases(data, "case2", preprocessed=False)
    grid = build_grid(read_spec(str(write_spec(data, preprocess="true"))))
    store = StateStore(grid.state_dir)
    states = resolve_states(grid, store, lambda record: None)
    assert states["preprocess"].state == "missing"
    store.write("preprocess", {"key": "preprocess", "status": "done"})  # an earlier attempt that said it was done
    states = resolve_states(grid, store, lambda record: None)
    assert states["preprocess"].state == "missing"  # so `run` starts it again
    assert grid.steps["preprocess"].done_file is None  # and the job does not skip it for a file that exists
    data_folder = data / "pre" / DATASET / "nnAlignPlans_3d_fullres"
    (data_folder / "case2.pkl").touch()
    assert resolve_states(grid, store, lambda record: None)["preprocess"].state == "done"
    from nnalign.planning.status import INCOMPLETE_MARKER

    (data / "pre" / DATASET / INCOMPLETE_MARKER).touch()  # every file there, but the run that wrote them broke off
    assert resolve_states(grid, store, lambda record: None)["preprocess"].state == "missing"
    (data / "pre" / DATASET / INCOMPLETE_MARKER).unlink()
    (data_folder / "case2.pkl").unlink()
    with pytest.raises(NnalignError, match=f"{DATASET} is not preprocessed for 3d_fullres .*1 of 2 training cases "
                                           f"missing, e.g. case2"):
        build_grid(read_spec(str(write_spec(data))))


def test_planned_but_not_preprocessed_is_not_done(data):
    training_cases(data, "case", preprocessed=False)
    (data / "pre" / DATASET / "nnAlignPlans_3d_fullres" / "case.pkl").unlink()
    grid = build_grid(read_spec(str(write_spec(data, folds='"all"', preprocess="true"))))
    assert resolve_states(grid, StateStore(grid.state_dir), lambda record: None)["preprocess"].state == "missing"


# ----------------------------------------------------------------------------------------------------------------------
# state files


@pytest.mark.parametrize("field, value", [("updated", "yesterday"), ("job_id", 42), ("log", 5), ("pid", "12"),
                                          ("attempts", True), ("error", ["x"])])
def test_a_state_field_of_the_wrong_type_is_one_line_naming_the_state_file(data, field, value):
    from nnalign.cli.experiment import status

    spec = write_spec(data)
    grid = build_grid(read_spec(str(spec)))
    store = StateStore(grid.state_dir)
    key = f"train.{TeacherSpec('mixture').trainer_name()}.fold_0"
    store.write(key, {"key": key, "status": "running", "executor": "local", "log": str(store.log(key))})
    record = json.loads(store.path(key).read_text())
    store.path(key).write_text(json.dumps({**record, field: value}))
    with pytest.raises(NnalignError, match=f"^{store.path(key)}: {field} must be .*got {value!r}".replace("[", r"\[")):
        status(str(spec))
