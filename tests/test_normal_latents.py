"""The fused reparameterised sample and KL of the N(0, 1) anchor against the plain formulas and autograd."""
from __future__ import annotations

import math

import pytest
import torch

from nnalign.networks.normal_latents import LOGVAR_RANGE, kl_to_standard_normal, mean_and_logvar, sample_normal_latents


def test_kl_by_hand():
    # one sample, two modalities, C = 1, 2 voxels: mu = 1, lv = 0 -> 0.5; mu = 0, lv = [2, 50 -> 10]
    mean = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])
    logvar = torch.tensor([[[[0.0, 0.0]], [[2.0, 50.0]]]])
    kl = kl_to_standard_normal(mean, logvar)
    expected = [[0.5, (0.5 * (math.exp(2) - 3) + 0.5 * (math.exp(10) - 11)) / 2]]
    torch.testing.assert_close(kl, torch.tensor(expected))


def test_mean_and_logvar_are_views_of_the_halves():
    encoded = torch.randn(2, 3, 4, 5)
    mean, logvar = mean_and_logvar(encoded)
    torch.testing.assert_close(mean, encoded[:, :, :2])
    torch.testing.assert_close(logvar, encoded[:, :, 2:])
    assert mean.data_ptr() == encoded.data_ptr()


def reference(encoded: torch.Tensor, noise: torch.Tensor):
    """The same sample and KL as plain autograd operations."""
    mean, logvar = encoded.chunk(2, dim=2)
    latents = mean + torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE)) * noise
    return latents, kl_to_standard_normal(mean, logvar)


def encoded_with_clamped_entries(dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(3)
    encoded = torch.randn(2, 3, 4, 2, 3, 2, dtype=dtype)  # (B, M, 2C, *S), C = 2, 3-D spatial
    encoded[0, 1, 2, 0, 0, 0] = 12.0  # log-variances beyond both ends of the clamp range
    encoded[1, 2, 3, 1, 1, 1] = -11.0
    return encoded


# the GPU cases run where CUDA is present (half precision: the dtype of the teacher's latents under nnU-Net's AMP)
DEVICES = [("cpu", torch.float32)] + ([("cuda", torch.float32), ("cuda", torch.float16)]
                                      if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device, dtype", DEVICES)
def test_training_sample_and_gradients_match_autograd(device, dtype):
    encoded = encoded_with_clamped_entries().to(device, dtype)
    torch.manual_seed(0)
    weights = torch.randn(2, 3, 2, 2, 3, 2, device=device), torch.randn(2, 3, device=device)  # a loss on both outputs
    results = []
    for fused in (True, False):
        x = encoded.clone().requires_grad_()
        torch.manual_seed(1)
        if fused:
            latents, kl = sample_normal_latents(x)
        else:
            latents, kl = reference(x, torch.randn(2, 3, 2, 2, 3, 2, device=device, dtype=dtype))
        ((latents * weights[0]).sum() + (kl * weights[1]).sum()).backward()
        results.append((latents.detach(), kl.detach(), x.grad))
    for fused, ref in zip(*results):
        torch.testing.assert_close(fused, ref, rtol=1e-2 if dtype == torch.float16 else None,
                                   atol=1e-2 if dtype == torch.float16 else None)
    assert results[0][2][0, 1, 2, 0, 0, 0] == 0 and results[0][2][1, 2, 3, 1, 1, 1] == 0  # clamped: no gradient


@pytest.mark.parametrize("which", ["latents", "kl"])
def test_gradcheck(which):
    encoded = encoded_with_clamped_entries(torch.float64).requires_grad_()

    def run(x):
        torch.manual_seed(0)  # the same noise on every call
        latents, kl = sample_normal_latents(x)
        return latents if which == "latents" else kl

    assert torch.autograd.gradcheck(run, (encoded,), eps=1e-6, atol=1e-5)


def test_half_precision_kl_in_float32():
    encoded = torch.zeros(1, 2, 2, 3, dtype=torch.float16)
    encoded[0, 1, 0] = 600.0  # mu = 600: mu^2 overflows fp16
    latents, kl = sample_normal_latents(encoded)
    assert latents.dtype == torch.float16 and kl.dtype == torch.float32
    torch.testing.assert_close(kl, torch.tensor([[0.0, 0.5 * 600.0**2]]))


def test_odd_channel_count_is_rejected():
    with pytest.raises(ValueError, match="2C"):
        sample_normal_latents(torch.zeros(1, 2, 3, 4))


def test_the_sample_keeps_only_its_input_and_its_output_for_backward():
    # the noise is not kept: the predictor's first convolution keeps Z when no latent is filled, so keeping Z costs
    # nothing there, while the noise would be a tensor of Z's size of its own
    encoded = encoded_with_clamped_entries().requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        latents, _ = sample_normal_latents(encoded)
    assert sorted(kept) == sorted([encoded.untyped_storage().data_ptr(), latents.untyped_storage().data_ptr()])
