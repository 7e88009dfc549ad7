"""Network building blocks: the pointwise latent head and the teacher's per-modality encoding."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nnalign.networks.normal_latents import kl_to_standard_normal
from nnalign.networks.align_unet import PointwiseConv, modality_folded_conv, nnAlignTeacherUNet


@pytest.mark.parametrize("conv_op, spatial", [(nn.Conv3d, (3, 4, 5)), (nn.Conv2d, (6, 7))])
def test_pointwise_conv_equals_the_convolution_it_holds(conv_op, spatial):
    torch.manual_seed(0)
    head = PointwiseConv(conv_op, 4, 6)
    x = torch.randn(3, 4, *spatial, requires_grad=True)
    got = head(x)
    expected = head.conv(x)
    torch.testing.assert_close(got, expected)
    assert head.out_channels == 6
    weight_grad, = torch.autograd.grad(got.square().sum(), head.conv.weight)
    expected_grad, = torch.autograd.grad(expected.square().sum(), head.conv.weight)
    torch.testing.assert_close(weight_grad, expected_grad)


def test_pointwise_conv_keeps_the_autocast_dtype():
    head = PointwiseConv(nn.Conv3d, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = head(torch.randn(1, 4, 2, 2, 2))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("conv_op, spatial", [(nn.Conv3d, (5, 6, 7)), (nn.Conv2d, (6, 7))])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [8, 6])  # 6 is not a multiple of 4 modalities: the plain convolution runs
@pytest.mark.parametrize("in_channels, stride", [(1, 1), (2, 1), (3, 2)])  # the stem, a latent conv, a strided block
def test_folded_conv_equals_the_plain_convolution(conv_op, spatial, bias, batch, in_channels, stride):
    torch.manual_seed(0)
    folded = modality_folded_conv(conv_op, 4)(in_channels, 3, 3, stride, padding=1, bias=bias)
    assert isinstance(folded, conv_op) and modality_folded_conv(conv_op, 4) is type(folded)
    plain = conv_op(in_channels, 3, 3, stride, padding=1, bias=bias)
    plain.load_state_dict(folded.state_dict())
    x = torch.randn(batch, in_channels, *spatial, requires_grad=True)
    got, expected = folded(x), plain(x)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.square().sum(), [x, *folded.parameters()])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *plain.parameters()])
    for g, e in zip(grads, expected_grads):  # summed in another order: float32 rounding apart
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-4)


def _teacher(shared: bool, anchor: str = "mixture", latent_level: int = 0, deep_supervision: bool = False):
    return nnAlignTeacherUNet(
        4, 3, deep_supervision, anchor=anchor, shared_encoder=shared, latent_channels=2, latent_level=latent_level,
        n_stages=3, features_per_stage=(4, 8, 8), conv_op=nn.Conv3d, kernel_sizes=((3, 3, 3),) * 3,
        strides=((1, 1, 1), (2, 2, 2), (1, 2, 2)), n_conv_per_stage=(1, 1, 1), n_conv_per_stage_decoder=(1, 1),
        conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
        dropout_op_kwargs=None, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


@pytest.mark.parametrize("shared", [True, False])
def test_each_modality_is_encoded_on_its_own(shared):
    torch.manual_seed(0)
    net = _teacher(shared).eval()
    x = torch.randn(2, 4, 8, 8, 8)
    encoded = net.encode(x)
    assert encoded.shape == (2, 4, 2, 8, 8, 8)
    for j in range(4):
        encoder = net.encoders[0 if shared else j]
        torch.testing.assert_close(encoded[:, j], encoder(x[:, j:j + 1]))
    changed = x.clone()
    changed[:, 2] = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(net.encode(changed)[:, [0, 1, 3]], encoded[:, [0, 1, 3]])


def test_normal_teacher_samples_in_training_and_uses_the_mean_in_evaluation():
    torch.manual_seed(0)
    teacher = _teacher(True, "normal")
    x = torch.randn(2, 4, 4, 4, 4)
    mean, logvar = teacher.encode(x).detach().chunk(2, dim=2)
    expected_kl = kl_to_standard_normal(mean, logvar)

    parts = teacher.train()(x, return_parts=True)
    assert parts["latents"].shape == mean.shape and not torch.allclose(parts["latents"], mean)  # noise was added
    torch.testing.assert_close(parts["latent_kl"], expected_kl)

    teacher.eval()
    parts = teacher(x, return_parts=True)
    torch.testing.assert_close(parts["latents"], mean)
    torch.testing.assert_close(parts["latent_kl"], expected_kl)
    torch.testing.assert_close(teacher(x), parts["logits"][0])


@pytest.mark.parametrize("anchor", ["mixture", "normal"])
@pytest.mark.parametrize("shared", [True, False])
def test_latent_level_sets_the_latent_resolution_and_keeps_every_other_part(anchor, shared):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, 8)
    present = torch.tensor([[True, False, True, False], [False, False, False, True]])
    shapes = {}
    for level, latent_shape in ((0, (8, 8, 8)), (1, (4, 4, 4)), (2, (4, 2, 2))):  # strides (2,2,2) then (1,2,2)
        net = _teacher(shared, anchor, level, deep_supervision=True).train()
        parts = net(x, present, return_parts=True)
        assert parts["latents"].shape == (2, 4, 2, *latent_shape)
        assert parts["latent_kl"] is None or parts["latent_kl"].shape == (2, 4)
        assert len(net.upsample) == level
        loss = sum(p.square().mean() for p in parts["logits"]) + net.anchor.alignment_loss(parts)
        loss.backward()
        used = [p.grad is not None for n, p in net.named_parameters() if not n.startswith("unet.decoder.seg_layers.0")]
        assert all(used)
        shapes[level] = [t.shape for t in (*parts["logits"], *parts["skips"], parts["decoder_features"])]
    assert shapes[0] == shapes[1] == shapes[2]  # what students distil from does not depend on the level


def test_latent_level_zero_keeps_the_parameters_and_the_budget_counts_each_level():
    level0 = _teacher(True)
    keys0 = set(level0.state_dict())
    assert "encoders.0.1.conv.weight" in keys0 and not any(k.startswith("upsample") for k in keys0)  # as before levels
    level1 = _teacher(True, latent_level=1)
    assert len(level1.encoders[0]) == 3 and isinstance(level1.upsample[0], nn.ConvTranspose3d)
    assert level1.upsample[0].stride == (2, 2, 2) and level1.upsample[0].in_channels == 8  # 4 modalities x 2
    # activation voxels beyond the U-Net's, by hand for 4 modalities, C_z = 2, an 8^3 patch (512 voxels):
    # level 0: 4 x (stem 2*512 + latents 2*512) + fused 8*512 = 12288
    # level 1: 4 x (stem 2*512 + strided block 2*64 + latents 2*64) + fused 8*(64 + 512) = 9728
    unet = level0.unet.compute_conv_feature_map_size((8, 8, 8))
    assert level0.compute_conv_feature_map_size((8, 8, 8)) - unet == 12288
    assert level1.compute_conv_feature_map_size((8, 8, 8)) - unet == 9728


@pytest.mark.parametrize("level", [-1, 3])
def test_latent_level_must_be_a_stage_of_the_unet(level):
    with pytest.raises(ValueError, match="latent level .* is not a stage of the 3-stage U-Net"):
        _teacher(True, latent_level=level)


@pytest.mark.slow
@pytest.mark.parametrize("anchor, latent_level", [("none", 0), ("normal", 0), ("modality:T1ce", 0), ("mixture", 0),
                                                   ("mixture", 1), ("normal", 1)])
def test_teacher_compiles_as_one_graph_and_matches_eager(anchor, latent_level):
    """nnU-Net compiles the network on CUDA: the teacher (its folded convolutions, fill, and P^N's fused sample and KL
    with its backward) must trace without a graph break, and give eager's logits, losses and gradients."""
    torch._dynamo.reset()  # each test's networks count against dynamo's recompile limit for the same forward
    torch.manual_seed(0)
    net = _teacher(True, anchor=anchor, latent_level=latent_level, deep_supervision=True)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 4, 8, 8, 8)
    present = torch.tensor([[True, True, True, True], [True, False, True, False]])

    def loss_and_grads(model):
        torch.manual_seed(1)  # the same noise for P^N
        parts = model(x, present, return_parts=True)
        loss = sum(logits.square().mean() for logits in parts["logits"]) + net.anchor.alignment_loss(parts)
        grads = torch.autograd.grad(loss, [p for p in net.parameters() if p.requires_grad], allow_unused=True)
        return loss, grads

    loss, grads = loss_and_grads(compiled)
    expected_loss, expected_grads = loss_and_grads(net)
    torch.testing.assert_close(loss, expected_loss)
    for g, e in zip(grads, expected_grads):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, present), net(x, present))
        # the parts a student's frozen teacher gives its distillation loss
        parts, expected_parts = compiled(x, present, return_parts=True), net(x, present, return_parts=True)
        for key in ("latents", "latent_kl", "decoder_features", "skips"):
            torch.testing.assert_close(parts[key], expected_parts[key])
        net.present_modalities = (0, 2)  # how nnalign_predict runs a case with missing modalities
        torch.testing.assert_close(compiled(x), net(x))


