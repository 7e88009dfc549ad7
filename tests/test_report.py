"""``nnalign_report`` on a fake results tree: tables against hand-computed Dice, empty cells, CSV/Markdown agreement,
figures, and the CLI.

The tree holds no trained network: model folders named like nnalign's teachers and students, each with a
``validation/`` folder of tiny predictions. Every volume is 10 x 10 x 10 and built from whole planes along the last
axis, so a region's Dice is a ratio of plane counts: the ground truth is, plane by plane,
``1 1 1 1 2 2 3 3 0 0`` (nnU-Net labels: 1 edema, 2 necrosis, 3 enhancing), i.e. WT 8 planes, TC 4, ET 2.
"""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnalign.errors import NnalignError
from nnalign.evaluation.metrics import HD95_EMPTY
from nnalign.evaluation.validation import CACHE_FILE
from nnalign.modalities import BRATS_MODALITIES, all_subsets, subset_tag
from nnalign.reporting.collect import Results, classify
from nnalign.reporting.figures import (Latents, plot_latent_tsne, plot_training_curves, sample_latents,
                                      tsne_embedding)
from nnalign.reporting.report import build_report
from nnalign.training.record import METHOD_VERSION

DATASET = "Dataset990_Fake"
PLANS, CONFIG = "nnUNetPlans", "3d_fullres"
GT = [1, 1, 1, 1, 2, 2, 3, 3, 0, 0]
PERFECT = GT
SHORT_ET = [1, 1, 1, 1, 2, 2, 3, 0, 0, 0]  # WT 7 of 8 planes, TC 3 of 4, ET 1 of 2: Dice 14/15, 6/7, 2/3
NO_ET = [1, 1, 1, 1, 2, 2, 2, 2, 0, 0]  # WT and TC perfect, ET empty: Dice 1, 1, 0; HD95 0, 0, 373.13
EDEMA_ONLY = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]  # WT perfect, TC and ET empty: Dice 1, 0, 0
REGIONS = {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}
CASES = ("C0", "C1")
CHANNELS = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
CLI = [sys.executable, "-m", "nnalign.cli.report"]


def plane_dice(pred: list[int], ref: list[int] = GT) -> dict[str, float]:
    """Dice per region in plane counts (every plane holds 100 voxels)."""
    out = {}
    for region, labels in REGIONS.items():
        p = [v in labels for v in pred]
        r = [v in labels for v in ref]
        total = sum(p) + sum(r)
        out[region] = 1.0 if total == 0 else 2 * sum(a and b for a, b in zip(p, r)) / total
    return out


def avg_pct(pred: list[int]) -> float:
    return 100 * sum(plane_dice(pred).values()) / 3


def volume(planes: list[int]) -> np.ndarray:
    return np.broadcast_to(np.array(planes, dtype=np.uint8), (10, 10, 10)).copy()  # numpy (z, y, x): planes along x


def write_nifti(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def make_model(results: Path, trainer: str, folds: dict[int, dict[str, list[int]]], config: str = CONFIG,
               checkpoint_log: dict | None = None, record: dict | None = None) -> Path:
    """A model folder: ``folds`` maps fold -> {case: prediction planes} (an empty dict: trained, not validated)."""
    model = results / f"{trainer}__{PLANS}__{config}"
    model.mkdir(parents=True)
    (model / "dataset.json").write_text(json.dumps({"channel_names": CHANNELS, "labels": {}}))
    for fold, predictions in folds.items():
        fold_dir = model / f"fold_{fold}"
        fold_dir.mkdir()
        for case, planes in predictions.items():
            write_nifti(fold_dir / "validation" / f"{case}.nii.gz", volume(planes))
        if checkpoint_log is not None:
            import torch

            torch.save({"logging": checkpoint_log, "trainer_name": trainer}, fold_dir / "checkpoint_final.pth")
        if record is not None:
            (fold_dir / "nnalign_settings.json").write_text(json.dumps({"method_version": METHOD_VERSION, **record}))
    return model


def write_evaluation(results: Path, model: Path, subset: tuple[str, ...], dice: tuple[float, float, float],
                     cases: int = 5) -> None:
    mean = {**{f"Dice_{r}": d for r, d in zip(REGIONS, dice)}, **{f"HD95_{r}": 1.0 for r in REGIONS}}
    path = results / "nnalign_evaluations" / model.name / subset_tag(subset) / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"aggregates": {"mean": mean}, "num_cases": cases, "cases": {}}))


