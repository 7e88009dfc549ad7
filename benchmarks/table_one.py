"""Table I as the paper measures it: per KD method and modality, the students of the P* teacher minus the same KD
method's students of the Original (unaligned, plain nnU-Net) teacher, several training runs each.

The paper's Table I "Imp." is that difference (+1.75 Dice points on average over its methods and single-modality
students). ``benchmarks/kd_repeats.py`` asks another question: each method's student against the no-distillation
student of one teacher. For each seed S this runs, each step skipped when its result exists (an interrupted series
resumes):

1. ``nnalign_demo --seed S --kd METHODS --modalities M1`` in ``WORK/seedS`` (kd_repeats' command): the data
   (synthetic cases of the seed, ``--test-cases N`` held out, or with ``--data`` a BraTS release with its split's test
   cases held out), the demo's P* teacher and run 1 of its M1 students (and of the no-distillation student, which the
   demo always trains; it is not part of this table), at the training lengths given here;
2. the Original teacher: ``nnalign_train ... --anchor original`` with the P* teacher's modality dropout, subset
   sampling and length, in the same results folder;
3. every student of both teachers, one per modality, KD method and run (run K > 1 in ``WORK/seedS/runK``, with copies
   of both teachers: a student loads its teacher from its own results folder);
4. prediction of the held-out cases from the student's modality, scored as the demo scores them.

Every scored run is one row of ``WORK/table_one.csv``. The table gives, per modality and method, the mean held-out Dice
(the average of WT, TC and ET, as the report's Table I) of the P* and the Original students and Imp., their difference
within each seed averaged over the seeds, with its 95% interval (Student's t on the spread between runs of one student,
pooled per modality); then per modality that spread and how many runs of each student would find the paper's +1.75
with 80% power. The interval holds the students' run-to-run spread with each seed's two teachers fixed; with two or
more seeds the per-seed Imp. and an interval from their spread, which holds the teachers' own spread too, follow::

    python benchmarks/table_one.py --work table_one         # 3 seeds x 3 runs; pmkl and kdnet; T1ce and FLAIR students
    python benchmarks/table_one.py --work table_real --seeds 1 2 --runs 2 \\
        --data ../shared/data/brats/BraTS2018 --teacher-epochs 15 --student-epochs 8 --iters-per-epoch 20
    python benchmarks/table_one.py --work table_one --table-only     # the table of what is scored so far
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import stdev
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_repeats import (PAPER_GAIN, _append_row, _call, _folders, _read_rows, demo_command,  # noqa: E402
                        paired_difference, predict_command, run_spread, runs_needed, t_quantile, train_command,
                        values_by_student)

if TYPE_CHECKING:
    from nnalign.demo import DemoOptions
    from nnalign.runs import AnyTeacher, BaselineSpec, TeacherSpec

FIELDS = ("seed", "run", "teacher", "modalities", "kd", "WT", "TC", "ET", "collapse_warning")
REGIONS = ("WT", "TC", "ET")
DEFAULT_KD = ("pmkl", "kdnet")
DEFAULT_MODALITIES = ("T1ce", "FLAIR")
P_STAR, ORIGINAL = "mixture", "original"
"""The two teachers of Table I by anchor, as ``table_one.csv``'s teacher column names them."""
COLUMN = {P_STAR: "P*", ORIGINAL: "Original"}


def original_of(teacher: TeacherSpec) -> BaselineSpec:
    """The Original (plain nnU-Net) teacher trained as ``teacher`` is: the same modality dropout and subset sampling
    (an Original teacher has no latents, encoder or alignment, so nothing else to match)."""
    from nnalign.runs import BaselineSpec

    return BaselineSpec(modality_dropout=teacher.modality_dropout, subset_sampling=teacher.subset_sampling)


def teachers() -> dict[str, AnyTeacher]:
    """Table I's teachers by anchor: the demo's P* teacher and the Original teacher trained the same way."""
    from nnalign.demo import demo_preset

    teacher = demo_preset().teachers[0].spec
    return {P_STAR: teacher, ORIGINAL: original_of(teacher)}


def teacher_command(dataset: str, teacher: AnyTeacher, demo: DemoOptions) -> list[str]:
    """``nnalign_train`` of one of Table I's teachers, as long as the demo's teacher."""
    return train_command(dataset, demo.device, demo.teacher_epochs, demo.iters_per_epoch, teacher.train_flags())


