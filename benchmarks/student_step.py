"""Student training step with each distillation method, against the same student without distillation and against
stock nnU-Net, same plan and patch, in one run.

    python benchmarks/student_step.py --config 3d_cpu --device cpu
    python benchmarks/student_step.py --config 3d_fullres --device cuda --amp [--compile]

A distillation step is what nnalign's student trainer does: the frozen teacher's forward pass (no gradients, same
autocast), the student's forward, nnU-Net's region loss plus the distillation loss, backward, clipping, SGD (and the
discriminator's step for SMU-Net). The students train as the trainer trains them: on the CPU with their weights in
the training layout (:data:`nnalign.training.common.CPU_TRAINING_LAYOUT`); stock nnU-Net and the frozen teacher keep
the default one.

The frozen teacher's forward pass is also timed on its own: every KD step contains it, so a method's floor is the
plain student step plus that pass. Target: every KD step <= 1.05x its floor. That ratio is taken within each round
(the KD step over the plain step plus the teacher's pass of the same round) and its median over the rounds is
printed with the lowest and highest round, so load that drifts between rounds does not enter it.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (benchmark_configuration, benchmark_device, brats_like_plans,  # noqa: E402
                    interleaved_seconds, peak_cuda_bytes, region_loss, region_targets, saved_activation_bytes,
                    step_benchmark_parser)

FLOOR_TARGET = 1.05
TEACHER_ROW = "frozen teacher forward alone"
PLAIN_ROW = "student, no distillation"


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
                                     3, deep_supervision=False)
    return stock, make_student, teacher.eval().requires_grad_(False)


def make_step(net, cfg, device, amp: bool, teacher=None, kd=None):
    from nnalign.networks.align_unet import as_outputs
    from nnalign.training.common import optimizer_step

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
        optimizer_step(loss, opt, scaler, params)
        if adv_opt is not None:
            adv_opt.zero_grad(set_to_none=True)
            kd.adversary_loss(s, t).backward()
            adv_opt.step()

    return step


def teacher_forward(teacher, cfg, device, amp: bool):
    """The frozen teacher's forward pass as a KD step runs it (no gradients, same autocast), timed on its own."""
    x = torch.randn(cfg["batch_size"], 4, *cfg["patch_size"], device=device)

    def step():
        ctx = torch.autocast("cuda", torch.float16) if amp else contextlib.nullcontext()
        with ctx, torch.no_grad():
            teacher(x, None, return_parts=True)

    return step


def main() -> None:
    from nnalign.losses.kd import KD_METHODS, build_kd

    methods = [m for m in KD_METHODS if m != "none"]
    p = step_benchmark_parser(__doc__)
    p.add_argument("--kd", nargs="+", default=methods, choices=methods, metavar="METHOD",
                   help="KD methods to time, e.g. only kdnet for a quicker --compile run (default: all)")
    args = p.parse_args()
    device = benchmark_device(args)
    with brats_like_plans() as plans:
        cfg = benchmark_configuration(plans, args)
    arch = cfg["architecture"]
    features = list(arch["arch_kwargs"]["features_per_stage"])
    torch.manual_seed(0)
    stock, make_student, teacher = build_networks(arch, [1])
    from nnalign.training.common import set_training_layout

    def prepare(net: torch.nn.Module, training_layout: bool = False) -> torch.nn.Module:
        net = net.to(device)
        set_training_layout(net, device, training_layout)
        return torch.compile(net) if args.compile else net

    teacher = prepare(teacher)
    print(f"plan {args.config}: patch {cfg['patch_size']}, batch {cfg['batch_size']}, features {features}, "
          f"student T1ce, device {device}{', AMP' if args.amp else ''}{', compiled' if args.compile else ''}")
    variants = [("stock nnU-Net (4 modalities)", prepare(stock), None),
                (PLAIN_ROW, prepare(make_student(), True), None)]
    for method in args.kd:
        kd = build_kd(method, feature_channels=features[0], bottleneck_channels=features[-1],
                      skip_channels=features).to(device)
        variants.append((f"student + {method}", prepare(make_student(), True), kd))
    steps = {name: make_step(net, cfg, device, args.amp, teacher, kd) for name, net, kd in variants}
    steps[TEACHER_ROW] = teacher_forward(teacher, cfg, device, args.amp)
    times = interleaved_seconds(steps, device, args.warmup, args.steps)
    seconds = {name: median(t) for name, t in times.items()}
    floors = [plain + forward for plain, forward in zip(times[PLAIN_ROW], times[TEACHER_ROW])]
    vs_floor = {name: sorted(s / f for s, f in zip(t, floors))
                for name, t in times.items() if name.startswith("student + ")}
    rows = [(name, seconds[name], peak_cuda_bytes(step) if device.type == "cuda" else saved_activation_bytes(step))
            for name, step in steps.items()]
    plain_s, plain_m = seconds[PLAIN_ROW], rows[1][2]  # rows follow the variants: stock, then the plain student
    floor_s = plain_s + seconds[TEACHER_ROW]
    kind = "peak CUDA memory" if device.type == "cuda" else "saved activations"
    print(f"\n| step | median (s) | vs plain student | vs floor, median of rounds (lowest-highest) | vs stock | {kind} "
          f"(MiB) | vs plain student |\n|---|---|---|---|---|---|---|")
    for name, s, m in rows:
        ratios = vs_floor.get(name)
        floor_cell = f"{median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})" if ratios else ""
        print(f"| {name} | {s:.3f} | {s / plain_s:.2f} | {floor_cell} | {s / rows[0][1]:.2f} | {m / 2**20:.0f} | "
              f"{m / plain_m:.2f} |")
    worst_name, worst = max(((name, median(r)) for name, r in vs_floor.items()), key=lambda item: item[1])
    print(f"\nfloor (plain student step + frozen teacher forward): {floor_s:.3f} s, {floor_s / plain_s:.2f}x the plain "
          f"student step; slowest KD step: {worst_name}, {worst:.2f}x its floor, median of {args.steps} rounds "
          f"(target <= {FLOOR_TARGET}x): {'met' if worst <= FLOOR_TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
