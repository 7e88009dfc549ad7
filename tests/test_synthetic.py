"""The synthetic BraTS-like generator, its dataset writer, and ``nnalign_synth``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.stats import rankdata

from nnalign.data.raw_dataset import image_filename
from nnalign.data.synthetic import (BG, CSF, GM, GLIOMA_KINDS, WM, CaseOptions, case_seed, generate_case,
                                    incomplete_cases, synthesize_case, write_synthetic_dataset)
from nnalign.errors import NnalignError
from nnalign.modalities import BRATS_MODALITIES

# ----------------------------------------------------------------------------------------------------------------------
# generate_case


def test_arrays_are_zyx_float32_images_in_channel_order_and_uint8_labels():
    images, seg = generate_case((48, 40, 32), seed=3)
    assert list(images) == list(BRATS_MODALITIES)
    for name, img in images.items():
        assert img.shape == (32, 40, 48), name
        assert img.dtype == np.float32, name
        assert np.all(np.isfinite(img)), name
    assert seg.shape == (32, 40, 48)
    assert seg.dtype == np.uint8


def test_same_seed_same_case_other_seed_other_case():
    images_a, seg_a = generate_case((40, 40, 40), seed=11)
    images_b, seg_b = generate_case((40, 40, 40), seed=11)
    images_c, seg_c = generate_case((40, 40, 40), seed=12)
    np.testing.assert_array_equal(seg_a, seg_b)
    for m in BRATS_MODALITIES:
        np.testing.assert_array_equal(images_a[m], images_b[m])
        assert not np.array_equal(images_a[m], images_c[m]), m
    assert not np.array_equal(seg_a, seg_c)


def test_labels_are_nnunet_labels_every_case_has_tumour_and_et_is_sometimes_absent():
    has_et = []
    for seed in range(80):
        seg = synthesize_case((32, 32, 32), seed).seg
        values = set(np.unique(seg).tolist())
        assert values <= {0, 1, 2, 3}, (seed, values)
        assert np.count_nonzero(seg) > 0, f"seed {seed} has no tumour"
        assert np.count_nonzero(seg >= 2) > 0, f"seed {seed} has no tumour core"
        has_et.append(3 in values)
    assert 0.7 * len(has_et) <= sum(has_et) < len(has_et)


@pytest.fixture(scope="module")
def cases():
    return [synthesize_case((64, 64, 64), seed) for seed in range(4)]


def test_background_is_exactly_zero_and_the_brain_is_not(cases):
    for case in cases:
        outside = case.tissue == BG
        assert 0 < np.count_nonzero(~outside) < outside.size
        assert np.all(case.seg[outside] == 0)
        for m in BRATS_MODALITIES:
            assert np.all(case.images[m][outside] == 0), m
            assert np.mean(case.images[m][~outside] > 0) > 0.99, m


def _relative_means(cases) -> dict[str, dict[str, float]]:
    """Mean intensity of each tissue / label relative to white matter, per modality, averaged over the cases."""
    classes = {"CSF": lambda c: c.tissue == CSF, "GM": lambda c: c.tissue == GM, "ED": lambda c: c.seg == 1,
               "NCR": lambda c: c.seg == 2, "ET": lambda c: c.seg == 3}
    out: dict[str, dict[str, float]] = {}
    for m in BRATS_MODALITIES:
        out[m] = {}
        for name, select in classes.items():
            ratios = [c.images[m][select(c)].mean() / c.images[m][c.tissue == WM].mean()
                      for c in cases if np.any(select(c))]
            assert len(ratios) >= 2, f"fewer than two test cases have {name}"
            out[m][name] = float(np.mean(ratios))
    return out


CONTRAST_RULES = {
    "enhancing tumour bright in T1ce": lambda r: r["T1ce"]["ET"] > 1.2,
    "enhancing tumour brighter in T1ce than in T1": lambda r: r["T1ce"]["ET"] > r["T1"]["ET"] + 0.4,
    "enhancing tumour like grey matter in T1": lambda r: abs(r["T1"]["ET"] - r["T1"]["GM"]) < 0.2,
    "edema bright in FLAIR and T2": lambda r: r["FLAIR"]["ED"] > 1.5 and r["T2"]["ED"] > 1.3,
    "edema stands out more in FLAIR than in T1": lambda r: r["FLAIR"]["ED"] > 1.5 * r["T1"]["ED"],
    "edema only mildly dark in T1 and T1ce": lambda r: 0.6 < r["T1"]["ED"] < 1 and 0.6 < r["T1ce"]["ED"] < 1.1,
    "CSF dark in FLAIR and T1, bright in T2": lambda r: r["FLAIR"]["CSF"] < 1 and r["T1"]["CSF"] < 0.6
    and r["T2"]["CSF"] > 1.5,
    "necrosis dark in T1ce and T1, bright in T2": lambda r: r["T1ce"]["NCR"] < 0.9 and r["T1"]["NCR"] < 0.9
    and r["T2"]["NCR"] > 1.5,
    "necrosis between CSF and edema in FLAIR": lambda r: r["FLAIR"]["CSF"] < r["FLAIR"]["NCR"] < r["FLAIR"]["ED"],
    "white matter brighter than grey in T1/T1ce": lambda r: r["T1"]["GM"] < 0.9 and r["T1ce"]["GM"] < 0.9,
    "white matter darker than grey in T2/FLAIR": lambda r: r["T2"]["GM"] > 1.1 and r["FLAIR"]["GM"] > 1.1,
}


@pytest.mark.parametrize("rule", list(CONTRAST_RULES))
def test_contrasts_follow_mri_physics(cases, rule):
    ratios = _relative_means(cases)
    assert CONTRAST_RULES[rule](ratios), ratios


def _separability(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve of intensity for pos against neg, either direction (0.5: no information)."""
    ranks = rankdata(np.concatenate([pos, neg]))
    auc = (ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size)
    return max(auc, 1 - auc)