LOG = {"train_losses": [0.5, 0.2, -0.1], "val_losses": [0.6, 0.3, 0.0], "mean_fg_dice": [0.2, 0.5, 0.7],
       "ema_fg_dice": [0.2, 0.23, 0.28], "lrs": [0.01, 0.006, 0.002], "align_losses": [1.0, 0.5, 0.25],
       "modality_gap": [2.0, 1.0, 0.5]}
WEIGHTS = {"T1": {"raw": 0.7759, "normalised": 0.185}, "T1ce": {"raw": 2.2055, "normalised": 0.527},
           "T2": {"raw": 0.8977, "normalised": 0.215}, "FLAIR": {"raw": 0.3055, "normalised": 0.073}}


def build_tree(base: Path, env) -> tuple[Path, dict[str, Path]]:
    """The fake results tree under ``base`` (``env(var, value)`` sets nnU-Net's folders); returns (results folder,
    {short name: model folder})."""
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        env(var, str(base / sub))
    results = base / "res" / DATASET
    for case in CASES:
        write_nifti(base / "pre" / DATASET / "gt_segmentations" / f"{case}.nii.gz", volume(GT))
    write_nifti(base / "raw" / DATASET / "imagesTr" / "C0_0003.nii.gz",
                np.random.default_rng(0).random((10, 10, 10)).astype(np.float32))
    both = {c: None for c in CASES}
    m = {
        # teachers: none misses ET everywhere; mixture is perfect, validated over two folds; normal is not validated
        "t_none": make_model(results, "nnAlignTeacher_none", {0: dict.fromkeys(both, NO_ET)}, checkpoint_log=LOG),
        "t_mix": make_model(results, "nnAlignTeacher_mixture", {0: {"C0": PERFECT}, 1: {"C1": PERFECT}},
                            checkpoint_log=LOG, record={"mixture_weights": WEIGHTS}),
        "t_normal": make_model(results, "nnAlignTeacher_normal", {0: {}}),
        # a teacher variant (alignment weight 0.5): not the standard mixture teacher
        "t_mix_w": make_model(results, "nnAlignTeacher_mixture_w0p5", {0: dict.fromkeys(both, EDEMA_ONLY)}),
        # plain nnU-Net teachers: without and with modality dropout (sparsified training)
        "t_orig": make_model(results, "nnAlignOriginal", {0: dict.fromkeys(both, EDEMA_ONLY)}),
        "t_orig_drop": make_model(results, "nnAlignOriginal_drop0p5", {0: dict.fromkeys(both, SHORT_ET)}),
        # the T1 kdnet student of the plain nnU-Net teacher (the paper's Original Method column)
        "s_t1_kdnet_orig": make_model(results, "nnAlignStudent_T1_kdnet_Original", {0: dict.fromkeys(both, NO_ET)}),
        # a T2 pmkl student only from a teacher with other settings than the compared ones
        "s_t2_pmkl_mix_w": make_model(results, "nnAlignStudent_T2_pmkl_Teacher-mixture-w0p5",
                                       {0: dict.fromkeys(both, PERFECT)}),
        # students
        "s_t1_kdnet_none": make_model(results, "nnAlignStudent_T1_kdnet_Teacher-none",
                                      {0: {"C0": SHORT_ET, "C1": SHORT_ET}}),
        "s_t1_kdnet_mix": make_model(results, "nnAlignStudent_T1_kdnet_Teacher-mixture",
                                     {0: dict.fromkeys(both, PERFECT)}),
        "s_t1ce_kdnet_mix": make_model(results, "nnAlignStudent_T1ce_kdnet_Teacher-mixture",
                                       {0: {"C0": PERFECT, "C1": NO_ET}},
                                       record={"cases": {"train": 12, "val": 3, "train_without_subset": 4,
                                                         "val_without_subset": 1}}),
        "s_t1_protokd_mix": make_model(results, "nnAlignStudent_T1_protokd_Teacher-mixture",
                                       {0: dict.fromkeys(both, NO_ET)}),
        "s_t1_none": make_model(results, "nnAlignStudent_T1_none_Teacher-mixture",
                                {0: dict.fromkeys(both, EDEMA_ONLY)}, checkpoint_log=LOG),
        "s_t2_t1ce_kdnet_normal": make_model(results, "nnAlignStudent_T1ce-T2_kdnet_Teacher-normal",
                                             {0: dict.fromkeys(both, SHORT_ET)}),
    }
    # held-out evaluations: the T1 kdnet student from the mixture teacher on its own subset (takes precedence over
    # its validation), and the single-modality T1 model evaluated on T2
    write_evaluation(results, m["s_t1_kdnet_mix"], ("T1",), (0.9, 0.8, 0.7))
    write_evaluation(results, m["s_t1_none"], ("T2",), (0.5, 0.4, 0.3))
    # not reported: another configuration and a plain nnU-Net model
    make_model(results, "nnAlignTeacher_mixture", {0: dict.fromkeys(both, PERFECT)}, config="3d_cpu")
    make_model(results, "nnUNetTrainer", {0: dict.fromkeys(both, PERFECT)})
    return results, m


