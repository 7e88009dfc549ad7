"""The end-to-end demo: its data (synthetic cases, or a BraTS release with some cases held out), then the shipped
experiment preset ``demo`` (plan and preprocess -> teacher -> students -> prediction of the held-out cases with
missing modalities -> evaluation -> report) run as ``nnalign_experiment run`` runs a grid (:mod:`nnalign.experiments`:
the same commands, each run skipped when its result exists, so an interrupted demo resumes), then its summary: the
held-out Dice per model and modality subset, and any model that collapsed.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from nnalign.errors import NnalignError
from nnalign.experiments.spec import ExperimentSpec, Students, read_spec
from nnalign.model_folders import EVALUATION_FILE, evaluation_folder, fold_folder, model_folder
from nnalign.runs import StudentSpec, TrainingLength
from nnalign.training.record import read_settings_record

if TYPE_CHECKING:
    from nnalign.experiments.grid import Grid
    from nnalign.experiments.state import StateStore

DEMO_PRESET = "demo"
"""The preset the demo runs (``nnalign/experiments/presets/demo.toml``): dataset ID, configuration, teacher, students,
training lengths, the subsets each model is evaluated on, the report."""
HOLD_OUT_FRACTION = 0.2


@functools.cache
def demo_preset() -> ExperimentSpec:
    """The preset :data:`DEMO_PRESET`, read once."""
    return read_spec(DEMO_PRESET)


def _preset(value: Callable[[ExperimentSpec], Any]) -> Any:
    """A DemoOptions field whose default is ``value`` of the demo's preset."""
    return field(default_factory=lambda: value(demo_preset()))


@dataclass
class DemoOptions:
    """What the demo trains and on which data; dataset ID, lengths, students and device by default the preset's (short
    runs that show the pipeline on 2 CPU cores; the segmentation quality needs longer training, e.g. 50 epochs each,
    or a GPU)."""

    dataset_id: int = _preset(lambda p: p.dataset_id)
    data: Path | None = None
    cases: int = 8
    test_cases: int = 3
    shape: tuple[int, int, int] = (64, 64, 64)
    seed: int = 0
    min_rim_mm: float = 4.0
    glioma_kinds: tuple[str, ...] = ("ring",)
    """Ring-enhancing gliomas only: 8 training cases are too few to learn the rarer solid and non-enhancing kinds, and
    a held-out glioma of a kind no training case shows would test the data, not the method."""
    teacher_epochs: int = _preset(lambda p: p.teacher_length.epochs)
    student_epochs: int = _preset(lambda p: p.student_length.epochs)
    iters_per_epoch: int = _preset(lambda p: p.teacher_length.iters_per_epoch)
    kd: tuple[str, ...] = _preset(lambda p: tuple(k for k in p.students[0].kd if k != "none"))
    student_modalities: tuple[str, ...] = _preset(lambda p: p.students[0].subsets[0])
    device: str = _preset(lambda p: p.device)


def demo_spec(opts: DemoOptions) -> ExperimentSpec:
    """The demo's preset with ``opts``' dataset, device, training lengths and students (each KD method and ``none``,
    of the preset's teacher); a ``nnUNet_n_proc_DA`` of the environment wins over the preset's data workers."""
    preset = demo_preset()
    students = Students((opts.student_modalities,), tuple(dict.fromkeys((*opts.kd, "none"))),
                        (preset.teachers[0].label,))
    return replace(preset, dataset_id=opts.dataset_id, device=opts.device, students=(students,),
                   teacher_length=TrainingLength(opts.teacher_epochs, opts.iters_per_epoch),
                   student_length=TrainingLength(opts.student_epochs, opts.iters_per_epoch),
                   data_workers=None if "nnUNet_n_proc_DA" in os.environ else preset.data_workers)


@dataclass(frozen=True)
class DemoModel:
    """A model of the demo: its folder, its name in the summary, the subsets it is evaluated on, its epochs."""

    folder: Path
    what: str
    subsets: tuple[tuple[str, ...], ...]
    epochs: int


def demo_models(spec: ExperimentSpec, results: Path) -> list[DemoModel]:
    """The teacher, then each student, of the demo's ``spec`` with model folders in ``results``."""
    teacher = spec.teachers[0]
    models = [DemoModel(model_folder(results, teacher.spec.trainer_name(), spec.configuration),
                        f"teacher {teacher.label} (modality dropout {teacher.spec.modality_dropout:g}, "
                        f"{teacher.spec.subset_sampling})", spec.evaluate.teacher_subsets, spec.teacher_length.epochs)]
    for block in spec.students:
        for subset in block.subsets:
            for kd in block.kd:
                name = StudentSpec(subset, kd, teacher.spec).trainer_name()
                models.append(DemoModel(model_folder(results, name, spec.configuration),
                                        f"student {'+'.join(subset)} ({kd})", (subset,), spec.student_length.epochs))
    return models


