"""How fast every ``nnalign_*`` command answers ``--help``, against stock nnU-Net's commands, in one run.

Each command is started as a user starts it (a new interpreter, ``python -m``), ``--repeat`` times; the table gives
the median wall time and its ratio to the median of nnU-Net's ``nnUNetv2_train -h`` and
``nnUNetv2_plan_and_preprocess -h`` (which import torch). A bare interpreter's start-up is the floor::

    python benchmarks/cli_startup.py --repeat 5
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from importlib.metadata import entry_points

NNUNET = (("nnUNetv2_train", "nnunetv2.run.run_training", "run_training_entry"),
          ("nnUNetv2_plan_and_preprocess", "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
           "plan_and_preprocess_entry"))


def seconds(command: list[str], repeat: int) -> float:
    """Median wall time of ``command`` over ``repeat`` runs (output discarded)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5, help="runs per command (median reported)")
    args = p.parse_args()
    python = [sys.executable]
    floor = seconds([*python, "-c", "pass"], args.repeat)
    stock = {name: seconds([*python, "-c", f"import sys; sys.argv = ['{name}', '-h']; "
                                           f"from {module} import {entry}; {entry}()"], args.repeat)
             for name, module, entry in NNUNET}
    baseline = statistics.median(stock.values())
    print("| command | --help (s) | / stock nnU-Net's |\n|---|---|---|")
    print(f"| python -c pass (start-up floor) | {floor:.2f} | {floor / baseline:.2f} |")
    for name, value in stock.items():
        print(f"| {name} -h (stock) | {value:.2f} | {value / baseline:.2f} |")
    commands = sorted((e.name, e.module) for e in entry_points(group="console_scripts") if e.name.startswith("nnalign_"))
    ours = {name: seconds([*python, "-m", module, "--help"], args.repeat) for name, module in commands}
    for name, value in ours.items():
        print(f"| {name} --help | {value:.2f} | {value / baseline:.2f} |")
    slowest = max(ours, key=ours.get)
    print(f"\nslowest: {slowest} {ours[slowest]:.2f} s = {ours[slowest] / baseline:.2f}x stock nnU-Net's "
          f"{baseline:.2f} s (target: about a second)")


if __name__ == "__main__":
    main()
