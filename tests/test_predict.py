"""nnalign_predict: model discovery and selection (fast, fake model folders), then end to end on two trained models.

The slow part is one module-scoped fixture: a 3-case synthetic dataset of 40^3 with 2 held-out cases, planned for
3d_cpu, and two models trained by nnalign_train for 1 epoch x 2 iterations: a mixture teacher with modality dropout
0.5 (serves every subset) and the ``original`` nnU-Net baseline (all modalities only). Every prediction runs on the CPU
without test-time augmentation.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnalign.errors import NnalignError
from nnalign.inference.models import NoModelError, discover_models, load_model, select_model
from nnalign.inference.predict import LOG_COLUMNS, input_cases
from nnalign.modalities import BRATS_MODALITIES, all_subsets
from nnalign.model_folders import NNUNET, ORIGINAL, STUDENT, TEACHER

ALL = BRATS_MODALITIES
PLANS = "nnAlignPlans"
CONFIG = "3d_cpu"


# ----------------------------------------------------------------------------------------------------------------------
# fake model folders: checkpoints are empty files, nothing is loaded


def fake_model(root: Path, trainer: str, folds=(0,), dice: dict | None = None,
               checkpoint: str = "checkpoint_final.pth", convention: str | None = "brats2023", channels=ALL) -> Path:
    """A model folder with empty checkpoints, dataset.json/plans.json and a validation summary per fold in ``dice``."""
    folder = root / f"{trainer}__{PLANS}__{CONFIG}"
    folder.mkdir(parents=True)
    info = {"source_label_convention": convention} if convention else {}
    (folder / "dataset.json").write_text(json.dumps(
        {"channel_names": {str(i): m for i, m in enumerate(channels)}, "labels": {"background": 0}, "nnalign": info}))
    (folder / "plans.json").write_text("{}")
    for f in folds:
        (folder / f"fold_{f}").mkdir()
        (folder / f"fold_{f}" / checkpoint).touch()
    for f, value in (dice or {}).items():
        (folder / f"fold_{f}" / "validation").mkdir(parents=True)
        summary = {"foreground_mean": {"Dice": value}, "mean": {}, "metric_per_case": []}
        (folder / f"fold_{f}" / "validation" / "summary.json").write_text(json.dumps(summary))
    return folder


def student(subset: str, kd: str = "protokd") -> str:
    return f"nnAlignStudent_{subset}_{kd}_Teacher-mixture"


@pytest.mark.parametrize("trainer, kind, subset, any_subset", [
    (student("T1ce-T2"), STUDENT, ("T1ce", "T2"), False),
    (student("FLAIR", "none"), STUDENT, ("FLAIR",), False),
    ("nnAlignTeacher_mixture_drop0p5", TEACHER, ALL, True),
    ("nnAlignTeacher_modalityT1ce_w0p5_sep", TEACHER, ALL, False),
    ("nnAlignOriginal", ORIGINAL, ALL, False),
    ("nnAlignOriginal_drop0p25", ORIGINAL, ALL, True),  # trained on zeroed channels: absent ones are zeroed
    ("nnUNetTrainer", NNUNET, ALL, False),
])
def test_models_are_classified_by_trainer_name(tmp_path, trainer, kind, subset, any_subset):
    model = load_model(fake_model(tmp_path, trainer))
    assert (model.kind, model.subset, model.any_subset) == (kind, subset, any_subset)
    assert model.trainer == trainer and model.plans == PLANS and model.configuration == CONFIG
    assert model.folds == (0,) and model.mean_dice is None
    assert model.serves(subset) and model.serves(ALL) == (kind != STUDENT)
    assert model.serves(("T1",)) == (any_subset or subset == ("T1",))


def test_folds_auto_detection_checkpoint_and_dice(tmp_path):
    folder = fake_model(tmp_path, "nnAlignOriginal", folds=(0, 1, 2, "all"), dice={0: 0.6, 1: 0.8, 2: float("nan")})
    (folder / "fold_3").mkdir()  # a run still training: no checkpoint_final.pth yet
    model = load_model(folder)
    assert model.folds == (0, 1, 2)  # fold_all left out, as nnU-Net's auto-detection does
    assert model.mean_dice == pytest.approx(0.7)  # NaN ignored
    assert load_model(folder, folds=["all"]).folds == ("all",)
    assert load_model(folder, folds=[1]).mean_dice == pytest.approx(0.8)
    with pytest.raises(Exception, match="fold_3 has no checkpoint_final.pth"):
        load_model(folder, folds=[0, 3])
    only_all = fake_model(tmp_path / "b", "nnAlignOriginal", folds=("all",))
    assert load_model(only_all).folds == ("all",)  # fold_all when it is the only one
    best = fake_model(tmp_path / "c", "nnAlignOriginal", folds=(0,), checkpoint="checkpoint_best.pth")
    assert load_model(best, checkpoint="checkpoint_best.pth").checkpoint == "checkpoint_best.pth"
    with pytest.raises(Exception, match=r"no fold_\*/checkpoint_final.pth"):
        load_model(best)


def test_label_convention_comes_from_the_dataset_json(tmp_path):
    assert load_model(fake_model(tmp_path / "a", "nnAlignOriginal")).source_label_convention == "brats2023"
    assert load_model(fake_model(tmp_path / "b", "nnAlignOriginal", convention=None)).source_label_convention == \
        "brats2018"


def test_discovery_of_one_model_folder_or_a_dataset_folder(tmp_path):
    single = fake_model(tmp_path, "nnAlignOriginal")
    assert [m.name for m in discover_models(single).models] == [single.name]
    fake_model(tmp_path, "nnAlignTeacher_mixture_drop0p5")
    fake_model(tmp_path, student("T1ce"))
    (tmp_path / "predictions").mkdir()  # not a model folder: ignored
    found = discover_models(tmp_path)
    assert sorted(m.kind for m in found.models) == [ORIGINAL, STUDENT, TEACHER] and not found.problems


def test_unusable_model_folders_are_listed_and_the_rest_used(tmp_path):
    fake_model(tmp_path, "nnAlignOriginal")
    fake_model(tmp_path, "nnAlignTeacher_mixture", folds=())  # no checkpoint
    fake_model(tmp_path, "nnAlignTeacher_bogus")
    found = discover_models(tmp_path)
    assert [m.trainer for m in found.models] == ["nnAlignOriginal"]
    assert len(found.problems) == 2
    assert any("nnAlignTeacher_mixture__" in p and "no fold_*/checkpoint_final.pth" in p for p in found.problems)
    assert any("unknown nnalign trainer name" in p for p in found.problems)


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "missing", "no such folder"),
    (lambda root: root, "no model folders"),
    (lambda root: fake_model(root, "nnAlignOriginal", folds=()), "no usable model: "),
])
def test_no_usable_model_is_one_error(tmp_path, make, message):
    with pytest.raises(NnalignError, match=message) as info:
        discover_models(make(tmp_path))
    assert "\n" not in str(info.value)


def _models(root: Path, spec: dict) -> list:
    """Load fake models ``{trainer: dice or None}``."""
    return [load_model(fake_model(root, trainer, dice=None if dice is None else {0: dice}))
            for trainer, dice in spec.items()]


def test_selection_prefers_the_student_of_the_subset_then_the_best_dice_then_the_name(tmp_path):
    models = _models(tmp_path, {
        student("T1ce-T2"): 0.5, student("T1ce-T2", "kdnet"): 0.7, student("T1ce-T2", "none"): None,
        student("FLAIR"): None, student("FLAIR", "kdnet"): None,
        "nnAlignTeacher_mixture_drop0p5": 0.9, "nnAlignOriginal": 0.95})
    assert select_model(models, ("T1ce", "T2"))[0].trainer == student("T1ce-T2", "kdnet")  # best Dice
    assert select_model(models, ("FLAIR",))[0].trainer == student("FLAIR", "kdnet")  # no Dice: name order
    assert select_model(models, ("T1",))[0].trainer == "nnAlignTeacher_mixture_drop0p5"  # missing-modality path
    assert select_model(models, ALL)[0].trainer == "nnAlignOriginal"  # all modalities: best Dice of teacher/original


def test_a_baseline_trained_with_modality_dropout_serves_a_subset_zeroed(tmp_path):
    models = _models(tmp_path, {"nnAlignOriginal_drop0p5": 0.8, "nnAlignOriginal": 0.9})
    model, why = select_model(models, ("T1",))
    assert model.trainer == "nnAlignOriginal_drop0p5"
    assert why == "baseline trained with modality dropout (absent modalities zeroed)"
    with pytest.raises(NoModelError, match="no model for modalities T1"):
        select_model(models[1:], ("T1",))


def test_selection_for_all_modalities_and_ties(tmp_path):
    models = _models(tmp_path, {"nnAlignTeacher_mixture": 0.8, "nnAlignOriginal": 0.8, "nnAlignTeacher_none": None})
    assert select_model(models, ALL)[0].trainer == "nnAlignOriginal"  # tie: folder name order
    models = _models(tmp_path / "b", {"nnAlignTeacher_none": None, "nnAlignOriginal": None})
    assert select_model(models, ALL)[0].trainer == "nnAlignOriginal"
    models = _models(tmp_path / "c", {"nnAlignTeacher_none": None, "nnAlignOriginal": 0.1})
    assert select_model(models, ALL)[0].trainer == "nnAlignOriginal"  # a Dice beats none
    models = _models(tmp_path / "d", {student("T1-T1ce-T2-FLAIR"): None, "nnAlignOriginal": 0.99})
    assert select_model(models, ALL)[0].kind == STUDENT  # the all-modality student comes first


def test_without_a_serving_model_the_message_lists_what_there_is(tmp_path):
    models = _models(tmp_path, {student("T1ce"): None, "nnAlignTeacher_mixture": None,
                                "nnAlignOriginal": None})
    with pytest.raises(NoModelError) as info:
        select_model(models, ("T1", "T2"))
    message = str(info.value)
    assert "\n" not in message and message.startswith("no model for modalities T1+T2; models: ")
    assert f"{student('T1ce')}__{PLANS}__{CONFIG} serves T1ce" in message
    assert "nnAlignTeacher_mixture__nnAlignPlans__3d_cpu serves all modalities (T1+T1ce+T2+FLAIR)" in message


def test_every_subset_finds_the_dropout_teacher(tmp_path):
    models = _models(tmp_path, {"nnAlignTeacher_mixture_drop0p5": None, "nnAlignOriginal": None})
    for subset in all_subsets():
        chosen = select_model(models, subset)[0]
        assert chosen.trainer == ("nnAlignOriginal" if subset == ALL else "nnAlignTeacher_mixture_drop0p5")
        assert chosen.channel_indices(subset) == tuple(ALL.index(m) for m in subset)


def test_input_cases_from_a_single_file(tmp_path):
    for name, case, modality in (("BraTS-GLI-00001-000-t1c.nii.gz", "BraTS-GLI-00001-000", "T1ce"),
                                 ("Brats18_X_1_flair.nii.gz", "Brats18_X_1", "FLAIR"),
                                 ("SYN_0001_0002.nii.gz", "SYN_0001", "T2")):
        (tmp_path / name).touch()
        [found] = input_cases(tmp_path / name)
        assert (found.case_id, list(found.images)) == (case, [modality])
    (tmp_path / "scan.nii.gz").touch()
    with pytest.raises(NnalignError, match="cannot tell the modality"):
        input_cases(tmp_path / "scan.nii.gz")
    [found] = input_cases(tmp_path / "scan.nii.gz", ("T2",))
    assert (found.case_id, list(found.images)) == ("scan", ["T2"])
    (tmp_path / "X-seg.nii.gz").touch()
    with pytest.raises(NnalignError, match="a segmentation, not an image"):
        input_cases(tmp_path / "X-seg.nii.gz")


@pytest.mark.slow
def test_help_and_label_options_match():
    from nnalign.cli.predict import LABEL_OPTIONS as CLI_LABELS
    from nnalign.inference.predict import LABEL_OPTIONS

    assert CLI_LABELS == LABEL_OPTIONS
    proc = subprocess.run([sys.executable, "-m", "nnalign.cli.predict", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--modalities" in proc.stdout


# ----------------------------------------------------------------------------------------------------------------------
# end to end: two models trained by nnalign_train


def test_present_channels_is_set_for_one_prediction_and_reset():
    from nnalign.inference.predict import present_channels

    class Net:
        present_modalities = (0, 1, 2, 3)

    class Compiled:
        def __init__(self):
            self._orig_mod = Net()

    class Predictor:
        def __init__(self, network):
            self.network = network

    for predictor, net in ((p := Predictor(Net()), p.network), (q := Predictor(Compiled()), q.network._orig_mod)):
        with present_channels(predictor, (1, 3)):
            assert net.present_modalities == (1, 3)
        assert net.present_modalities == (0, 1, 2, 3)
        with pytest.raises(RuntimeError), present_channels(predictor, (2,)):
            raise RuntimeError("prediction failed")
        assert net.present_modalities == (0, 1, 2, 3)
    plain = Predictor(object())
    with present_channels(plain, (0,)):  # a student or plain U-Net: nothing to set
        assert not hasattr(plain.network, "present_modalities")


# ----------------------------------------------------------------------------------------------------------------------
# end to end: two models trained by nnalign_train

DATASET_ID = 5
DATASET = "Dataset005_SyntheticBraTS"
TEACHER_MODEL = f"nnAlignTeacher_mixture_drop0p5__{PLANS}__{CONFIG}"
ORIGINAL_MODEL = f"nnAlignOriginal__{PLANS}__{CONFIG}"
SUFFIX_2023 = {"T1": "t1n", "T1ce": "t1c", "T2": "t2w", "FLAIR": "t2f"}
BRATS2023_VALUES = {0, 1, 2, 3}


def _train(root: Path, *args: str) -> None:
    env = {**os.environ, "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "f"}
    env.pop("NNALIGN_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "nnalign.cli.train", str(DATASET_ID), CONFIG, "0", "--role", "teacher",
                           *args, "-device", "cpu", "--epochs", "1", "--iters-per-epoch", "2"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 training + 2 held-out synthetic cases of 40^3, planned for 3d_cpu; a dropout teacher and the original
    model trained for 1 epoch x 2 iterations. nnU-Net's variables point into the tmp folder for this module only."""
    root = tmp_path_factory.mktemp("predict")
    from nnalign.paths import TRAINER_SHIM_DIR

    with pytest.MonkeyPatch.context() as mp:
        for var, value in (("nnUNet_raw", root / "raw"), ("nnUNet_preprocessed", root / "pre"),
                           ("nnUNet_results", root / "results"), ("nnUNet_extTrainer", TRAINER_SHIM_DIR),
                           ("nnUNet_n_proc_DA", "0"), ("nnUNet_def_n_proc", "1"), ("nnUNet_compile", "f")):
            mp.setenv(var, str(value))
        mp.delenv("NNALIGN_DEBUG", raising=False)
        from nnalign.data.synthetic import write_synthetic_dataset
        from nnalign.planning.plan_and_preprocess import plan_and_preprocess

        write_synthetic_dataset(root / "raw", DATASET_ID, num_cases=3, shape=(40, 40, 40), num_test=2)
        plan_and_preprocess(DATASET_ID, [CONFIG], num_processes=1, warn=lambda m: None)
        _train(root, "--anchor", "mixture", "--modality-dropout", "0.5")
        _train(root, "--anchor", "original")
        results = root / "results" / DATASET
        yield {"root": root, "results": results, "images_ts": root / "raw" / DATASET / "imagesTs",
               "teacher": results / TEACHER_MODEL, "original": results / ORIGINAL_MODEL}