def test_t1ce_is_the_best_single_modality_for_et_and_flair_for_wt(cases):
    et = {m: [] for m in BRATS_MODALITIES}
    wt = {m: [] for m in BRATS_MODALITIES}
    for c in cases:
        brain = c.tissue != BG
        for m in BRATS_MODALITIES:
            img = c.images[m]
            if np.any(c.seg == 3):  # ET against the rest of the tumour, which is what makes ET hard
                et[m].append(_separability(img[c.seg == 3], img[(c.seg == 1) | (c.seg == 2)]))
            wt[m].append(_separability(img[c.seg > 0], img[brain & (c.seg == 0)]))
    et_mean = {m: float(np.mean(v)) for m, v in et.items()}
    wt_mean = {m: float(np.mean(v)) for m, v in wt.items()}
    assert max(et_mean, key=et_mean.get) == "T1ce", et_mean
    assert et_mean["T1ce"] > 0.9 and et_mean["T1"] < 0.8, et_mean
    assert max(wt_mean, key=wt_mean.get) == "FLAIR", wt_mean


def test_case_seeds_are_distinct_and_stable():
    seeds = [case_seed(0, i) for i in range(50)] + [case_seed(0, i, held_out=True) for i in range(50)]
    seeds += [case_seed(1, i) for i in range(50)]
    assert len(set(seeds)) == len(seeds)
    assert case_seed(7, 3) == case_seed(7, 3)


@pytest.mark.parametrize("shape", [(31, 64, 64), (64, 64), (64, 64, 64, 64), ("a", 64, 64)])
def test_bad_shapes_are_user_errors(shape):
    with pytest.raises(NnalignError):
        generate_case(shape, seed=0)


# ----------------------------------------------------------------------------------------------------------------------
# write_synthetic_dataset

