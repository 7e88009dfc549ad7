"""Training on a dataset whose cases really lack sequences: the P* teacher trained on every case (absent sequences
filled by its anchor) against the same teacher trained on the complete cases only and against the plain nnU-Net
baseline trained on every case with the absent channels zeroed.

Per seed S, each step skipped when its result exists (an interrupted series resumes):

1. the data: ``--cases`` synthetic training cases of seed S (the demo's kind: 64^3, ring gliomas, rims of 4 mm or
   more) of which ``--missing-fraction`` lack sequences (``nnalign_synth --missing-fraction F --site-missing T1ce``:
   half of them a block of cases without T1ce, the others a random one to three sequences each), and ``--test-cases``
   complete held-out cases; beside it the same dataset with only its complete training cases;
2. four teachers, fold 0, at the same length: ``P* incomplete`` (the demo's P* teacher: modality dropout 0.5,
   balanced) on every case, ``P* complete-only`` on the complete cases, ``baseline zeroed`` (``--anchor original``,
   the same dropout) on every case, and ``P* separate encoders`` (``P* incomplete`` with one latent encoder per
   modality, ``--separate-encoders``) on every case: with one shared encoder, a single sequence's latent fills all
   four of the predictor's inputs from an encoder that cannot tell which sequence it saw;
3. each teacher predicts the held-out cases from all four sequences and from each one alone, scored as the demo
   scores them.

Every score is a row of ``WORK/incomplete_data.csv``; the table gives per teacher and input the mean held-out Dice
(the mean of WT, TC and ET) over the seeds that teacher has been scored in (listed), then per input the differences
to ``P* incomplete`` within each seed with a 95% interval from their spread over the seeds (two seeds or more)::

    python benchmarks/incomplete_data.py --work incomplete          # 3 seeds, 20 cases (8 incomplete), 6 held out
    python benchmarks/incomplete_data.py --work incomplete --table-only
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path
from statistics import mean, stdev

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_repeats import (_append_row, _call, _folders, _read_rows, predict_command, t_quantile,  # noqa: E402
                        train_command)
from table_one import _train, original_of  # noqa: E402

FIELDS = ("seed", "teacher", "modalities", "WT", "TC", "ET", "training_cases")
REGIONS = ("WT", "TC", "ET")
INCOMPLETE_ID, COMPLETE_ONLY_ID = 910, 911
OURS, COMPLETE_ONLY, BASELINE = "P* incomplete", "P* complete-only", "baseline zeroed"
SEPARATE = "P* separate encoders"
TEACHERS = (OURS, COMPLETE_ONLY, BASELINE, SEPARATE)
INPUTS = ("all", "T1", "T1ce", "T2", "FLAIR")
SITE_MISSING = "T1ce"


def write_data(raw_root: Path, seed: int, cases: int, test_cases: int, fraction: float) -> None:
    """The incomplete dataset of ``seed`` and its complete-only twin (the same cases, without the incomplete ones)."""
    from nnalign.data.raw_dataset import build_dataset_folder, find_dataset_folder
    from nnalign.data.synthetic import CaseOptions, incomplete_cases, write_synthetic_dataset

    if find_dataset_folder(raw_root, INCOMPLETE_ID) is None:
        write_synthetic_dataset(raw_root, INCOMPLETE_ID, cases, (64, 64, 64), seed, num_test=test_cases,
                                name="IncompleteSynthetic", options=CaseOptions(min_rim_mm=4.0, glioma_kinds=("ring",)),
                                missing=incomplete_cases(cases, fraction, seed, SITE_MISSING))
    if find_dataset_folder(raw_root, COMPLETE_ONLY_ID) is not None:
        return
    source = find_dataset_folder(raw_root, INCOMPLETE_ID)
    dataset_json = json.loads((source / "dataset.json").read_text())
    incomplete = set(dataset_json["nnalign"].pop("missing_modalities"))
    with build_dataset_folder(raw_root, COMPLETE_ONLY_ID, "CompleteOnlySynthetic") as staging:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (staging / sub).mkdir()
            for path in sorted((source / sub).iterdir()):
                if not any(path.name.startswith(f"{case}_") or path.name.startswith(f"{case}.")
                           for case in incomplete):
                    shutil.copy2(path, staging / sub / path.name)
        dataset_json["numTraining"] -= len(incomplete)
        (staging / "dataset.json").write_text(json.dumps(dataset_json, indent=2))


def run_seed(work: Path, seed: int, args: argparse.Namespace, scores_csv: Path) -> None:
    """Make the data, train the four teachers and score each on every input of one seed, appending to
    ``scores_csv`` what is not there yet."""
    from nnalign.demo import demo_preset
    from nnalign.data.raw_dataset import find_dataset_folder
    from nnalign.model_folders import model_folder

    done = {(int(r["seed"]), r["teacher"], r["modalities"]) for r in _read_rows(scores_csv)}
    if all((seed, t, i) in done for t in TEACHERS for i in INPUTS):
        return
    seed_dir = work / f"seed{seed}"
    env = _folders(seed_dir)
    raw_root = Path(env["nnUNet_raw"])
    write_data(raw_root, seed, args.cases, args.test_cases, args.missing_fraction)
    configuration = demo_preset().configuration
    p_star = demo_preset().teachers[0].spec
    runs = {OURS: (INCOMPLETE_ID, p_star), COMPLETE_ONLY: (COMPLETE_ONLY_ID, p_star),
            BASELINE: (INCOMPLETE_ID, original_of(p_star)),
            SEPARATE: (INCOMPLETE_ID, dataclasses.replace(p_star, shared_encoder=False))}
    logs = seed_dir / "logs"
    for label, (dataset_id, spec) in runs.items():
        raw = find_dataset_folder(raw_root, dataset_id)
        if not (Path(env["nnUNet_preprocessed"]) / raw.name / "nnAlignPlans.json").is_file():
            _call([sys.executable, "-m", "nnalign.cli.plan_and_preprocess", "-d", str(dataset_id), "-c",
                   configuration, "-np", "2"], env, logs / f"plan_{dataset_id}.log")
        results = Path(env["nnUNet_results"]) / raw.name
        folder = model_folder(results, spec.trainer_name(), configuration)
        _train(f"seed {seed}: {label}", folder, train_command(raw.name, args.device, args.teacher_epochs,
                                                               args.iters_per_epoch, spec.train_flags()),
               env, logs / f"train_{label.replace(' ', '_')}.log")
        score_teacher(seed, label, folder, raw, INPUTS, done, seed_dir, env, args.device, scores_csv)


def score_teacher(seed: int, label: str, folder: Path, raw: Path, inputs: tuple[str, ...], done: set[tuple],
                  seed_dir: Path, env: dict[str, str], device: str, scores_csv: Path) -> None:
    """Predict the held-out cases of the raw dataset ``raw`` with the teacher in ``folder`` from each of ``inputs``
    (``all`` or one modality) whose ``(seed, label, input)`` is not in ``done``; score each as the demo scores it and
    append it to ``scores_csv``. Predictions go to ``seed_dir/predictions/LABEL/INPUT``, logs to ``seed_dir/logs``."""
    from nnalign.demo import reference_regions, score_row
    from nnalign.evaluation.evaluate import evaluate

    dataset_json = json.loads((raw / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    regions = reference_regions(raw / "labelsTs", ending)
    name = label.replace(" ", "_")
    for given in inputs:
        if (seed, label, given) in done:
            continue
        subset = () if given == "all" else (given,)
        predictions = seed_dir / "predictions" / name / given
        if len(list(predictions.glob(f"*{ending}"))) < len(regions):
            _call(predict_command(raw, subset, predictions, folder, device), env,
                  seed_dir / "logs" / f"predict_{name}_{given}.log")
        report = evaluate(raw / "labelsTs", predictions, labels="nnunet", output=None, progress=False)
        row, _ = score_row(label, subset or ("all",), report.scores, regions)
        _append_row(scores_csv, {"seed": seed, "teacher": label, "modalities": given,
                                 **{r: f"{row[f'Dice {r} with']:.4f}" for r in REGIONS},
                                 "training_cases": dataset_json["numTraining"]}, FIELDS)
        print(f"seed {seed}: {label} from {given}: held-out Dice WT / TC / ET "
              + " / ".join(f"{row[f'Dice {r} with']:.3f}" for r in REGIONS), flush=True)


def _average(row: dict) -> float:
    return sum(float(row[r]) for r in REGIONS) / len(REGIONS)


def summary(rows: list[dict], teachers: tuple[str, ...] = TEACHERS, inputs: tuple[str, ...] = INPUTS) -> str:
    """Mean held-out Dice (%) per teacher and input over the seeds, and each other teacher's difference to the first
    of ``teachers`` within each seed, with a 95% interval from the per-seed differences' spread."""
    value = {(int(r["seed"]), r["teacher"], r["modalities"]): _average(r) for r in rows}
    seeds = sorted({s for s, _, _ in value})
    reference = teachers[0]
    lines = ["| teacher | training cases | seeds | " + " | ".join(inputs) + " |",
             "|---|---|---|" + "---|" * len(inputs)]
    for teacher in teachers:
        cases = sorted({r["training_cases"] for r in rows if r["teacher"] == teacher})
        scored = sorted({s for s, t, _ in value if t == teacher})
        cells = []
        for given in inputs:
            got = [value[(s, teacher, given)] for s in seeds if (s, teacher, given) in value]
            cells.append(f"{100 * mean(got):.2f}" if got else "")
        lines.append(f"| {teacher} | {'/'.join(cases)} | {', '.join(map(str, scored))} | " + " | ".join(cells) + " |")
    lines += ["", f"Difference to {reference} (Dice points, per seed paired; 95% interval over the seeds):", "",
              "| teacher | " + " | ".join(inputs) + " |", "|---|" + "---|" * len(inputs)]
    for teacher in teachers[1:]:
        cells = []
        for given in inputs:
            diffs = [value[(s, reference, given)] - value[(s, teacher, given)] for s in seeds
                     if (s, reference, given) in value and (s, teacher, given) in value]
            cell = f"{100 * mean(diffs):+.2f}" if diffs else ""
            if len(diffs) > 1:
                half = t_quantile(0.975, len(diffs) - 1) * stdev(diffs) / math.sqrt(len(diffs))
                cell += f" ({100 * (mean(diffs) - half):+.2f} to {100 * (mean(diffs) + half):+.2f})"
            cells.append(cell)
        lines.append(f"| {reference} minus {teacher} | " + " | ".join(cells) + " |")
    lines.append(f"\nseeds: {', '.join(map(str, seeds))}; Dice: mean of WT, TC and ET over the held-out cases, %")
    return "\n".join(lines)


def main() -> None:
    from nnalign.demo import DemoOptions

    demo = DemoOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder of the runs and of incomplete_data.csv (resumable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--cases", type=int, default=20, help="training cases (default: %(default)s)")
    p.add_argument("--test-cases", type=int, default=6, help="held-out cases, all complete (default: %(default)s)")
    p.add_argument("--missing-fraction", type=float, default=0.4,
                   help="share of incomplete training cases (default: %(default)s)")
    p.add_argument("--teacher-epochs", type=int, default=demo.teacher_epochs)
    p.add_argument("--iters-per-epoch", type=int, default=demo.iters_per_epoch)
    p.add_argument("--device", default=demo.device)
    p.add_argument("--table-only", action="store_true", help="print the table of the rows scored so far")
    args = p.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    scores_csv = work / "incomplete_data.csv"
    if not args.table_only:
        for seed in args.seeds:
            run_seed(work, seed, args, scores_csv)
    print(summary(_read_rows(scores_csv)))


if __name__ == "__main__":
    main()
