"""Distillation losses (nnalign.losses.kd) against values worked out by hand on tiny tensors.

Numbers used below (natural logs): ln 2 = 0.693147, ln 3 = 1.098612, ln 1.5 = 0.405465, σ(0.2) = 0.549834,
σ(−0.2) = 0.450166, 1/√2 = 0.707107, KL(Bern(0.75) ‖ Bern(0.5)) = 0.75·ln 1.5 + 0.25·ln 0.5
= 0.304099 − 0.173287 = 0.130812.
"""
from __future__ import annotations

import math

import pytest
import torch

from nnalign.errors import NnalignError
from nnalign.losses.kd import KD_METHODS, build_kd, kd_class, register_kd
from nnalign.losses.kd.base import DistillationLoss
from nnalign.losses.kd.base import bernoulli_kl, bernoulli_kl_at_temperature
from nnalign.losses.kd.kdnet import channel_softmax_kl
from nnalign.losses.kd.pmkl import contrastive_pair_loss, regularisation_mask, regularised_kd, soft_target_bce
from nnalign.losses.kd.protokd import class_sums, prototype_maps, regions_to_labels
from nnalign.losses.kd.smunet import consistency_ramp, gram_matrix, style_loss
from nnalign.networks.outputs import NetworkOutputs

LN2, LN3 = math.log(2), math.log(3)
KL_75_50 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.130812


def t(values, shape=None) -> torch.Tensor:
    x = torch.tensor(values, dtype=torch.float32)
    return x.reshape(shape) if shape is not None else x


def outs(logits, skips=None, dec=None) -> NetworkOutputs:
    """NetworkOutputs with only what a test needs; unused fields get harmless placeholders."""
    skips = skips if skips is not None else [torch.zeros(logits.shape[0], 1, *logits.shape[2:])]
    dec = dec if dec is not None else torch.zeros(logits.shape[0], 1, *logits.shape[2:])
    return NetworkOutputs(logits=[logits], skips=list(skips), decoder_features=dec)


def approx(x: torch.Tensor, expected: float, rel: float = 1e-5, abs_: float = 1e-7) -> bool:
    return float(torch.as_tensor(x).detach()) == pytest.approx(expected, rel=rel, abs=abs_)


# ---------------------------------------------------------------------------------------------------------------
# Bernoulli KL
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p, z, expected",
    [
        (0.75, 0.0, KL_75_50),  # 0.75·ln(0.75/0.5) + 0.25·ln(0.25/0.5)
        (0.5, 0.0, 0.0),  # identical distributions
        (1.0, 0.0, LN2),  # 1·ln(1/0.5) + 0·ln 0 (xlogy: 0)
        (0.0, 0.0, LN2),  # symmetric case
        (0.5, LN3, 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)),  # = 0.143841
    ],
)
def test_bernoulli_kl_hand_values(p, z, expected):
    assert approx(bernoulli_kl(t([p]), t([z])), expected)


def test_bernoulli_kl_extreme_logits_are_finite():
    kl = bernoulli_kl(torch.sigmoid(t([80.0, -80.0])), t([-80.0, 80.0]))
    assert torch.isfinite(kl).all()
    assert kl.min() > 70  # ≈ 80: a confident teacher against the opposite confident student


def test_bernoulli_kl_divides_logits_by_temperature():
    # z_t = 10·ln3, z_s = 0 at T = 10: σ(ln 3) = 0.75 vs σ(0) = 0.5 → 0.130812 (no T² in the helper)
    assert approx(bernoulli_kl_at_temperature(t([10 * LN3]), t([0.0]), 10.0), KL_75_50)


# ---------------------------------------------------------------------------------------------------------------
# KD-Net
# ---------------------------------------------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _kl(p: float, q: float) -> float:
    """KL(Bern(p) ‖ Bern(q))."""
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def kdnet(**kw):
    return build_kd("kdnet", feature_channels=1, bottleneck_channels=2, skip_channels=[2], num_regions=1, **kw)


@pytest.mark.parametrize(
    "temperature, z_t0, expected",
    [
        # T = 1: soft label σ(ln 3) = 0.75 against σ(0) = 0.5 → KL 0.130812; voxel 1: σ(5) both → 0;
        # mean 0.065406; ×λ = 0.75 → 0.049055
        (1.0, LN3, 0.75 * KL_75_50 / 2),
        # T = 10: only the teacher is softened: σ(10 ln 3 / 10) = 0.75 against the student's σ(0); voxel 1: the
        # teacher's σ(5/10) against the student's σ(5) → KL(Bern(σ(0.5)) ‖ Bern(σ(5))), no T² factor
        (10.0, 10 * LN3, 0.75 * (KL_75_50 + _kl(_sigmoid(0.5), _sigmoid(5.0))) / 2),
    ],
)
def test_kdnet_logit_term_is_generalized_distillation(temperature, z_t0, expected):
    loss = kdnet(temperature=temperature)
    h = torch.zeros(1, 2, 2)
    parts = loss(outs(t([0.0, 5.0], (1, 1, 2)), [h]), outs(t([z_t0, 5.0], (1, 1, 2)), [h]), torch.zeros(1, 1, 2), 0)
    assert approx(parts["logit_kl"], expected)
    assert approx(parts["feature_kl"], 0.0)
    assert approx(parts["total"], expected + parts["soft_dice"].item())
    assert loss.seg_weight == pytest.approx(0.25)  # 1 − λ


