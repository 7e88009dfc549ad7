"""Pieces the teacher and student trainers share: the training length from the settings record, the plans'
optimizer, deep supervision for a U-Net with one output, the weights' memory layout on the CPU, the optimizer step,
what DDP leaves to them (gradients of parameters outside the DDP-wrapped network, per-step logs from every rank), the
stop at a loss that is not a finite number, and the warning for a model that collapsed to background."""
from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import distributed as dist

from nnalign.data.labels import REGION_NAMES
from nnalign.errors import NnalignError
from nnalign.runs import TrainingLength
from nnalign import __version__
from nnalign.atomic import write_json_atomic
from nnalign.training.record import METHOD_VERSION, SETTINGS_RECORD, TRAINING_VOLUMES, read_training_inputs

PLANS_TRAINING_KEY = "nnalign_training"


def apply_training_length(trainer) -> dict:
    """Apply the length ``nnalign_train --epochs/--iters-per-epoch`` told the run (its inputs file) to an nnU-Net
    trainer (nnU-Net's own where none was given); returns the run's inputs ({} if none)."""
    inputs = read_training_inputs(trainer.output_folder)
    length = TrainingLength.from_record(inputs)
    if length.epochs is not None:
        trainer.num_epochs = length.epochs
    if length.iters_per_epoch is not None:
        trainer.num_iterations_per_epoch = length.iters_per_epoch
        trainer.num_val_iterations_per_epoch = max(1, length.iters_per_epoch // 5)
    return inputs


def apply_plans_training(trainer) -> dict | None:
    """Read the configuration's ``nnalign_training`` (the paper configuration) and set the trainer's lr and decay."""
    training = trainer.configuration_manager.configuration.get(PLANS_TRAINING_KEY)
    if training:
        trainer.initial_lr = float(training["initial_lr"])
        trainer.weight_decay = float(training.get("weight_decay", 0.0))
    return training


def fit_deep_supervision(trainer) -> None:
    """Turn nnU-Net's deep supervision off for a U-Net with a single output (two stages, e.g. ``3d_cpu`` on small
    images). nnU-Net gives the lowest-resolution output weight 0 and scales the weights to sum 1, which for a single
    output is 0 / 0: a NaN loss from the first step. Without deep supervision that output is the loss, weight 1."""
    if trainer.enable_deep_supervision and len(trainer._get_deep_supervision_scales()) < 2:
        trainer.enable_deep_supervision = False


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_gradients_over_ranks(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters that DDP does not synchronise (those outside the DDP-wrapped network,
    e.g. a distillation loss's projection heads) over every rank, so that every rank takes the same step.

    A missing gradient counts as zero. A no-op without a process group of more than one rank.
    """
    parameters = list(parameters)
    if not parameters or not _distributed():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(parameters, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def gathered_over_ranks(values) -> np.ndarray:
    """This epoch's per-step values (steps first) from every DDP rank, concatenated; this rank's alone without DDP."""
    values = np.asarray(values, dtype=np.float64)
    if _distributed():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, values)
        values = np.concatenate(gathered)
    return values


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, grad_scaler: torch.amp.GradScaler | None,
                   parameters: Iterable[torch.nn.Parameter],
                   unsynchronised: Iterable[torch.nn.Parameter] = ()) -> None:
    """Backward and step as nnU-Net's trainer does: through the grad scaler when there is one (CUDA), gradient norm
    clipped at 12. ``unsynchronised`` (a subset of ``parameters`` that DDP does not cover) get their gradients
    averaged over the DDP ranks first."""
    parameters = list(parameters)
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        average_gradients_over_ranks(unsynchronised)
        grad_scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, 12)
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        loss.backward()
        average_gradients_over_ranks(unsynchronised)
        torch.nn.utils.clip_grad_norm_(parameters, 12)
        optimizer.step()


def collapsed_regions(dice_per_epoch: Sequence[Sequence[float]], names: Sequence[str]) -> list[str]:
    """The regions whose validation pseudo-Dice was 0 in every epoch of the last third of training.

    ``dice_per_epoch``: nnU-Net's ``dice_per_class_or_region`` log, one list per epoch. Epochs where a region's Dice
    is NaN (neither the validation references nor the predictions held it) are skipped; a region with no scored
    epoch in the last third is not reported.
    """
    if not dice_per_epoch:
        return []
    last_third = np.asarray(dice_per_epoch[-max(1, len(dice_per_epoch) // 3):], dtype=np.float64)
    collapsed = []
    for r, name in enumerate(names):
        scored = last_third[:, r][~np.isnan(last_third[:, r])]
        if scored.size and not scored.any():
            collapsed.append(name)
    return collapsed


CPU_TRAINING_LAYOUT = torch.channels_last_3d
"""The memory layout of a 3D network's weights while it trains on the CPU: oneDNN trains convolutions faster in it
than in PyTorch's default layout but runs a forward pass alone slower (the figures are in
documentation/benchmarks.md), so only training uses it: the final validation, prediction and a frozen teacher keep
the default."""


def set_training_layout(network: torch.nn.Module, device: torch.device, training: bool) -> None:
    """Put a 3D network's weights in :data:`CPU_TRAINING_LAYOUT` for training on the CPU (``training``), or back in
    the default layout; a no-op on other devices and for 2D networks. The parameters stay the same objects (an
    optimizer built before keeps them) and compute the same values."""
    if device.type != "cpu" or not any(p.dim() == 5 for p in network.parameters()):
        return
    network.to(memory_format=CPU_TRAINING_LAYOUT if training else torch.contiguous_format)


class ChannelsLastTraining:
    """Trainer mixin: on the CPU the network trains with its weights in :data:`CPU_TRAINING_LAYOUT`, and is back in
    the default layout when training ends (before the final checkpoint and validation)."""

    def on_train_start(self) -> None:
        super().on_train_start()
        set_training_layout(self.network, self.device, True)

    def on_train_end(self) -> None:
        set_training_layout(self.network, self.device, False)
        super().on_train_end()


class SettingsRecord:
    """Trainer mixin: the settings record (:data:`~nnalign.training.record.SETTINGS_RECORD`), rewritten atomically by
    rank 0 when training starts and after every epoch. A trainer adds its own keys to :meth:`settings_record`; every
    record holds the range of the fold's training cases' region volumes, which predictions' reports compare with."""

    role: str = ""
    training_volumes: dict | None = None

    def settings_record(self) -> dict:
        """What every record holds: versions, role, data, fold, length, and :class:`CollapseCheck`'s warning."""
        return {
            "nnalign_version": __version__,
            "method_version": METHOD_VERSION,
            "role": self.role,
            "collapse_warning": getattr(self, "collapse_warning", None),
            "trainer": type(self).__name__,
            "dataset": self.plans_manager.dataset_name,
            "plans": self.plans_manager.plans_name,
            "configuration": self.configuration_name,
            "fold": self.fold,
            "epochs": self.num_epochs,
            "iters_per_epoch": self.num_iterations_per_epoch,
            "epochs_completed": self.current_epoch,
            TRAINING_VOLUMES: self.training_volumes,
        }

    def measure_training_volumes(self) -> dict:
        """The range of the region volumes of this fold's training cases (:mod:`nnalign.data.label_volumes`)."""
        from nnalign.data.label_volumes import case_volumes, volume_range
        from nnalign.data.labels import CAVITY

        train, _ = self.do_split()
        rc = CAVITY in (self.dataset_json.get("labels") or {})
        return volume_range(case_volumes(self.preprocessed_dataset_folder_base, train,
                                         self.dataset_json["file_ending"], rc=rc))

    def write_settings_record(self) -> None:
        """Rewrite the record in the fold folder (atomically)."""
        write_json_atomic(f"{self.output_folder}/{SETTINGS_RECORD}", self.settings_record())

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.local_rank == 0:
            self.training_volumes = self.measure_training_volumes()
            self.write_settings_record()

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        if self.local_rank == 0:
            self.write_settings_record()


class CollapseCheck:
    """Trainer mixin: at the end of training, warn (log, stderr, settings record) when a region's validation
    pseudo-Dice stayed 0 for the last third of training, i.e. the model learned to predict background there."""

    collapse_warning: str | None = None

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.local_rank != 0:
            return
        log = self.logger.local_logger.my_fantastic_logging.get("dice_per_class_or_region") or []
        heads = self.label_manager.num_segmentation_heads
        names = REGION_NAMES if heads == len(REGION_NAMES) else tuple(f"region {i + 1}" for i in range(heads))
        regions = collapsed_regions(log, names)
        if regions:
            epochs = max(1, len(log) // 3)
            self.collapse_warning = (f"{self.output_folder}: the validation pseudo-Dice of {', '.join(regions)} "
                                     f"stayed 0 for the last {epochs} epochs: the model predicts no "
                                     f"{'/'.join(regions)} (collapsed to background); train longer, or check the "
                                     f"data and settings")
            self.print_to_log_file(f"WARNING: {self.collapse_warning}")
            print(f"nnalign_train: warning: {self.collapse_warning}", file=sys.stderr, flush=True)
        self.write_settings_record()


class FiniteLoss:
    """Trainer mixin: stop training with one line (:class:`NnalignError`) at an epoch whose mean training or
    validation loss is not a finite number (NaN, infinity), before the epoch's checkpoints and settings record are
    written; nnU-Net would train on and save a model that predicts nothing. The means are over every DDP rank, so
    every rank stops. A training stopped by any error shuts nnU-Net's background data loaders down first, as the end
    of training does, so that they print nothing after the error."""

    def run_training(self) -> None:
        try:
            super().run_training()
        except BaseException:
            for loader in (self.dataloader_train, self.dataloader_val):
                if hasattr(loader, "_finish"):
                    with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()):
                        loader._finish()
            raise

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        self._stop_unless_finite("train_losses", "training")

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        self._stop_unless_finite("val_losses", "validation")

    def _stop_unless_finite(self, key: str, what: str) -> None:
        value = float(self.logger.get_value(key, step=-1))
        if not np.isfinite(value):
            raise NnalignError(f"{self.output_folder}: the {what} loss of epoch {self.current_epoch} is {value} "
                               f"(not a finite number): training stopped (try a lower learning rate, or check the "
                               f"data)")


@contextlib.contextmanager
def checkpoint_write(filename: str, partial: str):
    """Around writing ``partial`` (to be renamed ``filename``): a failed write (a full disk; torch.save reports it as
    a RuntimeError) removes ``partial`` and stops training with one line naming ``filename``."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(partial)
        reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:200]
        raise NnalignError(f"{filename}: cannot write the checkpoint ({reason}): training stopped") from None


class SafeCheckpoints:
    """Trainer mixin: a checkpoint is written under a temporary name and renamed, so a run killed while saving keeps
    its previous checkpoint for ``--c`` (nnU-Net writes in place); and nnU-Net's own load of a checkpoint (``--c``,
    ``--val``, in every DDP rank) is weights-only (:func:`nnalign.checkpoints.safe_torch_load`)."""

    def save_checkpoint(self, filename: str) -> None:
        partial = f"{filename}.partial"
        with checkpoint_write(filename, partial):
            super().save_checkpoint(partial)
        if os.path.isfile(partial):  # rank 0 with checkpointing on
            os.replace(partial, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        from nnalign.checkpoints import safe_torch_load

        with safe_torch_load():
            super().load_checkpoint(filename_or_checkpoint)
