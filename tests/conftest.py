"""Helpers shared by the training tests (import them: ``from conftest import run_train``).

- :func:`plan_synthetic`: a synthetic raw dataset, planned and preprocessed for one configuration.
- :func:`nnunet_env`: nnU-Net's variables for an in-process test (data, results, trainer shim, one process).
- :func:`run_train`: ``nnalign_train`` as a user runs it, in a subprocess with a clean environment.
- :func:`assert_one_line_error`: exit 1, one stderr line ``nnalign_train: error: ...``, no traceback.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run_vars() -> tuple[str, ...]:
    """Variables that would leak a previous run's settings (or a traceback) into a test."""
    from nnalign.training.settings import ENV_EPOCHS, ENV_ITERS
    from nnalign.training.student_trainer import ENV_KD_OVERRIDES

    return "nnUNet_extTrainer", ENV_EPOCHS, ENV_ITERS, ENV_KD_OVERRIDES, "NNALIGN_DEBUG"


def plan_synthetic(root: Path, dataset_id: int, num_cases: int, shape: tuple[int, int, int],
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


def nnunet_env(monkeypatch: pytest.MonkeyPatch, data_root: Path, results: Path) -> None:
    """nnU-Net's variables for one in-process test: ``data_root``'s raw/pre, ``results``, the shim registered."""
    monkeypatch.setenv("nnUNet_raw", str(data_root / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(data_root / "pre"))
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    monkeypatch.setenv("nnUNet_compile", "f")
    for var in _run_vars():
        monkeypatch.delenv(var, raising=False)
    from nnalign.paths import setup_env

    setup_env()


def run_train(data_root: Path, results: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m nnalign.cli.train ARGS`` on ``data_root``'s raw/pre with results in ``results``, one process."""
    environ = {**os.environ, "nnUNet_raw": str(data_root / "raw"), "nnUNet_preprocessed": str(data_root / "pre"),
               "nnUNet_results": str(results), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
               "nnUNet_compile": "f"}
    for var in _run_vars():
        environ.pop(var, None)
    return subprocess.run([sys.executable, "-m", "nnalign.cli.train", *args], capture_output=True, text=True,
                          env=environ, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 1 and exactly one stderr line, ``nnalign_train: error: ...`` holding every fragment; returns it."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("nnalign_train: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
