"""One fixed protocol on the real BraTS 2018 cases in ``../shared/data/brats``: do alignment and distillation help?

Opt-in (it needs the shared cases; it exits with a message when they are absent) and resumable: every step is the
command a user runs, skipped when its result exists, so an interrupted run continues where it stopped::

    python benchmarks/real_data.py --work /tmp/real_run            # the whole protocol (hours on 2 CPU cores)
    python benchmarks/real_data.py --work /tmp/real_run --dry-run  # the commands, nothing run

Protocol (``3d_cpu``, fold 0 of the ProtoKD split, whose test cases among the shared ones are held out):

1. ``nnalign_convert_brats --split protokd``, ``nnalign_plan_and_preprocess -c 3d_cpu``;
2. teachers ``original``, ``none`` and ``mixture``, the same settings otherwise (every modality, shared encoder, each
   anchor's default lambda), ``--teacher-epochs`` x ``--iters``;
3. FLAIR and T1ce students (``none``, ``kdnet``, ``protokd``) of the ``mixture`` teacher, ``--student-epochs`` x
   ``--iters``;
4. ``nnalign_predict`` of the held-out cases (teachers with all four modalities, each student with its own) and
   ``nnalign_evaluate`` against their references, then ``nnalign_report`` of the results folder.

It prints the held-out Dice table (Markdown) and the wall time of each step.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "brats" / "BraTS2018"
DATASET_ID = 218
CONFIG = "3d_cpu"
TEACHERS = ("original", "none", "mixture")
STUDENTS = (("FLAIR",), ("T1ce",))
KD = ("none", "kdnet", "protokd")
CHANNEL = {"T1": 0, "T1ce": 1, "T2": 2, "FLAIR": 3}


def _command(name: str) -> list[str]:
    """``nnalign_<name>`` run by this Python (its console script need not be on PATH)."""
    return [sys.executable, "-m", f"nnalign.cli.{name}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("NNALIGN_BRATS_DATA", DEFAULT_DATA)))
    p.add_argument("--work", type=Path, required=True, help="folder for raw, preprocessed and results (resumable)")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--student-epochs", type=int, default=20)
    p.add_argument("--iters", type=int, default=20, help="iterations per epoch")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    if not args.data.is_dir():
        sys.exit(f"real_data.py: {args.data} not found (the shared BraTS 2018 cases); nothing to do")

    work = args.work.resolve()
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "pre"),
           "nnUNet_results": str(work / "results")}
    timings: list[tuple[str, float]] = []

    def run(what: str, command: list[str], done: Path | None = None) -> None:
        if done is not None and done.exists():
            print(f"[done before] {what}", flush=True)
            return
        print(f"[run] {what}: {' '.join(command)}", flush=True)
        if args.dry_run:
            return
        start = time.time()
        log = work / "logs" / f"{what.replace(' ', '_')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env=env)
        if code:
            sys.exit(f"real_data.py: {what} failed (exit {code}); see {log}")
        timings.append((what, time.time() - start))

    dataset = f"Dataset{DATASET_ID:03d}_BraTS2018"
    raw = work / "raw" / dataset
    results = work / "results" / dataset
    run("convert", [*_command("convert_brats"), "-i", str(args.data), "-d", str(DATASET_ID), "-n", "BraTS2018",
                    "--split", "protokd"], raw / "dataset.json")
    run("plan and preprocess", [*_command("plan_and_preprocess"), "-d", str(DATASET_ID), "-c", CONFIG, "-np", "2"],
        work / "pre" / dataset / "nnAlignPlans.json")
    train = [*_command("train"), str(DATASET_ID), CONFIG, "0", "-device", "cpu", "--iters-per-epoch", str(args.iters)]
    folders: dict[str, Path] = {}
    for anchor in TEACHERS:
        name = "nnAlignOriginal" if anchor == "original" else f"nnAlignTeacher_{anchor}"
        folders[f"teacher {anchor}"] = results / f"{name}__nnAlignPlans__{CONFIG}"
        run(f"teacher {anchor}", train + ["--anchor", anchor, "--epochs", str(args.teacher_epochs)],
            folders[f"teacher {anchor}"] / "fold_0" / "checkpoint_final.pth")
    teacher = folders["teacher mixture"]
    for subset in STUDENTS:
        for kd in KD:
            key = f"student {'+'.join(subset)} {kd}"
            folders[key] = results / f"nnAlignStudent_{'-'.join(subset)}_{kd}_Teacher-mixture__nnAlignPlans__{CONFIG}"
            run(key, train + ["--role", "student", "--modalities", ",".join(subset), "--kd", kd, "--teacher",
                              str(teacher), "--epochs", str(args.student_epochs)],
                folders[key] / "fold_0" / "checkpoint_final.pth")

    rows = []
    for key, folder in folders.items():
        subset = tuple(CHANNEL) if key.startswith("teacher") else tuple(key.split()[1].split("+"))
        inputs = work / "inputs" / "-".join(subset)
        if not args.dry_run:
            inputs.mkdir(parents=True, exist_ok=True)
            for m in subset:
                for image in (raw / "imagesTs").glob(f"*_{CHANNEL[m]:04d}.nii.gz"):
                    if not (inputs / image.name).exists():
                        os.symlink(image, inputs / image.name)
        out = work / "predictions" / folder.name
        run(f"predict {key}", [*_command("predict"), "-i", str(inputs), "-o", str(out), "-m", str(folder), "-device",
                               "cpu", "--disable-tta", "--labels", "nnunet"], out / "prediction_done")
        metrics = work / "evaluations" / f"{folder.name}.csv"
        run(f"evaluate {key}", [*_command("evaluate"), "-r", str(raw / "labelsTs"), "-p", str(out), "--labels",
                                "nnunet", "-o", str(metrics)], metrics)
        if not args.dry_run:
            (out / "prediction_done").touch()
            mean = next(r for r in csv.DictReader(open(metrics)) if r.get("case") == "mean")
            rows.append((key, "+".join(subset), *(float(mean[f"Dice_{r}"]) for r in ("WT", "TC", "ET"))))
    run("report", [*_command("report"), str(results), "-o", str(work / "report")], work / "report" / "report.md")

    if rows:
        print("\n| model | modalities | Dice WT | Dice TC | Dice ET |\n|---|---|---|---|---|")
        for key, subset, wt, tc, et in rows:
            print(f"| {key} | {subset} | {wt:.3f} | {tc:.3f} | {et:.3f} |")
    if timings:
        print("\n| step | minutes |\n|---|---|")
        for what, seconds in timings:
            print(f"| {what} | {seconds / 60:.1f} |")
        print(f"| all | {sum(s for _, s in timings) / 60:.1f} |")


if __name__ == "__main__":
    main()