@pytest.mark.parametrize("present", [None, [[1, 1, 1, 1], [1, 1, 1, 1]], [[1, 0, 1, 1], [1, 1, 1, 0]]])
def test_paper_mixture_weights_learn_through_the_fill_only(present):
    """P* as the paper defines it: the segmentation reaches the weights only through the fill of a missing modality;
    with every modality present (the fill skipped, or the identity) they get no gradient from the predictor path."""
    torch.manual_seed(0)
    net = _teacher(shared=True, anchor="mixture")
    with torch.no_grad():
        net.anchor.raw_weights.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    x = torch.randn(2, 4, 8, 8, 8)
    mask = None if present is None else torch.tensor(present, dtype=torch.bool)
    logits = net(x, mask)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.rand_like(logits)).backward()
    grad = net.anchor.raw_weights.grad
    if mask is not None and not bool(mask.all()):
        assert grad is not None and grad.abs().max() > 1e-6, grad
    else:
        assert grad is None or not grad.any(), grad


def test_paper_mixture_feeds_the_predictor_the_latents_unscaled():
    torch.manual_seed(0)
    net = _teacher(shared=True, anchor="mixture").eval()
    x = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        net.anchor.raw_weights.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
        latents = net(x, return_parts=True)["latents"]
        torch.testing.assert_close(net(x), net.unet(latents.flatten(1, 2)))


