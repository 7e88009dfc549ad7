"""Fixtures shared by the training tests; each gives a function (ask for it by name as a test's argument):

- ``plan_synthetic``: a synthetic raw dataset, planned and preprocessed for one configuration (session-wide, so
  module-scoped fixtures can use it).
- ``nnunet_env``: nnU-Net's variables for an in-process test (data, results, trainer shim, one process), undone
  after the test.
- ``run_train``: ``nnalign_train`` as a user runs it, in a subprocess with a clean environment.
- ``assert_one_line_error``: exit 1, one stderr line ``<prog>: error: ...``, no traceback (``prog=`` defaults to
  ``nnalign_train``).
- ``folders_env``: nnU-Net's folder variables for a data root (and a results folder) as a dict.
- ``fake_dataset``: a planned and preprocessed dataset as far as planning looks, no images.
- ``experiment``: ``nnalign_experiment`` as a user runs it, in a subprocess.
- ``tiny_data``: the synthetic dataset of the ``nnalign_experiment`` end-to-end tests, planned (per test module).
- ``write_spec``: the SPEC of a tiny grid on ``tiny_data`` (a mixture teacher and a T1ce KD-Net student).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest


RUN_VARS = ("nnUNet_extTrainer", "NNALIGN_DEBUG")
"""Variables that would leak a previous run's trainer shim (or a traceback) into a test."""


def _plan_synthetic(root: Path, dataset_id: int, num_cases: int, shape: tuple[int, int, int],
                   configuration: str = "3d_cpu") -> Path:
    """Write ``root/raw/Dataset<id>_SyntheticBraTS`` and plan and preprocess it into ``root/pre``; returns ``root``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_raw", str(root / "raw"))
        mp.setenv("nnUNet_preprocessed", str(root / "pre"))
        mp.setenv("nnUNet_results", str(root / "results"))
        mp.setenv("nnUNet_n_proc_DA", "0")
        from nnalign.data.synthetic import write_synthetic_dataset
        from nnalign.planning.plan_and_preprocess import plan_and_preprocess

        write_synthetic_dataset(root / "raw", dataset_id, num_cases=num_cases, shape=shape)
        plan_and_preprocess(dataset_id, [configuration], num_processes=1, warn=lambda m: None)
    return root


def _nnunet_env(monkeypatch: pytest.MonkeyPatch, data_root: Path, results: Path) -> None:
    """nnU-Net's variables for one in-process test: ``data_root``'s raw/pre, ``results``, the shim registered."""
    monkeypatch.setenv("nnUNet_raw", str(data_root / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(data_root / "pre"))
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    monkeypatch.setenv("nnUNet_compile", "f")
    for var in RUN_VARS:
        monkeypatch.delenv(var, raising=False)
    from nnalign.paths import setup_env

    setup_env()


def _run_train(data_root: Path, results: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m nnalign.cli.train ARGS`` on ``data_root``'s raw/pre with results in ``results``, one process."""
    environ = {**os.environ, "nnUNet_raw": str(data_root / "raw"), "nnUNet_preprocessed": str(data_root / "pre"),
               "nnUNet_results": str(results), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
               "nnUNet_compile": "f"}
    for var in RUN_VARS:
        environ.pop(var, None)
    return subprocess.run([sys.executable, "-m", "nnalign.cli.train", *args], capture_output=True, text=True,
                          env=environ, timeout=timeout)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str, prog: str = "nnalign_train") -> str:
    """Exit code 1 and exactly one stderr line, ``<prog>: error: ...`` holding every fragment; returns it."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _folders_env(root: Path, results: Path | None = None) -> dict[str, str]:
    """nnU-Net's raw/pre folders under ``root`` and the results folder (``root/results`` unless given)."""
    return {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
            "nnUNet_results": str(results or root / "results")}


def _fake_dataset(root: Path, dataset_id: int = 18, name: str = "BraTS2018", configuration: str = "3d_fullres"
                  ) -> Path:
    """A planned and preprocessed dataset as far as planning looks (plans, one .pkl, held-out folders)."""
    dataset = f"Dataset{dataset_id:03d}_{name}"
    data = root / "pre" / dataset / f"nnAlignPlans_{configuration}"
    data.mkdir(parents=True)
    (data / "case.pkl").touch()
    plans = {"dataset_name": dataset, "configurations": {configuration: {"patch_size": [112, 128, 112],
                                                                         "batch_size": 2}}}
    (root / "pre" / dataset / "nnAlignPlans.json").write_text(json.dumps(plans))
    for sub in ("imagesTs", "labelsTs"):
        (root / "raw" / dataset / sub).mkdir(parents=True)
    return root


def _experiment(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 1800
                ) -> subprocess.CompletedProcess:
    """``nnalign_experiment ARGS`` in a subprocess (one process per training, no compile)."""
    environ = {**os.environ, **env, "nnUNet_def_n_proc": "1", "nnUNet_compile": "f"}
    for var in RUN_VARS:
        environ.pop(var, None)
    return subprocess.run([sys.executable, "-m", "nnalign.cli.experiment", *args], capture_output=True, text=True,
                          env=environ, cwd=cwd, timeout=timeout)


TINY_DATASET_ID = 983
TINY_DATASET = "Dataset983_SyntheticBraTS"
"""The synthetic dataset of ``tiny_data`` (test modules that look into its results spell the name themselves)."""
TINY_SPEC = """
name = "tiny"
[dataset]
id = {id}
configuration = "3d_cpu"
folds = [0]
[training]
device = "cpu"
epochs = 2
iters_per_epoch = 2
data_workers = 0
[[teachers]]
anchor = "mixture"
{extra_teacher}
[[students]]
modalities = ["T1ce"]
kd = ["kdnet"]
teachers = ["mixture"]
[evaluate]
images = "{raw}/imagesTr"
labels = "{raw}/labelsTr"
[report]
tsne = false
"""


def _write_spec(folder: Path, data: Path, extra_teacher: str = "") -> Path:
    """``folder/tiny.toml``: ``TINY_SPEC`` on ``data`` (``tiny_data``), with ``extra_teacher`` after the teacher."""
    path = folder / "tiny.toml"
    path.write_text(TINY_SPEC.format(id=TINY_DATASET_ID, raw=data / "raw" / TINY_DATASET, extra_teacher=extra_teacher))
    return path


@pytest.fixture(scope="session")
def plan_synthetic() -> Callable[..., Path]:
    return _plan_synthetic


@pytest.fixture
def nnunet_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path, Path], None]:
    return functools.partial(_nnunet_env, monkeypatch)


@pytest.fixture(scope="session")
def run_train() -> Callable[..., subprocess.CompletedProcess]:
    return _run_train


@pytest.fixture(scope="session")
def assert_one_line_error() -> Callable[..., str]:
    return _assert_one_line_error


@pytest.fixture(scope="session")
def folders_env() -> Callable[..., dict[str, str]]:
    return _folders_env


@pytest.fixture(scope="session")
def fake_dataset() -> Callable[..., Path]:
    return _fake_dataset


@pytest.fixture(scope="session")
def experiment() -> Callable[..., subprocess.CompletedProcess]:
    return _experiment


@pytest.fixture(scope="module")
def tiny_data(plan_synthetic, tmp_path_factory, request) -> Path:
    """``TINY_DATASET`` (3 cases of 40^3, ``3d_cpu``) planned under a folder named after the test module."""
    folder = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    return plan_synthetic(folder, TINY_DATASET_ID, num_cases=3, shape=(40, 40, 40))


@pytest.fixture(scope="session")
def write_spec() -> Callable[..., Path]:
    return _write_spec
