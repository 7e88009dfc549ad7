"""Gaussian latents for the N(0, 1) anchor (P^N): the reparameterised sample and its KL divergence to N(0, 1).

The encoder of a P^N teacher outputs, per modality, a mean and a log-variance stacked on the channel axis:
``encoded`` (B, M, 2C, *S), means first. In training, Z = mu + exp(logvar / 2) * eps with eps ~ N(0, 1); in
evaluation, Z = mu (:func:`mean_and_logvar`). The anchor loss needs, per sample and modality,
KL(N(mu, sigma^2) || N(0, 1)) averaged over channels and voxels.

:func:`sample_normal_latents` computes both in one autograd function during training: a handful of passes over the
latents instead of the dozen element-wise operations (and their saved tensors, and the concatenated gradient) that
autograd records for the same formulas. :func:`kl_to_standard_normal` is the plain formula, used in evaluation and as
the reference the fused function is tested against.
"""
from __future__ import annotations

import torch

LOGVAR_RANGE: tuple[float, float] = (-10.0, 10.0)
"""Log-variance is clamped to this range before ``exp`` (std between e^-5 and e^5)."""


def mean_and_logvar(encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and log-variance halves of ``encoded`` (B, M, 2C, *S), each (B, M, C, *S) (views, no copy)."""
    if encoded.dim() < 3 or encoded.shape[2] % 2:
        raise ValueError(f"encoded must be (B, M, 2C, *S) with means then log-variances, got {tuple(encoded.shape)}")
    return encoded.chunk(2, dim=2)


def _kl_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs: the KL is a sum over many voxels, never accumulated in half."""
    return torch.promote_types(x.dtype, torch.float32)


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) averaged over channels and voxels: (B, M, C, *S) -> (B, M), in float32
    (float64 for float64 inputs).

    Per element 0.5 (mu^2 + sigma^2 - log sigma^2 - 1), with log sigma^2 clamped to :data:`LOGVAR_RANGE`.
    """
    if mean.shape != logvar.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} must have the same shape")
    dtype = _kl_dtype(mean)
    mu, lv = mean.to(dtype), logvar.to(dtype).clamp(*LOGVAR_RANGE)
    return (0.5 * (mu.pow(2) + lv.exp() - lv - 1.0)).flatten(2).mean(-1)


class _SampleWithKL(torch.autograd.Function):
    """(encoded, noise) -> (Z = mu + exp(clamp(logvar) / 2) * noise, per-modality KL (B, M) in :func:`_kl_dtype`)."""

    @staticmethod
    def forward(ctx, encoded: torch.Tensor, noise: torch.Tensor):
        mu, lv = mean_and_logvar(encoded)
        clamped = lv.clamp(*LOGVAR_RANGE)
        std = clamped.mul(0.5).exp_()
        latents = torch.addcmul(mu, std, noise)
        dtype = _kl_dtype(encoded)
        count = mu[0, 0].numel()
        kl = (torch.linalg.vector_norm(mu.flatten(2), dim=-1, dtype=dtype).square()
              + torch.linalg.vector_norm(std.flatten(2), dim=-1, dtype=dtype).square()
              - clamped.flatten(2).sum(-1, dtype=dtype)) * (0.5 / count) - 0.5
        # the sample, not the noise: noise * std = Z - mu, and the predictor's first convolution keeps Z anyway when
        # no latent is filled (the same storage); the clamped log-variance and std are recomputed
        ctx.save_for_backward(encoded, latents)
        return latents, kl

    @staticmethod
    def backward(ctx, grad_latents: torch.Tensor | None, grad_kl: torch.Tensor | None):
        encoded, latents = ctx.saved_tensors
        mu, lv = mean_and_logvar(encoded)
        clamped = lv.clamp(*LOGVAR_RANGE)
        std = clamped.mul(0.5).exp_()
        if grad_latents is None:
            grad_latents = torch.zeros_like(mu)
        if grad_kl is None:
            grad_kl = torch.zeros(mu.shape[:2], dtype=_kl_dtype(encoded), device=mu.device)
        # d KL / d mu = k mu and d KL / d logvar = k (sigma^2 - 1) / 2, with k = dL/dKL / (C * voxels)
        k = (grad_kl / mu[0, 0].numel()).to(encoded.dtype).reshape(*grad_kl.shape, *([1] * (mu.dim() - 2)))
        # both halves written in place into one buffer (no concatenation); in-place ops on its views, not out=
        # arguments, so torch.compile traces this backward too
        grad = torch.empty_like(encoded)
        grad_mu, grad_lv = mean_and_logvar(grad)
        grad_mu.copy_(grad_latents).addcmul_(mu, k)
        # d Z / d logvar = noise * sigma / 2 = (Z - mu) / 2, so dL/dlogvar = (g (Z - mu) + k (sigma^2 - 1)) / 2 inside
        # the clamp range
        grad_lv.copy_(latents).sub_(mu).mul_(grad_latents).addcmul_(std.square_(), k).sub_(k).mul_(0.5)
        grad_lv.masked_fill_(clamped != lv, 0.0)
        return grad, None


def sample_normal_latents(encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training-time latents Z (B, M, C, *S), reparameterised with fresh noise from torch's generator, in
    ``encoded``'s dtype, and the per-modality KL to N(0, 1) (B, M), float32 (float64 for float64 inputs).

    ``encoded`` is (B, M, 2C, *S): means, then log-variances.
    """
    mean, _ = mean_and_logvar(encoded)
    return _SampleWithKL.apply(encoded, torch.randn_like(mean))
