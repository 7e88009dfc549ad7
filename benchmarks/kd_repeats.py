"""KD against no distillation, beyond run-to-run noise: the demo's T1ce students, several training runs per method and
seed, each method's student against the no-distillation student of the same teacher.

This is not the paper's Table I gain, which compares the students of two teachers (P* minus Original, the same KD
method): that is ``benchmarks/table_one.py``.

One student run of the demo's length varies by more than the effect looked for (results.md, section 4), so a
single run per seed cannot say whether a method is at, above or below the no-distillation student. For each seed S
this runs, each step skipped when its result exists (an interrupted run resumes):

1. ``nnalign_demo --seed S --kd METHODS`` in ``WORK/seedS``: the synthetic data (``--test-cases N`` held-out cases)
   or, with ``--data``, a BraTS release converted with its split's test cases held out; the demo's teacher and the
   first run of every student (``none`` included), with the training lengths given here;
2. runs 2..R of every student, each from a copy of that same teacher in its own results folder ``WORK/seedS/runK``
   (a student loads its teacher from its own results folder);
3. prediction of the held-out cases from the student's modalities, scored as the demo scores them.

Every scored run is one row of ``WORK/scores.csv``. At the end it prints, per seed and method, the held-out WT (mean
over the runs, with their range), TC and ET, and the ratio of the method's mean WT to the no-distillation student's
(the issue's check: at least 0.9 in every seed). Then what the runs can resolve: the spread of one run's WT between
runs of the same student, each method's WT difference to ``none`` (KD vs no distillation) with its 95% interval, and
how many runs of each student would find a KD-vs-none difference as large as the paper's Table I gain (+1.75 Dice
points, another quantity) with 80% power (the interval is Student's t on the pooled spread; each student's own
spread is printed too, as distillation can steady a student's runs)::

    python benchmarks/kd_repeats.py --work kd_repeats --seeds 1 2 3 --runs 3 --kd kdnet,pmkl,protokd,smunet
    python benchmarks/kd_repeats.py --work kd_repeats --seeds 2 --runs 10 --kd pmkl --test-cases 20
    python benchmarks/kd_repeats.py --work kd_real --seeds 1 --runs 8 --kd pmkl \
        --data ../shared/data/brats/BraTS2018 --teacher-epochs 15 --student-epochs 8 --iters-per-epoch 20
    python benchmarks/kd_repeats.py --work kd_repeats --table-only    # the table of what is scored so far
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from nnalign.demo import DemoOptions

FIELDS = ("seed", "run", "kd", "WT", "TC", "ET", "collapse_warning")
CHECK_RATIO = 0.9
PAPER_GAIN = 0.0175
"""Table I's average "Imp." as a fraction of Dice: single-modality students of the P*-aligned teacher minus the same KD
method's students of the Original (unaligned) teacher, averaged over methods and modalities (+1.75 Dice points)."""


def _folders(seed_dir: Path) -> dict[str, str]:
    from nnalign.paths import DEFAULT_FOLDERS

    return {var: str(seed_dir / sub) for var, sub in DEFAULT_FOLDERS.items()}


def _call(command: list[str], env: dict[str, str], log: Path) -> None:
    """Run one nnalign command with nnU-Net's folders from ``env``; a failure stops the benchmark naming its log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT,
                               env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
    if code != 0:
        sys.exit(f"{Path(sys.argv[0]).stem}: {' '.join(command[2:6])} failed (exit {code}); see {log}")


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _append_row(path: Path, row: dict, fields: tuple[str, ...] = FIELDS) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def demo_command(seed: int, methods: tuple[str, ...], subset: tuple[str, ...], demo: DemoOptions) -> list[str]:
    """The ``nnalign_demo`` call that makes a seed's data (or converts ``demo.data``), teacher and first students."""
    command = [sys.executable, "-m", "nnalign.cli.demo", "--seed", str(seed), "--kd", ",".join(methods),
               "--modalities", ",".join(subset), "--teacher-epochs", str(demo.teacher_epochs),
               "--student-epochs", str(demo.student_epochs), "--iters-per-epoch", str(demo.iters_per_epoch),
               "-device", "cpu"]
    if demo.data is None:
        return [*command, "--test-cases", str(demo.test_cases)]
    return [*command, "--data", str(demo.data)]