SHAPE = (40, 36, 32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    return write_synthetic_dataset(raw, 42, 2, shape=SHAPE, seed=5, num_test=1)


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_dataset_layout(dataset):
    assert dataset.name == "Dataset042_SyntheticBraTS"
    expected = {"dataset.json"}
    for split, cases in (("Tr", ["SYN_0000", "SYN_0001"]), ("Ts", ["SYNTS_0000"])):
        for case in cases:
            expected |= {f"images{split}/{image_filename(case, c)}" for c in range(len(BRATS_MODALITIES))}
            expected.add(f"labels{split}/{case}.nii.gz")
    assert _files(dataset) == expected
    assert [p.name for p in dataset.parent.iterdir()] == [dataset.name]  # no staging folder left behind


def test_dataset_json(dataset):
    dj = json.loads((dataset / "dataset.json").read_text())
    assert dj["numTraining"] == 2
    assert dj["channel_names"] == {str(i): m for i, m in enumerate(BRATS_MODALITIES)}
    assert dj["labels"]["background"] == 0 and sorted(dj["labels"]["whole tumor"]) == [1, 2, 3]
    assert dj["file_ending"] == ".nii.gz"
    assert dj["nnalign"]["source_label_convention"] == "brats2023"
    assert dj["nnalign"]["synthetic"]["seed"] == 5
    assert tuple(dj["nnalign"]["synthetic"]["shape"]) == SHAPE


def test_files_hold_the_generated_cases_on_a_1mm_grid(dataset):
    for split, case, seed in (("Tr", "SYN_0001", case_seed(5, 1)), ("Ts", "SYNTS_0000", case_seed(5, 0, True))):
        images, seg = generate_case(SHAPE, seed)
        for c, m in enumerate(BRATS_MODALITIES):
            img = sitk.ReadImage(str(dataset / f"images{split}" / image_filename(case, c)))
            assert img.GetSize() == SHAPE
            assert img.GetSpacing() == (1.0, 1.0, 1.0)
            assert img.GetOrigin() == (0.0, 0.0, 0.0)
            assert img.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(img), images[m])
        lab = sitk.ReadImage(str(dataset / f"labels{split}" / f"{case}.nii.gz"))
        assert lab.GetSize() == SHAPE and lab.GetSpacing() == (1.0, 1.0, 1.0)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), seg)


@pytest.mark.slow
def test_nnunet_accepts_the_dataset(dataset):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(dataset), num_processes=1)


def test_adding_cases_keeps_the_earlier_ones(tmp_path):
    small = write_synthetic_dataset(tmp_path, 1, 1, shape=(32, 32, 32), seed=9, name="Small")
    large = write_synthetic_dataset(tmp_path, 2, 2, shape=(32, 32, 32), seed=9, name="Large")
    for rel in ("labelsTr/SYN_0000.nii.gz", f"imagesTr/{image_filename('SYN_0000', 3)}"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(small / rel))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(large / rel))))
    assert not np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(large / "labelsTr/SYN_0000.nii.gz"))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(large / "labelsTr/SYN_0001.nii.gz"))))


