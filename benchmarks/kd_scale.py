"""How strongly ProtoKD's logit term pulls against the segmentation loss: in its own code, and in nnalign's sigmoid-region
adaptation.

ProtoKD's code (SakurajimaMaiii/ProtoKD, ``code/loss.py``, ``code/train_protokd.py``) trains a 4-class softmax head
with a class-weighted cross-entropy (weight 1 - N_c / N per batch, a weighted mean) plus a soft Dice averaged over the
four classes (denominator sum p^2 + sum g^2), and adds ``10 x`` the KL at T 10, averaged over batch, classes and
voxels. nnalign's students train nnU-Net's region loss (Dice + BCE on WT, TC, ET, deep-supervised) and add
:class:`~nnalign.losses.kd.protokd.ProtoKDLoss`'s ``kd`` term on the full-resolution logits.

For a fresh student (logits drawn around 0) and a right, confident teacher, this prints the norm of each term's
gradient at the full-resolution logits, the ratio KD / segmentation in both, and the ``kd_weight`` at which nnalign's
ratio equals the original's::

    python benchmarks/kd_scale.py --tumour 0.04 0.08 0.14 --ds-stages 4 6

Only the logits are compared: the student's network is the same in both terms, so the ratio at the logits is the ratio
of their pulls. The teacher's logits are set, not trained (``--teacher-logits``).

``--smunet`` prints instead how SMU-Net's style loss in its code (rezazad68/smunet, ``losses.py::get_style_loss``:
``1e-4 x sum((G_f - G_m)^2) / (4 C^2 (H W)^2)``, G the batch-mixed Gram ``F F^T / (B C D H W)`` of F (B C, D H W))
relates to nnalign's ``mean((G_s - G_t)^2)`` (:func:`~nnalign.losses.kd.smunet.style_loss`) on the same features:
the factor between their values and between their gradients, per style map, and the gradient of each method's style
term against its content term (``0.2 x mean((h_s - h_t)^2)``) on the same map. Features are N(0, 1), the student's
another draw::

    python benchmarks/kd_scale.py --smunet
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import deep_supervision_weights, dice_bce  # noqa: E402

CLASSES = 4  # background, edema, necrosis, enhancing tumour
SPLIT = (0.5, 0.25, 0.25)  # shares of the tumour: edema, necrosis, enhancing tumour


def labels(batch: int, size: int, tumour: float, generator: torch.Generator) -> torch.Tensor:
    """Random class labels (B, S, S, S): ``tumour`` of the voxels split over the three tumour classes by SPLIT."""
    u = torch.rand(batch, size, size, size, generator=generator)
    out = torch.zeros_like(u, dtype=torch.long)
    low = 0.0
    for cls, share in enumerate(SPLIT, start=1):
        out[(u >= low) & (u < low + tumour * share)] = cls
        low += tumour * share
    return out


def original_segmentation(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """ProtoKD's ``DiceCeLoss`` on softmax logits (B, C, *S): class-weighted cross-entropy + mean soft Dice loss."""
    counts = torch.stack([(label == c).sum() for c in range(CLASSES)]).float()
    ce = F.cross_entropy(logits, label, weight=1 - counts / counts.sum())
    probs = F.softmax(logits, dim=1)
    onehot = F.one_hot(label, CLASSES).movedim(-1, 1).float()
    dice = [1 - (2 * (probs[:, c] * onehot[:, c]).sum() + 1e-5)
            / (onehot[:, c].pow(2).sum() + probs[:, c].pow(2).sum() + 1e-5) for c in range(CLASSES)]
    return ce + sum(dice) / CLASSES


def original_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float, weight: float) -> torch.Tensor:
    """ProtoKD's ``weight x softmax_kl_loss(z_s / T, z_t / T).mean()`` (no T^2)."""
    kl = F.kl_div(F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1), reduction="none")
    return weight * kl.mean()


def gradient_norm(loss, logits: torch.Tensor) -> float:
    """The norm of ``loss(logits)``'s gradient at ``logits`` (summed in float64: a float32 square of SMU-Net's style
    gradients, about 1e-22 per element, is below float32's range)."""
    leaf = logits.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(leaf), leaf)
    return float(grad.double().norm())


def measure(tumour: float, stages: int, size: int, inside: float, outside: float, spread: float,
            seed: int = 0) -> dict[str, float]:
    """The gradient norms and ratios for one tumour fraction and deep-supervision depth."""
    from nnalign.losses.kd import build_kd
    from nnalign.networks.outputs import NetworkOutputs

    generator = torch.Generator().manual_seed(seed)
    label = labels(2, size, tumour, generator)
    # the original: a softmax head, teacher right with a margin of -outside over the other classes
    onehot = F.one_hot(label, CLASSES).movedim(-1, 1).float()
    teacher_softmax = -outside * onehot
    student_softmax = spread * torch.randn(onehot.shape, generator=generator)
    seg_original = gradient_norm(lambda z: original_segmentation(z, label), student_softmax)
    kd_original = gradient_norm(lambda z: original_kd(z, teacher_softmax, 10.0, 10.0), student_softmax)
    # nnalign: nested region sigmoids, teacher at `inside` within a region and `outside` elsewhere
    regions = torch.stack([label >= 1, label >= 2, label >= 3], 1).float()
    teacher_regions = torch.where(regions > 0, inside, outside)
    student_regions = spread * torch.randn(regions.shape, generator=generator)
    seg_loss = dice_bce(batch_dice=False)
    full_resolution = float(deep_supervision_weights(stages)[0])
    seg_ours = full_resolution * gradient_norm(lambda z: seg_loss(z, regions), student_regions)
    protokd = build_kd("protokd", feature_channels=1, bottleneck_channels=1, skip_channels=[1], num_regions=3)
    features = torch.zeros(2, 1, size, size, size)

    def kd_ours(z: torch.Tensor) -> torch.Tensor:
        student = NetworkOutputs(logits=[z], skips=[features], decoder_features=features)
        teacher = NetworkOutputs(logits=[teacher_regions], skips=[features], decoder_features=features)
        return protokd(student, teacher, regions, 0)["kd"]

    kd_ours_norm = gradient_norm(kd_ours, student_regions)
    ratio_original, ratio_ours = kd_original / seg_original, kd_ours_norm / seg_ours
    return {"seg_original": seg_original, "kd_original": kd_original, "seg_ours": seg_ours, "kd_ours": kd_ours_norm,
            "ratio_original": ratio_original, "ratio_ours": ratio_ours,
            "matching_weight": protokd.kd_weight * ratio_original / ratio_ours, "kd_weight": protokd.kd_weight}


