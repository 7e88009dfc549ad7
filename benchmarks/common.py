"""Shared pieces of the step benchmarks: BraTS-sized plans, nnU-Net's region loss, timing and memory."""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch

from nnalign.paths import setup_env


@contextmanager
def brats_like_plans(gpu_memory_gb: float = 8.0):
    """Yield nnalign's plans for a BraTS 2018-sized dataset, planned in a scratch folder."""
    from nnalign.planning.brats_like import plan_brats_like
    from nnalign.planning.planner import nnAlignPlanner

    with tempfile.TemporaryDirectory() as tmp:
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            os.environ[var] = os.path.join(tmp, var)
        setup_env()
        yield plan_brats_like(nnAlignPlanner, 999, gpu_memory_gb)


def deep_supervision_weights(scales: int) -> np.ndarray:
    """nnU-Net's deep-supervision loss weights, highest resolution first: 1, 1/2, 1/4, ... with the lowest set to 0,
    normalised to sum 1."""
    weights = np.array([1 / (2 ** i) for i in range(scales)])
    weights[-1] = 0
    return weights / weights.sum()


def dice_bce(batch_dice: bool):
    """nnU-Net's region loss at one scale (Dice + BCE), as its trainer builds it for BraTS."""
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return DC_and_BCE_loss({}, {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False},
                           use_ignore_label=False, dice_class=MemoryEfficientSoftDiceLoss)


def region_loss(deep_supervision_scales: int, batch_dice: bool):
    """nnU-Net's region loss for BraTS (Dice + BCE) under its deep-supervision weights, as its trainer builds it."""
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    return DeepSupervisionWrapper(dice_bce(batch_dice), deep_supervision_weights(deep_supervision_scales))


def region_targets(batch: int, patch, strides, device) -> list[torch.Tensor]:
    """Random nested WT/TC/ET region targets at every deep-supervision scale (highest resolution first)."""
    scales = np.cumprod(np.array(strides), axis=0)[:-1]
    targets = []
    for s in scales:
        shape = [batch, 1, *[p // int(f) for p, f in zip(patch, s)]]
        level = torch.randint(0, 4, shape, device=device)
        targets.append(torch.cat([level >= 1, level >= 2, level >= 3], 1).float())
    return targets


def saved_activation_bytes(step) -> int:
    """Bytes of tensors autograd saves for the backward pass of ``step()`` (device-independent activation memory)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total


def interleaved_seconds(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int,
                        rounds: int) -> dict[str, list[float]]:
    """Wall time of each named ``step()`` in each of ``rounds`` rounds, timed round-robin (one call of each per round,
    after ``warmup`` untimed rounds), so drift in clock speed or background load hits every variant alike (CUDA
    synchronised)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(warmup + rounds):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def interleaved_median_seconds(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int,
                               rounds: int) -> dict[str, float]:
    """Median wall time of each named ``step()`` over the rounds of :func:`interleaved_seconds`."""
    return {name: statistics.median(t) for name, t in interleaved_seconds(steps, device, warmup, rounds).items()}


def peak_cuda_bytes(step) -> int:
    """Peak CUDA memory allocated during one ``step()``."""
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def step_benchmark_parser(description: str) -> argparse.ArgumentParser:
    """The options both step benchmarks take: configuration, device, AMP, compile, timed and warm-up rounds."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="3d_cpu", choices=("3d_cpu", "3d_fullres", "paper"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", action="store_true", help="fp16 autocast and grad scaling (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks, as nnU-Net does on CUDA")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (one step of each variant per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--patch", type=int, nargs=3, metavar=("D", "H", "W"),
                   help="replace the plan's patch size (a quick check that the script runs; the ratios that count "
                        "are at the planned size)")
    return p


def benchmark_device(args: argparse.Namespace) -> torch.device:
    """The device of ``args.device``; on CUDA with cuDNN's autotuner on, as nnU-Net's ``run_training`` sets it."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    return device


def benchmark_configuration(plans: dict, args: argparse.Namespace) -> dict:
    """The plans' configuration ``args.config``, with ``args.patch`` as its patch size when given."""
    cfg = plans["configurations"][args.config]
    return {**cfg, "patch_size": tuple(args.patch)} if args.patch else cfg
