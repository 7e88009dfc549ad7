"""The optimizer a configuration asks for: nnU-Net's SGD by default, or the plans' ``nnalign_training`` (paper)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch.optim.lr_scheduler import _LRScheduler

from nnalign.errors import NnalignError


class PolyLRWithFloor(_LRScheduler):
    """nnU-Net's poly decay ending at ``final_lr``: lr(e) = final + (initial - final) (1 - e / max_steps)^exponent.

    Stepped like nnU-Net's ``PolyLRScheduler``: ``step(current_epoch)`` each epoch, so it needs no saved state.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, final_lr: float, max_steps: int,
                 exponent: float = 0.9) -> None:
        self.initial_lr, self.final_lr = float(initial_lr), float(final_lr)
        self.max_steps, self.exponent, self.ctr = int(max_steps), float(exponent), 0
        super().__init__(optimizer, -1)

    def lr_at(self, step: int) -> float:
        frac = min(max(step / self.max_steps, 0.0), 1.0)
        return self.final_lr + (self.initial_lr - self.final_lr) * (1.0 - frac) ** self.exponent

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step, self.ctr = self.ctr, self.ctr + 1
        lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr


def optimizer_from_plans(params: Iterable[torch.nn.Parameter], training: dict, num_epochs: int):
    """(optimizer, scheduler) for a configuration's ``nnalign_training`` dict
    (``{"optimizer": "adam", "initial_lr", "final_lr", "weight_decay"}``)."""
    name = str(training.get("optimizer", "adam")).lower()
    if name != "adam":
        raise NnalignError(f"the plans ask for optimizer '{name}'; nnalign knows 'adam' (or no nnalign_training: SGD)")
    optimizer = torch.optim.Adam(params, lr=float(training["initial_lr"]),
                                 weight_decay=float(training.get("weight_decay", 0.0)))
    scheduler = PolyLRWithFloor(optimizer, training["initial_lr"], training.get("final_lr", 0.0), num_epochs)
    return optimizer, scheduler