def original_style(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """SMU-Net's code's style loss, from its formula: batch-mixed Gram of (B, C, D, H, W) features, H and W only in
    the divisor."""
    def gram(f: torch.Tensor) -> torch.Tensor:
        flat = f.reshape(f.shape[0] * f.shape[1], -1)
        return flat @ flat.T / f.numel()

    c, h, w = student.shape[1], student.shape[2], student.shape[3]
    return 1e-4 * (gram(teacher) - gram(student)).pow(2).sum() / (4 * c**2 * (h * w) ** 2)


def smunet_style(shape: tuple[int, ...], seed: int = 0) -> dict[str, float]:
    """The original's and nnalign's style terms on N(0, 1) features of ``shape`` (B, C, D, H, W)."""
    from nnalign.losses.kd.smunet import SMUNetLoss, style_loss

    generator = torch.Generator().manual_seed(seed)
    teacher, student = (torch.randn(shape, generator=generator) for _ in range(2))
    weight = SMUNetLoss.__init__.__kwdefaults__["style_weight"]
    content_weight = SMUNetLoss.__init__.__kwdefaults__["content_weight"]
    content = gradient_norm(lambda f: content_weight * (f - teacher).pow(2).mean(), student)
    original = gradient_norm(lambda f: original_style(f, teacher), student)
    ours = gradient_norm(lambda f: style_loss([f], [teacher]), student)
    return {"value_factor": float(original_style(student, teacher) / style_loss([student], [teacher])),
            "gradient_factor": original / ours, "original_vs_content": original / content,
            "nnalign_vs_content": weight * ours / content, "style_weight": weight}


def main_smunet() -> None:
    print("N(0, 1) teacher and student features; factor = the original's style loss / nnalign's mean((dG)^2)\n")
    print("| style map (B, C, D, H, W) | value factor | gradient factor | original: style / content gradient | "
          "nnalign: style / content gradient |")
    print("|---|---|---|---|---|")
    rows = [((1, 128, 20, 24, 16), "the original's: its 160x192x128 crop / 8"),
            ((1, 128, 10, 10, 10), "an 80^3 crop / 8"), ((1, 32, 20, 24, 16), "fewer channels"),
            ((2, 128, 20, 24, 16), "batch 2: the original's Gram mixes the samples")]
    for shape, what in rows:
        r = smunet_style(shape)
        print(f"| {shape} ({what}) | {r['value_factor']:.4g} | {r['gradient_factor']:.4g} | "
              f"{r['original_vs_content']:.3g} | {r['nnalign_vs_content']:.3g} "
              f"(style_weight {r['style_weight']:.4g}) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smunet", action="store_true",
                   help="instead: SMU-Net's style term in its code against nnalign's, per style map")
    p.add_argument("--tumour", type=float, nargs="+", default=[0.04, 0.08, 0.14],
                   help="tumour fractions of the patch")
    p.add_argument("--ds-stages", type=int, nargs="+", default=[4, 6],
                   help="resolution stages of nnU-Net's deep supervision (4: the demo's 3d_cpu, 6: BraTS 3d_fullres)")
    p.add_argument("--size", type=int, default=48, help="patch edge in voxels")
    p.add_argument("--teacher-logits", type=float, nargs=2, default=[10.0, -15.0], metavar=("INSIDE", "OUTSIDE"),
                   help="the teacher's region logit inside and outside a region")
    p.add_argument("--spread", type=float, default=0.5, help="standard deviation of the fresh student's logits")
    args = p.parse_args()
    if args.smunet:
        main_smunet()
        return
    inside, outside = args.teacher_logits
    print(f"teacher logits {inside:+g} inside / {outside:+g} outside a region; student logits ~ N(0, "
          f"{args.spread:g}); patch {args.size}^3, batch 2\n")
    print("| tumour | DS stages | original: kd / seg | nnalign: kd / seg | kd_weight for the original's ratio |")
    print("|---|---|---|---|---|")
    weights = []
    for tumour in args.tumour:
        for stages in args.ds_stages:
            row = measure(tumour, stages, args.size, inside, outside, args.spread)
            weights.append(row["matching_weight"])
            print(f"| {tumour:.2f} | {stages} | {row['ratio_original']:.3f} | {row['ratio_ours']:.3f} "
                  f"(kd_weight {row['kd_weight']:g}) | {row['matching_weight']:.2f} |")
    print(f"\nkd_weight for ProtoKD's own balance: {min(weights):.2f}-{max(weights):.2f}")


if __name__ == "__main__":
    main()
