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
    ScaledMixtureAnchor,
    build_anchor,
    latent_energy,
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


def mixture(raw=None, m=None, cls=MixtureAnchor):
    """A mixture anchor (``cls``) whose weight logits are ``raw`` (the parameter is raw / WEIGHT_GAIN)."""
    anchor = cls(m if m is not None else len(raw))
    if raw is not None:
        with torch.no_grad():
            anchor.raw_weights.copy_(torch.tensor(raw, dtype=torch.float32) / cls.WEIGHT_GAIN)
    return anchor


def relative(anchor):
    """``anchor`` with nnalign's relative distance (over the centred energy)."""
    anchor.distance = "relative"
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
# modality anchor: sum_{j != k} mean over samples with j, k of mean_voxels (Z_j - Z_k)^2 (the paper's MSE), or of that
# over E (relative), E = the sample's centred energy: mean over present j and voxels of (Z_j - mu)^2, mu the mean over
# the present modalities and voxels (per channel; C = 1 here)

# sample A: Z_0 = [1, 3], Z_1 = [0, 1] (anchor k = 1), Z_2 = [3, 1]
#   d_0 = ((1-0)^2 + (3-1)^2) / 2 = 2.5;  d_2 = ((3-0)^2 + (1-1)^2) / 2 = 4.5
#   mu = 9 / 6 = 1.5, E = (0.25 + 2.25 + 2.25 + 0.25 + 2.25 + 0.25) / 6 = 1.25
A = [[1, 3], [0, 1], [3, 1]]
# sample B lacks the anchor (Z_1 = NaN): it must contribute nothing
B_NO_K = [[9, 9], [NAN, NAN], [-9, 9]]
# sample C: Z_0 absent, Z_1 = [0, 0], Z_2 = [1, 1]: d_2 = 1; mu = 0.5, E = 0.25
C = [[NAN, NAN], [0, 0], [1, 1]]
# A with Z_2 absent: mu = 5 / 4 = 1.25, E = (0.0625 + 3.0625 + 1.5625 + 0.0625) / 4 = 1.1875


@pytest.mark.parametrize(
    "latents, present, mse, rel",
    [
        ([A], [[1, 1, 1]], 7.0, 7.0 / 1.25),
        ([A, B_NO_K], [[1, 1, 1], [1, 0, 1]], 7.0, 7.0 / 1.25),  # B has no k: unchanged
        # j = 0 paired only in A; j = 2 paired in A and C: (4.5 + 1) / 2, relative (4.5 / 1.25 + 1 / 0.25) / 2
        ([A, C], [[1, 1, 1], [0, 1, 1]], 2.5 + 2.75, 2.5 / 1.25 + 3.8),
        ([A, B_NO_K, C], [[1, 1, 1], [1, 0, 1], [0, 1, 1]], 2.5 + 2.75, 2.5 / 1.25 + 3.8),
        ([A], [[1, 1, 0]], 2.5, 2.5 / 1.1875),  # Z_2 absent
        ([A], [[0, 1, 0]], 0.0, 0.0),  # only the anchor: nothing pairs up
        ([B_NO_K], [[1, 0, 1]], 0.0, 0.0),  # nobody has the anchor: zero, not NaN
    ],
)
def test_modality_anchor_by_hand(latents, present, mse, rel):
    for anchor, expected in ((ModalityAnchor(1), mse), (relative(ModalityAnchor(1)), rel)):
        z = Z(*latents).requires_grad_()
        loss = anchor.loss(z, P(*present))
        assert loss.item() == pytest.approx(expected)
        loss.backward()
        assert torch.isfinite(z.grad).all()


def test_modality_anchor_stop_gradient():
    latents = Z(A).requires_grad_()
    ModalityAnchor(1, stop_gradient=True).loss(latents, P([1, 1, 1])).backward()
    # L = d_0 + d_2 = 7; dL/dZ_j = 2 (Z_j - Z_k) / 2 voxels, and Z_k is a constant: Z_0 -> [1, 2], Z_2 -> [3, 0]
    torch.testing.assert_close(latents.grad[0, :, 0], torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]]))

    latents.grad = None
    ModalityAnchor(1, stop_gradient=False).loss(latents, P([1, 1, 1])).backward()
    # dL/dZ_k = -sum_j (Z_j - Z_k) = -[(1-0) + (3-0), (3-1) + (1-1)] = [-4, -2]
    torch.testing.assert_close(latents.grad[0, 1, 0], torch.tensor([-4.0, -2.0]))