@pytest.fixture
def tree(tmp_path, monkeypatch):
    return build_tree(tmp_path, monkeypatch.setenv)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One report of a fresh tree, shared by the tests that only read it."""
    base = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        results, _ = build_tree(base, mp.setenv)
        yield build_report(results, output=base / "out", tsne=False)


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


def md_rows(path: Path) -> list[list[str]]:
    """The cells of the first Markdown table in a file."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if not line.startswith("|:")
            and not line.startswith("|-")]


# ----------------------------------------------------------------------------------------------------------------------
# discovery and metrics


def test_plane_dice_by_hand():
    assert plane_dice(SHORT_ET) == pytest.approx({"WT": 14 / 15, "TC": 6 / 7, "ET": 2 / 3})
    assert plane_dice(NO_ET) == {"WT": 1.0, "TC": 1.0, "ET": 0.0}


def test_runs_are_classified_from_trainer_names(tree):
    results, m = tree
    res = Results.load(results)
    assert (res.plans, res.configuration) == (PLANS, CONFIG)
    assert len(res.runs) == len(m)
    t = classify(m["t_mix_w"])
    assert (t.role, t.anchor, t.variant, t.subset) == ("teacher", "mixture", "w0p5", BRATS_MODALITIES)
    s = classify(m["s_t2_t1ce_kdnet_normal"])
    assert (s.role, s.anchor, s.kd, s.subset, s.variant) == ("student", "normal", "kdnet", ("T1ce", "T2"), "")
    assert any("3d_cpu" in n or "configuration" in n for n in res.notes)
    assert any("nnUNetTrainer__" in n for n in res.notes)
    assert res.default_kd() == "kdnet"  # 5 kdnet runs, 1 pmkl, 1 protokd, 1 none


def test_the_model_list_says_how_many_cases_a_student_trained_on(tree):
    from nnalign.reporting.tables import runs_table

    results, m = tree
    table = runs_table(Results.load(results))
    trained_on = dict(zip(table.column("Model"), table.column("Trained on")))
    assert trained_on[m["s_t1ce_kdnet_mix"].name] == "12 of 16"  # 4 training cases of the fold lack T1ce
    assert trained_on[m["s_t1_kdnet_mix"].name] == "" and trained_on[m["t_mix"].name] == ""  # no record / a teacher


def test_metrics_pool_folds_and_are_cached(tree):
    results, m = tree
    res = Results.load(results)
    mix = next(r for r in res.runs if r.folder == m["t_mix"])
    metrics = res.metrics(mix)
    assert metrics.num_cases == 2 and metrics.dice == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    assert metrics.source == "validation fold_0, fold_1"
    cache = m["t_mix"] / "fold_1" / "validation" / CACHE_FILE
    payload = json.loads(cache.read_text())
    assert list(payload["cases"]) == ["C1"] and payload["aggregates"]["mean"]["Dice_WT"] == 1.0
    # the cache is used: a tampered cached value shows up, until a prediction is newer than the cache
    payload["cases"]["C1"]["Dice_ET"] = 0.5
    cache.write_text(json.dumps(payload))
    assert Results.load(results).metrics(mix).dice["ET"] == pytest.approx(0.75)
    pred = m["t_mix"] / "fold_1" / "validation" / "C1.nii.gz"
    later = cache.stat().st_mtime + 10
    os.utime(pred, (later, later))
    assert Results.load(results).metrics(mix).dice["ET"] == 1.0


