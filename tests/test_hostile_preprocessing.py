"""Hostile and careless input to conversion and to nnalign_plan_and_preprocess: intensities that the NIfTI scale
factor makes infinite, blank modalities, broken dataset.json, missing channel files, bad label values and geometry,
unwritable or full nnUNet_preprocessed, and interrupted runs. Every failure is one line naming the file and the
problem, and leaves no folder that looks complete.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nnalign.errors import NnalignError

SHAPE = (10, 9, 8)  # z, y, x: the shape of write_brats_case's images (conftest's BRATS_SHAPE)
SCL_SLOPE_OFFSET = 112  # byte offset of the float32 scl_slope in a NIfTI-1 header


def set_scl_slope(path: Path, slope: float) -> Path:
    """Overwrite the ``scl_slope`` of the NIfTI-1 file ``path`` (gzipped or not) with ``slope``."""
    gz = path.name.endswith(".gz")
    data = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    assert int.from_bytes(data[:4], "little") == 348
    data[SCL_SLOPE_OFFSET:SCL_SLOPE_OFFSET + 4] = struct.pack("<f", slope)
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))
    return path


def scaled_int16(write_image, path: Path, slope: float) -> Path:
    """An int16 image (values 0..719) at ``path`` whose header scales its voxels by ``slope``."""
    return set_scl_slope(write_image(path, np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)), slope)


def header_reader(path: Path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


# ----------------------------------------------------------------------------------------------------------------------
# images: non-finite after scaling, blank


@pytest.mark.parametrize("name", ["scaled.nii.gz", "scaled.nii"])
def test_the_scale_factor_that_makes_voxels_infinite_is_a_problem(tmp_path, write_image, name):
    import SimpleITK as sitk

    from nnalign.data.case_checks import voxel_problem

    path = scaled_int16(write_image, tmp_path / name, 1e38)
    read = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    bad = int(np.count_nonzero(~np.isfinite(read)))
    assert bad > 0  # what SimpleITK, and so nnU-Net, would read
    problem = voxel_problem(path, header_reader(path))
    assert problem == f"{bad} NaN or infinite voxels after the header's scaling (scl_slope 1e+38, scl_inter 0)", \
        problem


def test_a_finite_scale_factor_is_no_problem(tmp_path, write_image):
    from nnalign.data.case_checks import voxel_problem

    path = scaled_int16(write_image, tmp_path / "scaled.nii.gz", 2.5)
    assert voxel_problem(path, header_reader(path)) is None


def test_conversion_refuses_infinite_voxels_through_the_scale_factor(tmp_path, write_brats_case, write_image, convert,
                                                                     assert_one_line_error):
    source, raw = tmp_path / "release", tmp_path / "raw"
    case = write_brats_case(source, "Brats18_SCALED_1")
    scaled_int16(write_image, case / "Brats18_SCALED_1_t2.nii.gz", 1e38)
    assert_one_line_error(convert(raw, source, "-np", 1), "Brats18_SCALED_1: Brats18_SCALED_1_t2.nii.gz: ",
                          "NaN or infinite voxels after the header's scaling (scl_slope 1e+38",
                          prog="nnalign_convert_brats")
    assert not raw.exists() or not any(raw.iterdir())


@pytest.mark.parametrize("array", [np.zeros(SHAPE, np.float32), np.full(SHAPE, 7, np.int16)])
def test_conversion_refuses_a_blank_modality(tmp_path, write_brats_case, convert, assert_one_line_error, array):
    source, raw = tmp_path / "release", tmp_path / "raw"
    write_brats_case(source, "Brats18_BLANK_1", arrays={"FLAIR": array})
    assert_one_line_error(convert(raw, source, "-np", 1),
                          f"Brats18_BLANK_1: Brats18_BLANK_1_flair.nii.gz: no signal (every voxel is "
                          f"{array.flat[0]:g})", prog="nnalign_convert_brats")
    assert not raw.exists() or not any(raw.iterdir())


def test_an_empty_label_map_is_no_blank_modality(tmp_path, write_brats_case, convert):
    source, raw = tmp_path / "release", tmp_path / "raw"
    write_brats_case(source, "Brats18_HEALTHY_1", arrays={"seg": np.zeros(SHAPE, np.uint8)})
    proc = convert(raw, source, "-np", 1)
    assert proc.returncode == 0, proc.stderr


def test_prediction_checks_refuse_infinite_voxels_through_the_scale_factor(tmp_path, write_image):
    """nnalign_predict checks its cases with check_case_images too: a scaled-to-infinity image fails its case."""
    from nnalign.data.brats_layout import BratsCase
    from nnalign.data.case_checks import check_case_images

    images = {"T1": write_image(tmp_path / "C_0000.nii.gz", np.ones(SHAPE, np.float32)),
              "T1ce": scaled_int16(write_image, tmp_path / "C_0001.nii.gz", 1e38)}
    with pytest.raises(NnalignError, match=r"^C: C_0001.nii.gz: \d+ NaN or infinite voxels after the header's "):
        check_case_images(BratsCase("C", tmp_path, "nnunet", images), ["T1", "T1ce"])


# ----------------------------------------------------------------------------------------------------------------------
# nnalign_plan_and_preprocess: the raw dataset

DATASET_ID = 61
DATASET = f"Dataset{DATASET_ID:03d}_Tiny"


@pytest.fixture
def tiny_dataset(tmp_path, write_image) -> Path:
    """``tmp_path/raw/Dataset061_Tiny``: two cases (TINY_000, TINY_001) of four noisy 8 x 9 x 10 channels and a label
    map with labels 0-3."""
    from nnalign.data.raw_dataset import write_dataset_json

    folder = tmp_path / "raw" / DATASET
    rng = np.random.default_rng(0)
    for i in range(2):
        for c in range(4):
            write_image(folder / "imagesTr" / f"TINY_{i:03d}_{c:04d}.nii.gz",
                        (10.0 * (c + 1) + rng.random(SHAPE)).astype(np.float32))
        write_image(folder / "labelsTr" / f"TINY_{i:03d}.nii.gz", rng.integers(0, 4, SHAPE).astype(np.uint8))
    write_dataset_json(folder, 2, "Tiny")
    return folder


@pytest.fixture
def plan(tmp_path, run_module, folders_env):
    """``plan(*args)``: ``nnalign_plan_and_preprocess -d 61 -np 1 ARGS`` on ``tmp_path``'s raw and pre folders."""
    def run(*args, pre: Path | None = None) -> subprocess.CompletedProcess:
        env = folders_env(tmp_path)
        if pre is not None:
            env["nnUNet_preprocessed"] = str(pre)
        return run_module("plan_and_preprocess", "-d", DATASET_ID, "-np", 1, *args, env=env)
    return run


