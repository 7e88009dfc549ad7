"""Anchor alignment losses against values worked out by hand on tiny tensors (B <= 3, M <= 4, C <= 2, 2 voxels)."""
from __future__ import annotations

import math

import pytest
import torch

from nnalign.errors import NnalignError
from nnalign.networks.anchors import (
    AnchorAlignment,
    MixtureAnchor,
    ModalityAnchor,
    NoAnchor,
    NormalAnchor,
    build_anchor,
    modality_gap,
)
from nnalign.networks.anchor_registry import ANCHORS as ANCHOR_REGISTRY
from nnalign.networks.normal_latents import kl_to_standard_normal
from nnalign.modalities import BRATS_MODALITIES

NAN = float("nan")


def Z(*per_sample):
    """Latents (B, M, C=1, 2 voxels) from nested lists: Z([[a0, a1], [b0, b1]]) is one sample with two modalities."""
    return torch.tensor(per_sample, dtype=torch.float32).unsqueeze(2)


def P(*rows):
    return torch.tensor(rows, dtype=torch.bool)


def mixture(raw=None, m=None):
    """A mixture anchor whose weight logits are ``raw`` (the parameter is raw / WEIGHT_GAIN)."""
    anchor = MixtureAnchor(m if m is not None else len(raw))
    if raw is not None:
        with torch.no_grad():
            anchor.raw_weights.copy_(torch.tensor(raw, dtype=torch.float32) / MixtureAnchor.WEIGHT_GAIN)
    return anchor


# ----------------------------------------------------------------------------------------------------------------------
# normal anchor: KL(N(mu, exp(lv)) || N(0, 1)) = 0.5 (mu^2 + exp(lv) - lv - 1) per element


@pytest.mark.parametrize(
    "mu, lv, present, expected",
    [
        # mu = 0, lv = 0: 0.5 (0 + 1 - 0 - 1) = 0
        ([[[0, 0]]], [[[0, 0]]], [[1]], 0.0),
        # mu = 1, lv = 0: 0.5 (1 + 1 - 0 - 1) = 0.5 per element, mean over 2 voxels = 0.5
        ([[[1, 1]]], [[[0, 0]]], [[1]], 0.5),
        # mu = 0, lv = 2: 0.5 (e^2 - 2 - 1)
        ([[[0, 0]]], [[[2, 2]]], [[1]], 0.5 * (math.exp(2) - 3)),
        # voxels differ: (0.5 + 0) / 2 = 0.25
        ([[[1, 0]]], [[[0, 0]]], [[1]], 0.25),
        # two modalities summed: mu = 1 -> 0.5, mu = 2 -> 0.5 * 4 = 2.0; total 2.5
        ([[[1, 1], [2, 2]]], [[[0, 0], [0, 0]]], [[1, 1]], 2.5),
        # B = 2, sample 2 has only modality 0 (mu = 1 -> 0.5; its absent modality is NaN and ignored):
        # mean over samples (2.5 + 0.5) / 2 = 1.5
        ([[[1, 1], [2, 2]], [[1, 1], [NAN, NAN]]], [[[0, 0], [0, 0]], [[0, 0], [NAN, NAN]]], [[1, 1], [1, 0]], 1.5),
        # lv = 50 is clamped to 10: 0.5 (e^10 - 10 - 1)
        ([[[0, 0]]], [[[50, 50]]], [[1]], 0.5 * (math.exp(10) - 11)),
    ],
)
def test_normal_kl_by_hand(mu, lv, present, expected):
    mu, lv = Z(*mu), Z(*lv)
    loss = NormalAnchor().kl_loss(kl_to_standard_normal(mu, lv), P(*present))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_normal_needs_the_networks_kl():
    with pytest.raises(ValueError, match="latent_kl"):
        NormalAnchor().alignment_loss({"latents": Z([[0, 0]]), "present": P([1]), "latent_kl": None})


# ----------------------------------------------------------------------------------------------------------------------
# modality anchor: sum_{j != k} mean over samples with j, k of mean_voxels (Z_j - Z_k)^2 / E,
# E = the sample's mean of Z^2 over its present modalities and voxels