def test_hd95_of_the_teacher_without_et(tree):
    results, m = tree
    res = Results.load(results)
    none = next(r for r in res.runs if r.folder == m["t_none"])
    assert res.metrics(none).hd95 == {"WT": 0.0, "TC": 0.0, "ET": HD95_EMPTY}


def test_missing_ground_truth_falls_back_to_nnunet_summary(tree, tmp_path):
    results, m = tree
    summary = {"mean": {"(1, 2, 3)": {"Dice": 0.9}, "(2, 3)": {"Dice": 0.8}, "(3,)": {"Dice": 0.7}},
               "foreground_mean": {"Dice": 0.8}, "metric_per_case": [{}, {}]}
    (m["t_none"] / "fold_0" / "validation" / "summary.json").write_text(json.dumps(summary))
    res = Results.load(results, preprocessed=tmp_path / "nowhere")
    none = next(r for r in res.runs if r.folder == m["t_none"])
    metrics = res.metrics(none)
    assert metrics.dice == {"WT": 0.9, "TC": 0.8, "ET": 0.7} and metrics.hd95 is None and metrics.num_cases == 2


def test_loading_results_leaves_the_environment_alone(tree, tmp_path, monkeypatch):
    results, m = tree
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "nnalign_preprocessed").symlink_to(tmp_path / "pre")  # the tree's, at nnalign's default
    monkeypatch.setenv("NNALIGN_HOME", str(tmp_path / "home"))
    before = dict(os.environ)
    res = Results.load(results)
    assert res.gt_folder == tmp_path / "home" / "nnalign_preprocessed" / DATASET / "gt_segmentations"
    assert res.metrics(next(r for r in res.runs if r.folder == m["t_mix"])).source == "validation fold_0, fold_1"
    assert dict(os.environ) == before


# ----------------------------------------------------------------------------------------------------------------------
# tables


def test_table_iii_hand_computed_cells_empty_cells_and_mean_row(report):
    t = report.tables["III"]
    assert report.kd == "kdnet"
    assert [row[0] for row in t.rows] == [subset_tag(s) for s in all_subsets()] + ["Mean"]
    t1 = t.row("T1")
    assert t1[1:5] == [True, False, False, False]
    wo = [100 * v for v in plane_dice(SHORT_ET).values()]
    assert t1[5:9] == pytest.approx([*wo, sum(wo) / 3])
    assert t1[9:13] == pytest.approx([90.0, 80.0, 70.0, 80.0])  # the held-out evaluation wins over validation
    assert t1[13] == pytest.approx(80.0 - sum(wo) / 3)
    t1ce = t.row("T1ce")  # only distilled from the mixture teacher
    case_avgs = [100.0, avg_pct(NO_ET)]
    assert t1ce[5:9] == [None] * 4 and t1ce[12] == pytest.approx(sum(case_avgs) / 2) and t1ce[13] is None
    assert t.row("T1-T2")[5:] == [None] * 9  # no run at all
    assert t.row("T1ce-T2")[5:] == [None] * 9  # a kdnet student of a normal-anchor teacher is not in Table III
    full = t.row("T1-T1ce-T2-FLAIR")  # no full-modality student: the teachers themselves
    assert full[8] == pytest.approx(avg_pct(NO_ET)) and full[12] == pytest.approx(100.0)
    assert any("teacher itself" in n for n in t.notes)
    mean = t.row("Mean")
    assert mean[8] == pytest.approx((sum(wo) / 3 + avg_pct(NO_ET)) / 2)
    assert mean[12] == pytest.approx((80.0 + sum(case_avgs) / 2 + 100.0) / 3)
    assert mean[13] == pytest.approx(((80.0 - sum(wo) / 3) + (100.0 - avg_pct(NO_ET))) / 2)
    assert any("2 of 15 without alignment, 3 of 15 with" in n for n in t.notes)


