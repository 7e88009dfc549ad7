"""``nnalign_predict --backend openvino``: the missing extra is one line, the IR cache is used only when it is this
model's, and on tiny trained models (a dropout teacher, a T1ce student) both backends give the same segmentations, from
a copied model folder without a cache, from its cache, and from a read-only copy."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnalign.errors import NnalignError
from nnalign.inference.openvino_backend import CACHE_FOLDER
from nnalign.modalities import BRATS_MODALITIES

ALL = BRATS_MODALITIES


def test_openvino_asked_for_and_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    from nnalign.inference.predict import predict

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(NnalignError, match=r"^--backend openvino: OpenVINO is not installed; it is an optional "
                                           r"extra: pip install nnalign\[openvino\]$"):
        predict(tmp_path, tmp_path / "out", tmp_path, device="cpu", backend="openvino")


# ----------------------------------------------------------------------------------------------------------------------
# the IR cache, on a two-operation model (no conversion)


def _key(**changes):
    from nnalign.inference.openvino_backend import CacheKey

    fields = dict(checkpoint_sha256="ab" * 32, config_sha256="cd" * 32, trainer="nnAlignTeacher_mixture_drop0p5",
                  configuration="3d_cpu", patch_size=(4, 4, 4), input_channels=4, present=(1, 2), openvino="2026.4.0",
                  precision="f32", method_version=5, nnalign="0.2.0")
    return CacheKey(**{**fields, **changes})


def _tiny_model(scale: float):
    ov = pytest.importorskip("openvino")
    from openvino import opset13 as ops

    x = ops.parameter([1, 4, 4, 4, 4], np.float32, name="x")
    return ov.Model([ops.multiply(x, ops.constant(np.float32(scale)))], [x], "tiny")


def _run(model, value: float = 1.0) -> float:
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU")
    return float(compiled([np.full((1, 4, 4, 4, 4), value, np.float32)])[0].ravel()[0])


def test_a_cache_is_read_back_only_for_its_own_key_and_intact_files(tmp_path):
    from nnalign.inference.openvino_backend import read_cached, write_cache

    key = _key()
    stem = key.file_stem("checkpoint_final.pth")
    assert stem.startswith(f"checkpoint_final-{'ab' * 8}-ov2026.4.0-c12-")  # the checkpoint's hash, OpenVINO's version
    write_cache(tmp_path, stem, key, _tiny_model(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.bin", f"{stem}.json", f"{stem}.xml"]  # no temps
    assert _run(read_cached(tmp_path, stem, key)) == 3.0
    for stale in (_key(checkpoint_sha256="ef" * 32), _key(openvino="2027.0.0"), _key(present=(1,)),
                  _key(patch_size=(4, 4, 8)), _key(method_version=6), _key(config_sha256="00" * 32)):
        assert read_cached(tmp_path, stem, stale) is None
    weights = tmp_path / f"{stem}.bin"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\1")  # another weight, same size
    assert read_cached(tmp_path, stem, key) is None
    assert read_cached(tmp_path / "elsewhere", stem, key) is None


def test_a_stale_cache_is_converted_again_and_an_unwritable_folder_falls_back_with_a_note(tmp_path, read_only):
    from nnalign.inference.openvino_backend import cached_or_converted

    key, notes = _key(), []
    stem = key.file_stem("checkpoint_final.pth")
    made = cached_or_converted([tmp_path / "a"], stem, key, lambda: _tiny_model(2.0), notes.append)
    assert _run(made) == 2.0 and notes == []
    reused = cached_or_converted([tmp_path / "a"], stem, key, lambda: pytest.fail("converted again"), notes.append)
    assert _run(reused) == 2.0
    rebuilt = cached_or_converted([tmp_path / "a"], stem, _key(nnalign="0.3.0"), lambda: _tiny_model(5.0),
                                  notes.append)
    assert _run(rebuilt) == 5.0
    with read_only(tmp_path / "ro") as ro:
        fallback = tmp_path / "user"
        cached_or_converted([ro / "fold_0" / "openvino", fallback], stem, key, lambda: _tiny_model(2.0), notes.append)
        assert (fallback / f"{stem}.json").is_file()
        assert len(notes) == 1 and "cannot write the OpenVINO cache in" in notes[0] and "next folder" in notes[0]
        model = cached_or_converted([ro / "x"], stem, _key(trainer="other"), lambda: _tiny_model(7.0), notes.append)
        assert _run(model) == 7.0 and notes[-1].endswith("kept in memory for this run")


# ----------------------------------------------------------------------------------------------------------------------
# end to end on tiny trained models


DATASET_ID = 37
DATASET = "Dataset037_SyntheticBraTS"
CONFIG = "3d_cpu"


def _train(root: Path, *args: str) -> None:
    env = {**os.environ, "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "f"}
    env.pop("NNALIGN_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "nnalign.cli.train", str(DATASET_ID), CONFIG, "0", *args, "-device",
                           "cpu", "--epochs", "1", "--iters-per-epoch", "2"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """2 training cases + 2 held-out synthetic cases of 40^3 (3d_cpu); a mixture teacher with modality dropout and a
    T1ce student without distillation, 1 epoch x 2 iterations each; a dataset results folder holding both."""
    pytest.importorskip("openvino")
    root = tmp_path_factory.mktemp("openvino")
    from nnalign.paths import TRAINER_SHIM_DIR

    with pytest.MonkeyPatch.context() as mp:
        for var, value in (("nnUNet_raw", root / "raw"), ("nnUNet_preprocessed", root / "pre"),
                           ("nnUNet_results", root / "results"), ("nnUNet_extTrainer", TRAINER_SHIM_DIR),
                           ("nnUNet_n_proc_DA", "0"), ("nnUNet_def_n_proc", "1"), ("nnUNet_compile", "f"),
                           ("XDG_CACHE_HOME", root / "user_cache")):
            mp.setenv(var, str(value))
        from nnalign.data.synthetic import write_synthetic_dataset
        from nnalign.planning.plan_and_preprocess import plan_and_preprocess

        write_synthetic_dataset(root / "raw", DATASET_ID, num_cases=2, shape=(40, 40, 40), num_test=2)
        plan_and_preprocess(DATASET_ID, [CONFIG], num_processes=1, warn=lambda m: None)
        results = root / "results" / DATASET
        _train(root, "--anchor", "mixture", "--modality-dropout", "0.5")
        teacher, = results.glob("nnAlignTeacher_*")
        _train(root, "--role", "student", "--modalities", "T1ce", "--kd", "none", "--teacher", str(teacher))
        yield {"root": root, "results": results, "images": root / "raw" / DATASET / "imagesTs"}


def _cases(images: Path, dest: Path) -> Path:
    """Each held-out case three times: all modalities (the teacher), T1ce alone (the student) and FLAIR alone (the
    teacher's missing-modality path), in nnU-Net naming."""
    dest.mkdir()
    for source in sorted(images.glob("*_0000.nii.gz")):
        case = source.name[: -len("_0000.nii.gz")]
        for tag, subset in (("all", ALL), ("t1ce", ("T1ce",)), ("flair", ("FLAIR",))):
            for index in (ALL.index(m) for m in subset):
                shutil.copyfile(images / f"{case}_{index:04d}.nii.gz", dest / f"{case}{tag}_{index:04d}.nii.gz")
    return dest


def _predict(models_dir: Path, cases: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "nnUNet_def_n_proc": "1"}
    env.pop("NNALIGN_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "nnalign.cli.predict", "-i", str(cases), "-o", str(out), "-m",
                           str(models_dir), "-device", "cpu", "--labels", "nnunet", *args],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _assert_agree(torch_out: Path, openvino_out: Path) -> None:
    import SimpleITK as sitk

    from nnalign.inference.openvino_backend import MAX_DICE_DIFFERENCE, MIN_VOXEL_AGREEMENT, label_agreement

    files = sorted(openvino_out.glob("*.nii.gz"))
    assert len(files) in (4, 6)
    for file in files:
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(folder / file.name))) for folder in (torch_out, openvino_out))
        voxels, dice = label_agreement(a, b)
        assert voxels >= MIN_VOXEL_AGREEMENT and max(dice.values()) <= MAX_DICE_DIFFERENCE, (file.name, voxels, dice)