# sample A: Z_0 = [1, 3], Z_1 = [0, 1] (anchor k = 1), Z_2 = [3, 1]; mean squares 5, 0.5, 5 -> E = 3.5
#   d_0 = ((1-0)^2 + (3-1)^2) / 2 = 2.5;  d_2 = ((3-0)^2 + (1-1)^2) / 2 = 4.5
A = [[1, 3], [0, 1], [3, 1]]
# sample B lacks the anchor (Z_1 = NaN): it must contribute nothing
B_NO_K = [[9, 9], [NAN, NAN], [-9, 9]]
# sample C: Z_0 absent, Z_1 = [0, 0], Z_2 = [1, 1]: d_2 = 1, E = (0 + 1) / 2 = 0.5
C = [[NAN, NAN], [0, 0], [1, 1]]


@pytest.mark.parametrize(
    "latents, present, expected",
    [
        ([A], [[1, 1, 1]], 2.0),  # (2.5 + 4.5) / 3.5
        ([A, B_NO_K], [[1, 1, 1], [1, 0, 1]], 2.0),  # B has no k: unchanged
        # j = 0 paired only in A: 2.5 / 3.5;  j = 2 paired in A and C: (4.5 / 3.5 + 1 / 0.5) / 2
        ([A, C], [[1, 1, 1], [0, 1, 1]], 2.5 / 3.5 + (4.5 / 3.5 + 2.0) / 2),
        ([A, B_NO_K, C], [[1, 1, 1], [1, 0, 1], [0, 1, 1]], 2.5 / 3.5 + (4.5 / 3.5 + 2.0) / 2),
        ([A], [[1, 1, 0]], 2.5 / 2.75),  # Z_2 absent: E = (5 + 0.5) / 2
        ([A], [[0, 1, 0]], 0.0),  # only the anchor: nothing pairs up
        ([B_NO_K], [[1, 0, 1]], 0.0),  # nobody has the anchor: zero, not NaN
    ],
)
def test_modality_anchor_by_hand(latents, present, expected):
    latents = Z(*latents).requires_grad_()
    loss = ModalityAnchor(1).loss(latents, P(*present))
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert torch.isfinite(latents.grad).all()


def test_modality_anchor_stop_gradient():
    latents = Z(A).requires_grad_()
    ModalityAnchor(1, stop_gradient=True).loss(latents, P([1, 1, 1])).backward()
    # L = D / E with D = 7, E = 3.5 (L = 2); dD/dZ_j = (Z_j - Z_k) per voxel, dE/dZ_j = Z_j / 3 (M = 3, 2 voxels),
    # and Z_k is a constant in both: dL/dZ_j = (Z_j - Z_k) / 3.5 - 2 Z_j / 10.5
    #   Z_0 = [1, 3]: [1, 2] / 3.5 - [2, 6] / 10.5 = [1, 0] / 10.5;  Z_2 = [3, 1]: [3, 0] / 3.5 - [6, 2] / 10.5
    expected = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, -2.0]]) / 10.5
    torch.testing.assert_close(latents.grad[0, :, 0], expected)

    latents.grad = None
    ModalityAnchor(1, stop_gradient=False).loss(latents, P([1, 1, 1])).backward()
    # dD/dZ_k = -sum_j (Z_j - Z_k) = -[(1-0) + (3-0), (3-1) + (1-1)] = [-4, -2]; dE/dZ_k = Z_k / 3 = [0, 1/3]
    # dL/dZ_k = [-4, -2] / 3.5 - 2 [0, 1] / 10.5 = [-12, -8] / 10.5
    torch.testing.assert_close(latents.grad[0, 1, 0], torch.tensor([-12.0, -8.0]) / 10.5)


# ----------------------------------------------------------------------------------------------------------------------
# mixture anchor: sum_j mean_voxels (Z_j - p_mix)^2 / E, p_mix = sum_j w_j Z_j, w = 1 / (2 n) + softmax(raw) / 2 over
# the n present modalities (the floor f = 1/2), E = the sample's mean of Z^2 over its present modalities and voxels

