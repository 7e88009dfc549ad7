"""``nnUNetv2_predict``, ``nnalign_predict --backend torch`` and ``--backend openvino`` side by side, on the same model
and cases, with and without mirroring: wall time per case, peak memory, and how far each segmentation agrees with
``nnalign_predict --backend torch``'s.

    python benchmarks/predict.py                       # builds a small synthetic dataset and model first (CPU)
    python benchmarks/predict.py --model DIR --input DIR [--brats CASE_DIR]

``--model``/``--input``: a model folder and its cases in nnU-Net naming with every modality (e.g. the demo's teacher and
its ``imagesTs``). ``--brats CASE_DIR``: also a BraTS-sized case (a real one, 240x240x155 at 1 mm) through a teacher
on nnalign's ``3d_fullres`` plans for a BraTS 2018-sized dataset (the plans of the step benchmarks), with untrained
weights (He initialisation): its time and memory are those of a trained model of that plan; its agreement is that of a
network whose logits have not learnt any margin. ``--brats-mirroring`` says which mirroring settings that case runs
(every tile is predicted 8 times with mirroring, so on 2 CPU cores that is long).

Every command runs as a user runs it, in a new process, with its default workers (``nnUNetv2_predict``'s 3 + 3
preprocessing and export processes) and threads (every core); the time per case includes process start, divided by
the cases of the run. OpenVINO's network is converted once before the timed runs (time shown separately); the timed
runs read it from the cache. Peak memory is the largest resident set of the command's process or of any process it
started (``wait4``'s ``ru_maxrss``). Targets: nnalign_predict (torch) <= 1.05x nnUNetv2_predict; OpenVINO <= 0.5x; the
per-case report (timed in this process on the torch run's segmentations) < 5 % of nnalign_predict's time per case.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPORT_SHARE = 0.05
TARGET_RATIO = {"nnalign_predict --backend torch": 1.05, "nnalign_predict --backend openvino": 0.5}
COMMANDS = ("nnUNetv2_predict", "nnalign_predict --backend torch", "nnalign_predict --backend openvino")
MIRRORING = {"off": (False,), "on": (True,), "both": (False, True)}


def run(command: list[str], env: dict) -> tuple[float, float]:
    """Wall time (s) and peak resident memory (MiB) of ``command`` and the processes it starts."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    errors = proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])}... failed ({proc.returncode}): {errors[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


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


def build_brats_sized_model(work: Path, case: Path) -> tuple[Path, Path]:
    """A mixture teacher (modality dropout) on nnalign's 3d_fullres plans for a BraTS 2018-sized dataset, untrained,
    as a model folder under ``work/results``, and ``case`` linked into nnU-Net naming; (model dir, images dir)."""
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnalign.data.brats_layout import find_cases
    from nnalign.modalities import modalities_from_dataset_json
    from nnalign.planning.brats_like import plan_brats_like
    from nnalign.planning.planner import nnAlignPlanner
    from nnalign.training.teacher_trainer import teacher_trainer_class

    os.environ.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"))
    plans = plan_brats_like(nnAlignPlanner, 998)
    dataset_json = json.loads((work / "raw" / "Dataset998_BraTSLike" / "dataset.json").read_text())
    trainer = "nnAlignTeacher_mixture_drop0p5"
    model = work / "results" / "Dataset998_BraTSLike" / f"{trainer}__{plans['plans_name']}__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps(plans, indent=2))
    (model / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    modalities = modalities_from_dataset_json(dataset_json)
    network = teacher_trainer_class(trainer).build_network_architecture(
        manager, configuration, len(modalities), manager.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False)
    torch.save({"network_weights": network.state_dict(), "trainer_name": trainer,
                "init_args": {"configuration": "3d_fullres"},  # all nnU-Net's predictor reads of them
                "inference_allowed_mirroring_axes": (0, 1, 2)}, model / "fold_0" / "checkpoint_final.pth")
    found, = find_cases(case)
    images = work / "brats_case"
    images.mkdir()
    for index, modality in enumerate(modalities):
        (images / f"{found.case_id}_{index:04d}.nii.gz").symlink_to(found.images[modality].resolve())
    return model, images


def commands(model: Path, images: Path, out: Path, device: str, mirroring: bool) -> dict[str, list[str]]:
    trainer, plans, configuration = model.name.split("__")
    bin_dir = Path(sys.executable).parent
    nnalign = [sys.executable, "-m", "nnalign.cli.predict", "-i", str(images), "-m", str(model), "-f", "0",
               "-device", device, "--labels", "nnunet", "--overwrite", *([] if mirroring else ["--disable-tta"])]
    return {
        "nnUNetv2_predict": [str(bin_dir / "nnUNetv2_predict"), "-i", str(images), "-o", str(out / "nnunet"), "-d",
                             model.parent.name, "-tr", trainer, "-p", plans, "-c", configuration, "-f", "0",
                             "-device", device, *([] if mirroring else ["--disable_tta"])],
        "nnalign_predict --backend torch": [*nnalign, "-o", str(out / "torch"), "--backend", "torch"],
        "nnalign_predict --backend openvino": [*nnalign, "-o", str(out / "openvino"), "--backend", "openvino"],
    }


def agreement(reference: Path, other: Path) -> str:
    """Voxel agreement (%) and the largest per-region Dice difference of ``other``'s segmentations against
    ``reference``'s, the worst case of the run."""
    import SimpleITK as sitk

    from nnalign.inference.openvino_backend import label_agreement

    worst_voxels, worst_dice = 1.0, 0.0
    for file in sorted(reference.glob("*.nii.gz")):
        voxels, dice = label_agreement(*(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / file.name)))
                                         for folder in (reference, other)))
        worst_voxels, worst_dice = min(worst_voxels, voxels), max(worst_dice, *dice.values())
    return f"{100 * worst_voxels:.3f} % / {worst_dice:.4f}"