@dataclass(frozen=True)
class StudentRun:
    """One training run of one student of Table I: its teacher's anchor, modality, KD method, model folder and
    ``nnalign_train`` command (without ``--c``)."""

    teacher: str
    modality: str
    kd: str
    folder: Path
    command: list[str]


def student_runs(run_results: Path, methods: tuple[str, ...], modalities: tuple[str, ...],
                 demo: DemoOptions) -> list[StudentRun]:
    """Every student of one run whose models go to ``run_results`` (a dataset's results folder holding both teachers):
    per modality and method the P* teacher's student, then the Original teacher's."""
    from nnalign.demo import demo_preset
    from nnalign.experiments.grid import student_flags
    from nnalign.model_folders import model_folder
    from nnalign.runs import StudentSpec

    configuration = demo_preset().configuration
    runs = []
    for modality in modalities:
        for kd in methods:
            for anchor, teacher in teachers().items():
                teacher_dir = model_folder(run_results, teacher.trainer_name(), configuration)
                folder = model_folder(run_results, StudentSpec((modality,), kd, teacher).trainer_name(), configuration)
                command = train_command(run_results.name, demo.device, demo.student_epochs, demo.iters_per_epoch,
                                        student_flags((modality,), kd, teacher_dir))
                runs.append(StudentRun(anchor, modality, kd, folder, command))
    return runs


def _train(what: str, folder: Path, command: list[str], env: dict[str, str], log: Path) -> None:
    """Train a model (saying ``what``) unless its final checkpoint exists; continue (``--c``) from its latest one if
    there is one."""
    from nnalign.model_folders import FINAL_CHECKPOINT, fold_folder

    if (fold_folder(folder, 0) / FINAL_CHECKPOINT).is_file():
        return
    print(f"{what}: train", flush=True)
    resume = ["--c"] if (fold_folder(folder, 0) / "checkpoint_latest.pth").is_file() else []
    _call(command + resume, env, log)


def _demo_done(results: Path | None, methods: tuple[str, ...], first: str) -> bool:
    """Whether the demo of a seed trained its P* teacher and its run-1 students of modality ``first``."""
    from nnalign.demo import demo_preset
    from nnalign.model_folders import FINAL_CHECKPOINT, fold_folder, model_folder
    from nnalign.runs import StudentSpec

    if results is None:
        return False
    configuration, teacher = demo_preset().configuration, demo_preset().teachers[0].spec
    names = [teacher.trainer_name()] + [StudentSpec((first,), kd, teacher).trainer_name() for kd in (*methods, "none")]
    return all((fold_folder(model_folder(results, n, configuration), 0) / FINAL_CHECKPOINT).is_file() for n in names)


def prepare_seed(work: Path, seed: int, methods: tuple[str, ...], first: str,
                 demo: DemoOptions) -> tuple[dict[str, str], Path]:
    """Steps 1 and 2 for one seed, each skipped when done: the demo (data, P* teacher, run-1 students of modality
    ``first``) and the Original teacher. Returns nnU-Net's folders for the seed and its dataset's results folder."""
    from nnalign.demo import demo_preset
    from nnalign.model_folders import model_folder
    from nnalign.paths import dataset_folders

    seed_dir = work / f"seed{seed}"
    env = _folders(seed_dir)
    results_root = Path(env["nnUNet_results"])
    results = next(iter(dataset_folders(results_root, demo.dataset_id)), None)
    if not _demo_done(results, methods, first):
        print(f"seed {seed}: the demo (data, P* teacher, run 1 of its {first} students)", flush=True)
        _call(demo_command(seed, methods, (first,), demo), env, seed_dir / "demo.log")
        results = dataset_folders(results_root, demo.dataset_id)[0]
    original = teachers()[ORIGINAL]
    folder = model_folder(results, original.trainer_name(), demo_preset().configuration)
    _train(f"seed {seed}: the Original teacher", folder,
           teacher_command(results.name, original, demo), env, results / "table_one_logs" / "train_original.log")
    return env, results


