"""Student training step with each distillation method, against the same student without distillation and against
stock nnU-Net, same plan and patch, in one run.

    python benchmarks/student_step.py --config 3d_cpu --device cpu
    python benchmarks/student_step.py --config 3d_fullres --device cuda --amp

A distillation step is what nnalign's student trainer does: the frozen teacher's forward pass (no gradients, same
autocast), the student's forward, nnU-Net's region loss plus the distillation loss, backward, clipping, SGD (and the
discriminator's step for SMU-Net). Target: every KD step <= 1.4x the plain student step.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (brats_like_plans, interleaved_median_seconds, peak_cuda_bytes, region_loss, region_targets,  # noqa: E402
                    saved_activation_bytes)

TARGET_RATIO = 1.4


def build_networks(arch: dict, student_channels: list[int]):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnalign.networks.align_unet import PLAIN_UNET_KEYS, nnAlignStudentUNet

    req = arch["_kw_requires_import"]
    plain = {k: v for k, v in arch["arch_kwargs"].items() if k in PLAIN_UNET_KEYS}
    stock = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", plain, req, 4, 3,
                                   deep_supervision=True)
    student_class = f"{nnAlignStudentUNet.__module__}.{nnAlignStudentUNet.__name__}"
    kwargs = {**arch["arch_kwargs"], "student_modalities": student_channels}
    make_student = lambda: get_network_from_plans(student_class, kwargs, req, 4, 3, deep_supervision=True)  # noqa: E731
    teacher = get_network_from_plans(arch["network_class_name"], {**arch["arch_kwargs"], "anchor": "mixture"}, req, 4,
                                     3, deep_supervision=True)
    return stock, make_student, teacher.eval().requires_grad_(False)


def make_step(net, cfg, device, amp: bool, teacher=None, kd=None):
    from nnalign.networks.align_unet import as_outputs

    kw = cfg["architecture"]["arch_kwargs"]
    loss_fn = region_loss(len(kw["strides"]), cfg.get("batch_dice", False))
    params = [*net.parameters(), *(kd.student_side_parameters() if kd is not None else [])]
    opt = torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True)
    adversary = list(kd.adversary_parameters()) if kd is not None else []
    adv_opt = torch.optim.Adam(adversary, lr=1e-4) if adversary else None
    scaler = torch.amp.GradScaler("cuda") if amp else None
    x = torch.randn(cfg["batch_size"], 4, *cfg["patch_size"], device=device)
    targets = region_targets(cfg["batch_size"], cfg["patch_size"], kw["strides"], device)

    def step():
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", torch.float16) if amp else contextlib.nullcontext()
        with ctx:
            if kd is None:
                loss = loss_fn(net(x), targets)
            else:
                t = None
                if kd.uses_teacher:
                    with torch.no_grad():
                        t = as_outputs(teacher(x, None, return_parts=True))
                s = as_outputs(net(x, None, return_parts=True))
                loss = kd.seg_weight * loss_fn(s.logits, targets) + kd(s, t, targets[0], 5)["total"]
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 12)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 12)
            opt.step()
        if adv_opt is not None:
            adv_opt.zero_grad(set_to_none=True)
            kd.adversary_loss(s, t).backward()
            adv_opt.step()

    return step


def main() -> None:
    from nnalign.losses.kd import KD_METHODS, build_kd

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="3d_cpu", choices=("3d_cpu", "3d_fullres", "paper"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", action="store_true", help="fp16 autocast and grad scaling (CUDA)")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (one step of each variant per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    args = p.parse_args()
    device = torch.device(args.device)
    with brats_like_plans() as plans:
        cfg = plans["configurations"][args.config]
    arch = cfg["architecture"]
    features = list(arch["arch_kwargs"]["features_per_stage"])
    torch.manual_seed(0)
    stock, make_student, teacher = build_networks(arch, [1])
    teacher = teacher.to(device)
    print(f"plan {args.config}: patch {cfg['patch_size']}, batch {cfg['batch_size']}, features {features}, "
          f"student T1ce, device {device}{', AMP' if args.amp else ''}")
    variants = [("stock nnU-Net (4 modalities)", stock.to(device), None),
                ("student, no distillation", make_student().to(device), None)]
    for method in KD_METHODS:
        if method == "none":
            continue
        kd = build_kd(method, feature_channels=features[0], bottleneck_channels=features[-1],
                      skip_channels=features).to(device)
        variants.append((f"student + {method}", make_student().to(device), kd))
    steps = {name: make_step(net, cfg, device, args.amp, teacher, kd) for name, net, kd in variants}
    seconds = interleaved_median_seconds(steps, device, args.warmup, args.steps)
    rows = [(name, seconds[name], peak_cuda_bytes(step) if device.type == "cuda" else saved_activation_bytes(step))
            for name, step in steps.items()]
    plain_s, plain_m = rows[1][1], rows[1][2]
    kind = "peak CUDA memory" if device.type == "cuda" else "saved activations"
    print(f"\n| step | median (s) | vs plain student | vs stock | {kind} (MiB) | vs plain student |\n"
          f"|---|---|---|---|---|---|")
    for name, s, m in rows:
        print(f"| {name} | {s:.3f} | {s / plain_s:.2f} | {s / rows[0][1]:.2f} | {m / 2**20:.0f} | {m / plain_m:.2f} |")
    worst = max(s / plain_s for _, s, _ in rows[2:])
    print(f"\nslowest KD step: {worst:.2f}x the plain student step (target <= {TARGET_RATIO}x): "
          f"{'met' if worst <= TARGET_RATIO else 'NOT met'}")


if __name__ == "__main__":
    main()