def test_scaled_mixture_weights_get_a_gradient_from_the_segmentation_with_every_modality_present():
    """With all modalities present (no fill), mixture-scaled's weights scale each modality's latents into the
    predictor, so the segmentation loss alone trains them from the zero (uniform) initialisation."""
    torch.manual_seed(0)
    net = _teacher(shared=True, anchor="mixture-scaled")
    x = torch.randn(2, 4, 8, 8, 8)
    x[:, 1] += (torch.rand(2, 8, 8, 8) > 0.7).float() * 3  # T1ce carries a pattern the others do not
    target = (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    logits = net(x)  # present=None: every modality, the fill skipped
    torch.nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
    grad = net.anchor.raw_weights.grad
    assert grad is not None and grad.abs().max() > 1e-6, grad


def test_scaled_mixture_weights_scale_each_modality_into_the_predictor():
    torch.manual_seed(0)
    net = _teacher(shared=True, anchor="mixture-scaled").eval()
    x = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        uniform = net(x)
        net.anchor.raw_weights.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]) / net.anchor.WEIGHT_GAIN)
        scales = 4 * (0.125 + 0.5 * torch.softmax(torch.tensor([0.0, 1.0, -1.0, 0.5]), 0))  # the floor: 1/2
        weighted = net(x)
        latents = net(x, return_parts=True)["latents"]
        by_hand = net.unet(latents.mul(scales.reshape(1, 4, 1, 1, 1, 1)).flatten(1, 2))
    torch.testing.assert_close(net.anchor.predictor_scales(), scales)
    torch.testing.assert_close(weighted, by_hand)
    assert not torch.allclose(weighted, uniform)  # the weights change what the predictor reads


def _blob_batch(gen: torch.Generator, informative: int, b: int = 4, size: int = 16):
    """Noise in every modality; one cube per sample is the target of all three regions and is brighter only in
    modality ``informative``."""
    x = torch.randn(b, 4, size, size, size, generator=gen)
    target = torch.zeros(b, 3, size, size, size)
    for i in range(b):
        centre = torch.randint(4, size - 4, (3,), generator=gen)
        radius = int(torch.randint(2, 4, (1,), generator=gen))
        cube = tuple(slice(int(c) - radius, int(c) + radius) for c in centre)
        target[(i, slice(None), *cube)] = 1.0
        x[(i, informative, *cube)] += 2.0
    return x, target


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_scaled_mixture_weights_learn_which_modality_shows_the_tumour(seed):
    """Known answer: with every modality present and only FLAIR showing the target, 150 SGD steps of segmentation
    (nnU-Net's optimiser settings) plus 0.1 x the mixture-scaled alignment give FLAIR the largest weight, above uniform: its
    softmax share above 0.35, i.e. its floored weight 1/8 + share / 2 above 0.30. (Without the floor the same set-up
    gave FLAIR the largest weight for 9 of seeds 0-9; seed 9 favoured T2. With it, seeds 0-2 gave 0.33-0.34.)"""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = _teacher(shared=True, anchor="mixture-scaled")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    for _ in range(150):
        x, target = _blob_batch(gen, informative=3)
        parts = net(x, None, return_parts=True)
        loss = nn.functional.binary_cross_entropy_with_logits(parts["logits"][0], target)
        loss = loss + 0.1 * net.anchor.alignment_loss(parts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = net.anchor.normalised_weights().detach()
    floor = net.anchor.WEIGHT_FLOOR
    assert int(weights.argmax()) == 3 and float(weights[3]) > floor / 4 + (1 - floor) * 0.35, weights