def test_table_i_improvement_columns_and_kd_none_fallback(report):
    t = report.tables["I"]
    assert t.columns == ["Student", "KD", "original", "none", "normal", "Δ normal", "modality:T1ce",
                         "Δ modality:T1ce", "mixture", "Δ mixture", "P* − original"]
    assert len(t.rows) == 4 * 5
    rows = {(r[0], r[1]): dict(zip(t.columns, r)) for r in t.rows}
    kdnet = rows[("T1", "kdnet")]
    assert kdnet["none"] == pytest.approx(avg_pct(SHORT_ET))
    assert kdnet["mixture"] == pytest.approx(80.0)
    assert kdnet["Δ mixture"] == pytest.approx(80.0 - avg_pct(SHORT_ET))
    assert kdnet["original"] == pytest.approx(avg_pct(NO_ET))
    assert kdnet["P* − original"] == pytest.approx(80.0 - avg_pct(NO_ET))
    # T2 pmkl exists only from a teacher with lambda 0.5: shown, and the notes say it differs in another setting
    assert rows[("T2", "pmkl")]["mixture"] == 100.0
    assert any("the default settings" in n for n in t.notes)
    assert any("differs in another setting" in n and "Teacher-mixture-w0p5" in n for n in t.notes)
    assert kdnet["normal"] is None and kdnet["Δ normal"] is None
    protokd = rows[("T1", "protokd")]
    assert protokd["mixture"] == pytest.approx(avg_pct(NO_ET)) and protokd["none"] is None
    assert protokd["Δ mixture"] is None  # no baseline, no improvement
    none = rows[("T1", "none")]  # KD none ignores the teacher: its one run stands in for every anchor
    assert none["none"] == none["mixture"] == none["normal"] == pytest.approx(avg_pct(EDEMA_ONLY))
    assert none["Δ mixture"] == 0.0
    assert all(v is None for k, v in rows[("FLAIR", "pmkl")].items() if k not in ("Student", "KD"))


def test_table_iv_teachers_dice_hd95_weights_and_variants(report):
    t = report.tables["IV"]
    assert [r[0] for r in t.rows] == ["none", "normal", "modality:T1ce", "mixture", "original (nnU-Net)",
                                      "original, modality dropout 0.5 (sparsified nnU-Net)"]
    assert t.sources["original (nnU-Net)"].startswith("nnAlignOriginal__")
    assert dict(zip(t.columns, t.row("original, modality dropout 0.5 (sparsified nnU-Net)")))["Dice Avg"] == \
        pytest.approx(avg_pct(SHORT_ET))
    assert any("Teachers with the default settings besides the anchor" in n for n in t.notes)
    none = dict(zip(t.columns, t.row("none")))
    assert [none[f"Dice {r}"] for r in ("WT", "TC", "ET")] == [100.0, 100.0, 0.0]
    assert none["Dice Avg"] == pytest.approx(200 / 3)
    assert none["HD95 ET"] == pytest.approx(HD95_EMPTY) and none["HD95 Avg"] == pytest.approx(HD95_EMPTY / 3)
    assert none["Cases"] == 2
    mixture = dict(zip(t.columns, t.row("mixture")))  # the standard teacher, not the w0p5 variant
    assert mixture["Dice Avg"] == 100.0 and mixture["HD95 Avg"] == 0.0 and mixture["Cases"] == 2
    assert t.row("normal")[1:] == [None] * 9 and t.row("modality:T1ce")[1:] == [None] * 9
    assert any("T1ce 0.527" in n for n in t.notes)
    assert any("nnAlignTeacher_mixture_w0p5" in n for n in t.notes)
    assert any(n.startswith("normal: nnAlignTeacher_normal") and "no validation" in n for n in t.notes)


def test_table_v_diagonal_from_validation_and_off_diagonal_from_evaluations(report):
    t = report.tables["V"]
    t1 = dict(zip(t.columns, t.row("T1")))
    assert t1["on T1"] == pytest.approx(avg_pct(EDEMA_ONLY))
    assert t1["on T2"] == pytest.approx(40.0)
    assert t1["on T1ce"] is None and t1["on FLAIR"] is None
    assert t.row("FLAIR")[1:] == [None] * 4


