"""Where a distilled student's first iterations are pulled: each loss term's gradient at the student's full-resolution
logits, per region, against the segmentation loss's.

For each distillation method, a fresh student of the given modalities is trained in-process with nnU-Net's loop
pieces (its data loader, loss and optimiser step) from a trained teacher. Before every step, the gradient of each
term (``seg_weight`` x nnU-Net's Dice + BCE, and each weighted distillation component) with respect to the
full-resolution logits is taken separately and reported, per region (WT, TC, ET):

- ``|g|``: the gradient's L2 norm, as a ratio to the segmentation term's (how strongly the term pulls);
- ``|g_w|``: the norm of the term's gradient over the student's weights, as a ratio to the segmentation term's (this
  also counts the feature terms, which reach the weights without passing through the logits);
- ``bg`` / ``fg``: the mean gradient over the voxels outside / inside the region (positive pushes the logit down,
  towards "not this region");

plus the student's mean logit there and its Dice on the training batch, averaged over windows of iterations::

    python benchmarks/kd_gradients.py -d 900 -c 3d_cpu --teacher nnAlignTeacher_mixture_drop0p5 --iters 40

The teacher must be trained (e.g. by ``nnalign_demo``). Nothing is written to the results folder: the student runs
in a scratch results folder that links the teacher.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

REGIONS = ("WT", "TC", "ET")


def _windows(iters: int) -> list[tuple[int, int]]:
    edges = sorted({0, min(5, iters), min(15, iters), iters})
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def measure(kd: str, teacher: str, dataset: str, configuration: str, subset: tuple[str, ...], iters: int,
            overrides: dict | None = None) -> list:
    """Per iteration: {term: (R,) norms, term_bg: (R,), term_fg: (R,)}, logits and Dice per region; ``overrides``:
    loss settings of the method (as ``nnalign_train --kd-set``)."""
    from dataclasses import replace

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnalign.networks.align_unet import as_outputs
    from nnalign.runs import StudentSpec, TeacherSpec
    from nnalign.training.student_trainer import student_trainer_class

    pre = Path(os.environ["nnUNet_preprocessed"]) / dataset
    name = StudentSpec(subset, kd, TeacherSpec.parse(teacher)).trainer_name()
    plans = {**load_json(pre / "nnAlignPlans.json"), "continue_training": False}  # as nnU-Net's run_training adds
    trainer = student_trainer_class(name)(plans, configuration, 0, load_json(pre / "dataset.json"),
                                          torch.device("cpu"))
    trainer.spec = replace(trainer.spec, overrides=dict(overrides or {}))
    trainer.initialize()
    trainer.dataloader_train, _ = trainer.get_dataloaders()
    rows = []
    for it in range(iters):
        batch = next(trainer.dataloader_train)
        data, target = batch["data"], batch["target"]
        full = target[0] if isinstance(target, list) else target
        with torch.no_grad():
            teacher_out = as_outputs(trainer.teacher(data, None, return_parts=True))
        student = as_outputs(trainer.network(data, None, return_parts=True))
        logits = student.final_logits
        terms = {"seg": trainer.kd.seg_weight * trainer.loss(student.logits, target)}
        terms.update({k: v for k, v in trainer.kd(student, teacher_out, full, it // 10).items() if k != "total"})
        inside = full > 0.5
        row = {"logit_bg": [], "logit_fg": [], "dice": []}
        weights = [p for p in trainer.network.parameters() if p.requires_grad]
        for term, value in terms.items():
            if not value.requires_grad:
                continue
            grads = torch.autograd.grad(value, weights, retain_graph=True, allow_unused=True)
            row[f"{term}_w"] = [float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))] * 3
            (grad,) = torch.autograd.grad(value, logits, retain_graph=True, allow_unused=True)
            grad = torch.zeros_like(logits) if grad is None else grad
            row[term] = [float(grad[:, r].norm()) for r in range(grad.shape[1])]
            row[f"{term}_bg"] = [float(grad[:, r][~inside[:, r]].mean()) if (~inside[:, r]).any() else 0.0
                                 for r in range(grad.shape[1])]
            row[f"{term}_fg"] = [float(grad[:, r][inside[:, r]].mean()) if inside[:, r].any() else float("nan")
                                 for r in range(grad.shape[1])]
        with torch.no_grad():
            for r in range(logits.shape[1]):
                z, m = logits[:, r].detach(), inside[:, r]
                row["logit_bg"].append(float(z[~m].mean()))
                row["logit_fg"].append(float(z[m].mean()) if m.any() else float("nan"))
                pred = z > 0
                denom = float(pred.sum() + m.sum())
                row["dice"].append(2 * float((pred & m).sum()) / denom if denom else float("nan"))
        rows.append(row)
        trainer.train_step(batch)
    return rows


def _mean(rows: list[dict], key: str, r: int) -> float:
    import math

    values = [row[key][r] for row in rows if key in row and not math.isnan(row[key][r])]
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-d", dest="dataset", required=True, help="dataset ID or name (planned and preprocessed)")
    p.add_argument("-c", dest="configuration", default="3d_cpu")
    p.add_argument("--teacher", required=True, help="the teacher's trainer name, e.g. nnAlignTeacher_mixture")
    p.add_argument("--modalities", default="T1ce")
    p.add_argument("--kd", nargs="+", default=["none", "kdnet", "pmkl", "protokd", "smunet"])
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--kd-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a loss setting of every --kd method, as nnalign_train's (e.g. temperature=2)")
    args = p.parse_args()

    import torch

    from nnalign.cli.train import parse_kd_overrides, resolve_dataset
    from nnalign.modalities import parse_modalities
    from nnalign.paths import setup_env

    torch.manual_seed(0)
    folders = setup_env()
    dataset = resolve_dataset(args.dataset, Path(folders["nnUNet_preprocessed"]), Path(folders["nnUNet_raw"]))
    subset = parse_modalities(args.modalities)
    teacher_dir = next((Path(folders["nnUNet_results"]) / dataset).glob(f"{args.teacher}__*__{args.configuration}"))
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / dataset).mkdir()
        os.symlink(teacher_dir, Path(scratch) / dataset / teacher_dir.name)
        os.environ["nnUNet_results"] = scratch
        os.environ["nnUNet_compile"] = "f"
        for kd in args.kd:
            torch.manual_seed(0)
            overrides = parse_kd_overrides(kd, args.kd_set, None)
            rows = measure(kd, args.teacher, dataset, args.configuration, subset, args.iters, overrides)
            terms = [k for k in rows[0]
                     if k not in ("logit_bg", "logit_fg", "dice") and not k.endswith(("_bg", "_fg", "_w"))]
            settings = "".join(f", {k} {v}" for k, v in overrides.items())
            print(f"\n## {kd}{settings} ({'+'.join(subset)} student of {args.teacher})\n")
            print("| iterations | region | Dice | logit bg / fg | " +
                  " | ".join(f"{t} \\|g_w\\|, \\|g\\| / seg, bg, fg" for t in terms) + " |")
            print("|---|---|---|---|" + "---|" * len(terms))
            for a, b in _windows(args.iters):
                window = rows[a:b]
                for r, region in enumerate(REGIONS):
                    seg = _mean(window, "seg", r)
                    seg_w = _mean(window, "seg_w", r)
                    cells = [f"{_mean(window, t + '_w', r) / seg_w:.2f}, {_mean(window, t, r) / seg:.2f}, "
                             f"{_mean(window, t + '_bg', r):+.1e}, {_mean(window, t + '_fg', r):+.1e}" for t in terms]
                    print(f"| {a + 1}-{b} | {region} | {_mean(window, 'dice', r):.3f} | "
                          f"{_mean(window, 'logit_bg', r):+.1f} / {_mean(window, 'logit_fg', r):+.1f} | "
                          + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
