"""Hostile and careless input without trained models: crafted and broken checkpoints, odd images and label maps,
unwritable or full output folders, killed conversions. Every failure is one line naming the file and the problem.

The tests that need trained models (nnalign_predict, nnalign_train --c, the student's teacher, nnalign_report, a killed
training) are in test_hostile_models.py. Read-only and full folders are tmpfs mounts where the tests run as root
(root writes through file permissions); they are skipped with a message where nothing can be mounted.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from nnalign.errors import NnalignError

SIZE = (8, 9, 10)  # x, y, z
SHAPE = SIZE[::-1]  # the shape of write_brats_case's images (conftest's BRATS_SHAPE)
NAMES = {"T1": "t1", "T1ce": "t1ce", "T2": "t2", "FLAIR": "flair", "seg": "seg"}  # its file names (BRATS_NAMES)


def seg_array(seed: int = 0) -> np.ndarray:
    """A BraTS 2018 label map: necrosis 1, edema 2, enhancing tumour 4 at random places."""
    flat = np.zeros(int(np.prod(SHAPE)), dtype=np.uint8)
    flat[:7], flat[7:20], flat[20:39] = 1, 2, 4
    return np.random.default_rng(seed).permutation(flat).reshape(SHAPE)


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints: weights only, one allow-list


@pytest.fixture
def real_like_checkpoint(tmp_path) -> Path:
    """A checkpoint with what nnU-Net's trainer saves: tensors, optimizer state, numpy scalars in the log, a device."""
    import torch

    net = torch.nn.Conv3d(2, 3, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    net(torch.ones(1, 2, 4, 4, 4)).sum().backward()
    opt.step()
    payload = {"network_weights": net.state_dict(), "optimizer_state": opt.state_dict(), "grad_scaler_state": None,
               "logging": {"mean_fg_dice": [np.float64(0.5), np.float32(0.25)], "ema_fg_dice": [np.float32(0.1)],
                           "epoch_start_timestamps": [1.5]},
               "_best_ema": np.float32(0.3), "current_epoch": 3,
               "init_args": {"plans": {"a": [1, 2]}, "configuration": "3d_cpu", "fold": 0, "dataset_json": {},
                             "device": torch.device("cuda")},
               "trainer_name": "nnAlignTeacher_mixture", "inference_allowed_mirroring_axes": (0, 1, 2)}
    path = tmp_path / "checkpoint_final.pth"
    torch.save(payload, path)
    return path


def test_what_nnunet_checkpoints_hold_loads_weights_only(real_like_checkpoint):
    from nnalign.checkpoints import check_checkpoint, load_checkpoint_safely

    check_checkpoint(real_like_checkpoint)
    loaded = load_checkpoint_safely(real_like_checkpoint)
    assert loaded["current_epoch"] == 3 and loaded["_best_ema"] == np.float32(0.3)
    assert loaded["logging"]["mean_fg_dice"][0] == 0.5 and loaded["init_args"]["device"].type == "cuda"


def test_numpy_1_scalars_load_under_their_old_name(real_like_checkpoint, tmp_path):
    """Checkpoints saved with numpy < 2 name the scalar type numpy.core.multiarray.scalar."""
    from nnalign.checkpoints import load_checkpoint_safely

    old = tmp_path / "numpy1.pth"
    with zipfile.ZipFile(real_like_checkpoint) as src, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            dst.writestr(info, data)
    assert load_checkpoint_safely(old)["_best_ema"] == np.float32(0.3)


def test_a_crafted_checkpoint_is_refused_naming_the_file_and_the_type(tmp_path, write_crafted_checkpoint):
    from nnalign.checkpoints import CheckpointError, check_checkpoint, load_checkpoint_safely

    marker, path = tmp_path / "created_by_the_checkpoint", tmp_path / "checkpoint_final.pth"
    write_crafted_checkpoint(path, marker)
    for load in (load_checkpoint_safely, check_checkpoint):
        with pytest.raises(CheckpointError) as e:
            load(path)
        assert str(e.value).startswith(f"{path}: refused: it holds io.open"), str(e.value)
        assert "\n" not in str(e.value)
    assert not marker.exists()


def test_inside_safe_torch_load_nnunets_loads_are_weights_only_whatever_they_ask(tmp_path, write_crafted_checkpoint):
    import torch

    from nnalign.checkpoints import CheckpointError, safe_torch_load

    marker, path = tmp_path / "created", tmp_path / "checkpoint_latest.pth"
    write_crafted_checkpoint(path, marker)
    original = torch.load
    with safe_torch_load(), pytest.raises(CheckpointError, match="io.open"):
        torch.load(path, map_location="cpu", weights_only=False)  # as nnU-Net's trainer and predictor call it
    assert torch.load is original and not marker.exists()


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"this is not a checkpoint\n" * 20, "not a readable checkpoint"),
    ("half", "not a readable checkpoint (truncated or corrupt: RuntimeError: PytorchStreamReader failed reading zip"),
])
def test_empty_truncated_and_garbage_checkpoints_are_one_line(real_like_checkpoint, tmp_path, content, reason):
    from nnalign.checkpoints import CheckpointError, check_checkpoint

    path = tmp_path / "checkpoint_latest.pth"
    data = real_like_checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content == "half" else content)
    with pytest.raises(CheckpointError) as e:
        check_checkpoint(path)
    assert str(e.value).startswith(f"{path}: {reason}") and "\n" not in str(e.value), str(e.value)