def test_csv_and_markdown_agree_and_empty_cells_are_dashes(report):
    for key in ("III", "I", "IV", "V"):
        md = md_rows(report.output / f"table_{key}.md")
        rows = read_csv(report.output / f"table_{key}.csv")
        header, body = md[0], md[1:]
        assert header == list(rows[0].keys())
        assert len(body) == len(rows) == len(report.tables[key].rows)
        for md_row, csv_row in zip(body, rows):
            for col, md_cell in zip(header, md_row):
                value = csv_row[col]
                if value == "":
                    assert md_cell in ("–", ""), (key, col, md_cell)
                elif md_cell in ("●", "○"):
                    assert value == ("1" if md_cell == "●" else "0")
                else:
                    try:
                        number = float(value)
                    except ValueError:
                        assert md_cell == value
                        continue
                    assert float(md_cell) == pytest.approx(round(number, 2), abs=1e-9), (key, col)
    text = (report.output / "table_III.md").read_text(encoding="utf-8")
    assert "| T1-T2 | ● | ○ | ● | ○ | – | – | – | – | – | – | – | – | – |" in text


def test_report_md_links_tables_and_figures(report):
    text = report.report_md.read_text(encoding="utf-8")
    for key in ("III", "I", "IV", "V"):
        assert f"[table_{key}.csv](table_{key}.csv)" in text
    assert "![overlays.png](overlays.png)" in text and "![training_curves.png](training_curves.png)" in text
    assert "![tsne_latents.png]" not in text
    assert "t-SNE skipped (--no-tsne)" in text
    assert "nnAlignStudent_T1_kdnet_Teacher-none__nnUNetPlans__3d_fullres" in text  # the models used
    assert not list(report.output.glob(".*"))  # no temporary files left


# ----------------------------------------------------------------------------------------------------------------------
# figures


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overlay_and_curve_figures_are_written(report):
    assert is_png(report.output / "overlays.png") and is_png(report.output / "training_curves.png")
    overlays = report.figures["overlays.png"]
    # the subset with the most students (T1: kdnet x3, protokd, none) beside the mixture teacher, on both cases
    assert overlays.panels[0] == "C0: teacher mixture"
    assert sum(p.startswith("C0: ") for p in overlays.panels) == 6
    assert any(p.startswith("C1: ") for p in overlays.panels)
    assert overlays.panels[1:6] == ["C0: T1 kdnet <- none", "C0: T1 kdnet <- mixture", "C0: T1 kdnet <- original",
                                    "C0: T1 none <- mixture", "C0: T1 protokd <- mixture"]
    curves = report.figures["training_curves.png"]
    assert curves.panels == ["teacher none (fold_0)", "teacher mixture (fold_0)", "T1 none <- mixture (fold_0)"]
    assert not (report.output / "tsne_latents.png").exists()


def test_training_curves_without_logs_write_nothing(tmp_path):
    result = plot_training_curves({"a": {"train_losses": []}}, tmp_path / "c.png")
    assert result.path is None and not (tmp_path / "c.png").exists() and "no logged epochs" in result.notes[0]


def test_tsne_one_panel_per_anchor_from_callables(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 6, 6, 6), dtype=bool)
    mask[:, 1:5, 1:5, 1:5] = True

    def latents(shift: float):
        values = rng.normal(size=(1, 4, 3, 6, 6, 6)) + shift * np.arange(4)[None, :, None, None, None, None]
        return lambda: Latents(values, BRATS_MODALITIES, mask)

    def broken():
        raise FileNotFoundError("no checkpoint here")

    anchors = {"none": latents(3.0), "normal": latents(1.0), "broken": broken, "mixture": latents(0.0)}
    result = plot_latent_tsne(anchors, tmp_path / "tsne.png", per_modality=12)
    assert result.panels == ["none", "normal", "mixture"]
    assert is_png(tmp_path / "tsne.png")
    assert result.notes == ["t-SNE panel broken skipped: no checkpoint here"]


