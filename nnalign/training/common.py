"""Pieces the teacher and student trainers share: training length, the plans' optimizer, the optimizer step."""
from __future__ import annotations

from typing import Iterable

import torch

from nnalign.training.settings import TeacherSettings

PLANS_TRAINING_KEY = "nnalign_training"


def apply_training_length(trainer) -> tuple[int | None, int | None]:
    """Apply ``nnalign_train --epochs/--iters-per-epoch`` (passed through the environment) to an nnU-Net trainer."""
    epochs, iters = TeacherSettings.length_from_env()
    if epochs is not None:
        trainer.num_epochs = epochs
    if iters is not None:
        trainer.num_iterations_per_epoch = iters
        trainer.num_val_iterations_per_epoch = max(1, iters // 5)
    return epochs, iters


def apply_plans_training(trainer) -> dict | None:
    """Read the configuration's ``nnalign_training`` (the paper configuration) and set the trainer's lr and decay."""
    training = trainer.configuration_manager.configuration.get(PLANS_TRAINING_KEY)
    if training:
        trainer.initial_lr = float(training["initial_lr"])
        trainer.weight_decay = float(training.get("weight_decay", 0.0))
    return training


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, grad_scaler: torch.amp.GradScaler | None,
                   parameters: Iterable[torch.nn.Parameter]) -> None:
    """Backward and step as nnU-Net's trainer does: through the grad scaler when there is one (CUDA), gradient norm
    clipped at 12."""
    parameters = list(parameters)
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        grad_scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, 12)
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 12)
        optimizer.step()