# ----------------------------------------------------------------------------------------------------------------------
# -chk is a file name


@pytest.mark.parametrize("name", ["../../other/fold_0/checkpoint_final.pth", "/tmp/checkpoint_final.pth", "..",
                                  "sub/checkpoint_final.pth", "..\\checkpoint_final.pth", ""])
def test_chk_takes_a_file_name_only(tmp_path, name):
    from nnalign.inference.models import discover_models

    with pytest.raises(NnalignError, match="not a path"):
        discover_models(tmp_path, checkpoint=name)


@pytest.mark.slow
def test_predict_cli_refuses_a_chk_path_before_writing(tmp_path, run_module, assert_one_line_error):
    out = tmp_path / "out"
    proc = run_module("predict", "-i", tmp_path, "-o", out, "-m", tmp_path, "-chk", "../fold_0/checkpoint_final.pth",
                      "-device", "cpu")
    assert_one_line_error(proc, "-chk '../fold_0/checkpoint_final.pth'", "not a path", prog="nnalign_predict")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------------
# conversion


def test_a_4d_modality_is_one_line_and_skip_bad_skips_the_case(tmp_path, write_brats_case, convert,
                                                               assert_one_line_error):
    source, raw = tmp_path / "release", tmp_path / "raw"
    write_brats_case(source, "Brats18_GOOD_1")
    write_brats_case(source, "Brats18_4D_1", arrays={"T1ce": np.ones((2, *SHAPE), np.float32)})
    line = assert_one_line_error(convert(raw, source, "-np", 1), "Brats18_4D_1_t1ce.nii.gz",
                                 "expected a 3D scalar image, got a 4D image (8 x 9 x 10 x 2)",
                                 prog="nnalign_convert_brats")
    assert "Brats18_4D_1" in line and not raw.exists() or not any(raw.iterdir())

    proc = convert(raw, source, "-np", 1, "--skip-bad")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "skipped Brats18_4D_1: Brats18_4D_1: Brats18_4D_1_t1ce.nii.gz: expected a 3D scalar image" in proc.stdout
    assert sorted(p.name for p in (raw / "Dataset030_release" / "labelsTr").iterdir()) == ["Brats18_GOOD_1.nii.gz"]


