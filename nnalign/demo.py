"""The end-to-end demo: data -> plan -> teacher -> students -> prediction with missing modalities -> evaluation ->
report, on the CPU, each step skipped when its result already exists (so an interrupted demo resumes).

Every step runs the same command a user would (``nnalign_train``, ``nnalign_predict``), as the experiment grid
(:mod:`nnalign.experiments.grid`) writes it, or the function behind it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nnalign.errors import NnalignError
from nnalign.experiments import grid
from nnalign.experiments.grid import student_flags
from nnalign.modalities import BRATS_MODALITIES, subset_tag
from nnalign.model_folders import FINAL_CHECKPOINT, fold_folder, model_folder
from nnalign.runs import TeacherSpec, TrainingLength
from nnalign.training.record import read_settings_record

DEMO_SUBSETS: tuple[tuple[str, ...], ...] = (BRATS_MODALITIES, ("T1ce",), ("FLAIR",))
CONFIGURATION = "3d_cpu"
HOLD_OUT_FRACTION = 0.2
TEACHER = TeacherSpec(anchor="mixture", modality_dropout=0.5, subset_sampling="balanced")
"""The demo's teacher: P*, and half of its samples missing a uniformly drawn proper subset of the modalities, so that
the all-modality case (50 % of samples) and every single modality (3.6 % each) are both trained; independent dropout
keeps all four in 1/15 of the samples at 0.5 (0.5^4 / (1 - 0.5^4)) and T1ce alone in 1.2 % at 0.25
(0.25^3 x 0.75 / (1 - 0.25^4))."""


@dataclass
class DemoOptions:
    """What the demo trains and on which data (defaults: short runs that show the pipeline on 2 CPU cores; the
    segmentation quality needs longer training, e.g. 50 epochs each, or a GPU)."""

    dataset_id: int = 900
    data: Path | None = None
    cases: int = 8
    test_cases: int = 3
    shape: tuple[int, int, int] = (64, 64, 64)
    seed: int = 0
    min_rim_mm: float = 4.0
    glioma_kinds: tuple[str, ...] = ("ring",)
    """Ring-enhancing gliomas only: 8 training cases are too few to learn the rarer solid and non-enhancing kinds, and
    a held-out glioma of a kind no training case shows would test the data, not the method."""
    teacher_epochs: int = 90
    student_epochs: int = 50
    iters_per_epoch: int = 10
    kd: tuple[str, ...] = ("pmkl",)
    student_modalities: tuple[str, ...] = ("T1ce",)
    device: str = "cpu"
    workers: int = 2


@dataclass
class DemoResult:
    """Where the demo's outputs are, the held-out scores and, in words, any model that collapsed."""

    dataset: str
    results: Path
    report: Path
    rows: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def reference_regions(labels_folder: Path, ending: str) -> dict[str, set[str]]:
    """``{case: regions its reference holds}`` for the nnU-Net label maps (0-3) in ``labels_folder``."""
    import SimpleITK as sitk

    from nnalign.data.labels import region_masks

    found = {}
    for path in sorted(labels_folder.glob(f"*{ending}")):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        found[path.name[: -len(ending)]] = {r for r, mask in region_masks(seg).items() if mask.any()}
    return found


def score_row(model: str, subset: tuple[str, ...], scores: dict[str, dict[str, float]],
              regions: dict[str, set[str]]) -> tuple[dict, list[str]]:
    """The summary row of one model and subset, and a sentence for each region it never found (collapse).

    Per region: the BraTS-convention mean over every case (a case whose reference and prediction both lack the
    region scores 1), the mean over the cases whose reference has the region, their number, and how many of them the
    model missed (Dice 0).
    """
    from nnalign.data.labels import REGION_NAMES

    row: dict = {"model": model, "modalities": "+".join(subset)}
    warnings = []
    for region in REGION_NAMES:
        values = [s[f"Dice_{region}"] for s in scores.values()]
        holding = [s[f"Dice_{region}"] for case, s in scores.items() if region in regions.get(case, ())]
        row[f"Dice {region}"] = sum(values) / len(values) if values else float("nan")
        row[f"Dice {region} with"] = sum(holding) / len(holding) if holding else float("nan")
        row[f"cases with {region}"] = len(holding)
        missed = sum(1 for d in holding if d == 0)
        row[f"missed {region}"] = missed
        if holding and missed == len(holding):
            what = "tumour" if region == "WT" else region
            warnings.append(f"{model} on {row['modalities']} found no {what} in any of the {len(holding)} held-out "
                            f"cases that have it")
    return row, warnings