@pytest.mark.parametrize("temperature", [1.0, 10.0])
def test_kdnet_soft_dice_is_nnunets_dice_against_the_soft_labels(temperature):
    # student σ([0, 5]) = [0.5, 0.99331]; teacher soft labels σ([ln 3, 5] / T); per sample and region:
    # Dice = (2 Σ p_s p_t + 1e-5) / (Σ p_s + Σ p_t + 1e-5), soft_dice = λ (1 − Dice)
    z_t = [LN3 * temperature, 5.0]
    p_s, p_t = [_sigmoid(0.0), _sigmoid(5.0)], [_sigmoid(z / temperature) for z in z_t]
    dice = (2 * sum(a * b for a, b in zip(p_s, p_t)) + 1e-5) / (sum(p_s) + sum(p_t) + 1e-5)
    h = torch.zeros(1, 2, 2)
    parts = kdnet(temperature=temperature)(outs(t([0.0, 5.0], (1, 1, 2)), [h]), outs(t(z_t, (1, 1, 2)), [h]),
                                           torch.zeros(1, 1, 2), 0)
    assert approx(parts["soft_dice"], 0.75 * (1 - dice))
    # two samples, one of them a perfect match of hard labels: the mean of the two samples' terms
    z_s2 = t([[0.0, 5.0], [-30.0, 30.0]], (2, 1, 2))
    z_t2 = t([z_t, [-30.0 * temperature, 30.0 * temperature]], (2, 1, 2))
    parts = kdnet(temperature=temperature)(outs(z_s2, [torch.zeros(2, 2, 2)]), outs(z_t2, [torch.zeros(2, 2, 2)]),
                                           torch.zeros(2, 1, 2), 0)
    assert approx(parts["soft_dice"], 0.75 * (1 - dice) / 2)


def test_kdnet_soft_dice_pulls_a_small_region_harder_than_the_cross_entropy():
    """An undecided student (logits 0) where the teacher sees a region of 5 voxels: the cross-entropy's pull on the
    region's logits is a mean over every voxel, λ (1/2 − 1) / N; the soft Dice's, about λ σ'(0) (2 − D) / (N/2 + 5),
    is larger, and more so the more background the patch holds."""
    pulls = {}
    for n in (100, 1000):
        z_s = torch.zeros(1, 1, n, requires_grad=True)
        z_t = torch.full((1, 1, n), -30.0)
        z_t[..., :5] = 30.0
        h = torch.zeros(1, 2, n)
        parts = kdnet()(outs(z_s, [h]), outs(z_t, [h]), torch.zeros(1, 1, n), 0)
        grad_dice = torch.autograd.grad(parts["soft_dice"], z_s, retain_graph=True)[0][0, 0, :5]
        grad_kl = torch.autograd.grad(parts["logit_kl"], z_s)[0][0, 0, :5]
        assert (grad_dice < 0).all() and (grad_kl < 0).all()  # descent raises the region's logits
        assert approx(grad_kl.mean(), 0.75 * -0.5 / n)
        pulls[n] = (grad_dice.abs().mean().item(), grad_kl.abs().mean().item())
    assert pulls[100][0] > 1.5 * pulls[100][1] and pulls[1000][0] > 1.9 * pulls[1000][1]


def test_kdnet_logit_gradient_is_bounded_like_bce():
    """Per element the logit term's gradient is λ (σ(z_s) − σ(z_t / T)): at most λ, however confident the teacher
    (Hinton's T²-scaled form at T = 10 gave up to 7.5 here)."""
    z_s = torch.zeros(1, 1, 4, requires_grad=True)
    z_t = t([-20.0, -10.0, 10.0, 20.0], (1, 1, 4))
    h = torch.zeros(1, 2, 4)
    parts = kdnet(temperature=10.0)(outs(z_s, [h]), outs(z_t, [h]), torch.zeros(1, 1, 4), 0)
    parts["logit_kl"].backward()
    expected = 0.75 * (0.5 - torch.sigmoid(z_t / 10)) / 4  # mean over 4 elements
    torch.testing.assert_close(z_s.grad, expected)
    assert z_s.grad.abs().max() * 4 <= 0.75


def test_kdnet_feature_term_channel_softmax_kl():
    # bottleneck C = 2, 2 voxels. Voxel 0: softmax([ln3, 0]) = [0.75, 0.25] vs softmax([0, 0]) = [0.5, 0.5]
    # → 0.130812; voxel 1: both [1, 2] → 0. Mean over voxels 0.065406; ×β = 0.1 → 0.0065406
    h_t = t([[LN3, 1.0], [0.0, 2.0]], (1, 2, 2))
    h_s = t([[0.0, 1.0], [0.0, 2.0]], (1, 2, 2))
    z = torch.zeros(1, 1, 2)
    parts = kdnet()(outs(z, [h_s]), outs(z, [h_t]), torch.zeros(1, 1, 2), 0)
    assert approx(parts["feature_kl"], 0.1 * KL_75_50 / 2)
    assert approx(parts["logit_kl"], 0.0)


def test_channel_softmax_kl_sums_channels_and_averages_batch():
    # C = 3: softmax([ln2, 0, 0]) = [0.5, 0.25, 0.25] vs uniform 1/3:
    # 0.5·ln 1.5 + 2·0.25·ln 0.75 = 0.202733 − 0.143841 = 0.058892; the second sample is identical (0) → mean 0.029446
    h_t = t([[LN2, 0.0, 0.0], [1.0, 1.0, 1.0]], (2, 3, 1))
    h_s = torch.zeros(2, 3, 1)
    expected = (0.5 * math.log(1.5) + 0.5 * math.log(0.75)) / 2
    assert approx(channel_softmax_kl(h_t, h_s), expected)


