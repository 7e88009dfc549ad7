"""How long ``nnalign_experiment plan`` and ``status`` take on a grid of more than 500 runs, and how long the local
executor leaves a slot idle between runs.

    python benchmarks/experiment_grid.py                       # plan / status of a 526-run grid, 3 rounds each
    python benchmarks/experiment_grid.py --state DIR --jobs 2  # also the idle gaps of a finished local run

The grid is ``paper-table-I`` over folds 0-3 (420 trainings, 105 evaluations, the report) on a stand-in for a
planned BraTS dataset (plans and folders only), with half of the runs given a state file (as after ``run``), so
that ``status`` reads 263 of them. Each command is timed as a user runs it: a new Python process, the console
command's module, wall clock. Target: under 10 s each.

The idle gaps are read from a finished experiment's state files (``started`` and the last ``updated`` of each run):
for each run, the time from the moment a slot became free and the run's dependencies were done to the run's start.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = 'extends = "paper-table-I"\nname = "bench"\n[dataset]\nid = 18\nfolds = [0, 1, 2, 3]\n'


def stand_in_dataset(root: Path) -> None:
    """Plans, one preprocessed file and the held-out folders of ``Dataset018_BraTS2018`` under ``root``."""
    data = root / "pre" / "Dataset018_BraTS2018" / "nnAlignPlans_3d_fullres"
    data.mkdir(parents=True)
    (data / "case.pkl").touch()
    plans = {"dataset_name": "Dataset018_BraTS2018",
             "configurations": {"3d_fullres": {"patch_size": [112, 128, 112], "batch_size": 2}}}
    (root / "pre" / "Dataset018_BraTS2018" / "nnAlignPlans.json").write_text(json.dumps(plans))
    for sub in ("imagesTs", "labelsTs"):
        (root / "raw" / "Dataset018_BraTS2018" / sub).mkdir(parents=True)


def timed(command: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"experiment_grid.py: {' '.join(command[2:])} failed: {proc.stderr.strip()}")
    return time.perf_counter() - start, proc.stdout


def idle_gaps(state: Path, jobs: int) -> list[float]:
    """Per run of a finished local experiment, seconds between a slot being free with its dependencies done and its
    start (0 when it started at once)."""
    records = [json.loads(p.read_text()) for p in (state / "runs").glob("*.json")]
    runs = sorted((r["started"], r["updated"]) for r in records if r.get("started") and r.get("status") == "done")
    gaps = []
    for i, (start, _) in enumerate(runs):
        ended = sorted(end for s, end in runs[:i] if end <= start)
        busy = sum(1 for s, end in runs[:i] if end > start)
        if busy < jobs and ended:
            gaps.append(max(0.0, start - ended[-1]))
    return gaps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--state", type=Path, help="a finished local experiment's state folder, for the idle gaps")
    p.add_argument("--jobs", type=int, default=2, help="the --jobs that run used")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stand_in_dataset(root)
        (root / "bench.toml").write_text(SPEC)
        env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
               "nnUNet_results": str(root / "results")}
        command = [sys.executable, "-m", "nnalign.cli.experiment"]
        _, out = timed([*command, "plan", str(root / "bench.toml")], env)
        print(out.splitlines()[-2])
        sys.path.insert(0, str(ROOT))
        from nnalign.experiments.grid import build_grid
        from nnalign.experiments.spec import read_spec
        from nnalign.experiments.state import StateStore

        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            os.environ[var] = env[var]
        grid = build_grid(read_spec(str(root / "bench.toml")))
        store = StateStore(grid.state_dir)
        for key in list(grid.steps)[::2]:
            store.write(key, {"key": key, "status": "failed", "error": "stand-in", "log": str(store.log(key))})
        print(f"| command | runs | wall time (s), {args.rounds} rounds | median |\n|---|---|---|---|")
        for sub in ("plan", "status"):
            times = [timed([*command, sub, str(root / "bench.toml")], env)[0] for _ in range(args.rounds)]
            print(f"| nnalign_experiment {sub} | {len(grid.steps)} | {', '.join(f'{t:.2f}' for t in times)} | "
                  f"{statistics.median(times):.2f} |")
    if args.state is not None:
        gaps = idle_gaps(args.state, args.jobs)
        if gaps:
            print(f"\nlocal executor, {args.state}: {len(gaps)} starts after a slot freed; idle gap median "
                  f"{statistics.median(gaps):.2f} s, longest {max(gaps):.2f} s")


if __name__ == "__main__":
    main()