class EpochLines:
    """nnU-Net's training log, fed line by line, as one line per epoch: ``epoch 3/60: train loss 0.100, pseudo-Dice
    WT 0.00 TC 0.38 ET 0.00, 1.5 s``."""

    _LINE = re.compile(r"^[0-9-]+ [0-9:.]+: (Epoch \d+|train_loss|Pseudo dice|Epoch time:)\s*(.*)$")
    _NUMBER = re.compile(r"(?:np\.float\d+\()?(-?\d+(?:\.\d+)?(?:e-?\d+)?)")

    def __init__(self, epochs: int, say: Callable[[str], None]):
        self.epochs, self.say = epochs, say
        self.epoch, self.loss, self.dice = 0, float("nan"), []

    def feed(self, line: str) -> None:
        """Read one log line; after an epoch's last line (its time), say the epoch's line."""
        m = self._LINE.match(line.strip())
        if m is None:
            return
        key, rest = m.groups()
        if key.startswith("Epoch ") and not key.startswith("Epoch time"):
            self.epoch, self.loss, self.dice = int(key.split()[1]), float("nan"), []
        elif key == "train_loss":
            self.loss = float(rest)
        elif key == "Pseudo dice":
            self.dice = [float(v) for v in self._NUMBER.findall(rest)]
        else:
            from nnalign.data.labels import REGION_NAMES

            names = REGION_NAMES if len(self.dice) == len(REGION_NAMES) else range(1, len(self.dice) + 1)
            dice = " ".join(f"{n} {d:.2f}" for n, d in zip(names, self.dice))
            self.say(f"  epoch {self.epoch + 1}/{self.epochs}: train loss {self.loss:.3f}, pseudo-Dice {dice}, "
                     f"{rest.split()[0]} s")


def _run(command: list[str], log: Path, progress: EpochLines | None = None) -> None:
    """Run one nnalign command, its output to ``log`` and, line by line, to ``progress``; a failure raises with the
    log's last line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                               env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        for line in proc.stdout:
            f.write(line)
            if progress is not None:
                progress.feed(line)
    if proc.returncode != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        raise NnalignError(f"{' '.join(command[2:5])} failed: {lines[-1] if lines else 'no output'} (log: {log})")


def _prepare_data(opts: DemoOptions, raw_root: Path, say) -> Path:
    from nnalign.data.raw_dataset import find_dataset_folder

    folder = find_dataset_folder(raw_root, opts.dataset_id)
    if folder is not None:
        say(f"data: reusing {folder}")
        return folder
    if opts.data is None:
        from nnalign.data.synthetic import CaseOptions, write_synthetic_dataset

        say(f"data: {opts.cases} synthetic training cases and {opts.test_cases} held-out cases (seed {opts.seed}, "
            f"{'x'.join(map(str, opts.shape))} voxels of 1 mm, {'/'.join(opts.glioma_kinds)} gliomas, enhancing "
            f"rims of about {opts.min_rim_mm:g} mm or more)")
        return write_synthetic_dataset(raw_root, opts.dataset_id, opts.cases, opts.shape, opts.seed,
                                       num_test=opts.test_cases, name="DemoSyntheticBraTS",
                                       options=CaseOptions(min_rim_mm=opts.min_rim_mm,
                                                           glioma_kinds=opts.glioma_kinds))
    from nnalign.data.brats_layout import find_cases
    from nnalign.data.convert_brats import convert_brats
    from nnalign.data.splits import protokd_split

    listed = set().union(*protokd_split().values())
    split = "protokd" if any(c.case_id in listed for c in find_cases(opts.data)) else "5fold"
    say(f"data: converting {opts.data} (split {split})")
    report = convert_brats(opts.data, opts.dataset_id, raw_root, name="DemoBraTS", split=split,
                           num_processes=opts.workers)
    if not (report.dataset_folder / "labelsTs").is_dir():
        hold_out(report.dataset_folder, HOLD_OUT_FRACTION)
    return report.dataset_folder


def hold_out(dataset_folder: Path, fraction: float) -> list[str]:
    """Move the last ``fraction`` of the labelled training cases to imagesTs/labelsTs (at least one)."""
    dataset_json = json.loads((dataset_folder / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    cases = sorted(p.name[: -len(ending)] for p in (dataset_folder / "labelsTr").glob(f"*{ending}"))
    if len(cases) < 2:
        raise NnalignError(f"{dataset_folder}: {len(cases)} labelled case; the demo needs at least 2")
    held = cases[-max(1, round(len(cases) * fraction)):]
    for sub in ("imagesTs", "labelsTs"):
        (dataset_folder / sub).mkdir(exist_ok=True)
    for case in held:
        shutil.move(dataset_folder / "labelsTr" / f"{case}{ending}", dataset_folder / "labelsTs" / f"{case}{ending}")
        for image in (dataset_folder / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"):
            shutil.move(image, dataset_folder / "imagesTs" / image.name)
    dataset_json["numTraining"] = len(cases) - len(held)
    (dataset_folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return held


def subset_inputs(dataset_folder: Path, subset: tuple[str, ...], target: Path) -> Path:
    """A folder of the held-out cases with only ``subset``'s files (links), in nnU-Net naming."""
    ending = json.loads((dataset_folder / "dataset.json").read_text())["file_ending"]
    target.mkdir(parents=True, exist_ok=True)
    for channel, modality in enumerate(BRATS_MODALITIES):
        if modality not in subset:
            continue
        for image in sorted((dataset_folder / "imagesTs").glob(f"*_{channel:04d}{ending}")):
            link = target / image.name
            if not link.exists():
                os.symlink(image.resolve(), link)
    return target