# ---------------------------------------------------------------------------------------------------------------
# PMKL
# ---------------------------------------------------------------------------------------------------------------

# Four voxels (B = 1, R = 1), target y = [1, 1, 0, 0]:
#  v0 teacher z=2 correct, student z=0 worse:  CE_s = ln 2 = 0.693147, CE_t = ln(1+e^-2) = 0.126928 → m = 0.566219
#  v1 teacher z=−1 WRONG (y=1) though less wrong than the student z=−3 (CE_s = 3.048587 > CE_t = 1.313262) → m = 0
#  v2 teacher z=−2 correct, student z=−4 BETTER: CE_s = ln(1+e^-4) = 0.018150 < CE_t = 0.126928     → m = 0
#  v3 teacher z=−2 correct, student z=2 worse:  CE_s = ln(1+e^2) = 2.126928, CE_t = 0.126928        → m = 2.0
PMKL_Z_T = [2.0, -1.0, -2.0, -2.0]
PMKL_Z_S = [0.0, -3.0, -4.0, 2.0]
PMKL_Y = [1.0, 1.0, 0.0, 0.0]
M0 = LN2 - math.log(1 + math.exp(-2))  # 0.566219
# ℓ at T = 10: v0 q_s = 0.5 → ℓ = −[q_t·ln 0.5 + (1−q_t)·ln 0.5] = ln 2;
# v3 q_t = σ(−0.2) = 0.450166, q_s = σ(0.2) = 0.549834:
#     ℓ = −[0.450166·ln 0.549834 + 0.549834·ln 0.450166] = 0.450166·0.598139 + 0.549834·0.798139 = 0.708106
S02 = 1 / (1 + math.exp(-0.2))
ELL3 = -((1 - S02) * math.log(S02) + S02 * math.log(1 - S02))
RKD = (M0 * LN2 + 2.0 * ELL3) / (M0 + 2.0)  # (0.392472 + 1.416211) / 2.566219 = 0.704805


def test_pmkl_mask_keeps_only_teacher_correct_and_better():
    m = regularisation_mask(t(PMKL_Z_T, (1, 1, 4)), t(PMKL_Z_S, (1, 1, 4)), t(PMKL_Y, (1, 1, 4)))
    assert torch.allclose(m.flatten(), t([M0, 0.0, 0.0, 2.0]), atol=1e-6)


def test_pmkl_soft_target_ce_at_temperature():
    ell = soft_target_bce(t([2.0, -2.0]), t([0.0, 2.0]), temperature=10.0, clip_min=0.005)
    assert torch.allclose(ell, t([LN2, ELL3]), atol=1e-6)


def test_pmkl_rkd_weighted_mean_and_component():
    loss = build_kd("pmkl", feature_channels=2, bottleneck_channels=1, skip_channels=[1], num_regions=1)
    z_t, z_s, y = t(PMKL_Z_T, (1, 1, 4)), t(PMKL_Z_S, (1, 1, 4)), t(PMKL_Y, (1, 1, 4))
    assert approx(regularised_kd(z_t, z_s, y), RKD)
    f = torch.randn(1, 2, 4)
    parts = loss(outs(z_s, dec=f), outs(z_t, dec=f.clone()), y.bool(), 0)
    assert approx(parts["rkd"], 0.5 * RKD)  # 0.352403
    assert approx(parts["total"], float((parts["rkd"] + parts["ckd"]).detach()))


def test_pmkl_rkd_clips_student_probability():
    # target 1, teacher z=100 correct, student z=−100: q_t = σ(10) = 0.9999546, q_s = σ(−10) = 4.5e-5 < 0.005 → clipped:
    # ℓ = −[0.9999546·ln 0.005 + 0.0000454·ln(1 − 4.5e-5)] = 0.9999546·5.298317 + 0 = 5.298077 (unclipped: ≈ 10.0)
    val = regularised_kd(t([100.0], (1, 1, 1)), t([-100.0], (1, 1, 1)), t([1.0], (1, 1, 1)))
    assert approx(val, 5.298077, rel=1e-5)


@pytest.mark.parametrize(
    "z_t, z_s, y",
    [
        ([-3.0, 3.0], [0.5, -0.5], [1.0, 0.0]),  # teacher wrong everywhere
        ([1.0, -1.0], [5.0, -5.0], [1.0, 0.0]),  # teacher right but the student is better everywhere
    ],
)
def test_pmkl_empty_mask_gives_zero_not_nan(z_t, z_s, y):
    z_s = t(z_s, (1, 1, 2)).requires_grad_()
    val = regularised_kd(t(z_t, (1, 1, 2)), z_s, t(y, (1, 1, 2)))
    val.backward()
    assert val.item() == 0.0
    assert torch.isfinite(z_s.grad).all() and float(z_s.grad.abs().sum()) == 0.0


def test_contrastive_pair_loss_known_embeddings():
    # student e_s = [(1,0), (0,1)], teacher e_t = [(1,0), (0.6,0.8)]:
    # (0,0) positive d = 0 → 0; (1,1) positive d² = 0.6² + 0.2² = 0.4;
    # (0,1) negative d = √(0.4² + 0.8²) = √0.8 = 0.894427 → (1 − 0.894427)² = 0.011146;
    # (1,0) negative d = √2 > margin → 0. Mean over 4 pairs: (0.4 + 0.011146)/4 = 0.102786
    e_s = t([[1.0, 0.0], [0.0, 1.0]])
    e_t = t([[1.0, 0.0], [0.6, 0.8]])
    assert approx(contrastive_pair_loss(e_s, e_t, margin=1.0), (0.4 + (1 - math.sqrt(0.8)) ** 2) / 4)
    # margin 2: the (1,0) negative now counts (2 − √2)² = 0.343146 → (0.4 + (2 − √0.8)² + 0.343146)/4
    expected_m2 = (0.4 + (2 - math.sqrt(0.8)) ** 2 + (2 - math.sqrt(2)) ** 2) / 4
    assert approx(contrastive_pair_loss(e_s, e_t, margin=2.0), expected_m2)


