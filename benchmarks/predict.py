"""``nnalign_predict`` against ``nnUNetv2_predict`` on the same model and cases, in one run, as a ratio.

    python benchmarks/predict.py                       # builds a small synthetic dataset and model first (CPU)
    python benchmarks/predict.py --model DIR --input DIR --device cuda

Both commands run as a user runs them (a fresh process each, their default worker settings, no test-time
augmentation), on cases with every modality present so that both can segment them; their segmentations must agree.
Target: nnalign_predict <= 1.05x nnUNetv2_predict.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_RATIO = 1.05


def run(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def build_model(work: Path, env: dict) -> tuple[Path, Path]:
    """A synthetic dataset, planned, with an all-modality nnalign model trained briefly; (model dir, test images)."""
    py = sys.executable
    subprocess.run([py, "-m", "nnalign.cli.synth", "-d", "951", "-n", "4", "--num-test", "4", "--shape", "96", "96",
                    "96"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([py, "-m", "nnalign.cli.plan_and_preprocess", "-d", "951", "-c", "3d_cpu", "-np", "2"], env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([py, "-m", "nnalign.cli.train", "951", "3d_cpu", "0", "--anchor", "original", "-device", "cpu",
                    "--epochs", "1", "--iters-per-epoch", "2"], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    dataset = "Dataset951_SyntheticBraTS"
    return (work / "results" / dataset / "nnAlignOriginal__nnAlignPlans__3d_cpu",
            work / "raw" / dataset / "imagesTs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a model folder <Trainer>__<plans>__<configuration>")
    p.add_argument("--input", type=Path, help="cases in nnU-Net naming with every modality")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each command (the median is used)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from nnalign.paths import setup_env

        if not args.model:
            os.environ.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"),
                              nnUNet_results=str(work / "results"))
        setup_env()  # nnUNetv2_predict finds nnalign's trainers through nnUNet_extTrainer, as nnalign_predict does
        env = dict(os.environ)
        model, images = (args.model, args.input) if args.model else build_model(work, env)
        trainer, plans, configuration = model.name.split("__")
        dataset = model.parent.name
        out_nnunet, out_nnalign = work / "pred_nnunet", work / "pred_nnalign"
        nnunet = [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(images), "-o",
                  str(out_nnunet), "-d", dataset, "-tr", trainer, "-p", plans, "-c", configuration, "-f", "0",
                  "-device", args.device, "--disable_tta"]
        nnalign = [sys.executable, "-m", "nnalign.cli.predict", "-i", str(images), "-o", str(out_nnalign), "-m",
                   str(model), "-f", "0", "-device", args.device, "--disable-tta", "--labels", "nnunet", "--overwrite"]
        times = {"nnUNetv2_predict": [], "nnalign_predict": []}
        for _ in range(args.repeats):
            times["nnUNetv2_predict"].append(run(nnunet, env))
            times["nnalign_predict"].append(run(nnalign, env))
        agree = _same_segmentations(out_nnunet, out_nnalign)
        n = len(list(images.glob("*_0000.nii.gz")))
    base, ours = (float(np.median(times[k])) for k in ("nnUNetv2_predict", "nnalign_predict"))
    print(f"{n} cases, {args.device}, no TTA, median of {args.repeats} runs each (process start included)\n")
    print("| command | wall time (s) | ratio |\n|---|---|---|")
    print(f"| nnUNetv2_predict | {base:.1f} | 1.00 |\n| nnalign_predict | {ours:.1f} | {ours / base:.2f} |")
    print(f"\nsegmentations identical: {agree}")
    print(f"ratio {ours / base:.2f} (target <= {TARGET_RATIO}): {'met' if ours / base <= TARGET_RATIO else 'NOT met'}")


def _same_segmentations(a: Path, b: Path) -> bool:
    import SimpleITK as sitk

    files = sorted(a.glob("*.nii.gz"))
    return bool(files) and all(
        np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(f))),
                       sitk.GetArrayFromImage(sitk.ReadImage(str(b / f.name)))) for f in files)


if __name__ == "__main__":
    main()
