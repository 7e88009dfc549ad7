"""``nnalign_predict``: segment BraTS cases with whatever modalities they have, choosing a trained model per case."""
from __future__ import annotations

import argparse
import sys

from nnalign.cli.parsing import CommandParser
from nnalign.device import setup_device
from nnalign.errors import cli_entry
from nnalign.inference import BACKENDS
from nnalign.model_folders import FINAL_CHECKPOINT, parse_fold

PROG = "nnalign_predict"
# Kept equal to nnalign.inference.predict.LABEL_OPTIONS (a test checks), so that --help imports nothing heavy.
LABEL_OPTIONS = ("source", "brats2018", "brats2023", "brats2024", "nnunet")


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog=PROG,
        description="Segment brain tumours (WT/TC/ET) in BraTS cases that may lack modalities. Per case the modalities "
                    "present are read from the files, and a model is chosen from MODELS: a student trained on exactly "
                    "those modalities, else (all modalities present) a teacher or original nnU-Net model, else a "
                    "teacher trained with modality dropout. Among several, the best mean validation Dice wins. Writes "
                    "OUT/<case>.nii.gz in the geometry of the case's images, its report OUT/<case>.json (one row of "
                    "OUT/nnalign_predict_report.csv), and the log "
                    "OUT/nnalign_predict_log.csv/.json. Finished cases are skipped unless --overwrite.")
    p.add_argument("-i", dest="input", required=True,
                   help="a folder of cases (BraTS 2018/2020/2023 naming in case folders, or nnU-Net <case>_0000.nii.gz "
                        "files), a folder holding one case's files, or one image file")
    p.add_argument("-o", dest="output", required=True, help="output folder")
    p.add_argument("-m", dest="models", required=True,
                   help="one model folder <Trainer>__<plans>__<configuration>, or a dataset results folder "
                        "($nnUNet_results/DatasetXXX_Name) holding several")
    p.add_argument("-f", dest="folds", nargs="+", default=None, metavar="FOLD",
                   help="folds to ensemble, e.g. -f 0 1 2 or -f all (default: every fold_N with the checkpoint; "
                        "fold_all only when it is the only one)")
    p.add_argument("-chk", dest="checkpoint", default=FINAL_CHECKPOINT,
                   help="checkpoint file name in each fold folder (default: %(default)s)")
    p.add_argument("-device", choices=("cpu", "cuda", "mps"), default=None,
                   help="device to predict on (default: cuda; cpu with --backend openvino)")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="what runs the networks inside nnU-Net's predictor: torch, or openvino (CPU only; each fold's "
                        "network is converted once and cached as OpenVINO IR beside its checkpoint; an optional "
                        "extra: pip install nnalign[openvino]) (default: %(default)s)")
    p.add_argument("--disable-tta", action="store_true",
                   help="no mirroring test-time augmentation (about 8x faster, slightly less accurate)")
    p.add_argument("--modalities", default=None, metavar="LIST",
                   help="use only these modalities of each case, e.g. T1ce,T2 (each must be there); "
                        "default: every modality found")
    p.add_argument("--labels", choices=LABEL_OPTIONS, default="source",
                   help="label convention of the output: source (that of the data the model was trained on, recorded "
                        "in its dataset.json; brats2018 if unknown), brats2018 (1 necrosis, 2 edema, 4 ET), brats2023 "
                        "(1 necrosis, 2 edema, 3 ET), brats2024 (as brats2023, and 4 the resection cavity of a model "
                        "trained with it), nnunet (1 edema, 2 necrosis, 3 ET, 4 resection cavity); a model's resection "
                        "cavity has no label in brats2018 and brats2023, and such a case fails (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="predict cases whose output already exists again")
    p.add_argument("--qc-images", action="store_true",
                   help="also write OUT/<case>.png: axial, coronal and sagittal slices through the tumour's centre "
                        "with the WT, TC and ET contours")
    return p


@cli_entry(PROG)
def main() -> int:
    args = build_parser().parse_args()
    from nnalign.modalities import parse_modalities

    modalities = parse_modalities(args.modalities) if args.modalities is not None else None
    folds = None
    if args.folds is not None:
        folds = list(dict.fromkeys(parse_fold(f) for f in args.folds))
    device = args.device or ("cpu" if args.backend == "openvino" else "cuda")
    setup_device(device)
    from tqdm import tqdm

    from nnalign.inference.predict import predict

    def on_error(message: str) -> None:
        tqdm.write(f"{PROG}: error: {message}", file=sys.stderr)  # above the progress bar, if there is one

    def on_note(message: str) -> None:
        tqdm.write(f"{PROG}: note: {message}", file=sys.stderr)

    report = predict(args.input, args.output, args.models, folds=folds, checkpoint=args.checkpoint,
                     device=device, disable_tta=args.disable_tta, modalities=modalities, labels=args.labels,
                     overwrite=args.overwrite, on_error=on_error, backend=args.backend, on_note=on_note,
                     qc_images=args.qc_images)
    unusable = f", {len(report.model_problems)} model folder(s) unusable" if report.model_problems else ""
    print(f"{len(report.records)} cases: {report.count('ok')} predicted, {report.count('skipped')} skipped "
          f"(output exists), {report.count('failed')} failed{unusable}. Log: {report.log_csv}")
    # each problem was one line on stderr as it happened; the exit status says there were some
    return 1 if report.failed or report.model_problems else 0


if __name__ == "__main__":
    main()