def test_contrastive_pair_loss_finite_gradient_at_zero_distance():
    e = t([[1.0, 0.0], [1.0, 0.0]]).requires_grad_()  # the negative pairs have d = 0 exactly
    val = contrastive_pair_loss(e, e.detach().clone())
    val.backward()
    assert approx(val, 2 * 1.0 / 4)  # two negatives at d = 0 contribute (1 − 0)² each
    assert torch.isfinite(e.grad).all()


def test_pmkl_heads_are_unit_norm_and_trained_with_the_student():
    torch.manual_seed(0)
    loss = build_kd("pmkl", feature_channels=3, bottleneck_channels=1, skip_channels=[1], num_regions=1)
    f_s = torch.randn(2, 3, 2, 2, 2, requires_grad=True)
    f_t = torch.randn(2, 3, 2, 2, 2, requires_grad=True)
    emb = loss.student_head(f_s)
    assert emb.shape == (2, 16)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    z = torch.zeros(2, 1, 2, 2, 2)
    loss(outs(z, dec=f_s), outs(z, dec=f_t), torch.zeros_like(z), 0)["ckd"].backward()
    assert f_t.grad is None and f_s.grad is not None and float(f_s.grad.abs().sum()) > 0
    for head in (loss.student_head, loss.teacher_head):
        assert all(p.grad is not None for p in head.parameters())
    assert {id(p) for p in loss.student_side_parameters()} == {id(p) for p in loss.parameters()}
    assert len(list(loss.parameters())) == 8  # two heads × two Linear layers × (weight, bias)


# ---------------------------------------------------------------------------------------------------------------
# ProtoKD
# ---------------------------------------------------------------------------------------------------------------


def test_protokd_kd_term_no_t_squared():
    # voxel 0: KL(σ(ln 3) ‖ σ(0)) = 0.130812, voxel 1 equal logits → 0; mean 0.065406; ×kd_weight 0.5 → 0.032703
    # (with T² it would be 3.27; without dividing by T, σ(10 ln 3) = 0.99998 would give ≈ 0.35)
    loss = build_kd("protokd", feature_channels=1, bottleneck_channels=1, skip_channels=[1], num_regions=1)
    assert loss.temperature == 10.0 and loss.kd_weight == 0.5  # T as ProtoKD's code; the weight: kd_scale.py
    parts = loss(outs(t([0.0, 5.0], (1, 1, 2))), outs(t([10 * LN3, 5.0], (1, 1, 2))), torch.zeros(1, 1, 2), 0)
    assert approx(parts["kd"], 0.5 * KL_75_50 / 2)


def test_regions_to_labels():
    # WT = [0,1,1,1], TC = [0,0,1,1], ET = [0,0,0,1] → background, edema, necrosis, enhancing
    target = t([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]], (1, 3, 4)).bool()
    assert regions_to_labels(target).tolist() == [[0, 1, 2, 3]]


# Four voxels with labels [0, 0, 1, 3] (necrosis, class 2, absent → skipped).
# Student features (C = 2) per voxel: [1,0], [0,1], [1,1], [2,0]; teacher: [1,0], [1,0], [0,1], [0,1].
# Prototypes (direction only matters for the cosine): student p0 ∝ [1,1], p1 ∝ [1,1], p3 ∝ [1,0];
# teacher p0 ∝ [1,0], p1 ∝ [0,1], p3 ∝ [0,1].
#   M_s c0 = [.707107, .707107, 1, .707107]   M_t c0 = [1, 1, 0, 0]  → Σ(Δ²) = 2·0.085786 + 1 + 0.5 = 1.671573
#   M_s c1 = [.707107, .707107, 1, .707107]   M_t c1 = [0, 0, 1, 1]  → 0.5 + 0.5 + 0 + 0.085786 = 1.085786
#   M_s c3 = [1, 0, .707107, 1]               M_t c3 = [0, 0, 1, 1]  → 1 + 0 + 0.085786 + 0 = 1.085786
# L_proto = 3.843146 / (3 present classes · 4 voxels) = 0.320262  (with the absent class as zeros: /16 = 0.240197)
PROTO_F_S = [[1.0, 0.0, 1.0, 2.0], [0.0, 1.0, 1.0, 0.0]]
PROTO_F_T = [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
PROTO_REGIONS = [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]]  # WT, TC, ET
D2 = (1 - 1 / math.sqrt(2)) ** 2  # 0.085786
PROTO = ((2 * D2 + 1 + 0.5) + (1 + D2) + (1 + D2)) / 12


def test_prototype_cosine_maps():
    f = t(PROTO_F_S, (1, 2, 4))
    onehot = torch.nn.functional.one_hot(torch.tensor([[0, 0, 1, 3]]), 4).transpose(1, 2).float()
    maps = prototype_maps(f, onehot)
    r = 1 / math.sqrt(2)
    assert torch.allclose(maps[0, 0], t([r, r, 1, r]), atol=1e-5)
    assert torch.allclose(maps[0, 3], t([1, 0, r, 1]), atol=1e-5)
    assert torch.allclose(maps[0, 2], torch.zeros(4))  # absent class: zero prototype, cosine 0 (eps), no NaN


