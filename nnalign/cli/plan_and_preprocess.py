"""``nnalign_plan_and_preprocess``: nnU-Net fingerprint, plan and preprocess with nnalign's planner."""
from __future__ import annotations

import argparse
import os

from nnalign.cli.parsing import CommandParser, positive_int
from nnalign.errors import cli_entry


def build_parser() -> argparse.ArgumentParser:
    from nnalign.planning.plan_and_preprocess import CONFIGURATIONS, DEFAULT_CONFIGURATIONS

    p = CommandParser(
        prog="nnalign_plan_and_preprocess",
        description="Fingerprint, plan and preprocess a raw dataset. Plans all configurations (2d, 3d_fullres, "
                    "3d_cpu: coarse spacing and a small network for CPU training, paper: the paper's 80^3 / batch 4 / "
                    "Adam setting) sized for teacher training and student distillation, and preprocesses those "
                    "given with -c.")
    p.add_argument("-d", dest="dataset_id", type=int, required=True, help="dataset ID")
    p.add_argument("-c", dest="configurations", nargs="+", default=list(DEFAULT_CONFIGURATIONS),
                   metavar="CONFIG", help=f"configurations to preprocess, from {', '.join(CONFIGURATIONS)} "
                                          f"(default: {' '.join(DEFAULT_CONFIGURATIONS)})")
    p.add_argument("--gpu-memory", type=float, default=8.0, metavar="GB",
                   help="GPU memory target the plans are sized for (default: %(default)s)")
    p.add_argument("-np", dest="num_processes", type=positive_int, default=min(4, os.cpu_count() or 1),
                   help="worker processes (default: %(default)s)")
    p.add_argument("--verify", action="store_true",
                   help="also run nnU-Net's own dataset integrity check (every case is checked by default: its "
                        "files, one geometry, finite voxels, a signal in every channel, label values)")
    p.add_argument("--plan-only", action="store_true", help="plan without preprocessing")
    return p


@cli_entry("nnalign_plan_and_preprocess")
def main() -> int:
    args = build_parser().parse_args()
    from nnalign.planning.plan_and_preprocess import configuration_table, plan_and_preprocess

    plans = plan_and_preprocess(args.dataset_id, args.configurations, args.gpu_memory, args.num_processes,
                                args.verify, args.plan_only, warn=lambda m: print(f"warning: {m}"))
    print(f"\nPlans {plans['plans_name']} for {plans['dataset_name']} "
          f"(sized for {args.gpu_memory:g} GB; teacher training and student distillation both fit):")
    print(configuration_table(plans))
    return 0


if __name__ == "__main__":
    main()
