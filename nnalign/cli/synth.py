"""``nnalign_synth``: write a synthetic BraTS-like nnU-Net raw dataset (the demo's and the tests' default data)."""
from __future__ import annotations

import argparse
import os

from nnalign.cli.parsing import CommandParser, non_negative_int, positive_int
from nnalign.errors import NnalignError, cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="nnalign_synth",
        description="Generate synthetic BraTS-like cases (channels T1, T1ce, T2, FLAIR; labels 1 edema, 2 necrosis, "
                    "3 enhancing tumour) as the nnU-Net raw dataset DatasetXXX_NAME under $nnUNet_raw (default "
                    "./nnalign_raw_data). The same seed always gives the same cases.")
    p.add_argument("-d", dest="dataset_id", type=int, required=True, help="dataset ID (1-999)")
    p.add_argument("-n", dest="num_cases", type=positive_int, required=True,
                   help="number of training cases (imagesTr/labelsTr)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=(96, 96, 96),
                   help="image size in voxels of 1 mm, each at least 32 (default: 96 96 96)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--num-test", type=non_negative_int, default=0,
                   help="held-out cases for imagesTs, with references in labelsTs (default: %(default)s)")
    p.add_argument("--name", default="SyntheticBraTS", help="dataset name (default: %(default)s)")
    p.add_argument("--tumour-modalities", metavar="LIST", default=None,
                   help="only these modalities (comma-separated) show the tumour; the others see white matter there, "
                        "a known answer for which modality matters (default: all)")
    p.add_argument("--min-rim-mm", type=float, default=0.0, metavar="MM",
                   help="thicken the enhancing rims of ring tumours to about MM mm, so that enhancing tumour survives "
                        "a coarse (e.g. 3d_cpu's 2 mm) resampling (default: as drawn)")
    p.add_argument("--glioma-kinds", metavar="LIST", default=None,
                   help="only these kinds of glioma, comma-separated: ring (a necrotic core in an enhancing rim), "
                        "solid, non-enhancing; a kind drawn outside the list becomes the first listed "
                        "(default: all, 80 / 10 / 10 %%)")
    p.add_argument("--missing-fraction", type=float, default=0.0, metavar="F",
                   help="this fraction of the training cases lacks some sequences (no file, recorded in dataset.json "
                        "as nnalign_convert_brats --allow-missing does), each a random one to three of them "
                        "(default: %(default)s, every case complete)")
    p.add_argument("--site-missing", metavar="MODALITY", default=None,
                   help="with --missing-fraction: half of the incomplete cases are instead the last cases, a block "
                        "that lacks MODALITY alone, as when one site never acquired it (e.g. T1ce)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with the same ID")
    return p


@cli_entry("nnalign_synth")
def main() -> int:
    args = build_parser().parse_args()
    from nnalign.data.synthetic import GLIOMA_KINDS, CaseOptions, incomplete_cases, write_synthetic_dataset
    from nnalign.modalities import BRATS_MODALITIES, parse_modalities
    from nnalign.paths import setup_env

    if args.site_missing and not args.missing_fraction:
        raise NnalignError("--site-missing needs --missing-fraction")
    setup_env()
    site = parse_modalities(args.site_missing)[0] if args.site_missing else None
    missing = incomplete_cases(args.num_cases, args.missing_fraction, args.seed, site)
    shown = parse_modalities(args.tumour_modalities) if args.tumour_modalities else BRATS_MODALITIES
    options = CaseOptions(shown, args.min_rim_mm,
                          tuple(args.glioma_kinds.split(",")) if args.glioma_kinds else GLIOMA_KINDS)
    folder = write_synthetic_dataset(os.environ["nnUNet_raw"], args.dataset_id, args.num_cases, shape=args.shape,
                                     seed=args.seed, num_test=args.num_test, name=args.name,
                                     overwrite=args.overwrite, options=options,
                                     missing=missing)
    print(f"Wrote {folder}: {args.num_cases} training cases, {args.num_test} test cases, "
          f"shape {' x '.join(map(str, args.shape))}, seed {args.seed}"
          + (f"; {len(missing)} training cases lack some sequences (dataset.json: nnalign.missing_modalities)"
             if missing else ""))
    return 0


if __name__ == "__main__":
    main()