def test_prototype_maps_of_a_zero_feature_voxel_are_zero_with_finite_gradients():
    f = t([[1.0, 0.0, 2.0], [1.0, 0.0, 0.0]], (1, 2, 3)).requires_grad_()  # voxel 1 has the zero feature vector
    onehot = torch.nn.functional.one_hot(torch.tensor([[0, 1, 1]]), 2).transpose(1, 2).float()
    maps = prototype_maps(f, onehot)
    # class 0: p = (1, 1) -> cosines 1, 0 (zero voxel), 1/sqrt(2); class 1: p = (1, 0) -> 1/sqrt(2), 0, 1
    r = 1 / math.sqrt(2)
    assert torch.allclose(maps[0], t([[1, 0, r], [r, 0, 1]]), atol=1e-5)
    maps.sum().backward()
    assert torch.isfinite(f.grad).all()


def test_class_sums_by_product_and_by_class_agree_in_value_and_gradient():
    # the CPU's batched product and the per-class reductions other devices use; features in the channels-last
    # layout a CPU student trains in, flattened as prototype_loss flattens them
    torch.manual_seed(0)
    features = torch.randn(2, 5, 3, 4, 6).contiguous(memory_format=torch.channels_last_3d).flatten(2)
    onehot = torch.nn.functional.one_hot(torch.randint(0, 4, (2, 72)), 4).transpose(1, 2).float()
    by_hand = torch.stack([torch.stack([features[b][:, onehot[b, k] > 0].sum(1) for k in range(4)]) for b in range(2)])
    weights, results = torch.randn(4, 5), []  # a loss on the sums, for the gradients
    for per_class in (False, True):
        f = features.detach().clone().requires_grad_()
        sums = class_sums(f, onehot, per_class)
        (sums * weights).sum().backward()
        results.append((sums.detach(), f.grad))
    torch.testing.assert_close(results[0][0], by_hand)
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("target_repeat", [1, 2])  # 2: the target at twice the feature resolution (nearest)
def test_protokd_prototype_term_skips_absent_class(target_repeat):
    loss = build_kd("protokd", feature_channels=2, bottleneck_channels=1, skip_channels=[1])
    f_s = t(PROTO_F_S, (1, 2, 1, 1, 4))
    f_t = t(PROTO_F_T, (1, 2, 1, 1, 4))
    target = t(PROTO_REGIONS, (1, 3, 1, 1, 4)).repeat_interleave(target_repeat, dim=-1).bool()
    z = torch.zeros(1, 3, 1, 1, 4 * target_repeat)
    parts = loss(outs(z, dec=f_s), outs(z, dec=f_t), target, 0)
    assert approx(parts["proto"], 0.1 * PROTO)  # 0.0320262
    assert approx(parts["kd"], 0.0)


def test_protokd_absent_class_is_per_sample():
    # Sample 0 as above; sample 1 is all background with student = teacher features → its one term is 0.
    # Present (b, c) pairs: 3 + 1 → L = 3.843146 / (4·4) = 0.240197
    loss = build_kd("protokd", feature_channels=2, bottleneck_channels=1, skip_channels=[1])
    f_s = torch.stack([t(PROTO_F_S), t(PROTO_F_S)]).reshape(2, 2, 1, 1, 4)
    f_t = torch.stack([t(PROTO_F_T), t(PROTO_F_S)]).reshape(2, 2, 1, 1, 4)
    target = torch.stack([t(PROTO_REGIONS), torch.zeros(3, 4)]).reshape(2, 3, 1, 1, 4)
    z = torch.zeros(2, 3, 1, 1, 4)
    parts = loss(outs(z, dec=f_s), outs(z, dec=f_t), target, 0)
    assert approx(parts["proto"], 0.1 * PROTO * 12 / 16)


# ---------------------------------------------------------------------------------------------------------------
# SMU-Net
# ---------------------------------------------------------------------------------------------------------------


def test_gram_matrix_and_style_loss():
    # F = [[1,2],[3,4]] (C = 2, N = 2): F Fᵀ = [[5, 11], [11, 25]] / (C·N = 4) = [[1.25, 2.75], [2.75, 6.25]]
    f_s = t([[1.0, 2.0], [3.0, 4.0]], (1, 2, 1, 1, 2))
    assert torch.allclose(gram_matrix(f_s)[0], t([[1.25, 2.75], [2.75, 6.25]]))
    # teacher F = I: G = I/4; ΔG = [[1, 2.75], [2.75, 6]] → (1 + 7.5625 + 7.5625 + 36)/4 = 13.03125
    f_t = t([[1.0, 0.0], [0.0, 1.0]], (1, 2, 1, 1, 2))
    assert approx(style_loss([f_s], [f_t]), 13.03125)
    # scale-free: repeating the voxels (a bigger patch) does not change G
    assert torch.allclose(gram_matrix(f_s.repeat(1, 1, 2, 3, 1)), gram_matrix(f_s))


def smunet(skip_channels, **kw):
    return build_kd("smunet", feature_channels=1, bottleneck_channels=skip_channels[-1], skip_channels=skip_channels,
                    **kw)


# SMU-Net's code's style factor 1e-4/(4·(H·W)²) on its 20 x 24 x 16 style map: 1e-4/(4·480²) = 1e-4/921600
ORIGINAL_STYLE = 1e-4 / 921600  # 1.0850694e-10


