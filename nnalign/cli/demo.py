"""``nnalign_demo``: the whole pipeline on built-in synthetic cases (or a BraTS release) on the CPU."""
from __future__ import annotations

import argparse
from pathlib import Path

from nnalign.cli.parsing import CommandParser, non_negative_int, positive_int
from nnalign.demo import DemoOptions
from nnalign.errors import cli_entry


def add_data_and_length_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's data (``--data`` or ``--test-cases`` synthetic held-out cases) and training lengths, with the
    defaults of DemoOptions; read back by ``data_and_length_options``."""
    defaults = DemoOptions()
    p.add_argument("--data", type=Path, default=None, help="a BraTS release folder instead of synthetic cases")
    p.add_argument("--teacher-epochs", type=positive_int, default=defaults.teacher_epochs,
                   help="(default: %(default)s)")
    p.add_argument("--student-epochs", type=positive_int, default=defaults.student_epochs,
                   help="(default: %(default)s)")
    p.add_argument("--iters-per-epoch", type=positive_int, default=defaults.iters_per_epoch,
                   help="(default: %(default)s)")
    p.add_argument("--test-cases", type=positive_int, default=defaults.test_cases,
                   help="synthetic held-out cases (default: %(default)s)")


def data_and_length_options(args: argparse.Namespace) -> dict:
    """The DemoOptions fields set by ``add_data_and_length_arguments``."""
    return {"data": args.data, "test_cases": args.test_cases, "teacher_epochs": args.teacher_epochs,
            "student_epochs": args.student_epochs, "iters_per_epoch": args.iters_per_epoch}


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoOptions()
    p = CommandParser(
        prog="nnalign_demo",
        description="Synthetic BraTS-like cases (or --data, a BraTS release) -> plan and preprocess (3d_cpu) -> "
                    "teacher with the learned mixture anchor P* -> a T1ce student distilled with one KD method and "
                    "its no-distillation baseline -> prediction of held-out cases with missing modalities -> "
                    "evaluation -> report: the experiment preset demo with the options below, run as "
                    "nnalign_experiment runs a grid. Short runs by default (the pipeline, not the paper's numbers: "
                    "raise the epochs, or use -device cuda, for real results); an interrupted demo resumes, reusing "
                    "every finished run. Data and results go to nnU-Net's folders (default ./nnalign_*).")
    p.add_argument("-d", dest="dataset_id", type=int, default=defaults.dataset_id,
                   help="dataset ID to use (default: %(default)s)")
    p.add_argument("--kd", default=",".join(defaults.kd), metavar="METHODS",
                   help="distillation methods of the students, comma-separated, each beside the no-distillation "
                        "student (default: %(default)s)")
    p.add_argument("--modalities", default=",".join(defaults.student_modalities),
                   help="the student's modalities (default: %(default)s)")
    add_data_and_length_arguments(p)
    p.add_argument("--cases", type=positive_int, default=defaults.cases,
                   help="synthetic training cases (default: %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=defaults.seed,
                   help="seed of the synthetic cases (default: %(default)s; training itself is not seeded)")
    p.add_argument("-device", choices=("cpu", "cuda", "mps"), default=defaults.device, help="(default: %(default)s)")
    return p


@cli_entry("nnalign_demo")
def main() -> int:
    args = build_parser().parse_args()
    from nnalign.demo import parse_kd_methods, rows_markdown, run_demo
    from nnalign.modalities import parse_modalities

    opts = DemoOptions(dataset_id=args.dataset_id, cases=args.cases, seed=args.seed, kd=parse_kd_methods(args.kd),
                       student_modalities=parse_modalities(args.modalities), device=args.device,
                       **data_and_length_options(args))
    result = run_demo(opts, say=lambda m: print(f"nnalign_demo: {m}", flush=True))
    print(f"\nHeld-out Dice on {result.dataset} (models in {result.results}):\n")
    print(rows_markdown(result.rows))
    print("\nPer region: the mean over all held-out cases (BraTS convention: a case without the region in its reference "
          "and prediction scores 1) / the mean over the n cases whose reference has it.")
    if result.warnings:
        print("\nWARNING, collapsed models:\n" + "\n".join(f"- {w}" for w in result.warnings))
    else:
        print("\nNo model collapsed: every model found each region in held-out cases that have it, and no training "
              "ended with a validation pseudo-Dice of 0 (the last column counts the cases a model missed).")
    print(f"\nPaper-style tables and figures: {result.report}")
    return 0


if __name__ == "__main__":
    main()