def test_latent_energy_is_centred_by_hand():
    # sample A: 1.25; A without Z_2: 1.1875; sample C without Z_0: 0.25 (absent latents zeroed, as the losses pass them)
    z = torch.nan_to_num(Z(A, A, C))
    present = P([1, 1, 1], [1, 1, 0], [0, 1, 1])
    z = torch.where(present[:, :, None, None], z, 0.0)
    torch.testing.assert_close(latent_energy(z, present), torch.tensor([1.25, 1.1875, 0.25]))
    # a constant per channel added to every modality does not change it; today's uncentred mean of Z^2 would
    torch.testing.assert_close(latent_energy(torch.where(present[:, :, None, None], z + 10.0, 0.0), present),
                               torch.tensor([1.25, 1.1875, 0.25]))


# ----------------------------------------------------------------------------------------------------------------------
# mixture anchor (P*, the paper's): sum_j mean_voxels (Z_j - p_mix)^2 (or over E, relative), p_mix = sum_j w_j Z_j,
# w = softmax(raw) over the present modalities

# Z_0 = [0, 0], Z_1 = [3, 3], Z_2 = [0, 6]; mu = 2, E = (4 + 4 + 1 + 1 + 4 + 16) / 6 = 5
MIX = [[0, 0], [3, 3], [0, 6]]


@pytest.mark.parametrize(
    "latents, present, expected, rel",
    [
        # uniform: p = [1, 3]; d_0 = (1 + 9)/2 = 5, d_1 = (4 + 0)/2 = 2, d_2 = (1 + 9)/2 = 5; total 12, over E 12 / 5
        ([MIX], [[1, 1, 1]], 12.0, 12.0 / 5),
        # Z_2 absent (NaN, ignored): p = [1.5, 1.5]; d_0 = d_1 = 2.25; mu = 1.5, E = 2.25; over E 4.5 / 2.25
        ([[[0, 0], [3, 3], [NAN, NAN]]], [[1, 1, 0]], 4.5, 2.0),
        # both samples: (12 + 4.5) / 2, relative (2.4 + 2) / 2
        ([MIX, [[0, 0], [3, 3], [NAN, NAN]]], [[1, 1, 1], [1, 1, 0]], 8.25, 2.2),
        # a single present modality: p = Z_j, loss 0
        ([MIX], [[0, 0, 1]], 0.0, 0.0),
        # equal latents: loss 0
        ([[[2, 5], [2, 5], [2, 5]]], [[1, 1, 1]], 0.0, 0.0),
    ],
)
def test_mixture_uniform_by_hand(latents, present, expected, rel):
    assert mixture(m=3).loss(Z(*latents), P(*present)).item() == pytest.approx(expected)
    assert relative(mixture(m=3)).loss(Z(*latents), P(*present)).item() == pytest.approx(rel)


