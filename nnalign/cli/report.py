"""``nnalign_report``: the paper's tables (Markdown and CSV) and figures (PNG) from a dataset's results folder."""
from __future__ import annotations

import argparse
import sys

from nnalign.cli.parsing import CommandParser, positive_int
from nnalign.errors import cli_entry

PROG = "nnalign_report"


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog=PROG,
        description="Collect every nnalign teacher and student under RESULTS and write the paper's tables: III "
                    "(the 15 modality subsets without vs with alignment), I (KD method x teacher anchor for the "
                    "single-modality students), IV (teachers by anchor, Dice and HD95) and V (single-modality models "
                    "on every modality), as Markdown and CSV, the figures tsne_latents.png, overlays.png and "
                    "training_curves.png, and report.md linking them. Metrics come from "
                    "RESULTS/nnalign_evaluations/<model>/<subset>/metrics.json when present, else from the folds' "
                    "validation predictions scored against {nnUNet_preprocessed}/<dataset>/gt_segmentations (cached "
                    "in fold_*/validation/nnalign_metrics.json). Missing runs are empty cells.")
    p.add_argument("results", metavar="RESULTS", help="a dataset's results folder, {nnUNet_results}/DatasetXXX_NAME")
    p.add_argument("-o", dest="output", default=None, metavar="DIR",
                   help="output folder (default: RESULTS/nnalign_report)")
    p.add_argument("--kd", default=None, metavar="METHOD",
                   help="KD method of Table III: none, kdnet, pmkl, protokd or smunet (default: the method with the "
                        "most student runs)")
    p.add_argument("--no-tsne", dest="tsne", action="store_false",
                   help="skip the t-SNE figure (it loads every teacher on the CPU and runs it on preprocessed cases)")
    p.add_argument("-c", dest="configuration", default=None, metavar="CONFIG",
                   help="report only this configuration (default: the plans/configuration with the most runs)")
    p.add_argument("-p", dest="plans", default=None, metavar="PLANS",
                   help="report only these plans (default: as -c)")
    p.add_argument("--tsne-cases", type=positive_int, default=2, metavar="N",
                   help="preprocessed cases per teacher for the t-SNE (default: %(default)s)")
    p.add_argument("--tsne-samples", type=positive_int, default=300, metavar="N",
                   help="latent voxels sampled per modality for the t-SNE (default: %(default)s)")
    return p


@cli_entry(PROG)
def main() -> int:
    args = build_parser().parse_args()
    from nnalign.reporting.report import build_report

    def progress(message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    report = build_report(args.results, output=args.output, kd=args.kd.lower() if args.kd else None, tsne=args.tsne,
                          configuration=args.configuration, plans=args.plans, tsne_cases=args.tsne_cases,
                          tsne_samples=args.tsne_samples, progress=progress)
    for figure in report.figures.values():
        for note in figure.notes:
            print(f"{PROG}: note: {note}", file=sys.stderr)
    print(f"Wrote {report.report_md}\n")
    print(report.tables["III"].markdown_with_notes())
    return 0


if __name__ == "__main__":
    main()