def test_a_geometry_mismatch_names_the_file_that_differs_from_the_others(tmp_path, write_brats_case, convert,
                                                                         assert_one_line_error):
    source, raw = tmp_path / "release", tmp_path / "raw"
    write_brats_case(source, "Brats18_MOVED_1", origins={"FLAIR": (0.0, 0.0, 5.0)})
    line = assert_one_line_error(convert(raw, source, "-np", 1), prog="nnalign_convert_brats")
    assert line.startswith("nnalign_convert_brats: error: Brats18_MOVED_1: Brats18_MOVED_1_flair.nii.gz: origin "
                           "(0.0, 0.0, 5.0) differs from (0.0, 0.0, 0.0) of the other files"), line


def test_geometry_without_a_majority_names_both_files_and_shapes_are_integers():
    from nnalign.data.brats_layout import BratsCase
    from nnalign.data.case_checks import check_same_geometry

    class Header:
        def __init__(self, size):
            self.size = size

        def GetSize(self):  # noqa: N802 - SimpleITK's reader interface
            return self.size

        def GetSpacing(self):  # noqa: N802
            return (1.0, 1.0, 1.0)

        def GetOrigin(self):  # noqa: N802
            return (0.0, 0.0, 0.0)

        def GetDirection(self):  # noqa: N802
            return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    case = BratsCase("C1", Path("."), "brats2018")
    files = {"T1ce": Path("C1_t1ce.nii.gz"), "T2": Path("C1_t2.nii.gz")}
    with pytest.raises(NnalignError) as e:
        check_same_geometry(case.case_id, files, {"T1ce": Header((240, 240, 155)), "T2": Header((240, 240, 160))})
    assert str(e.value).startswith("C1: C1_t1ce.nii.gz and C1_t2.nii.gz differ in shape: (240, 240, 155) vs "
                                   "(240, 240, 160)"), str(e.value)


@pytest.mark.parametrize("kind, value", [("T2", np.nan), ("FLAIR", np.inf), ("seg", np.nan)])
def test_nan_or_inf_in_an_image_or_label_is_an_error_naming_the_file(tmp_path, kind, value, write_brats_case, convert,
                                                                     assert_one_line_error):
    source, raw = tmp_path / "release", tmp_path / "raw"
    array = seg_array().astype(np.float32) if kind == "seg" else np.full(SHAPE, 5.0, np.float32)
    array[1, 2, 3] = value
    write_brats_case(source, "Brats18_NAN_1", arrays={kind: array})
    assert_one_line_error(convert(raw, source, "-np", 1),
                          f"Brats18_NAN_1_{NAMES[kind]}.nii.gz: 1 NaN or infinite voxel", prog="nnalign_convert_brats")


def test_skip_bad_with_every_case_bad_lists_what_it_skipped(tmp_path, write_brats_case, convert, assert_one_line_error):
    source, raw = tmp_path / "release", tmp_path / "raw"
    write_brats_case(source, "Brats18_BAD_1", arrays={"T1": np.ones((2, *SHAPE), np.float32)})
    write_brats_case(source, "Brats18_BAD_2", origins={"T2": (9.0, 0.0, 0.0)})
    proc = convert(raw, source, "-np", 1, "--skip-bad")
    assert_one_line_error(proc, "no case could be converted (2 skipped as bad)", prog="nnalign_convert_brats")
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("skipped ")]
    assert [line.split(":")[0] for line in skipped] == ["skipped Brats18_BAD_1", "skipped Brats18_BAD_2"], proc.stdout
    assert "Brats18_BAD_2_t2.nii.gz: origin" in skipped[1]


def test_nnunet_raw_that_is_a_file_is_one_line(tmp_path, write_brats_case, convert, assert_one_line_error):
    source = tmp_path / "release"
    write_brats_case(source, "Brats18_GOOD_1")
    raw = tmp_path / "raw_is_a_file"
    raw.write_text("not a folder")
    assert_one_line_error(convert(raw, source, "-np", 1), str(raw), "not a folder", prog="nnalign_convert_brats")
    inside = raw / "sub"
    assert_one_line_error(convert(inside, source, "-np", 1), str(inside), "cannot write", prog="nnalign_convert_brats")