def train_command(dataset: str, device: str, epochs: int, iters_per_epoch: int, flags: list[str]) -> list[str]:
    """The experiment grid's ``nnalign_train`` (this interpreter) of ``dataset``, fold 0, in the demo's configuration,
    at the given length, with the role's ``flags`` (:func:`nnalign.experiments.grid.student_flags` for a student)."""
    from nnalign.demo import demo_preset
    from nnalign.experiments import grid
    from nnalign.runs import TrainingLength

    length = grid.length_flags(TrainingLength(epochs, iters_per_epoch))
    return [sys.executable, "-m", *grid.train_command(dataset, demo_preset().configuration, 0, device,
                                                      [*length, *flags])]


def predict_command(raw: Path, subset: tuple[str, ...], predictions: Path, model: Path, device: str) -> list[str]:
    """The experiment grid's ``nnalign_predict`` (this interpreter) of the held-out cases of the raw dataset folder
    ``raw`` from ``subset`` alone, as the demo's evaluations run it."""
    from nnalign.demo import demo_preset
    from nnalign.experiments import grid

    spec = demo_preset()
    return [sys.executable, "-m", *grid.predict_command(raw / "imagesTs", predictions, model, device,
                                                        spec.evaluate.label_convention, spec.evaluate.tta, spec.folds,
                                                        subset)]


def run_seed(work: Path, seed: int, runs: int, methods: tuple[str, ...], subset: tuple[str, ...],
             scores_csv: Path, demo: DemoOptions | None = None) -> None:
    """Train, predict and score every missing (run, method) of one seed, appending each to ``scores_csv``; ``demo``
    says the data (synthetic cases of the seed, or a BraTS release) and the training lengths (default: the demo's)."""
    from nnalign.demo import DemoOptions, demo_preset, evaluation_scores, reference_regions, score_row
    from nnalign.evaluation.evaluate import evaluate
    from nnalign.experiments.grid import student_flags
    from nnalign.model_folders import FINAL_CHECKPOINT, fold_folder, model_folder
    from nnalign.paths import dataset_folders
    from nnalign.runs import StudentSpec
    from nnalign.training.record import read_settings_record

    done = {(int(r["seed"]), int(r["run"]), r["kd"]) for r in _read_rows(scores_csv)}
    kds = (*methods, "none")
    if all((seed, run, kd) in done for run in range(1, runs + 1) for kd in kds):
        return
    seed_dir = work / f"seed{seed}"
    env = _folders(seed_dir)
    demo = demo or DemoOptions()
    if not all((seed, 1, kd) in done for kd in kds):
        print(f"seed {seed}: the demo (data, teacher, run 1 of every student)", flush=True)
        _call(demo_command(seed, methods, subset, demo), env, seed_dir / "demo.log")
    results = dataset_folders(env["nnUNet_results"], demo.dataset_id)[0]
    raw = Path(env["nnUNet_raw"]) / results.name
    ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
    regions = reference_regions(raw / "labelsTs", ending)
    configuration, teacher = demo_preset().configuration, demo_preset().teachers[0].spec
    teacher_dir = model_folder(results, teacher.trainer_name(), configuration)
    for run in range(1, runs + 1):
        run_results = results if run == 1 else seed_dir / f"run{run}" / results.name
        for kd in kds:
            if (seed, run, kd) in done:
                continue
            folder = model_folder(run_results, StudentSpec(subset, kd, teacher).trainer_name(), configuration)
            if run == 1:
                scores = evaluation_scores(results, folder, subset)  # the demo's evaluation
            else:
                predictions = run_results / "predictions" / folder.name
                logs = run_results / "logs"
                run_teacher = run_results / teacher_dir.name  # the student loads its teacher from its results folder
                if not run_teacher.is_dir():
                    shutil.copytree(teacher_dir, run_teacher)
                if not (fold_folder(folder, 0) / FINAL_CHECKPOINT).is_file():
                    print(f"seed {seed}, run {run}: train the {kd} student", flush=True)
                    resume = ["--c"] if (fold_folder(folder, 0) / "checkpoint_latest.pth").is_file() else []
                    _call(train_command(results.name, "cpu", demo.student_epochs, demo.iters_per_epoch,
                                        student_flags(subset, kd, run_teacher) + resume),
                          {**env, "nnUNet_results": str(run_results.parent)}, logs / f"train_{kd}.log")
                if not predictions.is_dir():
                    _call(predict_command(raw, subset, predictions, folder, "cpu"), env, logs / f"predict_{kd}.log")
                scores = evaluate(raw / "labelsTs", predictions, labels="nnunet", output=None, progress=False).scores
            row, _ = score_row(kd, subset, scores, regions)
            record = read_settings_record(fold_folder(folder, 0)) or {}
            _append_row(scores_csv, {"seed": seed, "run": run, "kd": kd,
                                     **{r: f"{row[f'Dice {r} with']:.4f}" for r in ("WT", "TC", "ET")},
                                     "collapse_warning": record.get("collapse_warning") or ""})
            print(f"seed {seed}, run {run}, {kd}: held-out WT {row['Dice WT with']:.3f}", flush=True)