@pytest.mark.slow
def test_both_backends_segment_alike_from_a_copied_folder_its_cache_and_a_read_only_copy(models, tmp_path,
                                                                                          read_only):
    cases = _cases(models["images"], tmp_path / "cases")
    copied = shutil.copytree(models["results"], tmp_path / "copied")  # another machine: no cache yet
    _predict(copied, cases, tmp_path / "torch")  # mirroring on: the flipped tiles go through OpenVINO too
    first = _predict(copied, cases, tmp_path / "openvino", "--backend", "openvino")
    assert "note: backend openvino: OpenVINO" in first.stderr and "f32 precision" in first.stderr
    _assert_agree(tmp_path / "torch", tmp_path / "openvino")
    caches = [p.name for p in copied.glob("*/fold_0/openvino/*.xml")]
    # the teacher: all modalities and FLAIR alone; the student: one graph whatever the case has
    assert sorted(name.rsplit("-", 2)[-2] for name in caches) == ["all", "c0123", f"c{ALL.index('FLAIR')}"]
    assert all(name.startswith("checkpoint_final-") for name in caches)

    mtimes = {p: p.stat().st_mtime_ns for p in copied.glob("*/fold_0/openvino/*")}
    _predict(copied, cases, tmp_path / "cached", "--backend", "openvino")  # from the cache, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in copied.glob("*/fold_0/openvino/*")} == mtimes
    _assert_agree(tmp_path / "torch", tmp_path / "cached")

    # read-only (a 4 MiB tmpfs for root): the teacher alone, on the cases it served above
    teacher, = copied.glob("nnAlignTeacher_*")
    slim = shutil.copytree(teacher, tmp_path / "slim" / teacher.name,
                           ignore=shutil.ignore_patterns("checkpoint_best.pth", "*.png", "*.txt", "validation",
                                                         CACHE_FOLDER))
    served = tmp_path / "served_cases"
    served.mkdir()
    for image in cases.glob("*.nii.gz"):
        if "t1ce_" not in image.name:
            shutil.copyfile(image, served / image.name)
    with read_only(tmp_path / "ro", fill_from=slim.parent) as ro:
        proc = _predict(ro / teacher.name, served, tmp_path / "from_ro", "--backend", "openvino")
        assert "cannot write the OpenVINO cache in" in proc.stderr
        assert len(list((models["root"] / "user_cache" / "nnalign" / "openvino").glob("*.xml"))) == 2
        _assert_agree(tmp_path / "torch", tmp_path / "from_ro")