def test_read_only_nnunet_raw_is_one_line(tmp_path, write_brats_case, read_only, convert, assert_one_line_error):
    source = tmp_path / "release"
    write_brats_case(source, "Brats18_GOOD_1")
    with read_only(tmp_path / "raw") as raw:
        assert_one_line_error(convert(raw, source, "-np", 1), str(raw), "cannot write", prog="nnalign_convert_brats")
        assert not any(raw.iterdir())


def test_full_nnunet_raw_is_one_line_and_leaves_nothing(tmp_path, write_brats_case, tmpfs, convert,
                                                        assert_one_line_error):
    source = tmp_path / "release"
    rng = np.random.default_rng(0)
    for i in range(3):  # incompressible voxels: about 1.3 MB per case once gzipped
        write_brats_case(source, f"Brats18_BIG_{i}",
                         arrays={m: rng.random((80, 80, 13)).astype(np.float32) for m in ("T1", "T1ce", "T2", "FLAIR")}
                         | {"seg": np.zeros((80, 80, 13), np.uint8)})
    with tmpfs(tmp_path / "raw", size_kib=1024) as raw:
        proc = convert(raw, source, "-np", 1)
        assert_one_line_error(proc, "No space left on device", "nothing was", prog="nnalign_convert_brats")
        assert not any(raw.iterdir()), sorted(p.name for p in raw.iterdir())