def test_tsne_of_a_single_latent_channel_keeps_the_modalities_apart(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(scale=0.1, size=(1, 4, 1, 5, 5, 5)) + 10.0 * np.arange(4)[None, :, None, None, None, None]
    result = plot_latent_tsne({"mixture": lambda: Latents(values, BRATS_MODALITIES)}, tmp_path / "tsne.png",
                              per_modality=20)
    assert result.panels == ["mixture"] and result.notes == [] and is_png(tmp_path / "tsne.png")
    features, labels = sample_latents(Latents(values, BRATS_MODALITIES), 20, np.random.default_rng(0))
    embedding = tsne_embedding(features)
    centres = np.stack([embedding[labels == j].mean(0) for j in range(4)])
    spread = max(np.linalg.norm(embedding[labels == j] - centres[j], axis=1).max() for j in range(4))
    assert min(np.linalg.norm(centres[i] - centres[j]) for i in range(4) for j in range(i)) > spread


def test_latent_sampling_stays_inside_the_mask_at_the_same_voxels_for_every_modality():
    values = np.zeros((2, 4, 1, 3, 3, 3), dtype=np.float32)
    values[:, :, 0] = np.arange(54).reshape(2, 1, 3, 3, 3)  # feature = flat voxel index, the same for every modality
    mask = np.zeros((2, 3, 3, 3), dtype=bool)
    mask[1, 2] = True  # 9 voxels of the second case
    features, labels = sample_latents(Latents(values, BRATS_MODALITIES, mask), 5, np.random.default_rng(1))
    assert features.shape == (20, 1) and labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    picked = features[:5, 0]
    assert set(picked) <= set(range(27 + 18, 27 + 27)) and len(set(picked)) == 5
    assert all((features[5 * j:5 * j + 5, 0] == picked).all() for j in range(4))


TINY_ARCH = {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
             "kernel_sizes": [[3, 3, 3]] * 2, "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": [1, 1],
             "n_conv_per_stage_decoder": [1], "conv_bias": True,
             "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
             "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
             "nonlin_kwargs": {"inplace": True}, "latent_channels": 3, "latent_convs": 1, "shared_encoder": True,
             "modalities": list(BRATS_MODALITIES)}


def write_tiny_teacher(results: Path, preprocessed: Path) -> Path:
    """A real (untrained) nnAlignTeacherUNet in nnU-Net's model-folder format, with hand-written plans (configuration
    ``3d_tiny``: patch 8^3, two stages), and three preprocessed cases of 10 x 12 x 9 (blosc2, as nnU-Net 2.8.1)."""
    import torch
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    network_class = "nnalign.networks.align_unet.nnAlignTeacherUNet"
    requires_import = ["conv_op", "norm_op", "dropout_op", "nonlin"]
    config = {"data_identifier": "nnUNetPlans_3d_tiny", "preprocessor_name": "DefaultPreprocessor", "batch_size": 1,
              "patch_size": [8, 8, 8], "median_image_size_in_voxels": [10, 12, 9], "spacing": [1.0, 1.0, 1.0],
              "normalization_schemes": ["ZScoreNormalization"] * 4, "use_mask_for_norm": [True] * 4,
              "architecture": {"network_class_name": network_class, "arch_kwargs": TINY_ARCH,
                               "_kw_requires_import": requires_import}, "batch_dice": False}
    plans = {"dataset_name": DATASET, "plans_name": PLANS, "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "configurations": {"3d_tiny": config}, "label_manager": "LabelManager",
             "image_reader_writer": "SimpleITKIO", "foreground_intensity_properties_per_channel": {}}
    dataset_json = {"channel_names": CHANNELS, "regions_class_order": [1, 2, 3], "file_ending": ".nii.gz",
                    "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}}
    trainer = "nnAlignTeacher_mixture"
    model = results / f"{trainer}__{PLANS}__3d_tiny"
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps(plans))
    (model / "dataset.json").write_text(json.dumps(dataset_json))
    network = get_network_from_plans(network_class, {**TINY_ARCH, "anchor": "mixture"}, requires_import, 4, 3,
                                     allow_init=True, deep_supervision=False)
    torch.save({"network_weights": network.state_dict(), "trainer_name": trainer,
                "init_args": {"configuration": "3d_tiny"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               model / "fold_0" / "checkpoint_final.pth")
    folder = preprocessed / DATASET / config["data_identifier"]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for case in ("A", "B", "C"):
        seg = np.zeros((1, 10, 12, 9), np.int16)
        seg[:, :2] = -1  # outside the brain
        nnUNetDatasetBlosc2.save_case(rng.normal(size=(4, 10, 12, 9)).astype(np.float32), seg, {}, str(folder / case))
    return model


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_mask_on_a_coarser_latent_grid_keeps_blocks_at_least_half_inside():
    from nnalign.reporting.figures import mask_on_grid

    mask = np.zeros((1, 4, 4, 2), dtype=bool)
    mask[0, :2, :2, :] = True  # block (0, 0, 0) entirely inside
    mask[0, 2, 2:, :] = True  # block (1, 1, 0): half inside
    mask[0, 0, 2, 0] = True  # block (0, 1, 0): one voxel in eight
    coarse = mask_on_grid(mask, (2, 2, 1))
    assert coarse.shape == (1, 2, 2, 1)
    assert coarse[0, :, :, 0].tolist() == [[True, False], [False, True]]
    assert mask_on_grid(mask, (4, 4, 2)) is mask


@pytest.mark.slow
def test_tsne_loads_a_real_teacher_through_nnunets_predictor(tmp_path, monkeypatch):
    from nnalign.reporting.figures import teacher_latents
    from nnalign.reporting.report import tsne_figure

    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    model = write_tiny_teacher(tmp_path / "res" / DATASET, tmp_path / "pre")
    latents = teacher_latents(model, "0", tmp_path / "pre" / DATASET, cases=["C", "Z"], max_cases=2)
    # the configuration's patch (8^3) cut from the middle of 10 x 12 x 9: the first plane is outside the brain
    assert latents.values.shape == (2, 4, 3, 8, 8, 8) and tuple(latents.modalities) == BRATS_MODALITIES
    assert latents.mask.shape == (2, 8, 8, 8) and latents.mask.sum() == 2 * 7 * 8 * 8
    result = tsne_figure(Results.load(tmp_path / "res" / DATASET), tmp_path / "tsne.png", 1, 10)
    assert result.panels == ["mixture"] and result.notes == [] and is_png(tmp_path / "tsne.png")
    # a teacher with non-default settings (same network) is titled with them
    model.rename(model.with_name(model.name.replace("nnAlignTeacher_mixture__", "nnAlignTeacher_mixture_w0p5__")))
    result = tsne_figure(Results.load(tmp_path / "res" / DATASET), tmp_path / "tsne.png", 1, 10)
    assert result.panels == ["mixture (w0p5)"] and result.notes == []


def test_tsne_without_teacher_or_preprocessed_data_is_a_note(tree, tmp_path):
    from nnalign.reporting.report import tsne_figure

    results, m = tree
    res = Results.load(results, preprocessed=tmp_path / "nowhere")
    result = tsne_figure(res, tmp_path / "t.png", 1, 10)
    assert result.path is None and "no preprocessed data" in result.notes[0]


# ----------------------------------------------------------------------------------------------------------------------
# errors and CLI


def test_unknown_kd_and_empty_folder_are_nnalign_errors(tree, tmp_path):
    results, _ = tree
    with pytest.raises(NnalignError, match="unknown KD method 'foo'"):
        build_report(results, output=tmp_path / "o", kd="foo", tsne=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NnalignError, match="no nnalign models found"):
        build_report(tmp_path / "empty", tsne=False)


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_cli_writes_everything_and_prints_table_iii(tree, tmp_path):
    results, _ = tree
    out = run_cli(results, "--no-tsne", "--kd", "KDNET")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    report_dir = results / "nnalign_report"
    assert out.stdout.splitlines()[0] == f"Wrote {report_dir / 'report.md'}"
    assert "**Table III.**" in out.stdout and "| T1 | ● | ○ | ○ | ○ | 93.33 | 85.71 | 66.67 |" in out.stdout
    for name in ("table_III", "table_I", "table_IV", "table_V"):
        assert (report_dir / f"{name}.md").is_file() and (report_dir / f"{name}.csv").is_file()
    assert is_png(report_dir / "overlays.png") and is_png(report_dir / "training_curves.png")
    assert "t-SNE skipped (--no-tsne)" in out.stderr


@pytest.mark.slow
def test_cli_empty_or_missing_folder_is_one_line_exit_1(tmp_path):
    (tmp_path / "Dataset001_Empty").mkdir()
    for folder, message in ((tmp_path / "Dataset001_Empty", "no nnalign models found"),
                            (tmp_path / "nowhere", "no such results folder"),
                            (tmp_path, "give one of them")):
        out = run_cli(folder, "--no-tsne")
        assert out.returncode == 1, out.stderr
        assert "Traceback" not in out.stderr and out.stdout == ""
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nnalign_report: error: ") and message in lines[0]


@pytest.mark.slow
def test_help_imports_not_even_numpy():
    code = ("import sys; sys.argv = ['nnalign_report', '--help']\n"
            "from nnalign.cli import report\n"
            "try:\n    report.build_parser().parse_args()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('numpy', 'torch', 'nnunetv2', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "[]", out
    proc = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--no-tsne" in proc.stdout
