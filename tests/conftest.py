"""Fixtures shared by the test modules; each gives a function (ask for it by name as a test's argument):

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
- ``run_module``: ``python -m nnalign.cli.<module>`` as a user runs it, in a subprocess (no ``NNALIGN_DEBUG``).
- ``error_lines``: the stderr lines of a failed run, each ``<prog>: error: ...``, no traceback, a non-zero exit.
- ``write_crafted_checkpoint``: a checkpoint that creates a marker file when a loader that runs code unpickles it.
- ``tmpfs``: a context manager mounting a size-limited tmpfs (read-only if asked), skipping the test where nothing
  can be mounted.
- ``read_only``: a context manager giving a read-only folder (file permissions, or a read-only tmpfs for root).
- ``fill_up``: write a filler file into a folder until its file system is full.
- ``write_image``: a NIfTI (or other SimpleITK) image of an array.
- ``write_brats_case``: a BraTS 2018-named case folder (four images and a label map of ``BRATS_SHAPE``).
- ``convert``: ``nnalign_convert_brats`` of a release folder into an ``nnUNet_raw`` folder, in a subprocess.
"""
from __future__ import annotations

import builtins
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
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


def _experiment_command(*args: str, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of ``nnalign_experiment ARGS`` (one process per training, no compile)."""
    environ = {**os.environ, **env, "nnUNet_def_n_proc": "1", "nnUNet_compile": "f"}
    for var in RUN_VARS:
        environ.pop(var, None)
    return [sys.executable, "-m", "nnalign.cli.experiment", *args], environ


def _experiment(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 1800
                ) -> subprocess.CompletedProcess:
    """``nnalign_experiment ARGS`` in a subprocess, to the end."""
    command, environ = _experiment_command(*args, env=env)
    return subprocess.run(command, capture_output=True, text=True, env=environ, cwd=cwd, timeout=timeout)


def _start_experiment(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """``nnalign_experiment ARGS`` started in a subprocess (stdout and stderr piped, text)."""
    command, environ = _experiment_command(*args, env=env)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ)


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


def _run_module(module: str, *args, env: dict | None = None, cwd: Path | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m nnalign.cli.MODULE ARGS`` as a user runs it (no NNALIGN_DEBUG)."""
    environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "NNALIGN_DEBUG"}
    return subprocess.run([sys.executable, "-m", f"nnalign.cli.{module}", *map(str, args)], capture_output=True,
                          text=True, env=environ, cwd=cwd, timeout=timeout)


def _error_lines(proc: subprocess.CompletedProcess, prog: str) -> list[str]:
    """The stderr lines of a failed run, each ``PROG: error: ...``; asserts no traceback and a non-zero exit."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and all(line.startswith(f"{prog}: error: ") for line in lines), lines
    return lines


class _CreatesFile:
    """Unpickling this object creates the file ``path`` (what a crafted checkpoint could do, harmlessly)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def _write_crafted_checkpoint(path: Path, marker: Path, like: Path | None = None) -> None:
    """A checkpoint (a copy of ``like``'s contents, if given) with one extra entry that creates ``marker`` when
    unpickled by a loader that runs code."""
    import torch

    payload = torch.load(like, map_location="cpu", weights_only=False) if like is not None else {}
    payload["notes"] = _CreatesFile(marker)
    torch.save(payload, path)


def _mount(*args: str) -> str | None:
    """Run ``mount ARGS``; None on success, else why not."""
    try:
        proc = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"mount exited {proc.returncode}")