def test_existing_id_needs_overwrite(tmp_path):
    first = write_synthetic_dataset(tmp_path, 3, 1, shape=(32, 32, 32), seed=0)
    with pytest.raises(NnalignError, match=first.name):
        write_synthetic_dataset(tmp_path, 3, 1, shape=(32, 32, 32), seed=1, name="Other")
    replaced = write_synthetic_dataset(tmp_path, 3, 1, shape=(32, 32, 32), seed=1, name="Other", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [replaced.name]
    assert json.loads((replaced / "dataset.json").read_text())["nnalign"]["synthetic"]["seed"] == 1


@pytest.mark.parametrize("kwargs", [dict(num_cases=0), dict(num_test=-1), dict(seed=-1), dict(dataset_id=0),
                                    dict(dataset_id=1000), dict(name="bad/name"), dict(shape=(32, 32, 8))])
def test_bad_arguments_are_user_errors_and_write_nothing(tmp_path, kwargs):
    args = dict(raw_root=tmp_path / "raw", dataset_id=4, num_cases=1, shape=(32, 32, 32))
    args.update(kwargs)
    with pytest.raises(NnalignError):
        write_synthetic_dataset(**args)
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


# ----------------------------------------------------------------------------------------------------------------------
# nnalign_synth


def _synth(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NNALIGN_DEBUG"}
    env["nnUNet_raw"] = str(tmp_path / "raw")
    return subprocess.run([sys.executable, "-m", "nnalign.cli.synth", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def _assert_one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("nnalign_synth: error: ")
    return lines[0]


@pytest.mark.slow
def test_cli_writes_a_dataset_and_refuses_to_clobber_it(tmp_path):
    proc = _synth(tmp_path, "-d", "7", "-n", "1", "--shape", "32", "32", "32", "--seed", "3", "--num-test", "1",
                  "--name", "CliSynth", "--tumour-modalities", "FLAIR,T1ce", "--min-rim-mm", "3",
                  "--glioma-kinds", "ring")
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "raw" / "Dataset007_CliSynth"
    assert str(folder) in proc.stdout
    assert {"imagesTr/SYN_0000_0003.nii.gz", "labelsTr/SYN_0000.nii.gz", "labelsTs/SYNTS_0000.nii.gz"} <= _files(folder)
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["nnalign"]["synthetic"] == {**dj["nnalign"]["synthetic"], "seed": 3, "shape": [32, 32, 32],
                                          "tumour_modalities": ["T1ce", "FLAIR"], "min_rim_mm": 3.0,
                                          "glioma_kinds": ["ring"]}

    line = _assert_one_line_error(_synth(tmp_path, "-d", "7", "-n", "1", "--shape", "32", "32", "32"))
    assert folder.name in line
    assert json.loads((folder / "dataset.json").read_text())["nnalign"]["synthetic"]["seed"] == 3  # untouched

    proc = _synth(tmp_path, "-d", "7", "-n", "1", "--shape", "32", "32", "32", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((folder.parent / "Dataset007_SyntheticBraTS" / "dataset.json").read_text())["nnalign"][
        "synthetic"]["seed"] == 0
    assert not folder.exists()


def test_incomplete_cases_are_a_random_share_and_a_site_block():
    record = incomplete_cases(20, 0.4, seed=3, site_missing="T1ce")
    assert len(record) == 8 and record == incomplete_cases(20, 0.4, seed=3, site_missing="T1ce")
    assert [record[f"SYN_{i:04d}"] for i in range(16, 20)] == [("T1ce",)] * 4  # the last four: one site's block
    scattered = {c: m for c, m in record.items() if int(c[4:]) < 16}
    assert len(scattered) == 4 and all(0 < len(m) < 4 for m in scattered.values())
    assert all(list(m) == [x for x in BRATS_MODALITIES if x in m] for m in scattered.values())  # channel order
    assert incomplete_cases(20, 0.4, seed=4) != incomplete_cases(20, 0.4, seed=3)
    assert incomplete_cases(20, 0.0) == {}
    many = incomplete_cases(1000, 0.5, seed=0)
    assert len(many) == 500 and len(set(many.values())) == 14  # every proper non-empty subset is drawn
    for bad in (dict(fraction=1.0), dict(fraction=-0.1), dict(fraction=0.2, site_missing="T3")):
        with pytest.raises(NnalignError):
            incomplete_cases(10, **{"fraction": 0.2, **bad})


@pytest.mark.slow
def test_cli_writes_an_incomplete_dataset(tmp_path):
    proc = _synth(tmp_path, "-d", "9", "-n", "5", "--shape", "32", "32", "32", "--missing-fraction", "0.4",
                  "--site-missing", "t1ce")
    assert proc.returncode == 0, proc.stderr
    assert "2 training cases lack some sequences" in proc.stdout
    folder = tmp_path / "raw" / "Dataset009_SyntheticBraTS"
    record = json.loads((folder / "dataset.json").read_text())["nnalign"]["missing_modalities"]
    assert record == {c: list(m) for c, m in incomplete_cases(5, 0.4, 0, "T1ce").items()}
    assert record["SYN_0004"] == ["T1ce"] and not (folder / "imagesTr" / "SYN_0004_0001.nii.gz").exists()
    assert len(list((folder / "imagesTr").glob("*.nii.gz"))) == 20 - sum(map(len, record.values()))
    line = _assert_one_line_error(_synth(tmp_path, "-d", "10", "-n", "5", "--site-missing", "T1ce"))
    assert "--site-missing needs --missing-fraction" in line


@pytest.mark.slow
@pytest.mark.parametrize("args", [["-n", "0"], ["-n", "1", "--shape", "32", "16", "32"], ["-n", "1", "-d", "1000"],
                                  ["-n", "1", "--glioma-kinds", "ring,cystic"]])
def test_cli_rejects_bad_arguments_in_one_line(tmp_path, args):
    argv = ["-d", "8", "--shape", "32", "32", "32", *args] if "-d" not in args else ["--shape", "32", "32", "32", *args]
    _assert_one_line_error(_synth(tmp_path, *argv))
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def test_only_the_tumour_modalities_show_the_tumour():
    """A known answer for "which modality matters": the other modalities render tumour tissue as white matter."""
    from nnalign.data.synthetic import EDEMA, ENHANCING, NECROSIS, WM, synthesize_case

    case = synthesize_case((64, 64, 64), seed=5, options=CaseOptions(tumour_modalities=("FLAIR",)))
    wm, edema = case.tissue == WM, case.tissue == EDEMA
    core = np.isin(case.tissue, (NECROSIS, ENHANCING))
    for modality, image in case.images.items():
        ratio_edema = np.median(image[edema]) / np.median(image[wm])
        ratio_core = np.median(image[core]) / np.median(image[wm])
        if modality == "FLAIR":
            assert ratio_edema > 1.8, ratio_edema  # edema 1.45 against white matter 0.60
        else:
            assert abs(ratio_edema - 1) < 0.06 and abs(ratio_core - 1) < 0.1, (modality, ratio_edema, ratio_core)
    standard = synthesize_case((64, 64, 64), seed=5)
    np.testing.assert_array_equal(standard.seg, case.seg)  # same anatomy and tumour, other contrast
    assert np.median(standard.images["T2"][edema]) / np.median(standard.images["T2"][wm]) > 1.8


def test_a_minimum_rim_thickens_enhancing_tumour_and_changes_nothing_else():
    thin = synthesize_case((64, 64, 64), seed=4)
    thick = synthesize_case((64, 64, 64), seed=4, options=CaseOptions(min_rim_mm=4.0))
    np.testing.assert_array_equal(thin.seg > 0, thick.seg > 0)  # same whole tumour
    np.testing.assert_array_equal(np.isin(thin.seg, (2, 3)), np.isin(thick.seg, (2, 3)))  # same core
    assert ((thin.seg == 3) <= (thick.seg == 3)).all()  # enhancing only grows, into the necrosis
    assert (thick.seg == 3).sum() > 1.3 * (thin.seg == 3).sum()
    from scipy.ndimage import binary_dilation

    outside = ~binary_dilation(np.isin(thin.seg, (2, 3)), iterations=3)  # beyond the partial-volume blur
    for modality in BRATS_MODALITIES:  # outside the core the images are the same
        np.testing.assert_allclose(thin.images[modality][outside], thick.images[modality][outside], rtol=1e-5)


def test_glioma_kinds_turn_a_non_enhancing_glioma_into_a_ring_and_change_nothing_else():
    # the demo's first held-out case at seed 0 (64^3, rims of 4 mm) is a non-enhancing glioma: a core without ET
    seed = case_seed(0, 0, held_out=True)
    every, ring = (synthesize_case((64, 64, 64), seed=seed, options=CaseOptions(min_rim_mm=4.0, glioma_kinds=kinds))
                   for kinds in (GLIOMA_KINDS, ("ring",)))
    assert (every.seg == 3).sum() == 0 and (every.seg == 2).sum() > 0
    np.testing.assert_array_equal(every.seg > 0, ring.seg > 0)  # same whole tumour
    np.testing.assert_array_equal(np.isin(every.seg, (2, 3)), np.isin(ring.seg, (2, 3)))  # same core
    assert (ring.seg == 3).sum() > 0 and (ring.seg == 2).sum() > 0  # now an enhancing rim around necrosis
    with pytest.raises(NnalignError, match="unknown glioma kind 'cystic'"):
        CaseOptions(glioma_kinds=("cystic",))