def report_seconds(model: Path, predictions: Path) -> float:
    """Median wall time (s) of the per-case report over the segmentations in ``predictions`` (nnU-Net labels):
    everything ``nnalign_predict`` adds for it after the prediction (volumes, expected Dice, training range and
    warnings, the JSON beside the segmentation and the report table's row)."""
    import SimpleITK as sitk

    from nnalign.atomic import write_json_atomic
    from nnalign.inference.case_report import ReportTable, case_report
    from nnalign.inference.models import load_model

    loaded = load_model(model, (0,))
    table = ReportTable(predictions)
    times = []
    for file in sorted(predictions.glob("*.nii.gz")):
        image = sitk.ReadImage(str(file))
        seg = sitk.GetArrayFromImage(image)
        case = file.name[: -len(".nii.gz")]
        start = time.perf_counter()
        report = case_report(case, loaded.modalities, loaded.modalities, loaded, "all modalities present", "nnunet",
                             seg, image.GetSpacing())
        write_json_atomic(predictions / f"{case}.json", report)
        table.update(report)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def compare(label: str, model: Path, images: Path, work: Path, env: dict, device: str, mirroring: bool,
            repeats: int) -> list[str]:
    """The table rows of one model, case set and mirroring setting."""
    out = work / f"out_{label}_{mirroring}"
    cases = len(list(images.glob("*_0000.nii.gz")))
    todo = commands(model, images, out, device, mirroring)
    convert, _ = run(todo["nnalign_predict --backend openvino"], env)  # converts (or finds the cache), not timed
    measured = {name: [run(command, env) for _ in range(repeats)] for name, command in todo.items()}
    seconds = {name: float(np.median([t for t, _ in runs])) / cases for name, runs in measured.items()}
    memory = {name: max(m for _, m in runs) for name, runs in measured.items()}
    base = seconds["nnUNetv2_predict"]
    rows = []
    for name in COMMANDS:
        ratio = seconds[name] / base
        target = TARGET_RATIO.get(name)
        verdict = "" if target is None else f" ({'met' if ratio <= target else 'NOT met'}, <= {target})"
        agree = "-" if name == "nnalign_predict --backend torch" else agreement(out / "torch", out / name.split()[-1]
                                                                               if name != "nnUNetv2_predict"
                                                                               else out / "nnunet")
        rows.append(f"| {label} | {'on' if mirroring else 'off'} | {name} | {seconds[name]:.1f} | {ratio:.2f}{verdict} "
                    f"| {memory[name]:.0f} | {agree} |")
    report = report_seconds(model, out / "torch")
    print(f"{label}, mirroring {'on' if mirroring else 'off'}: {cases} cases; the first OpenVINO run (conversion "
          f"or cache) took {convert:.1f} s; the per-case report takes {1000 * report:.0f} ms, "
          f"{100 * report / seconds['nnalign_predict --backend torch']:.2f} % of nnalign_predict's time per case "
          f"(target < {100 * REPORT_SHARE:g} %)", file=sys.stderr)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a model folder <Trainer>__<plans>__<configuration>")
    p.add_argument("--input", type=Path, help="cases in nnU-Net naming with every modality")
    p.add_argument("--brats", type=Path, help="also one real BraTS case folder, through a 3d_fullres teacher")
    p.add_argument("--mirroring", choices=MIRRORING, default="both", help="for --model (default: %(default)s)")
    p.add_argument("--brats-mirroring", choices=MIRRORING, default="both", help="for --brats (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each command (the median is used)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from nnalign.paths import setup_env

        if not args.model or args.brats:
            os.environ.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"),
                              nnUNet_results=str(work / "results"))
        setup_env()  # nnUNetv2_predict finds nnalign's trainers through nnUNet_extTrainer, as nnalign_predict does
        os.environ["XDG_CACHE_HOME"] = str(work / "cache")  # a read-only model folder's OpenVINO cache stays here
        env = dict(os.environ)
        if args.model:  # a copy: the model folder is left as it was, and OpenVINO converts from scratch
            model = shutil.copytree(args.model, work / "results" / args.model.parent.name / args.model.name)
            env["nnUNet_results"] = str(work / "results")
            images = args.input
        else:
            model, images = build_model(work, env)
        print(f"{args.device}, {os.cpu_count()} cores, median of {args.repeats} run(s) each, per case\n")
        print("| model | mirroring | command | time per case (s) | vs nnUNetv2_predict | peak memory (MiB) | "
              "agreement with torch (voxels / max Dice diff) |\n|---|---|---|---|---|---|---|", flush=True)
        for mirroring in MIRRORING[args.mirroring]:
            print("\n".join(compare(model.parent.name, model, images, work, env, args.device, mirroring,
                                    args.repeats)), flush=True)
        if args.brats:
            big, big_images = build_brats_sized_model(work, args.brats)
            env = {**env, "nnUNet_results": str(work / "results")}
            for mirroring in MIRRORING[args.brats_mirroring]:
                print("\n".join(compare("BraTS-sized, 3d_fullres", big, big_images, work, env, args.device,
                                        mirroring, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