def test_style_loss_averages_the_scales():
    # scale 1 is the case above (13.03125), scale 2 equal in student and teacher (0): the mean is 13.03125/2
    f_s = t([[1.0, 2.0], [3.0, 4.0]], (1, 2, 1, 1, 2))
    f_t = t([[1.0, 0.0], [0.0, 1.0]], (1, 2, 1, 1, 2))
    same = torch.ones(1, 2, 1, 1, 2)
    assert approx(style_loss([f_s, same], [f_t, same.clone()]), 6.515625)


def test_smunet_style_uses_three_deepest_skips():
    # skip 0 differs hugely but is not among the three deepest; skip 1 is the case above (13.03125); skips 2, 3 equal:
    # the mean over the three is 13.03125/3 = 4.34375, weighted 1e-4/921600 → 4.7132704e-10
    f_s1 = t([[1.0, 2.0], [3.0, 4.0]], (1, 2, 1, 1, 2))
    f_t1 = t([[1.0, 0.0], [0.0, 1.0]], (1, 2, 1, 1, 2))
    same2, same3 = torch.ones(1, 2, 1, 1, 2), torch.ones(1, 2, 1, 1, 2)
    s = [100 * torch.ones(1, 2, 1, 1, 2), f_s1, same2, same3]
    tt = [torch.zeros(1, 2, 1, 1, 2), f_t1, same2.clone(), same3.clone()]
    z = torch.zeros(1, 3, 1, 1, 2)
    parts = smunet([2, 2, 2, 2])(outs(z, s), outs(z, tt), torch.zeros_like(z), 0)
    assert approx(parts["style"], 4.7132704e-10, abs_=0)
    assert approx(parts["content"], 0.0)
    parts = smunet([2, 2, 2, 2], style_weight=3.0)(outs(z, s), outs(z, tt), torch.zeros_like(z), 0)
    assert approx(parts["style"], 13.03125)  # the earlier term: weight 1 on the sum over the three scales


def test_smunet_content_and_style_on_a_single_skip():
    # one skip, C = 1, N = 2: student [1, 2], teacher [0, 0]
    # content = 0.2·mean([1, 4]) = 0.5; Gram: student (1 + 4)/(1·2) = 2.5, teacher 0 → mean((ΔG)²) = 6.25,
    # style = 6.25·1e-4/921600 = 6.7816840e-10
    z = torch.zeros(1, 3, 1, 1, 2)
    parts = smunet([1])(outs(z, [t([1.0, 2.0], (1, 1, 1, 1, 2))]), outs(z, [torch.zeros(1, 1, 1, 1, 2)]),
                        torch.zeros_like(z), 0)
    assert approx(parts["content"], 0.5)
    assert approx(parts["style"], 6.7816840e-10, abs_=0)


def test_smunet_style_is_the_originals_on_its_style_map():
    # The original at batch 1: 1e-4·Σ(ΔG)²/(4·C²·(H·W)²), G = F Fᵀ/(C·N), on a map with H·W = 20·24 (depth 1, N = 480).
    # C = 2, teacher 1 everywhere: G_t = 480/(2·480) = 1/2 in every entry. Student: channel 0 is 2 at one voxel, so
    # ΔG00 = (479 + 4)/960 − 1/2 = 3/960, ΔG01 = ΔG10 = (479 + 2)/960 − 1/2 = 1/960, ΔG11 = 0;
    # Σ(ΔG)² = 11/960² = 1.1935764e-5 → original = 1e-4·1.1935764e-5/(4·4·480²) = 3.2378e-16.
    f_t = torch.ones(1, 2, 20, 24, 1)
    f_s = f_t.clone()
    f_s[0, 0, 0, 0, 0] = 2.0
    z = torch.zeros(1, 3, 20, 24, 1)
    parts = smunet([2])(outs(z, [f_s]), outs(z, [f_t]), torch.zeros_like(z), 0)
    assert approx(parts["style"], 1e-4 * 11 / 960**2 / (4 * 4 * 480**2), rel=1e-4, abs_=0)
    assert approx(parts["style"], 3.2378e-16, rel=1e-4, abs_=0)
    assert smunet([2]).style_weight == pytest.approx(ORIGINAL_STYLE, rel=1e-12)


@pytest.mark.parametrize(
    "epoch, expected",
    [
        (0, 10 * math.exp(-5)),  # 10·e^(−5·1²) = 0.067379
        (10, 10 * math.exp(-1.25)),  # 10·e^(−5·0.5²) = 2.865048
        (20, 10.0),  # 10·e^0
        (40, 10.0),  # min(e, 20) = 20
    ],
)
def test_consistency_ramp(epoch, expected):
    assert consistency_ramp(epoch, 20, 10.0) == pytest.approx(expected, rel=1e-9)
    assert smunet([1]).consistency_weight(epoch) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("epoch, weight", [(0, 10 * math.exp(-5)), (20, 10.0)])
def test_smunet_consistency_term(epoch, weight):
    # R = 2, 2 voxels. Student σ(0) = 0.5 everywhere. Teacher region 0: σ(±ln 3) = [0.75, 0.25] → MSE
    # (0.0625 + 0.0625)/2 = 0.0625; region 1: σ(0) → 0. Σ_r = 0.0625; × w(20) = 10 → 0.625, × w(0) → 0.0042112
    z_t = t([[LN3, -LN3], [0.0, 0.0]], (1, 2, 1, 1, 2))
    z_s = torch.zeros(1, 2, 1, 1, 2)
    skip = [torch.zeros(1, 1, 1, 1, 2)]
    loss = build_kd("smunet", feature_channels=1, bottleneck_channels=1, skip_channels=[1], num_regions=2)
    parts = loss(outs(z_s, skip), outs(z_t, [s.clone() for s in skip]), torch.zeros_like(z_s), epoch)
    assert approx(parts["consistency"], 0.0625 * weight)


