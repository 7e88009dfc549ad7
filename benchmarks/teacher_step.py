"""Teacher training step (each anchor) against stock nnU-Net's network, same plan and patch, in one run.

    python benchmarks/teacher_step.py --config 3d_cpu --device cpu
    python benchmarks/teacher_step.py --config 3d_fullres --device cuda --amp [--compile]

The plan is nnalign's for a BraTS 2018-sized dataset (8 GB target). The step is what nnU-Net's trainer does:
forward, region Dice+BCE with deep supervision (plus lambda * alignment for the teacher), backward, gradient clipping,
SGD. A teacher trained with modality dropout (``--modality-dropout``, the default P* teacher's 0.5) draws each
sample's modalities, zeroes the dropped channels and runs with the presence mask, so the anchor fills the dropped
modalities' latents, as the trainer's step does; one more row does so on a dataset where 40 % of the cases lack
sequences (the dropout draws among what each case has), which should cost no more. Prints median step time and
memory (peak CUDA memory on a GPU; saved activations on a CPU) and the ratio to stock nnU-Net.

The teachers train as nnalign's trainer trains them: on the CPU with their weights in the training layout
(:data:`nnalign.training.common.CPU_TRAINING_LAYOUT`), which is not stock nnU-Net's. One more row runs stock nnU-Net's
network in that layout too, and the last column divides by it: the cost of the method itself, layout aside.
Target: every anchor's step <= 1.10x stock nnU-Net's, as nnU-Net trains it.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nnalign.networks.anchor_registry import ANCHOR_KINDS  # noqa: E402
from common import (benchmark_configuration, benchmark_device, brats_like_plans,  # noqa: E402
                    interleaved_median_seconds, peak_cuda_bytes, region_loss, region_targets, saved_activation_bytes,
                    step_benchmark_parser)

ANCHORS = ("none", "normal", "modality:T1ce", "mixture")
TARGET_RATIO = 1.10
STOCK_IN_LAYOUT = "stock nnU-Net, training layout"
INCOMPLETE_SHARE = 0.4
INCOMPLETE_ROW = f"mixture on {100 * INCOMPLETE_SHARE:g} % incomplete cases"
"""The row of the default P* teacher on a dataset where that share of the cases lacks sequences: each sample's case
lacks a random proper subset, and the dropout draws among what it has."""


def build(variant: str, arch: dict, req_import, deep_supervision: bool, **latent_settings):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnalign.networks.align_unet import PLAIN_UNET_KEYS

    if variant == "stock":
        kwargs = {k: v for k, v in arch["arch_kwargs"].items() if k in PLAIN_UNET_KEYS}
        return get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", kwargs,
                                      req_import, 4, 3, deep_supervision=deep_supervision)
    kwargs = {**arch["arch_kwargs"], "anchor": variant, **latent_settings}
    return get_network_from_plans(arch["network_class_name"], kwargs, req_import, 4, 3,
                                  deep_supervision=deep_supervision)


def case_availability(batch_size: int, incomplete: float, generator: torch.Generator) -> torch.Tensor | None:
    """(B, M) bool: each sample's case lacks a random proper subset of the four modalities with probability
    ``incomplete`` (as :func:`nnalign.data.synthetic.incomplete_cases` draws them); None when ``incomplete`` is 0."""
    if incomplete <= 0:
        return None
    available = torch.ones(batch_size, 4, dtype=torch.bool)
    for row in range(batch_size):
        if torch.rand(1, generator=generator).item() < incomplete:
            code = int(torch.randint(1, 15, (1,), generator=generator))
            available[row] = torch.tensor([not (code >> j & 1) for j in range(4)])
    return available


def make_step(net, cfg: dict, device: torch.device, amp: bool, align_weight: float, dropout: float = 0.0,
              incomplete: float = 0.0):
    from nnalign.training.common import optimizer_step
    from nnalign.training.presence import sample_presence, zero_absent

    kw = cfg["architecture"]["arch_kwargs"]
    loss_fn = region_loss(len(kw["strides"]), cfg.get("batch_dice", False))
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    x = torch.randn(cfg["batch_size"], 4, *cfg["patch_size"], device=device)
    targets = region_targets(cfg["batch_size"], cfg["patch_size"], kw["strides"], device)
    teacher = hasattr(net, "anchor")
    generator = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", torch.float16) if amp else contextlib.nullcontext()
        with ctx:
            if teacher and dropout > 0:
                available = case_availability(x.shape[0], incomplete, generator)
                present = sample_presence(x.shape[0], x.shape[1], dropout, device=device, available=available)
                parts = net(zero_absent(x, present), present, return_parts=True)
                loss = loss_fn(parts["logits"], targets) + align_weight * net.anchor.alignment_loss(parts)
            elif teacher:
                parts = net(x, return_parts=True)
                loss = loss_fn(parts["logits"], targets) + align_weight * net.anchor.alignment_loss(parts)
            else:
                loss = loss_fn(net(x), targets)
        optimizer_step(loss, opt, scaler, net.parameters())

    return step


def variant_step(variant: str, cfg: dict, device: torch.device, args, dropout: float = 0.0, incomplete: float = 0.0,
                 training_layout: bool | None = None, **latent_settings):
    """The training step of ``variant`` ("stock" or an anchor) built from the plan, seeded, compiled with --compile,
    with modality dropout ``dropout`` on samples whose cases are ``incomplete`` with that probability, in nnalign's
    training layout when ``training_layout`` (default: for the teachers, not for stock nnU-Net)."""
    from nnalign.training.common import set_training_layout

    arch = cfg["architecture"]
    torch.manual_seed(0)
    net = build(variant, arch, arch["_kw_requires_import"], True, **latent_settings).to(device)
    set_training_layout(net, device, variant != "stock" if training_layout is None else training_layout)
    if args.compile:
        net = torch.compile(net)
    return make_step(net, cfg, device, args.amp, args.align_weight, dropout, incomplete)


def main() -> None:
    p = step_benchmark_parser(__doc__)
    p.add_argument("--align-weight", type=float, default=0.1)
    p.add_argument("--modality-dropout", type=float, default=ANCHOR_KINDS["mixture"].modality_dropout, metavar="P",
                   help="the P* teacher's modality dropout (default: its default, %(default)s)")
    p.add_argument("--anchors", nargs="+", default=list(ANCHORS), choices=ANCHORS, metavar="ANCHOR",
                   help="teacher anchors to time, e.g. only mixture for a quicker --compile run (default: all; the "
                        "2-conv and stage-2 encoder rows come with mixture)")
    args = p.parse_args()
    device = benchmark_device(args)
    with brats_like_plans() as plans:
        cfg = benchmark_configuration(plans, args)
        arch = cfg["architecture"]
        print(f"plan {args.config}: patch {cfg['patch_size']}, batch {cfg['batch_size']}, "
              f"features {arch['arch_kwargs']['features_per_stage']}, device {device}"
              f"{', AMP' if args.amp else ''}{', compiled' if args.compile else ''}")
        planned_convs = arch["arch_kwargs"]["latent_convs"]
        other_convs = 2 if planned_convs == 1 else 1
        variants = [("stock", "stock", {}), (STOCK_IN_LAYOUT, "stock", {"training_layout": True}),
                    *((a, a, {}) for a in ANCHORS if a in args.anchors)]
        if "mixture" in args.anchors:
            variants += [(f"mixture, modality dropout {args.modality_dropout:g} (the default P*)", "mixture",
                          {"dropout": args.modality_dropout}),
                         (f"{INCOMPLETE_ROW}, modality dropout {args.modality_dropout:g}", "mixture",
                          {"dropout": args.modality_dropout, "incomplete": INCOMPLETE_SHARE}),
                         (f"mixture, {other_convs}-conv latent encoder", "mixture", {"latent_convs": other_convs}),
                         ("mixture, latents at stage 2", "mixture", {"latent_level": 2})]
        steps = {name: variant_step(variant, cfg, device, args, **settings)
                 for name, variant, settings in variants}
        seconds = interleaved_median_seconds(steps, device, args.warmup, args.steps)
        rows = [(name, seconds[name], peak_cuda_bytes(step) if device.type == "cuda" else saved_activation_bytes(step))
                for name, step in steps.items()]
    stock_s, stock_m = rows[0][1], rows[0][2]
    layout_s = seconds[STOCK_IN_LAYOUT]
    kind = "peak CUDA memory" if device.type == "cuda" else "saved activations"
    print(f"\n| network | median step (s) | ratio | {kind} (MiB) | ratio | step vs {STOCK_IN_LAYOUT} |\n"
          f"|---|---|---|---|---|---|")
    for name, s, m in rows:
        label = "stock nnU-Net" if name == "stock" else name if name == STOCK_IN_LAYOUT else "teacher " + name
        print(f"| {label} | {s:.3f} | {s / stock_s:.2f} | {m / 2**20:.0f} | {m / stock_m:.2f} | {s / layout_s:.2f} |")
    worst = max(s / stock_s for name, s, _ in rows if name in ANCHORS)
    print(f"\nslowest teacher step (planned encoder, {planned_convs} conv, no dropout): {worst:.2f}x stock "
          f"(target <= {TARGET_RATIO}x): {'met' if worst <= TARGET_RATIO else 'NOT met'}")
    default = next((s / stock_s for name, s, _ in rows if "the default P*" in name), None)
    if default is not None:
        incomplete = next(s for name, s, _ in rows if name.startswith(INCOMPLETE_ROW))
        print(f"on {100 * INCOMPLETE_SHARE:g} % incomplete cases the default P* step takes {incomplete / stock_s:.2f}x "
              f"stock, {incomplete / (default * stock_s):.2f}x its step on complete cases (target: no more)")
        print(f"the default P* teacher's step: {default:.2f}x stock (target <= {TARGET_RATIO}x): "
              f"{'met' if default <= TARGET_RATIO else 'NOT met'}")


if __name__ == "__main__":
    main()