# Z_0 = [0, 0], Z_1 = [3, 3], Z_2 = [0, 6]; mean squares 0, 9, 18 -> E = 9
MIX = [[0, 0], [3, 3], [0, 6]]


@pytest.mark.parametrize(
    "latents, present, expected",
    [
        # uniform: p = [1, 3]; d_0 = (1 + 9)/2 = 5, d_1 = (4 + 0)/2 = 2, d_2 = (1 + 9)/2 = 5; total 12 / 9
        ([MIX], [[1, 1, 1]], 12.0 / 9),
        # Z_2 absent (NaN, ignored): p = [1.5, 1.5]; d_0 = d_1 = 2.25; E = 4.5; total 4.5 / 4.5
        ([[[0, 0], [3, 3], [NAN, NAN]]], [[1, 1, 0]], 1.0),
        # both samples: (4/3 + 1) / 2
        ([MIX, [[0, 0], [3, 3], [NAN, NAN]]], [[1, 1, 1], [1, 1, 0]], 7.0 / 6),
        # a single present modality: p = Z_j, loss 0
        ([MIX], [[0, 0, 1]], 0.0),
        # equal latents: loss 0
        ([[[2, 5], [2, 5], [2, 5]]], [[1, 1, 1]], 0.0),
    ],
)
def test_mixture_uniform_by_hand(latents, present, expected):
    loss = mixture(m=3).loss(Z(*latents), P(*present))
    assert loss.item() == pytest.approx(expected)


def test_mixture_masked_softmax_renormalises():
    # raw = log [1, 2, 3, 4] -> softmax [0.1, 0.2, 0.3, 0.4] -> w = 1/8 + [0.05, 0.1, 0.15, 0.2]
    anchor = mixture(raw=[math.log(v) for v in (1, 2, 3, 4)])
    assert MixtureAnchor.WEIGHT_FLOOR == 0.5
    torch.testing.assert_close(anchor.normalised_weights(), torch.tensor([0.175, 0.225, 0.275, 0.325]))
    w = anchor.sample_weights(P([1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1]))
    # {0, 2}: shares [1/4, 3/4] -> 1/4 + [1/8, 3/8]; {1, 2, 3}: shares [2, 3, 4] / 9 -> 1/6 + [1, 1.5, 2] / 9
    expected = torch.tensor([[3 / 8, 0, 5 / 8, 0], [0, 5 / 18, 6 / 18, 7 / 18], [0.175, 0.225, 0.275, 0.325]])
    torch.testing.assert_close(w, expected)
    # constant latents Z = [4, 8, 0, 12], present {0, 2}: p = 4 x 3/8 + 0 = 1.5; distance 2.5^2 + 1.5^2 = 8.5;
    # E = (16 + 0) / 2 = 8
    latents = Z([[4, 4], [8, 8], [0, 0], [12, 12]])
    assert anchor.loss(latents, P([1, 0, 1, 0])).item() == pytest.approx(8.5 / 8)


def test_mixture_weights_keep_their_floor():
    # logits +-50: the softmax puts everything on modality 0, the floor keeps 1/8 for each other one (scale 0.5)
    anchor = mixture(raw=[50.0, -50.0, -50.0, -50.0])
    torch.testing.assert_close(anchor.normalised_weights(), torch.tensor([0.625, 0.125, 0.125, 0.125]))
    torch.testing.assert_close(anchor.predictor_scales(), torch.tensor([2.5, 0.5, 0.5, 0.5]))
    # modality 0 absent: the softmax over {1, 3} is uniform, and so are the weights
    w = anchor.sample_weights(P([0, 1, 0, 1], [1, 1, 0, 0]))
    torch.testing.assert_close(w, torch.tensor([[0, 0.5, 0, 0.5], [0.75, 0.25, 0, 0]]))
    weights = anchor.weights_dict(["a", "b", "c", "d"])
    assert weights["b"] == {"raw": pytest.approx(-50.0), "normalised": pytest.approx(0.125)}