@pytest.mark.slow
def test_stale_staging_folders_of_dead_processes_are_removed(tmp_path, write_brats_case, convert):
    from nnalign.data.raw_dataset import remove_stale_staging

    raw = tmp_path / "raw"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = raw / f".Dataset031_release.partial-{dead.pid}"
    live = raw / f".Dataset032_other.partial-{os.getpid()}"
    unrelated = raw / ".Dataset033_notes"
    for folder in (stale, live, unrelated):
        (folder / "imagesTr").mkdir(parents=True)
    source = tmp_path / "release"
    write_brats_case(source, "Brats18_GOOD_1")
    proc = convert(raw, source, "-np", 1)
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and live.is_dir() and unrelated.is_dir()
    assert remove_stale_staging(raw) == []


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the worker processes")
def test_a_killed_conversion_takes_its_workers_and_the_next_run_removes_its_staging(tmp_path, write_brats_case,
                                                                                      convert):
    source, raw = tmp_path / "release", tmp_path / "raw"
    for i in range(24):
        write_brats_case(source, f"Brats18_CASE_{i:02d}")
    env = {k: v for k, v in os.environ.items() if k != "NNALIGN_DEBUG"}
    env["nnUNet_raw"] = str(raw)
    proc = subprocess.Popen([sys.executable, "-m", "nnalign.cli.convert_brats", "-i", str(source), "-d", "40",
                             "-np", "2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    staging: list[Path] = []
    deadline = time.monotonic() + 120
    # the labels are read (by the workers) before the staging folder exists: wait for both
    while (len(workers) < 2 or not staging) and proc.poll() is None and time.monotonic() < deadline:
        workers = [p for p in _children(proc.pid)
                   if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes() and
                   b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]
        staging = list(raw.glob(f".Dataset040_release.partial-{proc.pid}"))
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(workers) == 2 and staging, "the conversion finished before it could be killed"
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), "worker processes outlived the killed conversion"
    assert staging[0].is_dir()  # the debris the next run must remove

    done = convert(raw, source, "-np", 1, dataset_id=40)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset040_release"]


# ----------------------------------------------------------------------------------------------------------------------
# evaluation


@pytest.fixture
def labels(write_image):
    """``labels(folder, case, array=None)``: the label map ``folder/<case>.nii.gz`` (``seg_array(1)`` by default)."""
    def write(folder: Path, case: str, array: np.ndarray | None = None) -> Path:
        return write_image(folder / f"{case}.nii.gz", seg_array(1) if array is None else array)
    return write


@pytest.fixture
def two_cases(tmp_path, labels) -> tuple[Path, Path]:
    """Reference and prediction folders holding the same label maps of cases A and B."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for case in ("A", "B"):
        labels(ref, case)
        labels(pred, case)
    return ref, pred


@pytest.fixture
def evaluate(run_module):
    """``evaluate(ref, pred, *args)``: ``nnalign_evaluate`` with BraTS 2018 labels, in a subprocess."""
    def run(ref: Path, pred: Path, *args) -> subprocess.CompletedProcess:
        return run_module("evaluate", "-r", ref, "-p", pred, "--labels", "brats2018", *args)
    return run


def test_a_truncated_prediction_is_a_failed_case_never_a_score(two_cases, evaluate, error_lines):
    import gzip

    ref, pred = two_cases
    path = pred / "B.nii.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-300]))
    proc = evaluate(ref, pred)
    lines = error_lines(proc, "nnalign_evaluate")
    assert any(f"{path}: truncated file" in line for line in lines), lines
    metrics = json.loads((pred / "metrics.json").read_text())
    assert list(metrics["cases"]) == ["A"] and "B" in metrics["errors"]


def test_a_truncated_reference_is_a_failed_case(two_cases, evaluate, error_lines, write_image):
    ref, pred = two_cases
    path = ref / "A.nii"
    write_image(path, seg_array(1))
    (ref / "A.nii.gz").unlink()
    path.write_bytes(path.read_bytes()[:-100])
    lines = error_lines(evaluate(ref, pred), "nnalign_evaluate")
    assert any(f"{path}: truncated file" in line for line in lines), lines


@pytest.mark.parametrize("side", ["ref", "pred"])
def test_nan_in_a_label_map_is_an_error_naming_the_file(tmp_path, side, two_cases, labels, evaluate, error_lines):
    ref, pred = two_cases
    bad = seg_array(1).astype(np.float32)
    bad[0, 0, 0] = np.nan
    path = labels(tmp_path / side, "B", bad)
    lines = error_lines(evaluate(ref, pred), "nnalign_evaluate")
    assert any(f"{path}: 1 NaN or infinite voxel" in line for line in lines), lines


def test_read_only_output_of_evaluate_is_one_line(tmp_path, labels, evaluate, read_only, assert_one_line_error):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    labels(ref, "A")
    labels(pred, "A")
    with read_only(tmp_path / "ro") as folder:
        assert_one_line_error(evaluate(ref, pred, "-o", folder / "metrics.csv"), str(folder),
                              "cannot write the metrics", prog="nnalign_evaluate")
    with read_only(tmp_path / "ro_pred", fill_from=pred) as ro_pred:
        assert_one_line_error(evaluate(ref, ro_pred), str(ro_pred), "cannot write", prog="nnalign_evaluate")


# ----------------------------------------------------------------------------------------------------------------------
# nnalign_train: the fold must be in the split


def test_a_fold_outside_the_split_is_one_line_listing_the_folds(tmp_path):
    from nnalign.cli.train import check_fold_in_split

    folder = tmp_path / "Dataset901_X"
    folder.mkdir()
    check_fold_in_split(folder, 4)
    with pytest.raises(NnalignError, match=r"fold 5: Dataset901_X has no splits_final.json yet, and nnU-Net makes 5"):
        check_fold_in_split(folder, 5)
    (folder / "splits_final.json").write_text(json.dumps([{"train": ["a"], "val": ["b"]}] * 4))
    check_fold_in_split(folder, 3)
    check_fold_in_split(folder, "all")
    with pytest.raises(NnalignError, match=r"fold 7 is not in .*splits_final.json \(its folds: 0-3; or 'all'\)"):
        check_fold_in_split(folder, 7)
    (folder / "splits_final.json").write_text("{not json")
    with pytest.raises(NnalignError, match="cannot read the split"):
        check_fold_in_split(folder, 0)




@pytest.mark.slow
def test_the_checkpoint_module_imports_no_torch_until_used():
    code = "import sys, nnalign.checkpoints; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