def test_a_truncated_dataset_json_is_one_line(tiny_dataset, tmp_path, plan, assert_one_line_error):
    path = tiny_dataset / "dataset.json"
    path.write_text(path.read_text()[:100])
    assert_one_line_error(plan(), f"{path}: not valid JSON", prog="nnalign_plan_and_preprocess")
    assert not (tmp_path / "pre" / DATASET).exists()


def _label_5(folder: Path, write_image) -> str:
    seg = np.zeros(SHAPE, np.uint8)
    seg[1, 2, 3] = 5
    write_image(folder / "labelsTr" / "TINY_001.nii.gz", seg)
    return "TINY_001: TINY_001.nii.gz: label value 5 not in dataset.json's labels (0, 1, 2, 3)"


def _nan_voxel(folder: Path, write_image) -> str:
    array = np.full(SHAPE, 3.0, np.float32)
    array[4, 4, 4] = np.nan
    write_image(folder / "imagesTr" / "TINY_001_0002.nii.gz", array)
    return "TINY_001: TINY_001_0002.nii.gz: 1 NaN or infinite voxel"


def _blank_channel(folder: Path, write_image) -> str:
    write_image(folder / "imagesTr" / "TINY_001_0003.nii.gz", np.zeros(SHAPE, np.float32))
    return "TINY_001: TINY_001_0003.nii.gz: no signal (every voxel is 0)"


def _t1ce_moved(folder: Path, write_image) -> str:
    write_image(folder / "imagesTr" / "TINY_001_0001.nii.gz", np.random.default_rng(1).random(SHAPE),
                origin=(0.0, 4.0, 0.0))
    return "TINY_001: TINY_001_0001.nii.gz: origin (0.0, 4.0, 0.0) differs from (0.0, 0.0, 0.0) of the other files"


def _scaled_to_infinity(folder: Path, write_image) -> str:
    scaled_int16(write_image, folder / "imagesTr" / "TINY_001_0000.nii.gz", 1e38)
    return "TINY_001: TINY_001_0000.nii.gz: "