@contextlib.contextmanager
def _tmpfs(path: Path, size_kib: int = 4096, read_only: bool = False, fill_from: Path | None = None):
    """Mount a tmpfs of ``size_kib`` at ``path`` (copying ``fill_from``'s files in first; then read-only if asked)
    and unmount it afterwards; skips the test where nothing can be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    problem = _mount("-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path))
    if problem:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {problem}")
    try:
        if fill_from is not None:
            for item in fill_from.iterdir():
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, path / item.name)
        if read_only:
            problem = _mount("-o", "remount,ro", str(path))
            if problem:
                pytest.skip(f"cannot remount a tmpfs read-only here: {problem}")
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def _read_only(path: Path, fill_from: Path | None = None):
    """``path`` as a read-only folder (holding ``fill_from``'s files): file permissions for an ordinary user, a
    read-only tmpfs for root."""
    if os.geteuid() != 0:
        path.mkdir(parents=True, exist_ok=True)
        if fill_from is not None:
            shutil.copytree(fill_from, path, dirs_exist_ok=True)
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    with _tmpfs(path, read_only=True, fill_from=fill_from) as mounted:
        yield mounted


def _fill_up(folder: Path) -> None:
    """Write ``folder/filler`` until the file system is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_image(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    """``array`` (z, y, x) as the image ``path``, with ``spacing`` and ``origin`` (x, y, z); returns ``path``."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array, isVector=False)
    image.SetSpacing(spacing[: image.GetDimension()] + (1.0,) * (image.GetDimension() - len(spacing)))
    image.SetOrigin(origin[: image.GetDimension()] + (0.0,) * (image.GetDimension() - len(origin)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


BRATS_SHAPE = (10, 9, 8)
BRATS_NAMES = {"T1": "t1", "T1ce": "t1ce", "T2": "t2", "FLAIR": "flair", "seg": "seg"}
"""The voxel shape (z, y, x) and file-name suffixes of ``write_brats_case``'s images (test modules that replace an
image spell them themselves)."""


def _write_brats_case(folder: Path, case_id: str, arrays: dict | None = None, origins: dict | None = None) -> Path:
    """A BraTS 2018-named case ``folder/case_id`` of float32 images (distinct constants plus a little noise) and a
    label map (necrosis 1, edema 2, enhancing tumour 4 at random places); ``arrays`` / ``origins`` override a kind's
    voxels / origin."""
    rng = np.random.default_rng(abs(hash(case_id)) % 2**32)
    arrays, origins = arrays or {}, origins or {}
    flat = np.zeros(int(np.prod(BRATS_SHAPE)), dtype=np.uint8)
    flat[:7], flat[7:20], flat[20:39] = 1, 2, 4
    seg = np.random.default_rng(0).permutation(flat).reshape(BRATS_SHAPE)
    for i, kind in enumerate(BRATS_NAMES):
        default = seg if kind == "seg" else (10.0 * (i + 1) + rng.random(BRATS_SHAPE)).astype(np.float32)
        _write_image(folder / case_id / f"{case_id}_{BRATS_NAMES[kind]}.nii.gz", arrays.get(kind, default),
                     origin=origins.get(kind, (0.0, 0.0, 0.0)))
    return folder / case_id


def _convert(raw: Path, source: Path, *args, dataset_id: int = 30) -> subprocess.CompletedProcess:
    """``nnalign_convert_brats -i SOURCE -d DATASET_ID ARGS`` into the ``nnUNet_raw`` folder ``raw``."""
    return _run_module("convert_brats", "-i", source, "-d", dataset_id, *args, env={"nnUNet_raw": str(raw)},
                       cwd=source.parent)


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


@pytest.fixture(scope="session")
def start_experiment() -> Callable[..., subprocess.Popen]:
    return _start_experiment


@pytest.fixture(scope="module")
def tiny_data(plan_synthetic, tmp_path_factory, request) -> Path:
    """``TINY_DATASET`` (3 cases of 40^3, ``3d_cpu``) planned under a folder named after the test module."""
    folder = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    return plan_synthetic(folder, TINY_DATASET_ID, num_cases=3, shape=(40, 40, 40))


@pytest.fixture(scope="session")
def write_spec() -> Callable[..., Path]:
    return _write_spec


@pytest.fixture(scope="session")
def run_module() -> Callable[..., subprocess.CompletedProcess]:
    return _run_module


@pytest.fixture(scope="session")
def error_lines() -> Callable[[subprocess.CompletedProcess, str], list[str]]:
    return _error_lines


@pytest.fixture(scope="session")
def write_crafted_checkpoint() -> Callable[..., None]:
    return _write_crafted_checkpoint


@pytest.fixture(scope="session")
def tmpfs() -> Callable[..., contextlib.AbstractContextManager[Path]]:
    return _tmpfs


@pytest.fixture(scope="session")
def read_only() -> Callable[..., contextlib.AbstractContextManager[Path]]:
    return _read_only


@pytest.fixture(scope="session")
def fill_up() -> Callable[[Path], None]:
    return _fill_up


@pytest.fixture(scope="session")
def write_image() -> Callable[..., Path]:
    return _write_image


@pytest.fixture(scope="session")
def write_brats_case() -> Callable[..., Path]:
    return _write_brats_case


@pytest.fixture(scope="session")
def convert() -> Callable[..., subprocess.CompletedProcess]:
    return _convert