def make_case(dest: Path, case: str, source: Path, modalities, origin=None, direction=None) -> Path:
    """A BraTS 2023-named case folder ``dest/case`` with ``modalities`` of the nnU-Net case files ``source_000X``."""
    import SimpleITK as sitk

    folder = dest / case
    folder.mkdir(parents=True)
    for m in modalities:
        src = source.parent / f"{source.name}_{ALL.index(m):04d}.nii.gz"
        dst = folder / f"{case}-{SUFFIX_2023[m]}.nii.gz"
        if origin is None:
            shutil.copyfile(src, dst)
        else:
            image = sitk.ReadImage(str(src))
            image.SetOrigin(origin)
            image.SetDirection(direction)
            sitk.WriteImage(image, str(dst), True)
    return folder


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NNALIGN_DEBUG"}
    return subprocess.run([sys.executable, "-m", "nnalign.cli.predict", *map(str, args), "-device", "cpu",
                           "--disable-tta"], capture_output=True, text=True, env=env, timeout=timeout)


def read_log(out: Path) -> dict:
    rows = {r["case"]: r for r in csv.DictReader((out / "nnalign_predict_log.csv").open())}
    payload = json.loads((out / "nnalign_predict_log.json").read_text())
    assert {c["case"] for c in payload["cases"]} == set(rows)
    assert list(next(iter(rows.values()))) == list(LOG_COLUMNS)
    return rows


