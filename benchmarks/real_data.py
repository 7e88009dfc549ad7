"""One fixed protocol on the real BraTS 2018 cases in ``../shared/data/brats``: do alignment and distillation help?

The protocol is ``nnalign_experiment``'s ``cpu-evidence`` preset (``nnalign/experiments/presets/cpu-evidence.toml``):
the shared cases converted with the ProtoKD split (its test cases among them held out), ``3d_cpu``, teachers
``mixture``, ``none`` and ``original`` with the same settings, FLAIR and T1ce students (``none``, ``kdnet``,
``protokd``) of the ``mixture`` teacher and the same KD students (``kdnet``, ``protokd``) of the ``original`` teacher
(Table I's Original column: the paper's gain is P* students minus Original students), each evaluated on the held-out
cases, then ``nnalign_report``. This script
runs that preset with the local executor, with nnU-Net's folders under ``--work`` and the cases from ``--data``, and
prints the report and each run's wall time. Opt-in (it exits with a message when the cases are absent) and
resumable: run it again and the finished runs are reused::

    python benchmarks/real_data.py --work /tmp/real_run            # the whole protocol (about 65 min on 2 CPU cores)
    python benchmarks/real_data.py --work /tmp/real_run --dry-run  # nnalign_experiment plan: the runs, nothing run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "brats" / "BraTS2018"
PRESET = "cpu-evidence"


def write_spec(work: Path, data: Path) -> Path:
    """``work/cpu-evidence.toml``: the preset, with the cases from ``data`` and nnU-Net's folders under ``work``."""
    spec = work / f"{PRESET}.toml"
    spec.write_text(f'extends = "{PRESET}"\n[dataset]\nconvert = {json.dumps(str(data))}\n[folders]\n'
                    + "".join(f"{key} = {json.dumps(str(work / key))}\n"
                              for key in ("raw", "preprocessed", "results")))
    return spec


def wall_times(state_dir: Path) -> list[tuple[str, float]]:
    """(title, minutes) of every finished run of the experiment, in the order they started."""
    records = [json.loads(path.read_text()) for path in (state_dir / "runs").glob("*.json")]
    done = sorted((r for r in records if r.get("status") == "done" and r.get("started")), key=lambda r: r["started"])
    return [(r["title"], (r["updated"] - r["started"]) / 60) for r in done]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the BraTS 2018 release folder")
    p.add_argument("--work", type=Path, required=True, help="folder for raw, preprocessed and results (resumable)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    args = p.parse_args()
    if not args.data.is_dir():
        sys.exit(f"real_data.py: {args.data} not found (the shared BraTS 2018 cases); nothing to do")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    spec = write_spec(work, args.data.resolve())
    command = [sys.executable, "-m", "nnalign.cli.experiment"]
    if args.dry_run:
        sys.exit(subprocess.call([*command, "plan", str(spec)]))
    from nnalign.experiments.grid import build_grid
    from nnalign.experiments.spec import read_spec

    code = subprocess.call([*command, "run", str(spec), "--executor", "local", "--jobs", "1"],
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    state_dir = build_grid(read_spec(str(spec))).state_dir
    report = state_dir / "report" / "report.md"
    if report.is_file():
        print(f"\n{report}:\n\n{report.read_text()}")
    times = wall_times(state_dir)
    print("\n| run | minutes |\n|---|---|")
    print("\n".join(f"| {title} | {minutes:.1f} |" for title, minutes in times))
    print(f"| all | {sum(m for _, m in times):.1f} |")
    sys.exit(code)


if __name__ == "__main__":
    main()