def test_mixture_gradient_reaches_raw_weights():
    # raw = [0, log 3] -> softmax [1/4, 3/4], w = 1/4 + [1/8, 3/8] = [3/8, 5/8]; Z_0 = 0, Z_1 = 4: p = 2.5, distance
    # 6.25 + 2.25 = 8.5, E = (0 + 16) / 2 = 8. dD/dp = -2 (0 - 2.5) - 2 (4 - 2.5) = 2; p = 4 (1/4 + sigmoid(r1 - r0) / 2),
    # dp/dr1 = 2 x 3/16 = 3/8 -> dD/dr1 = 3/4, dD/dr0 = -3/4; E does not depend on the weights: dL/dr = [-3, 3] / 32
    # for the logits r, times the gain for the parameter
    anchor = mixture(raw=[0.0, math.log(3.0)])
    latents = Z([[0, 0], [4, 4]]).requires_grad_()
    loss = anchor.loss(latents, P([1, 1]))
    assert loss.item() == pytest.approx(8.5 / 8)
    loss.backward()
    torch.testing.assert_close(anchor.raw_weights.grad, torch.tensor([-3.0, 3.0]) / 32 * MixtureAnchor.WEIGHT_GAIN)
    assert latents.grad.abs().sum() > 0  # p_mix is not detached

    # at uniform weights p_mix is the centroid, the minimiser of the loss in p: zero gradient into the weights ...
    uniform = mixture(m=2)
    uniform.loss(Z([[0, 0], [4, 4]]), P([1, 1])).backward()
    torch.testing.assert_close(uniform.raw_weights.grad, torch.zeros(2))
    # ... but the fill of an absent modality reaches them: fill = p = 4 (1/4 + sigmoid(r1 - r0) / 2), d/dr1 = 2 / 4
    # per voxel
    three = mixture(m=3)
    filled = three.fill_missing(Z([[0, 0], [4, 4], [NAN, NAN]]), P([1, 1, 0]))
    filled[0, 2].sum().backward()  # 2 voxels -> d/dr = [-1, 1, 0] for the logits, times the gain for the parameter
    torch.testing.assert_close(three.raw_weights.grad, torch.tensor([-1.0, 1.0, 0.0]) * MixtureAnchor.WEIGHT_GAIN)


def test_mixture_normalisation_prevents_collapse():
    # Z_0 = 0, Z_1 = 4, E = 8. With w1 = sigmoid(r1 - r0), p = 4 w1 and L = ((4 w1)^2 + (4 - 4 w1)^2) / 8 >= 1,
    # equal at w1 = 1/2. A free weight could drive L to 0; the normalised one can only reach the centroid.
    # init softmax([1, -1]) = [0.88, 0.12], w = [0.69, 0.31] -> L = 2 (0.31^2 + 0.69^2) = 1.14; lr 3.2 / gain^2 (the
    # logits' step is gain^2 times the parameter's, the floor halves their gradient) keeps SGD from oscillating
    anchor = mixture(raw=[1.0, -1.0])
    latents = Z([[0, 0], [4, 4]])
    opt = torch.optim.SGD(anchor.parameters(), lr=3.2 / MixtureAnchor.WEIGHT_GAIN**2)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = anchor.loss(latents, P([1, 1]))
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert anchor.normalised_weights().sum().item() == pytest.approx(1.0)
    assert min(losses) >= 1.0 - 1e-5
    assert losses[0] > losses[-1]
    assert losses[-1] == pytest.approx(1.0, abs=1e-3)
    torch.testing.assert_close(anchor.normalised_weights(), torch.tensor([0.5, 0.5]), atol=1e-2, rtol=0)


def test_mixture_weights_dict():
    anchor = mixture(raw=[0.0, math.log(3.0)])
    d = anchor.weights_dict(["T1", "T1ce"])
    # softmax [1/4, 3/4] -> floored 1/4 + [1/8, 3/8]
    assert d["T1"] == {"raw": 0.0, "normalised": pytest.approx(0.375)}
    assert d["T1ce"]["raw"] == pytest.approx(math.log(3.0)) and d["T1ce"]["normalised"] == pytest.approx(0.625)
    assert all(isinstance(v, float) for w in d.values() for v in w.values())
    with pytest.raises(ValueError):
        anchor.weights_dict(["T1"])


