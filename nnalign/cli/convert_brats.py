"""``nnalign_convert_brats``: turn a BraTS release folder into an nnU-Net raw dataset."""
from __future__ import annotations

import argparse
import os

from nnalign.cli.parsing import CommandParser, positive_int
from nnalign.errors import cli_entry
from nnalign.modalities import BRATS_MODALITIES

# Kept equal to nnalign.data.convert_brats.LABEL_CHOICES (a test checks), so that --help needs no numpy.
LABEL_CHOICES = ("auto", "brats2018", "brats2023", "brats2024")


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="nnalign_convert_brats",
        description="Convert a BraTS release (2018/2019 HGG/LGG or flat, 2020/2021, 2023+ naming, 2024+ GLI labels "
                    "with the resection cavity) into the nnU-Net raw dataset DatasetXXX_NAME under $nnUNet_raw "
                    "(default ./nnalign_raw_data). Channels T1, T1ce, T2, FLAIR and labels as nnU-Net's own BraTS "
                    "conversion.")
    p.add_argument("-i", dest="source", required=True, help="BraTS release folder")
    p.add_argument("-d", dest="dataset_id", type=int, required=True, help="dataset ID (1-999)")
    p.add_argument("-n", dest="name", default=None, help="dataset name (default: the source folder's name)")
    p.add_argument("--split", choices=("5fold", "protokd"), default="5fold",
                   help="5fold: nnU-Net's default cross-validation; protokd: the ProtoKD BraTS 2018 "
                        "train/val/test split (test cases go to imagesTs/labelsTs)")
    p.add_argument("--labels", choices=LABEL_CHOICES, default="auto",
                   help="label convention of the release: brats2018 (2017-2021: 1 necrosis, 2 edema, 4 ET), "
                        "brats2023 (1, 2, 3 ET), brats2024 (2024+ GLI: 1, 2, 3 ET, 4 resection cavity, trained as "
                        "the region RC). auto: from all segmentations together: 2023+ file names give brats2024 if "
                        "any case has label 4, else brats2023; 2018-2021 names give brats2018, or brats2023 if label "
                        "3 occurs and 4 does not (default: %(default)s)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip cases with bad files and list them, instead of stopping")
    p.add_argument("--allow-missing", action="store_true",
                   help="keep cases that have no file for some modalities (not for all): they are written without "
                        "them and listed in dataset.json (nnalign.missing_modalities); teachers train on them with "
                        "the absent modalities filled by the anchor. Without it such a case is a bad case")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with the same ID")
    p.add_argument("-np", dest="num_processes", type=positive_int, default=min(4, os.cpu_count() or 1),
                   help="worker processes (default: %(default)s)")
    return p


def print_skipped(skipped: dict[str, str]) -> None:
    """One stdout line per case ``--skip-bad`` skipped."""
    for case_id, reason in skipped.items():
        print(f"skipped {case_id}: {reason}")


@cli_entry("nnalign_convert_brats")
def main() -> int:
    args = build_parser().parse_args()
    from nnalign.data.convert_brats import NothingConverted, convert_brats
    from nnalign.paths import setup_env

    raw = setup_env()["nnUNet_raw"]
    try:
        report = convert_brats(args.source, args.dataset_id, raw, name=args.name, split=args.split,
                               skip_bad=args.skip_bad, overwrite=args.overwrite, num_processes=args.num_processes,
                               labels=args.labels, allow_missing=args.allow_missing)
    except NothingConverted as e:
        print_skipped(e.skipped)
        raise
    for note in report.split_notes:
        print(f"note: {note}")
    print_skipped(report.skipped)
    if report.missing:
        counts = {m: sum(m in absent for absent in report.missing.values()) for m in BRATS_MODALITIES}
        print(f"{len(report.missing)} cases lack some modalities (recorded in dataset.json): "
              + ", ".join(f"{m} {n}" for m, n in counts.items() if n))
    print(f"Wrote {report.dataset_folder}: {report.num_training} training cases, {report.num_test} test cases, "
          f"labels from {report.label_convention}" + (f", {len(report.skipped)} skipped" if report.skipped else ""))
    return 0


if __name__ == "__main__":
    main()
