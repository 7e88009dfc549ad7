"""The alignment term against the segmentation loss, per anchor, at the start and end of a short teacher training.

Trains one teacher per anchor with ``nnalign_train`` (the anchor's default lambda unless ``--align-weight``) on a
planned dataset and reads its per-epoch log from the final checkpoint: ``align_losses`` and ``train_losses`` (= seg +
lambda * align). The segmentation loss is reported as ``seg + 1`` = BCE + (1 - soft Dice), which is >= 0 (nnU-Net's
Dice term is -Dice), so that ``lambda * align / (seg + 1)`` is the share of the alignment term in the loss::

    python benchmarks/align_weight.py -d 900 -c 3d_cpu --epochs 15 --iters 10

The dataset must be planned and preprocessed (e.g. by ``nnalign_demo`` or ``nnalign_synth`` and
``nnalign_plan_and_preprocess``); runs that exist are reused, so the script resumes.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

ANCHORS = ("normal", "modality:T1ce", "mixture")


def _first_last(values: list[float], epochs: int) -> tuple[float, float]:
    """Means over the first and the last ``epochs`` entries."""
    head, tail = values[:epochs], values[-epochs:]
    return sum(head) / len(head), sum(tail) / len(tail)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-d", dest="dataset", required=True, help="dataset ID or name (planned and preprocessed)")
    p.add_argument("-c", dest="configuration", default="3d_cpu")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--align-weight", type=float, default=None, help="lambda for every anchor (default: each own)")
    p.add_argument("--anchors", nargs="+", default=list(ANCHORS))
    p.add_argument("--window", type=int, default=3, help="epochs averaged at the start and at the end")
    args = p.parse_args()

    from nnalign.checkpoints import load_checkpoint_safely
    from nnalign.model_folders import FINAL_CHECKPOINT, fold_folder, model_folder
    from nnalign.paths import setup_env
    from nnalign.runs import TeacherSpec
    from nnalign.cli.train import resolve_dataset
    from pathlib import Path

    folders = setup_env()
    dataset = resolve_dataset(args.dataset, Path(folders["nnUNet_preprocessed"]), Path(folders["nnUNet_raw"]))
    rows = []
    for anchor in args.anchors:
        spec = TeacherSpec(anchor=anchor, align_weight=args.align_weight)
        folder = model_folder(Path(folders["nnUNet_results"]) / dataset, spec.trainer_name(), args.configuration)
        checkpoint = fold_folder(folder, 0) / FINAL_CHECKPOINT
        if not checkpoint.is_file():
            command = [sys.executable, "-m", "nnalign.cli.train", dataset, args.configuration, "0", "-device", "cpu",
                       "--anchor", anchor, "--epochs", str(args.epochs), "--iters-per-epoch", str(args.iters)]
            if args.align_weight is not None:
                command += ["--align-weight", str(args.align_weight)]
            print("+", " ".join(command[2:]), flush=True)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        log = load_checkpoint_safely(checkpoint, "cpu")["logging"]
        align = [float(v) for v in log["align_losses"]]
        seg_plus_one = [float(t) - spec.align_weight * a + 1 for t, a in zip(log["train_losses"], align)]
        (a0, a1), (s0, s1) = _first_last(align, args.window), _first_last(seg_plus_one, args.window)
        lam = spec.align_weight
        rows.append((anchor, lam, a0, a1, s0, s1, lam * a0 / s0, lam * a1 / s1))
    print(f"\nalignment term vs segmentation loss (mean of the first / last {args.window} epochs of "
          f"{args.epochs} x {args.iters} iterations, {args.configuration})\n")
    print("| anchor | lambda | align start | align end | seg+1 start | seg+1 end | share start | share end |")
    print("|---|---|---|---|---|---|---|---|")
    for anchor, lam, a0, a1, s0, s1, f0, f1 in rows:
        print(f"| {anchor} | {lam:g} | {a0:.4f} | {a1:.4f} | {s0:.3f} | {s1:.3f} | {f0:.1%} | {f1:.1%} |")


if __name__ == "__main__":
    main()