# ----------------------------------------------------------------------------------------------------------------------
# fill_missing: absent entries replaced, present unchanged

# Z_0 = [0, 0], Z_1 = [3, 3], Z_2 = [0, 6]; mean of {Z_0, Z_2} = [0, 3]; of {Z_1, Z_2} = [1.5, 4.5]
@pytest.mark.parametrize(
    "anchor, present, absent, expected",
    [
        (NoAnchor(), [1, 0, 1], 1, [0, 3]),
        (NormalAnchor(), [1, 0, 1], 1, [0, 0]),
        (ModalityAnchor(0), [1, 0, 1], 1, [0, 0]),  # k = 0 present: Z_0
        (ModalityAnchor(1), [1, 0, 1], 1, [0, 3]),  # k = 1 absent: mean of present
        (ModalityAnchor(1), [0, 1, 1], 0, [3, 3]),  # k = 1 present: Z_1
        (MixtureAnchor(3), [0, 1, 1], 0, [1.5, 4.5]),  # uniform: mean of present
        (mixture(raw=[0.0, 0.0, math.log(3.0)]), [1, 0, 1], 1, [0, 3.75]),  # w = [3/8, 0, 5/8]: [0, 30/8]
    ],
)
def test_fill_missing_by_hand(anchor, present, absent, expected):
    latents = Z(MIX)
    latents[0, absent] = NAN  # whatever the network put there must not matter
    latents.requires_grad_()
    mask = P(present)
    filled = anchor.fill_missing(latents, mask)
    assert filled.shape == latents.shape
    torch.testing.assert_close(filled[0, absent, 0], torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(filled[0][mask[0]], latents[0][mask[0]])
    filled[0][mask[0]].sum().backward()  # present entries pass their gradient straight through
    torch.testing.assert_close(latents.grad[0][mask[0]], torch.ones_like(latents[0][mask[0]]))
    assert not torch.isnan(latents.grad).any()


# ----------------------------------------------------------------------------------------------------------------------
# shapes and numerics for 1..4 present modalities

def parts(latents, present, logvar):
    """The teacher's parts for the anchor losses: latents as the normal anchor's means."""
    return {"latents": latents, "present": present, "latent_kl": kl_to_standard_normal(latents, logvar)}


ANCHORS = {
    "none": NoAnchor,
    "normal": NormalAnchor,
    "modality": lambda: ModalityAnchor(1),
    "mixture": lambda: MixtureAnchor(4),
}


@pytest.mark.parametrize("kind", sorted(ANCHORS))
@pytest.mark.parametrize("n_present", [1, 2, 3, 4])
def test_shapes(kind, n_present):
    torch.manual_seed(n_present)
    anchor = ANCHORS[kind]()
    latents = torch.randn(2, 4, 2, 1, 1, 2, requires_grad=True)  # (B, M, C, 1, 1, 2): 3-D spatial
    logvar = torch.randn(2, 4, 2, 1, 1, 2)
    present = torch.zeros(2, 4, dtype=torch.bool)
    present[0, :n_present] = True
    present[1, 4 - n_present :] = True
    loss = anchor.alignment_loss(parts(latents, present, logvar))
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    if n_present == 1 and kind in ("modality", "mixture", "none"):
        assert loss.item() == 0.0  # nothing pairs up
    assert anchor.fill_missing(latents, present).shape == latents.shape
    assert anchor.anchor_center(latents, present).shape == (2, 2, 1, 1, 2)
    loss.backward()
    assert torch.isfinite(latents.grad).all()


@pytest.mark.parametrize(
    "anchor, expected",
    [
        # Z_0 = 0, Z_1 = 600 (600^2 = 360000 overflows fp16); E = 360000 / 2
        (ModalityAnchor(1), 2.0),  # 360000 / E
        (MixtureAnchor(2), 1.0),  # p = 300: 2 * 300^2 / E
        (NormalAnchor(), 0.5 * 600.0**2),  # mu_0 = 0 -> 0, mu_1 = 600 -> 0.5 * 600^2
    ],
)
def test_fp16_inputs_computed_in_float32(anchor, expected):
    latents = Z([[0, 0], [600, 600]]).half()
    logvar = torch.zeros_like(latents)
    loss = anchor.alignment_loss(parts(latents, P([1, 1]), logvar))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert anchor.alignment_loss(parts(latents, P([1, 1]), logvar)).dtype == torch.float32
    assert anchor.fill_missing(latents, P([1, 0])).dtype == torch.float16


def test_no_anchor_is_zero_and_in_graph():
    latents = Z(MIX).requires_grad_()
    loss = NoAnchor().alignment_loss({"latents": latents, "present": P([1, 1, 1])})
    assert loss.item() == 0.0 and loss.requires_grad


# ----------------------------------------------------------------------------------------------------------------------
# build_anchor


@pytest.mark.parametrize(
    "spec, modalities, cls, name, index",
    [
        ("none", BRATS_MODALITIES, NoAnchor, "none", None),
        ("normal", BRATS_MODALITIES, NormalAnchor, "normal", None),
        ("modality", BRATS_MODALITIES, ModalityAnchor, "modality:T1ce", 1),
        ("modality:flair", BRATS_MODALITIES, ModalityAnchor, "modality:FLAIR", 3),
        ("Modality: t1c ", BRATS_MODALITIES, ModalityAnchor, "modality:T1ce", 1),
        ("modality:T2", ("T2", "FLAIR"), ModalityAnchor, "modality:T2", 0),
        ("modality", ("flair", "t1gd"), ModalityAnchor, "modality:T1ce", 1),  # dataset spellings
        (" MIXTURE ", BRATS_MODALITIES, MixtureAnchor, "mixture", None),
    ],
)
def test_build_anchor(spec, modalities, cls, name, index):
    anchor = build_anchor(spec, modalities)
    assert type(anchor) is cls and isinstance(anchor, AnchorAlignment)
    assert anchor.name == name
    assert anchor.uses_gaussian_latents == (cls is NormalAnchor)
    if index is not None:
        assert anchor.anchor_index == index and anchor.stop_gradient
    if cls is MixtureAnchor:
        assert anchor.raw_weights.shape == (len(modalities),)
    assert name.split(":")[0] in ANCHOR_REGISTRY.names and ANCHOR_REGISTRY.get(name.split(":")[0]) is cls


@pytest.mark.parametrize(
    "spec, modalities, match",
    [
        ("bogus", BRATS_MODALITIES, "unknown anchor 'bogus'.*none, normal, modality.*mixture"),
        ("", BRATS_MODALITIES, "unknown anchor"),
        ("modality:", BRATS_MODALITIES, "names no modality"),
        ("modality:PD", BRATS_MODALITIES, "unknown modality 'PD'"),
        ("modality", ("T1", "T2"), "T1ce is not one of this model's modalities"),
        ("modality:FLAIR", ("T1", "T2"), "FLAIR is not one of"),
        ("mixture:3", BRATS_MODALITIES, "takes no"),
        ("bo\ngus", BRATS_MODALITIES, "unknown anchor"),
    ],
)
def test_build_anchor_errors(spec, modalities, match):
    with pytest.raises(NnalignError, match=match) as info:
        build_anchor(spec, modalities)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------------------------
# modality_gap


def _gap_latents():
    # C = 2, 2 voxels, B = 2, M = 4. Per-sample spatial means (channel 0, channel 1):
    #   sample 0: Z_0 voxels (-1, 1)/(0, 0) -> (0, 0);  Z_1 -> (3, 4);  Z_2 absent;  Z_3 absent
    #   sample 1: Z_0 -> (2, 0);  Z_1 absent;  Z_2 -> (0, 0);  Z_3 absent
    # centroids: c_0 = mean((0,0), (2,0)) = (1, 0); c_1 = (3, 4); c_2 = (0, 0); Z_3 nowhere -> left out
    latents = torch.full((2, 4, 2, 2), 100.0)  # absent entries: garbage
    latents[0, 0] = torch.tensor([[-1.0, 1.0], [0.0, 0.0]])
    latents[0, 1] = torch.tensor([[3.0, 3.0], [4.0, 4.0]])
    latents[1, 0] = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    latents[1, 2] = 0.0
    return latents, P([1, 1, 0, 0], [1, 0, 1, 0])


def test_modality_gap_by_hand():
    latents, present = _gap_latents()
    # normal anchor: centroid (0, 0), distances |c_0| = 1, |c_1| = 5, |c_2| = 0
    gap = modality_gap(latents, present, NormalAnchor())
    assert gap["to_anchor"] == {0: pytest.approx(1.0), 1: pytest.approx(5.0), 2: pytest.approx(0.0)}
    # pairs: |c_0 - c_1| = |(-2, -4)| = sqrt(20); |c_0 - c_2| = 1; |c_1 - c_2| = 5 -> mean (sqrt(20) + 6) / 3
    assert gap["pairwise_mean"] == pytest.approx((math.sqrt(20) + 6) / 3)
    assert isinstance(gap["pairwise_mean"], float) and all(isinstance(v, float) for v in gap["to_anchor"].values())

    # modality anchor k = 0: centre Z_0 in both samples -> centroid mean((0, 0), (2, 0)) = (1, 0) = c_0
    gap = modality_gap(latents, present, ModalityAnchor(0))
    assert gap["to_anchor"] == {0: pytest.approx(0.0), 1: pytest.approx(math.sqrt(20)), 2: pytest.approx(1.0)}

    # no anchor: centre = mean of the present: sample 0 ((0,0) + (3,4)) / 2 = (1.5, 2); sample 1 (1, 0)
    # -> centroid (1.25, 1): |c_0 - .| = |(-0.25, -1)|, |c_1 - .| = |(1.75, 3)|, |c_2 - .| = |(-1.25, -1)|
    gap = modality_gap(latents, present, NoAnchor())
    assert gap["to_anchor"] == {0: pytest.approx(math.hypot(0.25, 1)), 1: pytest.approx(math.hypot(1.75, 3)),
                                2: pytest.approx(math.hypot(1.25, 1))}

    # mixture, raw weights (ln 3, 0, 0, 0): two present, softmax (3/4, 1/4), floored weights (5/8, 3/8): sample 0
    # -> (1.125, 1.5); sample 1 of Z_0, Z_2 -> (1.25, 0); centroid (1.1875, 0.75): |c_1 - .| = |(1.8125, 3.25)|
    gap = modality_gap(latents, present, mixture([math.log(3), 0, 0, 0]))
    assert gap["to_anchor"][1] == pytest.approx(math.hypot(1.8125, 3.25))

    # one modality in the whole batch: no pairs
    assert modality_gap(latents, P([1, 0, 0, 0], [1, 0, 0, 0]), NormalAnchor())["pairwise_mean"] == 0.0


@pytest.mark.parametrize("spec", ["none", "normal", "modality:T1ce", "mixture"])
def test_modality_gap_centroid_equals_full_resolution_centre(spec):
    """The anchor centroid from the spatial means equals the full-resolution centre averaged over samples and space."""
    torch.manual_seed(0)
    anchor = build_anchor(spec, BRATS_MODALITIES)
    if spec == "mixture":
        with torch.no_grad():
            anchor.raw_weights.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    latents = torch.randn(3, 4, 2, 3, 4, 5) + torch.arange(4.0).reshape(1, 4, 1, 1, 1, 1)
    present = P([1, 1, 1, 1], [0, 1, 0, 1], [1, 0, 1, 0])
    with torch.no_grad():
        centroid = anchor.anchor_center(latents, present).mean((0, 2, 3, 4))
    per_sample = latents.mean((3, 4, 5))
    expected = {j: float(torch.linalg.vector_norm(per_sample[present[:, j], j].mean(0) - centroid)) for j in range(4)}
    assert modality_gap(latents, present, anchor)["to_anchor"] == pytest.approx(expected, rel=1e-5)


def test_modality_gap_of_half_precision_latents():
    latents, present = _gap_latents()
    gap = modality_gap(latents.half(), present, NormalAnchor())
    assert gap["to_anchor"] == {0: pytest.approx(1.0), 1: pytest.approx(5.0), 2: pytest.approx(0.0)}


def test_mixture_stays_float32_under_autocast():
    """The weighted sum p_mix is a matrix product, which autocast would run in low precision; the loss keeps it fp32."""
    torch.manual_seed(0)
    anchor = mixture([0.3, -0.2, 0.1])
    latents = torch.randn(2, 3, 4, 5, 6) * 100
    present = P([1, 1, 1], [1, 0, 1])
    expected_mix, expected_loss = anchor.mixture(latents, present), anchor.loss(latents, present)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_mix, got_loss = anchor.mixture(latents, present), anchor.loss(latents, present)
    assert got_mix.dtype == torch.float32 and got_loss.dtype == torch.float32
    torch.testing.assert_close(got_mix, expected_mix)
    torch.testing.assert_close(got_loss, expected_loss)


# ----------------------------------------------------------------------------------------------------------------------
# scale: alignment that shrinking the latents cannot fake


@pytest.mark.parametrize("anchor", [ModalityAnchor(1), ModalityAnchor(1, stop_gradient=False), MixtureAnchor(3)])
@pytest.mark.parametrize("c", [1e-3, 0.1, 0.5, 3.0, 1e3])
def test_distance_anchors_do_not_change_when_every_latent_is_scaled(anchor, c):
    torch.manual_seed(0)
    if isinstance(anchor, MixtureAnchor):
        with torch.no_grad():
            anchor.raw_weights.copy_(torch.tensor([0.4, -0.3, 1.0]))
    latents = torch.randn(3, 3, 2, 4, 5) + torch.arange(3.0).reshape(1, 3, 1, 1, 1)
    present = P([1, 1, 1], [1, 1, 0], [0, 1, 1])
    loss = anchor.loss(latents, present)
    assert loss.item() > 0.1
    assert anchor.loss(c * latents, present).item() == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("anchor", [ModalityAnchor(1, stop_gradient=False), MixtureAnchor(3)])
def test_distance_anchors_have_no_gradient_along_the_latents_scale(anchor):
    """The loss is of degree 0 in the latents, so <dL/dZ, Z> = 0: it gives the encoder no push to shrink them."""
    torch.manual_seed(1)
    latents = (torch.randn(2, 3, 2, 4, 5) + 2.0).requires_grad_()
    present = P([1, 1, 1], [1, 1, 0])
    anchor.loss(latents, present).backward()
    radial = float((latents.grad * latents.detach()).sum())
    assert latents.grad.abs().max() > 1e-3 and abs(radial) < 1e-5


def test_modality_gap_reports_rms_and_the_relative_gap():
    latents, present = _gap_latents()
    gap = modality_gap(latents, present, NormalAnchor())
    # RMS over the samples holding each modality, channels and voxels:
    #   Z_0: sample 0 (1, 1, 0, 0), sample 1 (1, 9, 0, 0) -> mean 12 / 8 = 1.5;  Z_1: (9, 9, 16, 16) -> 12.5;  Z_2: 0
    assert gap["rms"] == {0: pytest.approx(math.sqrt(1.5)), 1: pytest.approx(math.sqrt(12.5)), 2: pytest.approx(0.0)}
    mean_rms = (math.sqrt(1.5) + math.sqrt(12.5)) / 3
    assert gap["relative_gap"] == pytest.approx(((math.sqrt(20) + 6) / 3) / mean_rms)
    # scaling every latent scales the gap and the RMS alike: the relative gap stays
    scaled = modality_gap(latents * 0.01, present, NormalAnchor())
    assert scaled["pairwise_mean"] == pytest.approx(gap["pairwise_mean"] * 0.01)
    assert scaled["relative_gap"] == pytest.approx(gap["relative_gap"])