def _channel_missing(folder: Path, write_image) -> str:
    (folder / "imagesTr" / "TINY_001_0002.nii.gz").unlink()
    return "TINY_001: TINY_001_0002.nii.gz is missing from imagesTr (dataset.json names 4 channels"


def _label_missing(folder: Path, write_image) -> str:
    (folder / "labelsTr" / "TINY_000.nii.gz").unlink()
    return "TINY_000: no label map TINY_000.nii.gz in labelsTr"


@pytest.mark.parametrize("damage", [_label_5, _nan_voxel, _blank_channel, _t1ce_moved, _scaled_to_infinity,
                                    _channel_missing, _label_missing])
def test_a_bad_case_is_refused_before_planning_naming_the_case_and_file(tiny_dataset, tmp_path, plan, write_image,
                                                                       assert_one_line_error, damage):
    expected = damage(tiny_dataset, write_image)
    assert_one_line_error(plan(), f"{tiny_dataset}: {expected}", prog="nnalign_plan_and_preprocess")
    assert not (tmp_path / "pre" / DATASET).exists()


def test_every_bad_case_is_counted(tiny_dataset, write_image):
    from nnalign.data.dataset_checks import check_raw_dataset, read_dataset_json

    _nan_voxel(tiny_dataset, write_image)
    write_image(tiny_dataset / "imagesTr" / "TINY_000_0003.nii.gz", np.ones(SHAPE, np.float32))
    with pytest.raises(NnalignError, match=r"^\S+: TINY_000: TINY_000_0003.nii.gz: no signal .* \(and 1 more bad "
                                           r"case\)$"):
        check_raw_dataset(tiny_dataset, read_dataset_json(tiny_dataset))


def test_read_only_nnunet_preprocessed_is_one_line(tiny_dataset, tmp_path, plan, read_only, assert_one_line_error):
    with read_only(tmp_path / "ro") as pre:
        assert_one_line_error(plan(pre=pre), str(pre), "cannot write preprocessed data there",
                              prog="nnalign_plan_and_preprocess")
        assert not any(pre.iterdir())


# ----------------------------------------------------------------------------------------------------------------------
# a failed or interrupted run leaves no folder that looks complete


@pytest.mark.slow
def test_train_refuses_a_folder_whose_preprocessing_did_not_finish(tmp_path, fake_dataset, run_train,
                                                                   assert_one_line_error):
    from nnalign.planning.status import INCOMPLETE_MARKER

    root = fake_dataset(tmp_path, configuration="3d_cpu")
    from nnalign.data.raw_dataset import write_dataset_json

    folder = root / "pre" / "Dataset018_BraTS2018"
    write_dataset_json(folder, 2, "BraTS2018")  # as far as nnalign_train looks, the folder is complete but for:
    (folder / INCOMPLETE_MARKER).touch()
    assert_one_line_error(run_train(root, tmp_path / "results", "18", "3d_cpu", "0", "-device", "cpu"),
                          f"{folder}: its preprocessing did not finish", "run nnalign_plan_and_preprocess -d 18 again")


@pytest.fixture
def synthetic(tmp_path, folders_env):
    """``synthetic(num_cases)``: the synthetic dataset 62 of 32^3 cases under ``tmp_path/raw``; returns the folders'
    environment."""
    from nnalign.data.synthetic import write_synthetic_dataset

    def write(num_cases: int) -> dict[str, str]:
        write_synthetic_dataset(tmp_path / "raw", 62, num_cases=num_cases, shape=(32, 32, 32))
        return folders_env(tmp_path)
    return write


@pytest.mark.slow
def test_a_full_nnunet_preprocessed_is_one_line_and_leaves_no_folder(tmp_path, synthetic, run_module, tmpfs,
                                                                     assert_one_line_error):
    env = synthetic(2)
    with tmpfs(tmp_path / "full", size_kib=16) as pre:  # room for the first small files, not for the plans
        env["nnUNet_preprocessed"] = str(pre)
        proc = run_module("plan_and_preprocess", "-d", 62, "-c", "3d_cpu", "-np", 1, env=env)
        assert_one_line_error(proc, f"{pre / 'Dataset062_SyntheticBraTS'}: cannot write preprocessed data there",
                              "No space left on device", "nothing was kept", prog="nnalign_plan_and_preprocess")
        assert not any(pre.iterdir()), sorted(p.name for p in pre.iterdir())