def summary(rows: list[dict], methods: tuple[str, ...]) -> str:
    """The markdown table: per seed and method the mean held-out Dice over the runs (WT with its range) and the ratio of
    mean WT to the no-distillation student's; then, per method, in how many seeds that ratio is >= 0.9."""
    lines = ["| seed | student | runs | WT mean (min-max) | TC | ET | WT / none | collapse warnings |",
             "|---|---|---|---|---|---|---|---|"]
    passed: dict[str, list[bool]] = {m: [] for m in methods}
    for seed in sorted({int(r["seed"]) for r in rows}):
        by_kd = {kd: [r for r in rows if int(r["seed"]) == seed and r["kd"] == kd] for kd in (*methods, "none")}
        if not by_kd["none"]:
            continue
        none_wt = sum(float(r["WT"]) for r in by_kd["none"]) / len(by_kd["none"])
        for kd in ("none", *methods):
            got = by_kd[kd]
            if not got:
                continue
            mean = {g: sum(float(r[g]) for r in got) / len(got) for g in ("WT", "TC", "ET")}
            wts = [float(r["WT"]) for r in got]
            ratio = mean["WT"] / none_wt if none_wt > 0 else float("nan")
            if kd != "none":
                passed[kd].append(ratio >= CHECK_RATIO)
            warned = sum(1 for r in got if r["collapse_warning"])
            lines.append(f"| {seed} | {kd} | {len(got)} | {mean['WT']:.3f} ({min(wts):.3f}-{max(wts):.3f}) | "
                         f"{mean['TC']:.3f} | {mean['ET']:.3f} | {ratio:.2f} | {warned} |")
    lines.append("")
    for kd, ok in passed.items():
        lines.append(f"{kd}: mean WT at least {CHECK_RATIO} of none's in {sum(ok)} of {len(ok)} seeds")
    sd, dof = run_spread(rows)
    if dof == 0:
        return "\n".join(lines)
    lines.append(f"spread between runs of one student: SD {sd:.3f} of held-out WT (pooled, {dof} degrees of freedom)")
    lines.append("each student's own spread: " + ", ".join(
        f"seed {seed} {kd} {spread:.3f} ({n} runs)" for (seed, kd), (spread, n) in student_spreads(rows).items()))
    t = t_quantile(0.975, dof)
    lines.append("KD vs no distillation (each method's student minus the no-distillation student of the same teacher; "
                 "not the paper's Table I gain, P* students minus Original students: benchmarks/table_one.py):")
    for kd in methods:
        diff, se, seeds = difference_to_none(rows, kd, sd)
        if seeds:
            lines.append(f"{kd}: WT minus none's {diff:+.3f} (95% interval {diff - t * se:+.3f} to "
                         f"{diff + t * se:+.3f}) over {seeds} seed{'s' * (seeds > 1)}")
    lines.append(f"a KD-vs-none difference of {PAPER_GAIN} WT (as large as the paper's Table I gain, another "
                 f"quantity) is found with 80% power at the 5% level by {runs_needed(sd, PAPER_GAIN)} runs of each "
                 f"student (all seeds together)")
    return "\n".join(lines)


def _kd(row: dict) -> str:
    """The student of a ``scores.csv`` row: its KD method (one teacher and modality subset per seed)."""
    return row["kd"]


def _wt(row: dict) -> float:
    """The held-out WT Dice of a ``scores.csv`` row."""
    return float(row["WT"])


def values_by_student(rows: list[dict], student: Callable[[dict], str] = _kd,
                      value: Callable[[dict], float] = _wt) -> dict[tuple[int, str], list[float]]:
    """``value`` (default: held-out WT) of every run, per (seed, ``student``) (default: the KD method)."""
    groups: dict[tuple[int, str], list[float]] = {}
    for r in rows:
        groups.setdefault((int(r["seed"]), student(r)), []).append(value(r))
    return groups