def constant_discriminator(loss, value: float) -> None:
    """Make D(x) ≡ value: zero every weight and bias, head bias = value."""
    with torch.no_grad():
        for p in loss.discriminator.parameters():
            p.zero_()
        loss.discriminator.head.bias.fill_(value)


def test_smunet_adversarial_terms_with_known_discriminator():
    # D ≡ ln 3. Generator: 2e-4·BCE(ln 3, 0) = 2e-4·softplus(ln 3) = 2e-4·ln 4 = 2.772589e-4
    # Discriminator: BCE(ln 3, 0) + BCE(ln 3, 1) = ln 4 + ln(4/3) = 1.386294 + 0.287682 = 1.673976
    loss = smunet([2, 3, 4])
    constant_discriminator(loss, LN3)
    skips = [torch.randn(1, c, 2, 2, 2) for c in (2, 3, 4)]
    z = torch.zeros(1, 3, 2, 2, 2)
    parts = loss(outs(z, skips), outs(z, [s.clone() for s in skips]), torch.zeros_like(z), 0)
    assert approx(parts["adversarial"], 2e-4 * math.log(4))
    assert approx(loss.adversary_loss(outs(z, skips), outs(z, skips)), math.log(4) + math.log(4 / 3))


def test_smunet_discriminator_separated_from_student_optimiser():
    torch.manual_seed(0)
    loss = smunet([2, 3, 4])
    disc = {id(p) for p in loss.discriminator.parameters()}
    assert disc and disc == {id(p) for p in loss.adversary_parameters()}
    assert not disc & {id(p) for p in loss.student_side_parameters()}
    assert loss.adversary_lr == pytest.approx(1e-4)

    s_skips = [torch.randn(1, c, 4, 4, 4, requires_grad=True) for c in (2, 3, 4)]
    t_skips = [torch.randn(1, c, 4, 4, 4, requires_grad=True) for c in (2, 3, 4)]
    z = torch.zeros(1, 3, 4, 4, 4)
    # main loss: the adversarial term reaches the student's second-deepest skip but never D's .grad
    parts = loss(outs(z, s_skips), outs(z, t_skips), torch.zeros_like(z), 0)
    parts["adversarial"].backward()
    assert s_skips[1].grad is not None and float(s_skips[1].grad.abs().sum()) > 0
    assert all(p.grad is None for p in loss.discriminator.parameters())
    assert all(f.grad is None for f in t_skips)
    # discriminator loss: gradients reach D only
    for f in s_skips:
        f.grad = None
    loss.adversary_loss(outs(z, s_skips), outs(z, t_skips)).backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert float(sum(p.grad.abs().sum() for p in loss.discriminator.parameters())) > 0
    assert all(f.grad is None for f in s_skips + t_skips)


def test_smunet_rejects_2d_features():
    loss = smunet([2, 3])
    skips = [torch.randn(1, 2, 4, 4), torch.randn(1, 3, 2, 2)]
    z = torch.zeros(1, 3, 4, 4)
    with pytest.raises(NnalignError, match="3D only"):
        loss(outs(z, skips), outs(z, skips), torch.zeros_like(z), 0)


# ---------------------------------------------------------------------------------------------------------------
# none and the registry
# ---------------------------------------------------------------------------------------------------------------


def test_none_total_is_zero_on_the_student_graph():
    loss = build_kd("none", feature_channels=1, bottleneck_channels=1, skip_channels=[1])
    z = torch.randn(1, 3, 2, requires_grad=True)
    parts = loss(outs(z), outs(torch.randn(1, 3, 2)), torch.zeros(1, 3, 2), 0)
    assert set(parts) == {"total"}
    assert parts["total"].item() == 0.0 and parts["total"].dtype == torch.float32
    assert parts["total"].requires_grad and parts["total"].device == z.device
    parts["total"].backward()
    assert float(z.grad.abs().sum()) == 0.0
    # still exactly 0 (not NaN) when the logits overflowed
    bad = t([float("inf"), float("nan")], (1, 1, 2)).requires_grad_()
    assert loss(outs(bad), outs(bad.detach()), torch.zeros(1, 1, 2), 0)["total"].item() == 0.0


def test_registry_names_in_order_and_every_name_has_its_class():
    assert KD_METHODS == ("none", "kdnet", "pmkl", "protokd", "smunet")
    for name in KD_METHODS:
        cls = kd_class(name)
        assert issubclass(cls, DistillationLoss) and cls.name == name
    assert kd_class(" PMKL ") is kd_class("pmkl")


def test_register_kd_refuses_an_undeclared_name():
    with pytest.raises(ValueError, match="not declared"):
        register_kd("fitnet")


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(NnalignError, match=r"unknown KD method 'fitnet' \(known: none, kdnet, pmkl, protokd, smunet\)"):
        build_kd("fitnet", feature_channels=1, bottleneck_channels=1, skip_channels=[1])


def test_unknown_override_is_rejected_and_known_ones_apply():
    with pytest.raises(NnalignError, match="unknown setting 'temprature' for KD method 'kdnet'.*temperature"):
        kdnet(temprature=4.0)
    with pytest.raises(NnalignError):
        build_kd("none", feature_channels=1, bottleneck_channels=1, skip_channels=[1], temperature=2.0)
    loss = kdnet(temperature=4.0, imitation_weight=0.5)
    assert loss.settings() == {"method": "kdnet", "seg_weight": 0.5, "temperature": 4.0, "imitation_weight": 0.5,
                               "feature_weight": 0.1}


