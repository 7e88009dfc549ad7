"""``nnalign_evaluate``: Dice and HD95 on WT, TC, ET (and RC) for a folder of predictions, with the BraTS conventions;
``--lesionwise`` adds the official BraTS package's lesion-wise scores."""
from __future__ import annotations

import argparse
import sys

from nnalign.cli.parsing import CommandParser, non_negative_int
from nnalign.errors import cli_entry

PROG = "nnalign_evaluate"
# Kept equal to nnalign.evaluation.metrics.LABEL_CHOICES (a test checks), so that --help needs no numpy.
LABEL_CHOICES = ("auto", "nnunet", "brats2018", "brats2023", "brats2024")


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog=PROG,
        description="Per-case Dice and HD95 (mm) on the whole tumour (WT), tumour core (TC) and enhancing tumour "
                    "(ET), and on the resection cavity (RC) where the labels have it, with the BraTS conventions: both "
                    "masks empty gives Dice 1 and HD95 0; exactly one empty gives Dice 0 and HD95 373.13. Writes one "
                    "CSV row per case plus mean, std and median rows, and a JSON with the same stem. A reference case "
                    "without prediction is scored Dice 0, HD95 373.13.")
    p.add_argument("-r", dest="reference", required=True,
                   help="reference label maps: a BraTS release folder (<case>/<case>_seg.nii.gz or -seg.nii.gz), a "
                        "flat folder of <case>.nii.gz (nnU-Net labelsTr/labelsTs), or one file")
    p.add_argument("-p", dest="prediction", required=True,
                   help="predicted label maps: a folder of <case>.nii.gz (as nnU-Net writes them), or one file")
    p.add_argument("--labels", choices=LABEL_CHOICES, default="auto",
                   help="label convention of both reference and prediction: nnunet (1 edema, 2 necrosis, 3 ET, 4 RC), "
                        "brats2018 (1 necrosis, 2 edema, 4 ET), brats2023 (1 necrosis, 2 edema, 3 ET), brats2024 (as "
                        "2023, and 4 the resection cavity RC, in no tumour region). auto: from the labels of all "
                        "files together: flat <case>.nii.gz references are brats2018 if 4 occurs and 3 never does, "
                        "else nnunet; <case>-seg references are brats2024 if 4 occurs, else brats2023; <case>_seg "
                        "references are brats2018, or brats2023 if 3 occurs and 4 does not. Give it explicitly to be "
                        "sure (default: %(default)s)")
    p.add_argument("--et-min-voxels", type=non_negative_int, default=0, metavar="N",
                   help="ET post-processing as in RFNet/mmFormer: a predicted ET of fewer than N voxels is relabelled "
                        "necrosis, i.e. scored as an empty ET (TC and WT unchanged); the literature uses 500 "
                        "(default: 0, off)")
    p.add_argument("--lesionwise", action="store_true",
                   help="also the lesion-wise Dice and HD95 of the official BraTS evaluation package "
                        "(brats-evaluation, gli config; install with pip install 'nnalign[lesionwise]'), written by "
                        "that package as <stem>_lesionwise.csv; the whole-image scores stay as they are")
    p.add_argument("-o", dest="output", default=None,
                   help="CSV to write; the JSON goes beside it with the same stem (default: PRED/metrics.csv)")
    return p


@cli_entry(PROG)
def main() -> int:
    args = build_parser().parse_args()
    from tqdm import tqdm

    from nnalign.evaluation.evaluate import aggregates_markdown, evaluate

    def on_case_error(case_id: str, message: str) -> None:
        tqdm.write(f"{PROG}: error: {message}", file=sys.stderr)  # above the progress bar, if there is one

    report = evaluate(args.reference, args.prediction, labels=args.labels, et_min_voxels=args.et_min_voxels,
                      output=args.output, on_case_error=on_case_error, lesionwise=args.lesionwise)
    for warning in report.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    n_missing = len(report.missing)
    print(f"\n{len(report.scores)} cases" + (f" ({n_missing} without prediction)" if n_missing else "")
          + (f", ET post-processing below {args.et_min_voxels} voxels" if args.et_min_voxels else "") + ":\n")
    print(aggregates_markdown(report.aggregates))
    written = [report.json_path.name]
    if report.lesionwise is not None:
        print("\nLesion-wise, by brats-evaluation (per case the mean over matched lesions; NaN left out):\n")
        print(aggregates_markdown(report.lesionwise))
        written.append(report.lesionwise_path.name)
    print(f"\nWrote {report.csv_path} and {' and '.join(written)} (labels {', '.join(sorted(set(report.conventions.values())))})")
    if report.errors:
        print(f"{PROG}: error: {len(report.errors)} case(s) could not be evaluated (listed above) and are not in the "
              f"results: {', '.join(report.errors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    main()