def _squared_deviations(values: list[float]) -> float:
    """The sum of squared deviations of ``values`` from their mean."""
    mean = sum(values) / len(values)
    return sum((x - mean) ** 2 for x in values)


def run_spread(rows: list[dict], student: Callable[[dict], str] = _kd,
               value: Callable[[dict], float] = _wt) -> tuple[float, int]:
    """The standard deviation of one run's ``value`` (default: held-out WT) between runs of the same student and seed,
    pooled over every (seed, student) with two or more runs, and its degrees of freedom (0, with a NaN SD, when no
    student has two)."""
    groups = values_by_student(rows, student, value).values()
    squares = sum(_squared_deviations(v) for v in groups)
    dof = sum(len(v) - 1 for v in groups)
    return (math.sqrt(squares / dof) if dof else float("nan")), dof


def student_spreads(rows: list[dict], student: Callable[[dict], str] = _kd,
                    value: Callable[[dict], float] = _wt) -> dict[tuple[int, str], tuple[float, int]]:
    """The standard deviation of ``value`` (default: held-out WT) between the runs of each (seed, student) that has
    two or more runs, and its number of runs: where a method steadies training, its spread is smaller than
    ``none``'s."""
    return {key: (math.sqrt(_squared_deviations(v) / (len(v) - 1)), len(v))
            for key, v in sorted(values_by_student(rows, student, value).items()) if len(v) > 1}


def t_quantile(probability: float, dof: int) -> float:
    """Student's t quantile: the interval of a difference whose standard error comes from a spread estimated with
    ``dof`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(probability, dof))


def paired_difference(groups: dict[tuple[int, str], list[float]], ours: str, reference: str,
                      sd: float) -> tuple[float, float, int]:
    """Student ``ours``'s mean minus student ``reference``'s, within each seed of ``groups`` that has both, averaged
    over those seeds; its standard error from the pooled run spread ``sd``; and the number of seeds."""
    seeds = sorted(s for s, k in groups if k == ours and (s, reference) in groups)
    if not seeds:
        return float("nan"), float("nan"), 0
    diffs, variances = [], []
    for s in seeds:
        a, b = groups[(s, ours)], groups[(s, reference)]
        diffs.append(sum(a) / len(a) - sum(b) / len(b))
        variances.append(sd ** 2 * (1 / len(a) + 1 / len(b)))
    return sum(diffs) / len(seeds), math.sqrt(sum(variances)) / len(seeds), len(seeds)


def difference_to_none(rows: list[dict], kd: str, sd: float) -> tuple[float, float, int]:
    """The method's mean WT minus the no-distillation student's, within each seed that has both, averaged over those
    seeds; its standard error from the pooled run spread ``sd``; and the number of seeds."""
    return paired_difference(values_by_student(rows), kd, "none", sd)


def runs_needed(sd: float, gain: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Runs of each of two students that a two-sided test at level ``alpha`` needs to find a WT difference of ``gain``
    with probability ``power``, when one run's WT has standard deviation ``sd`` (normal approximation)."""
    z = NormalDist().inv_cdf
    return math.ceil(2 * (z(1 - alpha / 2) + z(power)) ** 2 * sd ** 2 / gain ** 2)


def main() -> None:
    from nnalign.cli.demo import add_data_and_length_arguments, data_and_length_options
    from nnalign.demo import DemoOptions, parse_kd_methods

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder of the runs and of scores.csv (resumable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--runs", type=int, default=3, help="training runs per student and seed (default: %(default)s)")
    p.add_argument("--kd", default="kdnet,pmkl,protokd,smunet", help="distillation methods (default: %(default)s)")
    p.add_argument("--modalities", default="T1ce", help="the students' modalities (default: %(default)s)")
    add_data_and_length_arguments(p)
    p.add_argument("--table-only", action="store_true", help="print the table of the rows scored so far")
    args = p.parse_args()
    from nnalign.modalities import parse_modalities

    methods = parse_kd_methods(args.kd)
    subset = parse_modalities(args.modalities)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    scores_csv = work / "scores.csv"
    demo = DemoOptions(**{**data_and_length_options(args), "data": args.data and args.data.resolve()})
    if not args.table_only:
        for seed in args.seeds:
            run_seed(work, seed, args.runs, methods, subset, scores_csv, demo)
    print(summary(_read_rows(scores_csv), methods))


if __name__ == "__main__":
    main()
