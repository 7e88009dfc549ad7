"""The student trainer: nnU-Net's training loop for a modality-subset U-Net distilled from a frozen teacher.

The student is the planned U-Net on its own modality channels (a plain nnU-Net model at inference). Each step the
frozen teacher (eval mode, no gradients, same autocast) sees every modality, the student sees its subset, and the loss
is ``seg_weight`` x nnU-Net's segmentation loss plus the distillation loss chosen by name (:mod:`nnalign.losses.kd`).
Trainable parts of a distillation loss (PMKL's projection heads) join the student's optimizer; a discriminator
(SMU-Net) gets its own Adam. The class used for a run is generated from its name (:func:`student_trainer_class`).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnalign.checkpoints import load_checkpoint_safely
from nnalign.data.missing import missing_modalities, presence_by_case
from nnalign.errors import NnalignError
from nnalign.losses.kd import build_kd
from nnalign.modalities import channel_indices
from nnalign.model_folders import FINAL_CHECKPOINT, fold_folder, model_folder
from nnalign.networks.align_unet import as_outputs, nnAlignStudentUNet
from nnalign.training.common import (ChannelsLastTraining, CollapseCheck, FiniteLoss, SafeCheckpoints, SettingsRecord,
                                     apply_plans_training, apply_training_length, average_gradients_over_ranks,
                                     checkpoint_write, fit_deep_supervision, gathered_over_ranks, optimizer_step)
from nnalign.training.optim import optimizer_from_plans
from nnalign.training.presence import case_presence
from nnalign.runs import StudentSpec
from nnalign.training.teacher_trainer import plans_modalities, teacher_trainer_class, unwrap

STUDENT_NETWORK = f"{nnAlignStudentUNet.__module__}.{nnAlignStudentUNet.__name__}"
KD_STATE_FILE = "nnalign_kd_state.pth"


def teacher_checkpoint(results_dataset_folder: str | os.PathLike, teacher_trainer: str, plans: str,
                       configuration: str, fold) -> Path:
    """Where the teacher's final checkpoint for a fold lives (nnU-Net's results layout)."""
    folder = model_folder(results_dataset_folder, teacher_trainer, configuration, plans)
    return fold_folder(folder, fold) / FINAL_CHECKPOINT


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class nnAlignStudentTrainer(ChannelsLastTraining, CollapseCheck, SettingsRecord, FiniteLoss, SafeCheckpoints,
                            nnUNetTrainer):
    """nnU-Net's trainer for a student distilled from a frozen nnalign teacher (see the module docstring)."""

    role = "student"

    spec: StudentSpec | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        fit_deep_supervision(self)
        if type(self).spec is None:
            raise NnalignError("use a generated student trainer (nnAlignStudent_<subset>_<kd>_<teacher>)")
        inputs = apply_training_length(self)
        self.spec = type(self).spec.with_overrides(inputs.get("kd_overrides") or {})
        self.plans_training = apply_plans_training(self)
        self.kd = None
        self.teacher = None
        self.adversary_optimizer = None
        self.teacher_checkpoint = None
        self.subset_cases: dict[str, int] | None = None
        self.incomplete_cases = presence_by_case(dataset_json, list(missing_modalities(dataset_json)))
        self.logger.local_logger.my_fantastic_logging["kd_losses"] = []

    # ------------------------------------------------------------------------------------------------------------------
    # networks, losses, optimizers

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        """The planned U-Net on the student's modality channels (a classmethod: nnU-Net's predictor calls it)."""
        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        modalities = plans_modalities(kwargs, num_input_channels)
        missing = [m for m in cls.spec.modalities if m not in modalities]
        if missing:
            raise NnalignError(f"{cls.__name__}: modality {missing[0]} is not in this dataset "
                               f"({', '.join(modalities)})")
        kwargs["student_modalities"] = list(channel_indices(cls.spec.modalities, modalities))
        return get_network_from_plans(STUDENT_NETWORK, kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import, num_input_channels,
                                      num_output_channels, allow_init=True, deep_supervision=enable_deep_supervision)

    def initialize(self) -> None:
        features = list(self.configuration_manager.network_arch_init_kwargs["features_per_stage"])
        self.kd = build_kd(self.spec.kd, feature_channels=features[0], bottleneck_channels=features[-1],
                           skip_channels=features, num_regions=self.label_manager.num_segmentation_heads,
                           **self.spec.overrides).to(self.device)
        super().initialize()
        self.teacher = self._load_teacher()
        adversary = list(self.kd.adversary_parameters())
        if adversary:
            self.adversary_optimizer = torch.optim.Adam(adversary, lr=self.kd.adversary_lr)

    def _load_teacher(self) -> torch.nn.Module:
        teacher_name = self.spec.teacher_trainer
        fold = self.spec.teacher_fold if self.spec.teacher_fold is not None else self.fold
        path = teacher_checkpoint(Path(self.output_folder_base).parent, teacher_name, self.plans_manager.plans_name,
                                  self.configuration_name, fold)
        if not path.is_file():
            raise NnalignError(f"{path}: teacher checkpoint not found (train the teacher first)")
        checkpoint = load_checkpoint_safely(path, self.device)
        # Without deep supervision: the losses read only the teacher's full-resolution logits (the lower-resolution
        # heads stay in the state dict but are not run).
        teacher = teacher_trainer_class(self.spec.teacher).build_network_architecture(
            self.plans_manager, self.configuration_manager, self.num_input_channels,
            self.label_manager.num_segmentation_heads, False)
        teacher.load_state_dict(checkpoint["network_weights"])
        self.teacher_checkpoint = {"path": str(path), "fold": fold, "sha256": file_sha256(path)}
        teacher = teacher.to(self.device).eval().requires_grad_(False)
        return torch.compile(teacher) if self._do_i_compile() else teacher

    def do_split(self) -> tuple[list[str], list[str]]:
        """nnU-Net's split of the fold, each part kept to the cases that have every modality of the student's subset
        (dataset.json's record of absent modalities); how many are kept and left out goes into the settings record.
        A one-line NnalignError when no training or no validation case is left."""
        train, val = super().do_split()
        record = missing_modalities(self.dataset_json)

        def keep(keys: list[str]) -> list[str]:
            return [k for k in keys if not any(m in record.get(k, ()) for m in self.spec.modalities)]

        kept_train, kept_val = keep(train), keep(val)
        subset = "+".join(self.spec.modalities)
        for part, kept, keys in (("training", kept_train, train), ("validation", kept_val, val)):
            if not kept:
                raise NnalignError(f"no {part} case of fold {self.fold} has {subset}: all {len(keys)} lack one of "
                                   f"those modalities (dataset.json's nnalign.missing_modalities)")
        self.subset_cases = {"train": len(kept_train), "val": len(kept_val),
                             "train_without_subset": len(train) - len(kept_train),
                             "val_without_subset": len(val) - len(kept_val)}
        return kept_train, kept_val

    def configure_optimizers(self):
        """nnU-Net's optimizer (or the plans' Adam) over the student and the distillation loss's trainable parts."""
        extra = list(self.kd.student_side_parameters())
        if self.plans_training:
            return optimizer_from_plans([*self.network.parameters(), *extra], self.plans_training, self.num_epochs)
        optimizer, scheduler = super().configure_optimizers()
        if extra:
            optimizer.add_param_group({"params": extra})
        return optimizer, scheduler

    # ------------------------------------------------------------------------------------------------------------------
    # training step

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        full_res_target = target[0] if isinstance(target, list) else target

        self.optimizer.zero_grad(set_to_none=True)
        amp = autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()
        with amp:
            teacher = None
            if self.kd.uses_teacher:
                # the teacher sees what each case has: its absent modalities filled as in the teacher's training
                present = case_presence(self.incomplete_cases, batch["keys"], data.shape[1])
                with torch.no_grad():
                    teacher = as_outputs(self.teacher(data, None if present is None else present.to(self.device),
                                                      return_parts=True))
            student = as_outputs(self.network(data, None, return_parts=True))
            logits = student.logits if self.enable_deep_supervision else student.logits[0]
            seg = self.loss(logits, target)
            kd = self.kd(student, teacher, full_res_target, self.current_epoch)
            loss = self.kd.seg_weight * seg + kd["total"]
        heads = list(self.kd.student_side_parameters())  # outside the DDP-wrapped student: averaged over ranks here
        optimizer_step(loss, self.optimizer, self.grad_scaler, [*self.network.parameters(), *heads], heads)

        if self.adversary_optimizer is not None:
            self.adversary_optimizer.zero_grad(set_to_none=True)
            adversary = self.kd.adversary_loss(_detached(student), teacher)
            adversary.backward()
            average_gradients_over_ranks(self.kd.adversary_parameters())
            self.adversary_optimizer.step()
        return {"loss": loss.detach().cpu().numpy(), "kd_loss": kd["total"].detach().cpu().numpy()}

    # ------------------------------------------------------------------------------------------------------------------
    # logging, checkpoints, settings record

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        kd = gathered_over_ranks(collate_outputs(train_outputs)["kd_loss"])
        self.logger.log("kd_losses", float(kd.mean()), self.current_epoch)

    def on_epoch_end(self) -> None:
        self.print_to_log_file("kd_loss", np.round(self.logger.get_value("kd_losses", step=-1), decimals=4))
        super().on_epoch_end()

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, plus the distillation loss's own state (heads, discriminator) beside it."""
        super().save_checkpoint(filename)
        if self.local_rank == 0 and not self.disable_checkpointing:
            state = {"kd": self.kd.state_dict(),
                     "adversary_optimizer": self.adversary_optimizer.state_dict() if self.adversary_optimizer else None}
            path = Path(self.output_folder) / KD_STATE_FILE
            with checkpoint_write(str(path), f"{path}.partial"):
                torch.save(state, f"{path}.partial")
            os.replace(f"{path}.partial", path)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's checkpoint and the distillation loss's state, both loaded weights-only (nnU-Net reads the file
        itself, so its load runs inside the guard of :class:`SafeCheckpoints`, in every DDP rank)."""
        super().load_checkpoint(filename_or_checkpoint)
        path = Path(self.output_folder) / KD_STATE_FILE
        if path.is_file():
            state = load_checkpoint_safely(path, self.device)
            self.kd.load_state_dict(state["kd"])
            if self.adversary_optimizer is not None and state["adversary_optimizer"] is not None:
                self.adversary_optimizer.load_state_dict(state["adversary_optimizer"])

    def settings_record(self) -> dict:
        """What ``nnalign_settings.json`` holds: how this student was made."""
        return {
            **super().settings_record(),
            "modalities": list(self.spec.modalities),
            "kd": self.spec.kd,
            "kd_settings": self.kd.settings() if self.kd is not None else None,
            "seg_weight": self.kd.seg_weight if self.kd is not None else None,
            "kd_overrides": self.spec.overrides,
            "cases": self.subset_cases,
            "teacher": {"trainer": self.spec.teacher_trainer, **(self.teacher_checkpoint or {})},
        }

    @property
    def net(self) -> torch.nn.Module:
        """The student out of its DDP / torch.compile wrappers."""
        return unwrap(self.network)


def _detached(outputs):
    from dataclasses import replace

    return replace(outputs, logits=[t.detach() for t in outputs.logits], skips=[t.detach() for t in outputs.skips],
                   decoder_features=outputs.decoder_features.detach())


_GENERATED: dict[str, type] = {}


def student_trainer_class(spec_or_name: StudentSpec | str) -> type:
    """The student trainer subclass for a spec (or a name :meth:`StudentSpec.trainer_name` made; ValueError for
    another name); the same name always gives the same class.

    The loss-setting overrides are not in the class (only their hash is in the name); the trainer reads them from
    the run's settings record and checks them against the name.
    """
    name = spec_or_name if isinstance(spec_or_name, str) else spec_or_name.trainer_name()
    cls = _GENERATED.get(name)
    if cls is None:
        spec = StudentSpec.parse(name)
        cls = type(name, (nnAlignStudentTrainer,), {
            "spec": spec, "__module__": __name__, "__qualname__": name,
            "__doc__": f"nnalign student trainer for {'+'.join(spec.modalities)}."})
        _GENERATED[name] = cls
    return cls


def __getattr__(name: str):
    """PEP 562: generated student trainers resolve as module attributes (pickling, ``pydoc.locate``)."""
    try:
        return student_trainer_class(name)
    except ValueError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