def test_mixture_masked_softmax_renormalises():
    # raw = log [1, 2, 3, 4] -> w = softmax = [0.1, 0.2, 0.3, 0.4]: no floor, no gain (the paper's weights)
    anchor = mixture(raw=[math.log(v) for v in (1, 2, 3, 4)])
    torch.testing.assert_close(anchor.normalised_weights(), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    w = anchor.sample_weights(P([1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1]))
    # {0, 2}: [1, 3] / 4; {1, 2, 3}: [2, 3, 4] / 9
    expected = torch.tensor([[1 / 4, 0, 3 / 4, 0], [0, 2 / 9, 3 / 9, 4 / 9], [0.1, 0.2, 0.3, 0.4]])
    torch.testing.assert_close(w, expected)
    # constant latents Z = [4, 8, 0, 12], present {0, 2}: p = 4 x 1/4 + 0 = 1; distance 3^2 + 1^2 = 10
    latents = Z([[4, 4], [8, 8], [0, 0], [12, 12]])
    assert anchor.loss(latents, P([1, 0, 1, 0])).item() == pytest.approx(10.0)


def test_paper_mixture_does_not_scale_the_predictor_input():
    anchor = mixture(raw=[2.0, -1.0, 0.0])
    latents = torch.randn(2, 3, 2, 4)
    assert anchor.scale_for_predictor(latents) is latents
    assert (MixtureAnchor.WEIGHT_GAIN, MixtureAnchor.WEIGHT_FLOOR) == (1.0, 0.0)


def test_scaled_mixture_weights_keep_their_floor():
    # nnalign's extension: logits +-50 put the softmax on modality 0, the floor keeps 1/8 for each other (scale 0.5)
    anchor = mixture(raw=[50.0, -50.0, -50.0, -50.0], cls=ScaledMixtureAnchor)
    assert (ScaledMixtureAnchor.WEIGHT_GAIN, ScaledMixtureAnchor.WEIGHT_FLOOR) == (5.0, 0.5)
    torch.testing.assert_close(anchor.normalised_weights(), torch.tensor([0.625, 0.125, 0.125, 0.125]))
    torch.testing.assert_close(anchor.predictor_scales(), torch.tensor([2.5, 0.5, 0.5, 0.5]))
    latents = torch.ones(1, 4, 1, 2)
    torch.testing.assert_close(anchor.scale_for_predictor(latents)[0, :, 0, 0], torch.tensor([2.5, 0.5, 0.5, 0.5]))
    # modality 0 absent: the softmax over {1, 3} is uniform, and so are the weights
    w = anchor.sample_weights(P([0, 1, 0, 1], [1, 1, 0, 0]))
    torch.testing.assert_close(w, torch.tensor([[0, 0.5, 0, 0.5], [0.75, 0.25, 0, 0]]))
    weights = anchor.weights_dict(["a", "b", "c", "d"])
    assert weights["b"] == {"raw": pytest.approx(-50.0), "normalised": pytest.approx(0.125)}


def test_mixture_gradient_reaches_raw_weights():
    # raw = [0, log 3] -> w = [1/4, 3/4]; Z_0 = 0, Z_1 = 4: p = 3, L = 9 + 1 = 10. dL/dp = -2 (0 - 3) - 2 (4 - 3) = 4;
    # p = 4 sigmoid(r1 - r0), dp/dr1 = 4 x 3/16 = 3/4 -> dL/dr = [-3, 3]
    anchor = mixture(raw=[0.0, math.log(3.0)])
    latents = Z([[0, 0], [4, 4]]).requires_grad_()
    loss = anchor.loss(latents, P([1, 1]))
    assert loss.item() == pytest.approx(10.0)
    loss.backward()
    torch.testing.assert_close(anchor.raw_weights.grad, torch.tensor([-3.0, 3.0]))
    assert latents.grad.abs().sum() > 0  # p_mix is not detached

    # at uniform weights p_mix is the centroid, the minimiser of the loss in p: zero gradient into the weights
    uniform = mixture(m=2)
    uniform.loss(Z([[0, 0], [4, 4]]), P([1, 1])).backward()
    torch.testing.assert_close(uniform.raw_weights.grad, torch.zeros(2))


@pytest.mark.parametrize(
    "present, expected",
    [
        # Z_2 dropped: fill = p = 4 sigmoid(r1 - r0) per voxel, d/dr1 = 4 / 4 = 1 per voxel, 2 voxels -> [-2, 2, 0]
        ([1, 1, 0], [-2.0, 2.0, 0.0]),
        # every modality present: the fill is the identity and the present latents enter unscaled: no gradient
        ([1, 1, 1], [0.0, 0.0, 0.0]),
    ],
)
def test_mixture_weights_learn_through_the_fill_only(present, expected):
    """P*'s weights reach the predictor through the fill of a dropped modality, and only through it."""
    anchor = mixture(m=3)
    latents = Z([[0, 0], [4, 4], [NAN, NAN]] if not present[2] else [[0, 0], [4, 4], [1, 2]])
    into_predictor = anchor.scale_for_predictor(anchor.fill_missing(latents, P(present)))
    torch.nan_to_num(into_predictor[0, 2]).sum().backward()  # a loss on the latents the predictor reads
    grad = anchor.raw_weights.grad if anchor.raw_weights.grad is not None else torch.zeros(3)
    torch.testing.assert_close(grad, torch.tensor(expected))


def test_mixture_normalisation_prevents_collapse():
    # Z_0 = 0, Z_1 = 4. With w1 = sigmoid(r1 - r0), p = 4 w1 and L = (4 w1)^2 + (4 - 4 w1)^2 >= 8, equal at w1 = 1/2.
    # A free weight could drive L to 0; the normalised one can only reach the centroid. init softmax([1, -1]) =
    # [0.88, 0.12] -> L = 16 (0.12^2 + 0.88^2) = 12.6; near the optimum d2L/dr2 = 64 / 16 = 4, so lr 0.1 is stable
    anchor = mixture(raw=[1.0, -1.0])
    latents = Z([[0, 0], [4, 4]])
    opt = torch.optim.SGD(anchor.parameters(), lr=0.1)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = anchor.loss(latents, P([1, 1]))
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert anchor.normalised_weights().sum().item() == pytest.approx(1.0)
    assert min(losses) >= 8.0 - 1e-4
    assert losses[0] > losses[-1]
    assert losses[-1] == pytest.approx(8.0, abs=1e-3)
    torch.testing.assert_close(anchor.normalised_weights(), torch.tensor([0.5, 0.5]), atol=1e-2, rtol=0)


def test_mixture_weights_dict():
    anchor = mixture(raw=[0.0, math.log(3.0)])
    d = anchor.weights_dict(["T1", "T1ce"])
    assert d["T1"] == {"raw": 0.0, "normalised": pytest.approx(0.25)}
    assert d["T1ce"]["raw"] == pytest.approx(math.log(3.0)) and d["T1ce"]["normalised"] == pytest.approx(0.75)
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
        (mixture(raw=[0.0, 0.0, math.log(3.0)]), [1, 0, 1], 1, [0, 4.5]),  # w = [1/4, 0, 3/4]: [0, 18/4]
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
    "mixture-scaled": lambda: ScaledMixtureAnchor(4),
    "modality, relative": lambda: relative(ModalityAnchor(1)),
    "mixture, relative": lambda: relative(MixtureAnchor(4)),
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
    if n_present == 1 and kind != "normal":
        assert loss.item() == 0.0  # nothing pairs up
    assert anchor.fill_missing(latents, present).shape == latents.shape
    assert anchor.anchor_center(latents, present).shape == (2, 2, 1, 1, 2)
    loss.backward()
    assert torch.isfinite(latents.grad).all()


@pytest.mark.parametrize(
    "anchor, expected",
    [
        # Z_0 = 0, Z_1 = 600 (600^2 = 360000 overflows fp16)
        (ModalityAnchor(1), 360000.0),
        (MixtureAnchor(2), 180000.0),  # p = 300: 2 * 300^2
        (relative(MixtureAnchor(2)), 2.0),  # over E = 300^2
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

    # mixture, raw weights (ln 3, 0, 0, 0): two present, weights (3/4, 1/4): sample 0 -> (0.75, 1); sample 1 of Z_0,
    # Z_2 -> (1.5, 0); centroid (1.125, 0.5): |c_1 - .| = |(1.875, 3.5)|
    gap = modality_gap(latents, present, mixture([math.log(3), 0, 0, 0]))
    assert gap["to_anchor"][1] == pytest.approx(math.hypot(1.875, 3.5))
    # scaled mixture: floored weights (5/8, 3/8): sample 0 -> (1.125, 1.5); sample 1 -> (1.25, 0); centroid
    # (1.1875, 0.75): |c_1 - .| = |(1.8125, 3.25)|
    gap = modality_gap(latents, present, mixture([math.log(3), 0, 0, 0], cls=ScaledMixtureAnchor))
    assert gap["to_anchor"][1] == pytest.approx(math.hypot(1.8125, 3.25))

    # one modality in the whole batch: no pairs
    assert modality_gap(latents, P([1, 0, 0, 0], [1, 0, 0, 0]), NormalAnchor())["pairwise_mean"] == 0.0


@pytest.mark.parametrize("spec", ["none", "normal", "modality:T1ce", "mixture", "mixture-scaled"])
def test_modality_gap_centroid_equals_full_resolution_centre(spec):
    """The anchor centroid from the spatial means equals the full-resolution centre averaged over samples and space."""
    torch.manual_seed(0)
    anchor = build_anchor(spec, BRATS_MODALITIES)
    if spec.startswith("mixture"):
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
# the relative distance: alignment that neither shrinking the latents nor a common offset can fake

DISTANCE_ANCHORS = [ModalityAnchor(1), ModalityAnchor(1, stop_gradient=False), MixtureAnchor(3),
                    ScaledMixtureAnchor(3)]


@pytest.mark.parametrize("anchor", DISTANCE_ANCHORS, ids=["P^k", "P^k nosg", "P*", "P* scaled"])
@pytest.mark.parametrize("c", [1e-3, 0.1, 0.5, 3.0, 1e3])
@pytest.mark.parametrize("offset", [(0.0, 0.0), (10.0, -3.0), (-200.0, 50.0)])
def test_relative_distance_ignores_scale_and_a_common_offset(anchor, c, offset):
    """Scaling every latent by c > 0 and adding one constant per channel (shared by the modalities) leave the relative
    loss unchanged: it can only be lowered by moving the modalities towards each other."""
    torch.manual_seed(0)
    anchor = relative(anchor)
    if isinstance(anchor, MixtureAnchor):
        with torch.no_grad():
            anchor.raw_weights.copy_(torch.tensor([0.4, -0.3, 1.0]))
    latents = torch.randn(3, 3, 2, 4, 5, dtype=torch.float64) + torch.arange(3.0).reshape(1, 3, 1, 1, 1)
    present = P([1, 1, 1], [1, 1, 0], [0, 1, 1])
    loss = anchor.loss(latents, present)
    assert loss.item() > 0.1
    # shift, then scale: any constant per channel and any c (the losses compute in float32, whose rounding, not the
    # formula, would show in c * Z + a for a tiny c and a large a)
    moved = c * (latents + torch.tensor(offset, dtype=torch.float64).reshape(1, 1, 2, 1, 1))
    assert anchor.loss(moved, present).item() == pytest.approx(loss.item(), rel=1e-4)


@pytest.mark.parametrize("anchor", [ModalityAnchor(1), MixtureAnchor(3)])
def test_plain_mse_is_the_default_distance(anchor):
    """The paper's MSE: scaling the latents by c scales the loss by c^2."""
    torch.manual_seed(0)
    latents = torch.randn(2, 3, 2, 4) + torch.arange(3.0).reshape(1, 3, 1, 1)
    present = P([1, 1, 1], [1, 1, 0])
    assert anchor.distance == "mse"
    assert anchor.loss(3 * latents, present).item() == pytest.approx(9 * anchor.loss(latents, present).item(), rel=1e-5)
    anchor.distance = "cosine"
    with pytest.raises(ValueError, match="cosine"):
        anchor.loss(latents, present)


@pytest.mark.parametrize("anchor", [ModalityAnchor(1, stop_gradient=False), MixtureAnchor(3)])
def test_relative_distance_has_no_gradient_along_the_latents_scale(anchor):
    """The relative loss is of degree 0 in the latents, so <dL/dZ, Z> = 0: it gives the encoder no push to shrink
    them; and it is unchanged by a common offset, so its gradient summed over the modalities and voxels is 0 per
    channel."""
    torch.manual_seed(1)
    anchor = relative(anchor)
    latents = (torch.randn(2, 3, 2, 4, 5) + 2.0).requires_grad_()
    present = P([1, 1, 1], [1, 1, 1])
    anchor.loss(latents, present).backward()
    radial = float((latents.grad * latents.detach()).sum())
    assert latents.grad.abs().max() > 1e-3 and abs(radial) < 1e-5
    torch.testing.assert_close(latents.grad.sum((1, 3, 4)), torch.zeros(2, 2), atol=1e-5, rtol=0)


def test_modality_gap_reports_rms_and_the_relative_gap():
    latents, present = _gap_latents()
    gap = modality_gap(latents, present, NormalAnchor())
    # RMS over the samples holding each modality, channels and voxels:
    #   Z_0: sample 0 (1, 1, 0, 0), sample 1 (1, 9, 0, 0) -> mean 12 / 8 = 1.5;  Z_1: (9, 9, 16, 16) -> 12.5;  Z_2: 0
    assert gap["rms"] == {0: pytest.approx(math.sqrt(1.5)), 1: pytest.approx(math.sqrt(12.5)), 2: pytest.approx(0.0)}
    # centred energy: sample 0, channel 0 (-1, 1, 3, 3) about 1.5 -> 11, channel 1 (0, 0, 4, 4) about 2 -> 16: 27 / 8;
    # sample 1, channel 0 (1, 3, 0, 0) about 1 -> 6, channel 1 all 0: 6 / 8. Centred RMS sqrt((27 / 8 + 6 / 8) / 2)
    centred_rms = math.sqrt((27 / 8 + 6 / 8) / 2)
    assert gap["relative_gap"] == pytest.approx(((math.sqrt(20) + 6) / 3) / centred_rms)
    # scaling every latent and adding one constant per channel move the absolute gap (scale) and the RMS, not the
    # relative gap
    moved = modality_gap((latents + torch.tensor([10.0, -20.0]).reshape(1, 1, 2, 1)) * 0.1, present, NormalAnchor())
    assert moved["pairwise_mean"] == pytest.approx(gap["pairwise_mean"] * 0.1, rel=1e-5)
    assert moved["relative_gap"] == pytest.approx(gap["relative_gap"], rel=1e-4)