def train_command(dataset: str, device: str, epochs: int, iters_per_epoch: int) -> list[str]:
    """The experiment grid's ``nnalign_train`` (this interpreter) of ``dataset`` in the demo's configuration, fold 0, at
    the given length; the role's flags follow (:func:`nnalign.experiments.grid.student_flags` for a student)."""
    flags = grid.length_flags(TrainingLength(epochs, iters_per_epoch))
    return [sys.executable, "-m", *grid.train_command(dataset, CONFIGURATION, 0, device, flags)]


def predict_command(inputs: Path, predictions: Path, model: Path, device: str) -> list[str]:
    """The experiment grid's ``nnalign_predict`` (this interpreter) as the demo runs it: every file of ``inputs``,
    no test-time mirroring, nnU-Net's label values."""
    return [sys.executable, "-m", *grid.predict_command(inputs, predictions, model, device, "nnunet", tta=False)]


def run_demo(opts: DemoOptions, say: Callable[[str], None] = print) -> DemoResult:
    """Run (or resume) the demo and return where its outputs are."""
    from nnalign.evaluation.evaluate import evaluate
    from nnalign.paths import setup_env
    from nnalign.planning.plan_and_preprocess import plan_and_preprocess
    from nnalign.planning.status import missing_preprocessed
    from nnalign.reporting.report import build_report
    from nnalign.runs import StudentSpec

    folders = setup_env()
    os.environ.setdefault("nnUNet_n_proc_DA", str(opts.workers))
    raw_root, results_root = Path(folders["nnUNet_raw"]), Path(folders["nnUNet_results"])
    start = time.time()
    dataset_folder = _prepare_data(opts, raw_root, say)
    dataset = dataset_folder.name
    work = results_root / dataset / "nnalign_demo"
    preprocessed = Path(folders["nnUNet_preprocessed"]) / dataset
    if missing_preprocessed(dataset_folder, preprocessed, CONFIGURATION) != []:
        say(f"plan and preprocess ({CONFIGURATION})")
        plan_and_preprocess(opts.dataset_id, [CONFIGURATION], num_processes=opts.workers, warn=lambda m: say(f"  {m}"))
    teacher_dir = model_folder(results_root / dataset, TEACHER.trainer_name(), CONFIGURATION)
    teacher_command = train_command(dataset, opts.device, opts.teacher_epochs, opts.iters_per_epoch)
    models = [(teacher_dir, teacher_command + TEACHER.train_flags(),
               f"teacher P* (modality dropout {TEACHER.modality_dropout:g}, {TEACHER.subset_sampling})",
               opts.teacher_epochs)]
    for kd in (*opts.kd, "none"):
        name = StudentSpec(opts.student_modalities, kd, TEACHER).trainer_name()
        models.append((model_folder(results_root / dataset, name, CONFIGURATION),
                       train_command(dataset, opts.device, opts.student_epochs, opts.iters_per_epoch)
                       + student_flags(opts.student_modalities, kd, teacher_dir),
                       f"student {'+'.join(opts.student_modalities)} ({kd})", opts.student_epochs))
    for folder, command, what, epochs in models:
        if (fold_folder(folder, 0) / FINAL_CHECKPOINT).is_file():
            say(f"train {what}: done before")
            continue
        log = work / "logs" / f"{folder.name}.log"
        say(f"train {what}: {epochs} epochs x {opts.iters_per_epoch} iterations (log: {log})")
        _run(command, log, EpochLines(epochs, say))

    rows, warnings = [], []
    ending = json.loads((dataset_folder / "dataset.json").read_text())["file_ending"]
    regions = reference_regions(dataset_folder / "labelsTs", ending)
    for folder, _, what, _ in models:
        record = read_settings_record(fold_folder(folder, 0)) or {}
        if record.get("collapse_warning"):
            warnings.append(f"{what}: {record['collapse_warning']}")
        subsets = DEMO_SUBSETS if folder == teacher_dir else (opts.student_modalities,)
        for subset in subsets:
            tag = subset_tag(subset)
            inputs = subset_inputs(dataset_folder, subset, work / "inputs" / tag)
            predictions = work / "predictions" / folder.name / tag
            say(f"predict {tag} held-out cases with {what}")
            _run(predict_command(inputs, predictions, folder, opts.device),
                 work / "logs" / f"predict_{folder.name}_{tag}.log")
            metrics = results_root / dataset / "nnalign_evaluations" / folder.name / tag / "metrics.csv"
            report = evaluate(dataset_folder / "labelsTs", predictions, labels="nnunet", output=metrics,
                              progress=False)
            row, missed = score_row(what, subset, report.scores, regions)
            rows.append(row)
            warnings.extend(missed)
    say("report")
    report = build_report(results_root / dataset, tsne_cases=1)
    say(f"done in {(time.time() - start) / 60:.1f} min")
    return DemoResult(dataset, results_root / dataset, report.report_md, rows, warnings)