def evaluation_scores(results: Path, model: Path, subset: tuple[str, ...]) -> dict[str, dict]:
    """``{case: scores}`` of the held-out evaluation of the model folder ``model`` from ``subset`` alone."""
    path = evaluation_folder(results, model.name, subset) / EVALUATION_FILE
    return json.loads(path.read_text())["cases"]


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


def _prepare_data(opts: DemoOptions, raw_root: Path, processes: int, say: Callable[[str], None]) -> Path:
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
                           num_processes=processes)
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


class TrainingLogs:
    """The logs of a grid's trainings followed while they run (``watch`` of :func:`nnalign.experiments.local.run_local`):
    one line per epoch each (:class:`EpochLines`), from what the log holds beyond what earlier attempts wrote."""

    def __init__(self, grid: Grid, store: StateStore, models: list[DemoModel], say: Callable[[str], None]):
        epochs = {fold_folder(m.folder, fold): m.epochs for m in models for fold in grid.spec.folds}
        self.store = store
        self.lines = {k: EpochLines(epochs[s.folder], say) for k, s in grid.steps.items() if s.kind == "train"}
        self.offsets = {k: store.log(k).stat().st_size if store.log(k).is_file() else 0 for k in self.lines}

    def __call__(self, keys: list[str]) -> None:
        """Say the epochs that the trainings among ``keys`` finished since the last call."""
        for key in (k for k in keys if k in self.lines):
            with open(self.store.log(key), "rb") as f:
                f.seek(self.offsets[key])
                new = f.read()
            new = new[: new.rfind(b"\n") + 1]  # whole lines; the rest is read once it ends
            self.offsets[key] += len(new)
            for line in new.decode(errors="replace").splitlines():
                self.lines[key].feed(line)


def run_demo(opts: DemoOptions, say: Callable[[str], None] = print) -> DemoResult:
    """Make the data if needed, run (or resume) the demo's grid and return where its outputs are, with the scores."""
    from nnalign.experiments.grid import build_grid
    from nnalign.experiments.local import run_local
    from nnalign.experiments.slurm import alive_checker
    from nnalign.experiments.state import StateStore, resolve_states
    from nnalign.paths import setup_env

    folders = setup_env()
    start = time.time()
    spec = demo_spec(opts)
    dataset_folder = _prepare_data(opts, Path(folders["nnUNet_raw"]), spec.processes, say)
    grid = build_grid(spec)
    store = StateStore(grid.state_dir)
    models = demo_models(spec, grid.results)
    teacher, student = spec.teacher_length, spec.student_length
    say(f"training: the teacher {teacher.epochs} epochs x {teacher.iters_per_epoch} iterations, each student "
        f"{student.epochs} x {student.iters_per_epoch} (state and logs: {grid.state_dir})")
    for key, state in resolve_states(grid, store, alive_checker()).items():
        if state.state == "done":
            say(f"{grid.steps[key].title}: done before")
    failed = run_local(grid, store, 1, alive_checker, say, TrainingLogs(grid, store, models, say))
    if failed:
        error = (store.read(failed[0]) or {}).get("error") or "see its log"
        raise NnalignError(f"{grid.steps[failed[0]].title} failed: {error} (log: {store.log(failed[0])}); run "
                           f"nnalign_demo again to retry")

    rows, warnings = [], []
    ending = json.loads((dataset_folder / "dataset.json").read_text())["file_ending"]
    regions = reference_regions(dataset_folder / "labelsTs", ending)
    for model in models:
        record = read_settings_record(fold_folder(model.folder, spec.folds[0])) or {}
        if record.get("collapse_warning"):
            warnings.append(f"{model.what}: {record['collapse_warning']}")
        for subset in model.subsets:
            row, missed = score_row(model.what, subset, evaluation_scores(grid.results, model.folder, subset), regions)
            rows.append(row)
            warnings.extend(missed)
    say(f"done in {(time.time() - start) / 60:.1f} min")
    return DemoResult(grid.dataset, grid.results, grid.report_md, rows, warnings)


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