def run_seed(work: Path, seed: int, runs: int, methods: tuple[str, ...], modalities: tuple[str, ...],
             scores_csv: Path, demo: DemoOptions) -> None:
    """Train, predict and score every missing (run, teacher, modality, method) of one seed, appending each to
    ``scores_csv``."""
    from nnalign.demo import demo_preset, reference_regions, score_row
    from nnalign.evaluation.evaluate import evaluate
    from nnalign.model_folders import fold_folder, model_folder
    from nnalign.training.record import read_settings_record

    done = {(int(r["seed"]), int(r["run"]), r["teacher"], r["modalities"], r["kd"]) for r in _read_rows(scores_csv)}
    wanted = [(seed, run, anchor, m, kd) for run in range(1, runs + 1) for m in modalities for kd in methods
              for anchor in COLUMN]
    if all(key in done for key in wanted):
        return
    seed_dir = work / f"seed{seed}"
    env, results = prepare_seed(work, seed, methods, modalities[0], demo)
    configuration = demo_preset().configuration
    raw = Path(env["nnUNet_raw"]) / results.name
    ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
    regions = reference_regions(raw / "labelsTs", ending)
    for run in range(1, runs + 1):
        run_results = results if run == 1 else seed_dir / f"run{run}" / results.name
        for teacher in teachers().values():  # a student loads its teacher from its own results folder
            teacher_dir = model_folder(results, teacher.trainer_name(), configuration)
            if not (run_results / teacher_dir.name).is_dir():
                shutil.copytree(teacher_dir, run_results / teacher_dir.name)
        for student in student_runs(run_results, methods, modalities, demo):
            if (seed, run, student.teacher, student.modality, student.kd) in done:
                continue
            what = f"seed {seed}, run {run}: the {student.modality} {student.kd} student of {COLUMN[student.teacher]}"
            logs = run_results / "table_one_logs"
            _train(what, student.folder, student.command, {**env, "nnUNet_results": str(run_results.parent)},
                   logs / f"train_{student.folder.name}.log")
            predictions = run_results / "table_one_predictions" / student.folder.name
            if len(list(predictions.glob(f"*{ending}"))) < len(regions):
                _call(predict_command(raw, (student.modality,), predictions, student.folder, demo.device), env,
                      logs / f"predict_{student.folder.name}.log")
            report = evaluate(raw / "labelsTs", predictions, labels="nnunet", output=None, progress=False)
            row, _ = score_row(student.kd, (student.modality,), report.scores, regions)
            record = read_settings_record(fold_folder(student.folder, 0)) or {}
            _append_row(scores_csv, {"seed": seed, "run": run, "teacher": student.teacher,
                                     "modalities": student.modality, "kd": student.kd,
                                     **{r: f"{row[f'Dice {r} with']:.4f}" for r in REGIONS},
                                     "collapse_warning": record.get("collapse_warning") or ""}, FIELDS)
            print(f"{what}: held-out Dice WT / TC / ET "
                  + " / ".join(f"{row[f'Dice {r} with']:.3f}" for r in REGIONS), flush=True)


def _student(row: dict) -> str:
    """A ``table_one.csv`` row's student: teacher anchor, modality and KD method."""
    return f"{row['teacher']} {row['modalities']} {row['kd']}"


def _average(row: dict) -> float:
    """The row's held-out Dice averaged over WT, TC and ET (the report's Table I value)."""
    return sum(float(row[r]) for r in REGIONS) / len(REGIONS)


def _region(name: str):
    return lambda row: float(row[name])


def _points(value: float) -> str:
    """A Dice difference as signed Dice points (percent)."""
    return f"{100 * value:+.2f}"