def parse_kd_methods(spec: str) -> tuple[str, ...]:
    """``'kdnet,pmkl'`` as distillation methods (lower case, in the order given, ``none`` left out: the demo always
    trains the no-distillation student); NnalignError for an unknown one."""
    from nnalign.losses.kd.registry import KD

    names = [m for m in spec.split(",") if m.strip()]
    if not names:
        raise NnalignError(f"--kd {spec!r}: no method (known: {', '.join(KD.names)})")
    try:
        methods = tuple(dict.fromkeys(KD.check(m) for m in names))
    except NnalignError as e:
        raise NnalignError(f"--kd {spec!r}: {e}") from None
    return tuple(m for m in methods if m != "none")


def rows_markdown(rows: list[dict]) -> str:
    """The demo's summary: held-out Dice per model and modality subset; per region the BraTS-convention mean over
    all cases and, after the slash, the mean over the n cases whose reference has the region."""
    from nnalign.data.labels import REGION_NAMES

    lines = ["| model | modalities | " + " | ".join(f"Dice {r} (all / with {r}, n)" for r in REGION_NAMES)
             + " | cases missed (WT/TC/ET) |", "|---|---|" + "---|" * (len(REGION_NAMES) + 1)]
    for r in rows:
        cells = [f"{r[f'Dice {g}']:.3f} / {r[f'Dice {g} with']:.3f} ({r[f'cases with {g}']})" for g in REGION_NAMES]
        missed = "/".join(str(r.get(f"missed {g}", 0)) for g in REGION_NAMES)
        lines.append(f"| {r['model']} | {r['modalities']} | " + " | ".join(cells) + f" | {missed} |")
    return "\n".join(lines)