@pytest.mark.parametrize("bad", [{"temperature": 0.0}, {"imitation_weight": 1.5}, {"feature_weight": -1.0}])
def test_invalid_setting_values_raise(bad):
    with pytest.raises(NnalignError):
        kdnet(**bad)


def test_register_kd_refuses_a_second_class_under_a_taken_name():
    kd_class("kdnet")
    with pytest.raises(ValueError, match="already registered"):
        @register_kd("kdnet")
        class Other(DistillationLoss):
            pass


# ---------------------------------------------------------------------------------------------------------------
# Every method: gradients, dtypes, settings
# ---------------------------------------------------------------------------------------------------------------

SKIP_CHANNELS = [4, 6, 8]


# the CUDA cases run where a GPU is present: the losses must keep float32 and their gradients there too
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_pair(dtype=torch.float32, seed=0, device="cpu"):
    """Tiny 3D student/teacher outputs (B = 2, R = 3) with leaf tensors on ``device``; the teacher is confident and
    right."""
    g = torch.Generator().manual_seed(seed)
    b, shapes = 2, [(4, 4, 4), (2, 2, 2), (1, 1, 1)]
    target = torch.rand(b, 1, 4, 4, 4, generator=g) < torch.tensor([0.6, 0.4, 0.2]).view(1, 3, 1, 1, 1)  # nested

    def make(teacher: bool):
        logits = (6.0 * (2 * target.float() - 1)) if teacher else torch.randn(b, 3, 4, 4, 4, generator=g)
        skips = [torch.randn(b, c, *s, generator=g) for c, s in zip(SKIP_CHANNELS, shapes)]
        dec = torch.randn(b, 4, 4, 4, 4, generator=g)
        leaves = [x.to(device=device, dtype=dtype).requires_grad_() for x in [logits, *skips, dec]]
        return NetworkOutputs(logits=[leaves[0]], skips=leaves[1:-1], decoder_features=leaves[-1])

    student, teacher = make(False), make(True)
    return student, teacher, target.to(device)


def build(name, device="cpu"):
    return build_kd(name, feature_channels=4, bottleneck_channels=8, skip_channels=SKIP_CHANNELS).to(device)


# the student tensors each method must send gradient to
USES = {
    "kdnet": ["logits", "bottleneck"],
    "pmkl": ["logits", "decoder_features"],
    "protokd": ["logits", "decoder_features"],
    "smunet": ["logits", "bottleneck", "skip_-2", "skip_-3"],
}


def tensor_of(o: NetworkOutputs, key: str) -> torch.Tensor:
    if key == "logits":
        return o.final_logits
    if key.startswith("skip_"):
        return o.skips[int(key[5:])]
    return getattr(o, key)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["none", "kdnet", "pmkl", "protokd", "smunet"])
def test_gradient_reaches_student_not_teacher(name, device):
    torch.manual_seed(0)
    loss = build(name, device)
    student, teacher, target = random_pair(device=device)
    parts = loss(student, teacher, target, epoch=5)
    assert "total" in parts and all(v.dim() == 0 and v.dtype == torch.float32 for v in parts.values())
    assert all(torch.isfinite(v) for v in parts.values())
    parts["total"].backward()
    teacher_leaves = [teacher.final_logits, *teacher.skips, teacher.decoder_features]
    assert all(x.grad is None for x in teacher_leaves)
    for key in USES.get(name, []):
        grad = tensor_of(student, key).grad
        assert grad is not None and torch.isfinite(grad).all() and float(grad.abs().sum()) > 0, key
    if name == "none":
        assert float(student.final_logits.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["none", "kdnet", "pmkl", "protokd", "smunet"])
def test_half_precision_inputs_give_finite_float32(name, device):
    loss = build(name, device)
    student, teacher, target = random_pair(dtype=torch.float16, device=device)
    with torch.no_grad():
        student.final_logits.mul_(5000.0)  # |z| up to ~2e4: still finite in fp16
    parts = loss(student, teacher, target, epoch=3)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in parts.values())


# the autocast dtype of nnU-Net's AMP on each device type
AUTOCAST_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["kdnet", "pmkl", "protokd", "smunet"])
def test_autocast_is_disabled_inside_the_loss(name, device):
    torch.manual_seed(0)
    loss = build(name, device)
    student, teacher, target = random_pair(device=device)
    plain = loss(student, teacher, target, 7)["total"]
    with torch.autocast(device, dtype=AUTOCAST_DTYPE[device]):
        cast = loss(student, teacher, target, 7)["total"]
    assert cast.dtype == torch.float32
    assert cast.item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["none", "kdnet", "pmkl", "protokd", "smunet"])
def test_settings_record_every_setting(name):
    loss = build(name)
    record = loss.settings()
    assert record["method"] == name
    assert set(record) == {"method", "seg_weight", *type(loss).setting_names()}
    assert all(isinstance(v, (int, float)) for k, v in record.items() if k != "method")


def test_total_is_the_sum_of_the_components():
    student, teacher, target = random_pair()
    parts = build("smunet")(student, teacher, target, epoch=10)
    assert set(parts) == {"content", "style", "adversarial", "consistency", "total"}
    assert parts["total"].item() == pytest.approx(sum(v.item() for k, v in parts.items() if k != "total"), rel=1e-6)