def read_seg(path: Path):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def expected_full_model(trained) -> str:
    """The selection rule for all four modalities: teacher or original, higher validation Dice, then name order."""
    def dice(model):
        summary = json.loads((trained[model] / "fold_0" / "validation" / "summary.json").read_text())
        value = summary["foreground_mean"]["Dice"]
        return value if value == value else None

    candidates = [(ORIGINAL_MODEL, dice("original")), (TEACHER_MODEL, dice("teacher"))]  # name order
    with_dice = [c for c in candidates if c[1] is not None]
    return max(with_dice, key=lambda c: c[1])[0] if with_dice else candidates[0][0]


SUBSETS = {  # case -> (held-out source, modalities present)
    "SYNTS_0000_1mod": ("SYNTS_0000", ("T1ce",)),
    "SYNTS_0000_2mod": ("SYNTS_0000", ("T1ce", "FLAIR")),
    "SYNTS_0000_3mod": ("SYNTS_0000", ("T1", "T2", "FLAIR")),
    "SYNTS_0000_4mod": ("SYNTS_0000", ALL),
    "SYNTS_0001_1mod": ("SYNTS_0001", ("FLAIR",)),
    "SYNTS_0001_2mod": ("SYNTS_0001", ("T1", "T2")),
    "SYNTS_0001_3mod": ("SYNTS_0001", ("T1", "T1ce", "T2")),
    "SYNTS_0001_4mod": ("SYNTS_0001", ALL),
}
MOVED = "SYNTS_0001_4mod"  # written with another origin and direction, which the output must keep