def summary(rows: list[dict], methods: tuple[str, ...], modalities: tuple[str, ...]) -> str:
    """Table I from the scored runs: per modality and method the mean Dice (%) of the P* and Original students over all
    their runs and Imp. with its 95% interval; then per modality the run spread and the runs each student needs for
    the paper's gain; then, with two or more seeds, the per-seed Imp. and an interval from their spread."""
    lines = ["| modality | KD | seeds | runs P* / Original | P* Avg Dice | Original Avg Dice | "
             "Imp. Avg (95% interval) | Imp. WT / TC / ET |", "|---|---|---|---|---|---|---|---|"]
    notes, per_seed = [], []
    for modality in modalities:
        mine = [r for r in rows if r["modalities"] == modality]
        sd, dof = run_spread(mine, _student, _average)
        groups = values_by_student(mine, _student, _average)
        for kd in methods:
            ours, theirs = f"{P_STAR} {modality} {kd}", f"{ORIGINAL} {modality} {kd}"
            got = {a: [v for (_, k), vs in groups.items() if k == key for v in vs]
                   for a, key in ((P_STAR, ours), (ORIGINAL, theirs))}
            if not got[P_STAR] and not got[ORIGINAL]:
                continue
            means = {a: f"{100 * sum(v) / len(v):.2f}" if v else "" for a, v in got.items()}
            diff, se, seeds = paired_difference(groups, ours, theirs, sd)
            imp, by_region = "", ""
            if seeds:
                imp = _points(diff)
                if dof:
                    t = t_quantile(0.975, dof)
                    imp += f" ({_points(diff - t * se)} to {_points(diff + t * se)})"
                by_region = " / ".join(
                    _points(paired_difference(values_by_student(mine, _student, _region(r)), ours, theirs, sd)[0])
                    for r in REGIONS)
                seed_diffs = [paired_difference({k: v for k, v in groups.items() if k[0] == s}, ours, theirs, sd)[0]
                              for s in sorted({s for s, _ in groups})]
                seed_diffs = [d for d in seed_diffs if not math.isnan(d)]
                if len(seed_diffs) > 1:
                    mean, spread = sum(seed_diffs) / len(seed_diffs), stdev(seed_diffs)
                    half = t_quantile(0.975, len(seed_diffs) - 1) * spread / math.sqrt(len(seed_diffs))
                    per_seed.append(f"{modality} {kd}: Imp. per seed " + ", ".join(map(_points, seed_diffs))
                                    + f"; from their spread {_points(mean)} ({_points(mean - half)} to "
                                      f"{_points(mean + half)})")
            lines.append(f"| {modality} | {kd} | {seeds} | {len(got[P_STAR])} / {len(got[ORIGINAL])} | "
                         f"{means[P_STAR]} | {means[ORIGINAL]} | {imp} | {by_region} |")
        if dof:
            notes.append(f"{modality}: spread between runs of one student SD {100 * sd:.2f} Dice points (Avg; pooled, "
                         f"{dof} degrees of freedom); the paper's +{100 * PAPER_GAIN:g} is found with 80% power at the "
                         f"5% level by {runs_needed(sd, PAPER_GAIN)} runs of each student (all seeds together)")
    lines += ["", "Imp.: the P* teacher's student minus the Original teacher's (same KD method and modality), within "
                  "each seed, averaged over the seeds; Dice points. The interval holds the students' run-to-run "
                  "spread with each seed's teachers fixed.", *notes]
    if per_seed:
        lines += ["Over the seeds (the interval from the spread of the per-seed Imp., which holds the teachers' "
                  "run-to-run spread too):", *per_seed]
    warned = sorted({_student(r) for r in rows if r["collapse_warning"]})
    if warned:
        lines.append("collapse warnings: " + ", ".join(warned))
    return "\n".join(lines)


def series_parser(description: str, work_help: str) -> argparse.ArgumentParser:
    """The options of a series over Table I's seeds (this script's and those sharing its folder): ``--work``,
    ``--seeds``, ``--kd``, ``--modalities``, the demo's data and lengths, ``--table-only``."""
    from nnalign.cli.demo import add_data_and_length_arguments

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--work", type=Path, required=True, help=work_help)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--kd", default=",".join(DEFAULT_KD), help="distillation methods (default: %(default)s)")
    p.add_argument("--modalities", default=",".join(DEFAULT_MODALITIES),
                   help="the students' modalities, one single-modality student each (default: %(default)s)")
    add_data_and_length_arguments(p)
    p.add_argument("--table-only", action="store_true", help="print the table of the rows scored so far")
    return p


def series_options(args: argparse.Namespace) -> tuple[Path, tuple[str, ...], tuple[str, ...], DemoOptions]:
    """From :func:`series_parser`'s arguments: the work folder (made), KD methods, modalities and demo options."""
    from nnalign.cli.demo import data_and_length_options
    from nnalign.demo import DemoOptions, parse_kd_methods
    from nnalign.modalities import parse_modalities

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    demo = DemoOptions(**{**data_and_length_options(args), "data": args.data and args.data.resolve()})
    return work, parse_kd_methods(args.kd), parse_modalities(args.modalities), demo


def main() -> None:
    p = series_parser(__doc__.split("\n\n")[0], "folder of the runs and of table_one.csv (resumable)")
    p.add_argument("--runs", type=int, default=3, help="training runs per student and seed (default: %(default)s)")
    args = p.parse_args()
    work, methods, modalities, demo = series_options(args)
    scores_csv = work / "table_one.csv"
    if not args.table_only:
        for seed in args.seeds:
            run_seed(work, seed, args.runs, methods, modalities, scores_csv, demo)
    print(summary(_read_rows(scores_csv), methods, modalities))


if __name__ == "__main__":
    main()