def _sigint_as_in_a_terminal() -> None:
    """In a child before its exec: SIGINT's default action, as a command typed at a terminal has it. A test process
    can inherit SIGINT ignored (a suite started in the background, or in a pytest-xdist worker); a child would keep
    that, and Python would then never raise KeyboardInterrupt in it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """Send SIGINT to ``proc``'s process group (what Ctrl-C in a terminal does) as soon as ``ready()``."""
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["fingerprinting", "after 2 of 6 cases"])
@pytest.mark.parametrize("earlier", [False, True], ids=["new", "existing"])
def test_ctrl_c_is_one_line_and_leaves_no_folder_that_looks_complete(tmp_path, synthetic, moment, earlier, run_train,
                                                                     assert_one_line_error):
    from nnalign.planning.status import INCOMPLETE_MARKER

    env = synthetic(6)
    folder = tmp_path / "pre" / "Dataset062_SyntheticBraTS"
    if earlier:  # what an earlier run left: it must stay
        folder.mkdir(parents=True)
        (folder / "notes.txt").write_text("mine")
    environ = {k: v for k, v in {**os.environ, **env}.items() if k != "NNALIGN_DEBUG"}
    proc = subprocess.Popen([sys.executable, "-m", "nnalign.cli.plan_and_preprocess", "-d", "62", "-c", "3d_cpu",
                             "-np", "2"], env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_sigint_as_in_a_terminal)
    data = folder / "nnAlignPlans_3d_cpu"
    if moment == "fingerprinting":
        ready = lambda: (folder / INCOMPLETE_MARKER).exists() and len(_spawned_children(proc.pid)) >= 2  # noqa: E731
    else:
        ready = lambda: len(list(data.glob("*.pkl"))) >= 2  # noqa: E731
    try:
        _interrupt_when(proc, ready)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "nnalign_plan_and_preprocess: interrupted", \
        stderr
    if not earlier:
        assert not folder.exists(), sorted(p.name for p in folder.iterdir())
        return
    assert (folder / "notes.txt").read_text() == "mine" and (folder / INCOMPLETE_MARKER).exists()
    if moment != "fingerprinting":
        assert_one_line_error(run_train(tmp_path, tmp_path / "results", "62", "3d_cpu", "0", "-device", "cpu"),
                              "its preprocessing did not finish", "run nnalign_plan_and_preprocess -d 62 again")


def _spawned_children(pid: int) -> list[int]:
    """The multiprocessing workers among the children of ``pid`` (resource tracker aside)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if ppid == pid and b"spawn_main" in command and b"resource_tracker" not in command:
                found.append(int(entry.name))
    return found


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _sigint_blocked(pid: int) -> bool:
    """Whether SIGINT is in the blocked mask of process ``pid`` (from /proc)."""
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":\t" in line)
    return bool(int(fields["SigBlk"], 16) >> (signal.SIGINT - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads signal masks from /proc")
def test_workers_start_deaf_to_sigint_and_the_main_process_is_not():
    import multiprocessing

    from nnalign.planning.plan_and_preprocess import workers_ignore_sigint

    handler = signal.getsignal(signal.SIGINT)
    with workers_ignore_sigint():
        worker = multiprocessing.get_context("spawn").Process(target=_sleep, args=(30,))
        worker.start()
    try:
        assert _sigint_blocked(worker.pid)
        assert not _sigint_blocked(os.getpid())
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        worker.terminate()
        worker.join()


def test_a_ctrl_c_while_a_worker_starts_is_raised_after_it_and_the_worker_is_ended(monkeypatch):
    import multiprocessing
    import multiprocessing.process

    from nnalign.planning.plan_and_preprocess import workers_ignore_sigint

    real_start = multiprocessing.process.BaseProcess.start

    def start_with_ctrl_c(self) -> None:  # Ctrl-C lands while the worker is being started
        os.kill(os.getpid(), signal.SIGINT)
        real_start(self)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start_with_ctrl_c)
    worker = multiprocessing.get_context("spawn").Process(target=_sleep, args=(30,))
    with pytest.raises(KeyboardInterrupt):
        with workers_ignore_sigint():
            worker.start()
    assert worker.pid is not None, "the worker was started before the interrupt was raised"
    assert worker.exitcode == -signal.SIGTERM, "the worker outlived the interrupted body"