@pytest.mark.slow
def test_cli_predicts_every_subset_with_the_model_the_rules_choose(trained, tmp_path):
    cases = tmp_path / "in"
    for case, (source, modalities) in SUBSETS.items():
        moved = case == MOVED
        make_case(cases, case, trained["images_ts"] / source, modalities, origin=(12.5, -30.0, 4.0) if moved else None,
                  direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0) if moved else None)
    out = tmp_path / "out"
    proc = run_cli("-i", cases, "-o", out, "-m", trained["results"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr
    assert "8 cases: 8 predicted" in proc.stdout
    log = read_log(out)
    full_model = expected_full_model(trained)
    for case, (source, modalities) in SUBSETS.items():
        seg, image = read_seg(out / f"{case}.nii.gz")
        assert set(np.unique(seg).tolist()) <= BRATS2023_VALUES  # the synthetic data's source convention
        _, reference = read_seg(cases / case / f"{case}-{SUFFIX_2023[modalities[0]]}.nii.gz")
        assert image.GetSize() == reference.GetSize()
        for get in ("GetSpacing", "GetOrigin", "GetDirection"):
            assert getattr(image, get)() == pytest.approx(getattr(reference, get)()), (case, get)
        row = log[case]
        assert row["status"] == "ok" and row["labels"] == "brats2023", row
        assert row["message"] == ("chosen: all modalities present" if modalities == ALL else
                                  "chosen: teacher trained with modality dropout (missing-modality path)"), row
        assert row["modalities_present"] == row["modalities_used"] == ",".join(modalities)
        assert row["model"] == (full_model if modalities == ALL else TEACHER_MODEL), row
        assert row["folds"] == "0" and Path(row["model_folder"]) == (trained["results"] / row["model"]).resolve()
    _, moved = read_seg(out / f"{MOVED}.nii.gz")
    assert moved.GetOrigin() == pytest.approx((12.5, -30.0, 4.0))
    assert not list(out.glob(".*.tmp.nii.gz"))


@pytest.fixture(scope="module")
def one_case(trained, tmp_path_factory):
    """A folder holding the four nnU-Net-named files of one case, predicted in process with --labels nnunet."""
    from nnalign.inference.predict import predict

    folder = tmp_path_factory.mktemp("one_case")
    for src in trained["images_ts"].glob("SYNTS_0000_*.nii.gz"):
        shutil.copyfile(src, folder / src.name)
    out = tmp_path_factory.mktemp("out_nnunet")
    errors = []
    report = predict(folder, out, trained["results"], device="cpu", disable_tta=True, labels="nnunet",
                     on_error=errors.append, progress=False)
    assert not errors and [r.status for r in report.records] == ["ok"]
    return {"input": folder, "nnunet": out / "SYNTS_0000.nii.gz", "out": out}


@pytest.mark.slow
def test_each_case_has_a_report_beside_its_segmentation(trained, one_case):
    from nnalign.data.label_volumes import VOLUMES_FILE, region_volumes_ml
    from nnalign.training.record import TRAINING_VOLUMES

    record = json.loads((trained["teacher"] / "fold_0" / "nnalign_settings.json").read_text())
    stored = json.loads((trained["root"] / "pre" / DATASET / VOLUMES_FILE).read_text())["cases"]
    assert set(record[TRAINING_VOLUMES]) == {"WT", "TC", "ET"}
    assert len(stored) == record[TRAINING_VOLUMES]["WT"]["cases"] == 2  # fold 0 trains on 2 of the 3 cases
    assert record[TRAINING_VOLUMES]["WT"]["max"] == max(v["WT"] for v in stored.values())
    out = one_case["out"]
    report = json.loads((out / "SYNTS_0000.json").read_text())
    seg, image = read_seg(one_case["nnunet"])
    assert report["volumes_ml"] == pytest.approx(region_volumes_ml(seg, image.GetSpacing()))
    assert report["modalities_present"] == list(ALL) and report["modalities_missing"] == []
    assert report["reason"] == "all modalities present" and report["labels"] == "nnunet"
    rows = list(csv.DictReader((out / "nnalign_predict_report.csv").open()))
    assert [r["case"] for r in rows] == ["SYNTS_0000"] and rows[0]["model"] == report["model"]


@pytest.mark.slow
def test_the_segmenter_gives_what_the_command_writes(trained, one_case):
    """Two modalities as paths and two as SimpleITK images: the label map the command wrote, in the given images'
    geometry, and the same report, without a file written."""
    import SimpleITK as sitk

    import nnalign

    files = {m: one_case["input"] / f"SYNTS_0000_{i:04d}.nii.gz" for i, m in enumerate(ALL)}
    images = {"t1c": sitk.ReadImage(str(files["T1ce"])), "FLAIR": sitk.ReadImage(str(files["FLAIR"]))}
    segmenter = nnalign.Segmenter(trained["results"], device="cpu", disable_tta=True, labels="nnunet")
    before = set(one_case["out"].iterdir())
    label_map, report = segmenter.segment({"T1": files["T1"], "T2": str(files["T2"]), **images}, case_id="SYNTS_0000")
    expected, _ = read_seg(one_case["nnunet"])
    assert np.array_equal(sitk.GetArrayFromImage(label_map), expected)
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(label_map, get)() == getattr(images["FLAIR"], get)()
    assert report == json.loads((one_case["out"] / "SYNTS_0000.json").read_text())
    assert set(one_case["out"].iterdir()) == before


def test_segmenter_input_errors_are_one_line(tmp_path):
    import nnalign

    fake_model(tmp_path, TEACHER_MODEL.split("__")[0])
    segmenter = nnalign.Segmenter(tmp_path, device="cpu")
    for images, fragment in (({"PD": "x.nii.gz"}, "c1: unknown modality 'PD'"),
                             ({"T1ce": "a.nii.gz", "t1c": "b.nii.gz"}, "c1: t1c: T1ce is given twice"),
                             ({"T1ce": 3}, "c1: T1ce: expected a file path or a SimpleITK image, got int"),
                             ({"T1ce": tmp_path / "absent.nii.gz"}, "c1: absent.nii.gz")):
        with pytest.raises(NnalignError, match="^" + fragment.replace("(", r"\(")) as info:
            segmenter.segment(images, case_id="c1")
        assert "\n" not in str(info.value)


def test_import_nnalign_stays_light():
    code = "import sys, nnalign; assert 'torch' not in sys.modules; from nnalign.inference.predict import Segmenter; " \
           "assert nnalign.Segmenter is Segmenter"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("labels", ["brats2018", "brats2023", "source"])
def test_label_conventions(trained, one_case, tmp_path, labels):
    from nnalign.data.labels import nnunet_to_brats
    from nnalign.inference.predict import predict

    nnunet, _ = read_seg(one_case["nnunet"])
    assert set(np.unique(nnunet).tolist()) <= {0, 1, 2, 3}
    report = predict(one_case["input"], tmp_path, trained["results"], device="cpu", disable_tta=True, labels=labels,
                     progress=False)
    convention = "brats2023" if labels == "source" else labels  # the synthetic dataset.json records brats2023
    assert report.records[0].labels == convention
    seg, _ = read_seg(tmp_path / "SYNTS_0000.nii.gz")
    assert set(np.unique(seg).tolist()) <= ({0, 1, 2, 4} if convention == "brats2018" else {0, 1, 2, 3})
    np.testing.assert_array_equal(seg, nnunet_to_brats(nnunet, convention))


@pytest.mark.slow
def test_resume_skips_finished_cases_and_overwrite_redoes_them(trained, one_case, tmp_path):
    from nnalign.inference.predict import predict

    out = tmp_path / "out"
    shutil.copytree(one_case["out"], out)
    before = (out / "SYNTS_0000.nii.gz").stat().st_mtime_ns
    report = predict(one_case["input"], out, trained["results"], device="cpu", disable_tta=True, labels="nnunet",
                     progress=False)
    [record] = report.records
    assert record.status == "skipped" and "--overwrite" in record.message
    assert record.model == ORIGINAL_MODEL or record.model == TEACHER_MODEL  # kept from the run that predicted it
    assert (out / "SYNTS_0000.nii.gz").stat().st_mtime_ns == before
    # a second input into the same folder: the log keeps the first case and adds the new one
    single = trained["images_ts"] / "SYNTS_0001_0001.nii.gz"
    report = predict(single, out, trained["results"], device="cpu", disable_tta=True, progress=False)
    assert [(r.case, r.status, r.model, r.modalities_used) for r in report.records] == \
        [("SYNTS_0001", "ok", TEACHER_MODEL, ["T1ce"])]
    assert set(read_log(out)) == {"SYNTS_0000", "SYNTS_0001"}
    report = predict(one_case["input"], out, trained["results"], device="cpu", disable_tta=True, labels="nnunet",
                     overwrite=True, progress=False)
    assert [r.status for r in report.records] == ["ok"]
    assert (out / "SYNTS_0000.nii.gz").stat().st_mtime_ns != before
    rows = read_log(out)
    assert rows["SYNTS_0000"]["status"] == "ok" and rows["SYNTS_0001"]["status"] == "ok"


@pytest.mark.slow
def test_modalities_option_restricts_each_case(trained, tmp_path):
    from nnalign.inference.predict import predict

    make_case(tmp_path / "in", "FULL", trained["images_ts"] / "SYNTS_0000", ALL)
    make_case(tmp_path / "in", "NOT2", trained["images_ts"] / "SYNTS_0001", ("T1", "T1ce", "FLAIR"))
    errors = []
    report = predict(tmp_path / "in", tmp_path / "out", trained["results"], device="cpu", disable_tta=True,
                     modalities=("T1ce", "T2"), on_error=errors.append, progress=False)
    by_case = {r.case: r for r in report.records}
    assert by_case["FULL"].status == "ok" and by_case["FULL"].model == TEACHER_MODEL
    assert by_case["FULL"].modalities_present == list(ALL) and by_case["FULL"].modalities_used == ["T1ce", "T2"]
    assert by_case["NOT2"].status == "failed" and not (tmp_path / "out" / "NOT2.nii.gz").exists()
    assert errors == ["NOT2: --modalities names T2, but the case has no T2 file (it has T1, T1ce, FLAIR)"]


def _truncate(path: Path) -> None:
    import gzip

    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) // 2]))


@pytest.mark.slow
def test_cli_bad_input_is_one_line_per_case_and_the_rest_is_predicted(trained, tmp_path):
    import SimpleITK as sitk

    cases = tmp_path / "in"
    source = trained["images_ts"] / "SYNTS_0000"
    make_case(cases, "GOOD", source, ALL)
    geometry = make_case(cases, "GEOM", source, ALL)  # T1ce on another grid: resampled, with a warning
    image = sitk.ReadImage(str(geometry / "GEOM-t1c.nii.gz"))
    image.SetSpacing((1.5, 1.0, 1.0))
    sitk.WriteImage(image, str(geometry / "GEOM-t1c.nii.gz"), True)
    far = make_case(cases, "FAR", source, ALL)  # FLAIR shifted by half its field of view: refused
    image = sitk.ReadImage(str(far / "FAR-t2f.nii.gz"))
    image.SetOrigin((20.0, 0.0, 0.0))
    sitk.WriteImage(image, str(far / "FAR-t2f.nii.gz"), True)
    broken = make_case(cases, "BROKEN", source, ALL)
    (broken / "BROKEN-t2w.nii.gz").write_bytes(b"not a nifti")
    _truncate(make_case(cases, "TRUNC", source, ("T1ce", "FLAIR")) / "TRUNC-t2f.nii.gz")
    (cases / "SEGONLY").mkdir()
    shutil.copyfile(trained["root"] / "raw" / DATASET / "labelsTs" / "SYNTS_0000.nii.gz",
                    cases / "SEGONLY" / "SEGONLY-seg.nii.gz")
    models = tmp_path / "models"
    models.mkdir()
    for name in (TEACHER_MODEL, ORIGINAL_MODEL):
        (models / name).symlink_to(trained["results"] / name, target_is_directory=True)
    empty = models / f"nnAlignTeacher_none__{PLANS}__{CONFIG}"
    shutil.copytree(trained["results"] / ORIGINAL_MODEL, empty, ignore=shutil.ignore_patterns("*.pth"))
    out = tmp_path / "out"
    proc = run_cli("-i", cases, "-o", out, "-m", models)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert all(line.startswith("nnalign_predict: error: ") for line in lines), lines
    expected = {
        "nnAlignTeacher_none__": "no fold_*/checkpoint_final.pth",
        "FAR: FAR-t2f.nii.gz: its field of view covers 56% of T1ce's": "beyond what resampling fixes",
        "BROKEN: BROKEN-t2w.nii.gz: not a readable NIfTI image": "",
        "TRUNC: TRUNC-t2f.nii.gz: truncated": "",
        "SEGONLY: no image file (only the segmentation SEGONLY-seg.nii.gz)": "",
    }
    assert len(lines) == len(expected), lines
    for start, fragment in expected.items():
        assert sum(start in line and fragment in line for line in lines) == 1, (start, lines)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["GEOM.nii.gz", "GOOD.nii.gz"]
    log = read_log(out)
    assert {c: r["status"] for c, r in log.items()} == {"GOOD": "ok", "GEOM": "ok", "FAR": "failed",
                                                         "BROKEN": "failed", "TRUNC": "failed", "SEGONLY": "failed"}
    assert "2 predicted" in proc.stdout and "4 failed" in proc.stdout
    warnings = json.loads((out / "GEOM.json").read_text())["warnings"]
    assert "T1ce resampled onto T1's grid: its spacing 1.5 x 1 x 1 differed from 1 x 1 x 1" in warnings
    _, written = read_seg(out / "GEOM.nii.gz")
    _, t1 = read_seg(geometry / "GEOM-t1n.nii.gz")
    assert written.GetSpacing() == t1.GetSpacing() and written.GetSize() == t1.GetSize()
    assert not any("resampled" in w for w in json.loads((out / "GOOD.json").read_text())["warnings"])


@pytest.mark.slow
def test_cli_only_the_original_model_fails_cases_with_missing_modalities(trained, tmp_path):
    cases = tmp_path / "in"
    make_case(cases, "FULL", trained["images_ts"] / "SYNTS_0000", ALL)
    make_case(cases, "NOT1", trained["images_ts"] / "SYNTS_0001", ("T1ce", "T2", "FLAIR"))
    out = tmp_path / "out"
    proc = run_cli("-i", cases, "-o", out, "-m", trained["original"])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines == [f"nnalign_predict: error: NOT1: no model for modalities T1ce+T2+FLAIR; models: {ORIGINAL_MODEL} "
                     f"serves all modalities (T1+T1ce+T2+FLAIR)"], lines
    assert (out / "FULL.nii.gz").is_file() and not (out / "NOT1.nii.gz").exists()
    log = read_log(out)
    assert log["FULL"]["model"] == ORIGINAL_MODEL and log["NOT1"]["status"] == "failed"
    assert log["NOT1"]["message"].startswith("NOT1: no model for modalities T1ce+T2+FLAIR")


@pytest.mark.slow
@pytest.mark.parametrize("make_args, fragment", [
    (lambda t, p: ["-i", t["images_ts"], "-o", p / "o", "-m", p], "no model folders"),
    (lambda t, p: ["-i", t["images_ts"], "-o", p / "o", "-m", t["results"], "--modalities", "T5"], "unknown modality"),
    (lambda t, p: ["-i", p / "missing", "-o", p / "o", "-m", t["results"]], "no such file or folder"),
    (lambda t, p: ["-i", t["images_ts"], "-o", p / "o", "-m", t["results"], "-f", "3"], "fold_3 has no"),
])
def test_cli_run_level_errors_are_one_line(trained, tmp_path, make_args, fragment):
    proc = run_cli(*make_args(trained, tmp_path))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("nnalign_predict: error: ") and fragment in lines[0], lines


@pytest.mark.slow
def test_the_teacher_is_told_which_channels_are_real_and_the_absent_ones_are_zero(trained):
    from nnalign.data.brats_layout import find_cases
    from nnalign.data.sequence_grid import SequenceGrid
    from nnalign.inference.predict import Predictors, predict_array

    teacher = load_model(trained["teacher"])
    predictor = Predictors("cpu", disable_tta=True).get(teacher)
    net = predictor.network
    seen = []
    forward = net.forward

    def spy(x, *args, **kwargs):
        seen.append((net.present_modalities, [bool(x[:, c].abs().sum() == 0) for c in range(x.shape[1])]))
        return forward(x, *args, **kwargs)

    net.forward = spy
    try:
        [case] = [c for c in find_cases(trained["images_ts"]) if c.case_id == "SYNTS_0000"]
        seg, _ = predict_array(predictor, teacher, case, ("T1ce", "FLAIR"), SequenceGrid("T1ce"), {})
    finally:
        del net.forward
    assert seg.shape == (40, 40, 40)
    assert seen and all(s == ((1, 3), [True, False, True, False]) for s in seen), seen[:3]
    assert net.present_modalities == (0, 1, 2, 3)


@pytest.mark.slow
def test_an_output_folder_inside_the_input_is_not_read_as_input(trained, tmp_path):
    from nnalign.inference.predict import predict

    for src in trained["images_ts"].glob("SYNTS_0001_*.nii.gz"):  # nnU-Net naming: SYNTS_0001.nii.gz would parse
        shutil.copyfile(src, tmp_path / src.name)                 # as channel 1 of a case "SYNTS"
    for _ in range(2):
        report = predict(tmp_path, tmp_path / "pred", trained["results"], device="cpu", disable_tta=True,
                         progress=False)
        assert [r.case for r in report.records] == ["SYNTS_0001"]
    assert report.records[0].status == "skipped"
    with pytest.raises(NnalignError, match="must not be the input folder"):
        predict(tmp_path, tmp_path, trained["results"], device="cpu", progress=False)


@pytest.mark.slow
def test_a_model_nnunet_cannot_load_fails_its_cases_in_one_line_each(trained, tmp_path):
    from nnalign.inference.predict import predict

    models = tmp_path / "models"
    shutil.copytree(trained["original"], models / ORIGINAL_MODEL)
    (models / ORIGINAL_MODEL / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    make_case(tmp_path / "in", "A", trained["images_ts"] / "SYNTS_0000", ALL)
    make_case(tmp_path / "in", "B", trained["images_ts"] / "SYNTS_0001", ALL)
    errors = []
    report = predict(tmp_path / "in", tmp_path / "out", models, device="cpu", disable_tta=True,
                     on_error=errors.append, progress=False)
    assert [r.status for r in report.records] == ["failed", "failed"]
    assert len(errors) == 2 and all("\n" not in e for e in errors)
    assert errors[0].startswith(f"A: model {ORIGINAL_MODEL} could not be loaded: "), errors
    assert errors[1].startswith(f"B: model {ORIGINAL_MODEL} could not be loaded: "), errors


def test_an_earlier_log_is_read_once_for_both_prediction_and_evaluation_keeping_its_readable_cases(tmp_path):
    """nnalign_predict's log as its next run (PredictionLog) and nnalign_evaluate (recorded_conventions) read it: an
    entry without a case or status is passed over, the others kept; an unreadable log is no log."""
    import json

    from nnalign.evaluation.pairing import recorded_conventions
    from nnalign.inference.predict import PredictionLog

    cases = [{"case": "A", "status": "ok", "labels": "brats2023"}, {"labels": "nnunet"}, "not an entry",
             {"case": ["C"], "status": "ok", "labels": "nnunet"}, {"case": "B", "status": "failed", "labels": ""}]
    (tmp_path / "nnalign_predict_log.json").write_text(json.dumps({"cases": cases}))
    assert sorted(PredictionLog(tmp_path).records) == ["A", "B"]
    assert PredictionLog(tmp_path).earlier("A").labels == "brats2023"
    assert recorded_conventions(tmp_path) == {"A": "brats2023"}
    (tmp_path / "nnalign_predict_log.json").write_text("{not json")
    assert PredictionLog(tmp_path).records == {} and recorded_conventions(tmp_path) == {}
