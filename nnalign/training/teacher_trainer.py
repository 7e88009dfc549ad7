"""The trainers of the multi-modal models: the plain nnU-Net baseline (the paper's Original teacher) and the aligned
teacher, which adds the latents, the anchor and its loss to it.

Everything else (data loading, augmentation, deep supervision, checkpoints, validation, DDP) is nnU-Net's own. The
class used for a run is a subclass generated from its name (:func:`teacher_trainer_class`), whose ``spec``
(:class:`nnalign.runs.BaselineSpec` or :class:`nnalign.runs.TeacherSpec`) says what to train with; how long to
train comes from the run's settings record (:func:`nnalign.training.common.apply_training_length`).
"""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast
from torch._dynamo import OptimizedModule

from nnalign.data.missing import missing_modalities, presence_by_case
from nnalign.errors import NnalignError
from nnalign.networks.anchors import MixtureAnchor, modality_gap
from nnalign.modalities import BRATS_MODALITIES
from nnalign.networks.align_unet import nnAlignStudentUNet, nnAlignTeacherUNet
from nnalign.training.common import (ChannelsLastTraining, CollapseCheck, FiniteLoss, SafeCheckpoints, SettingsRecord,
                                     apply_plans_training, apply_training_length, fit_deep_supervision,
                                     gathered_over_ranks, optimizer_step)
from nnalign.training.optim import optimizer_from_plans
from nnalign.training.presence import case_presence, sample_presence, zero_absent
from nnalign.training.progress import plot_alignment_png
from nnalign.runs import AnyTeacher, BaselineSpec, TeacherSpec

TEACHER_NETWORK = f"{nnAlignTeacherUNet.__module__}.{nnAlignTeacherUNet.__name__}"
BASELINE_NETWORK = f"{nnAlignStudentUNet.__module__}.{nnAlignStudentUNet.__name__}"


def plans_modalities(arch_kwargs: dict, num_input_channels: int) -> tuple[str, ...]:
    """Modality names of the network's input channels: the plans' ``modalities``, else BraTS's for 4 channels."""
    names = arch_kwargs.get("modalities")
    if names:
        return tuple(names)
    if num_input_channels == len(BRATS_MODALITIES):
        return BRATS_MODALITIES
    raise NnalignError(f"the plans name no modalities for {num_input_channels} input channels; "
                       f"re-run nnalign_plan_and_preprocess")


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The network itself, out of DDP's ``.module`` and torch.compile's ``._orig_mod``."""
    if isinstance(network, torch.nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


class nnAlignBaselineTrainer(ChannelsLastTraining, CollapseCheck, SettingsRecord, FiniteLoss, SafeCheckpoints,
                             nnUNetTrainer):
    """nnU-Net's trainer for the plain baseline on all modalities stacked, with nnalign's modality dropout (the
    dropped input channels zeroed), training length, optimizer and settings record. The aligned teacher extends it.

    Per training step: draw each sample's present modalities (``spec.modality_dropout``) among those its case has
    (dataset.json's record of absent modalities, :mod:`nnalign.data.missing`), zero the absent input channels, run
    the network with the presence mask, and minimise nnU-Net's segmentation loss plus :meth:`alignment_loss` (none
    here). A case's absent modality is so treated exactly as a dropped one.
    """

    spec: AnyTeacher = BaselineSpec()
    role = "teacher"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        fit_deep_supervision(self)
        self.spec = type(self).spec
        apply_training_length(self)
        self.plans_training = apply_plans_training(self)
        self.incomplete_cases = presence_by_case(dataset_json, list(missing_modalities(dataset_json)))

    def case_presence(self, keys) -> torch.Tensor | None:
        """(B, M) bool: the modalities the case of each sample (``keys``: the batch's case IDs) has; None when every
        one has all."""
        return case_presence(self.incomplete_cases, keys, len(self.dataset_json["channel_names"]))

    # ------------------------------------------------------------------------------------------------------------------
    # network and optimizer

    @classmethod
    def network_class_and_kwargs(cls, arch_kwargs: dict, modalities: tuple[str, ...]) -> tuple[str, dict]:
        """The network class (as nnU-Net's plans name one) and the keyword arguments nnalign adds to the plans'."""
        return BASELINE_NETWORK, {"student_modalities": None}

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        """The network from the plans and ``cls.spec`` (:meth:`network_class_and_kwargs`).

        A classmethod with nnU-Net's parameter names: nnU-Net's predictor calls it on the class.
        """
        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        modalities = plans_modalities(kwargs, num_input_channels)
        kwargs.pop("modalities", None)
        arch, extra = cls.network_class_and_kwargs(kwargs, modalities)
        return get_network_from_plans(arch, {**kwargs, **extra},
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)

    def configure_optimizers(self):
        """nnU-Net's SGD + poly, or the plans' ``nnalign_training`` (the paper configuration: Adam, poly to a floor)."""
        if not self.plans_training:
            return super().configure_optimizers()
        return optimizer_from_plans(self.network.parameters(), self.plans_training, self.num_epochs)

    @property
    def net(self) -> torch.nn.Module:
        """The network out of its DDP / torch.compile wrappers."""
        return unwrap(self.network)

    # ------------------------------------------------------------------------------------------------------------------
    # training step

    def alignment_loss(self, parts: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the term added to the segmentation loss, the alignment loss itself) of a step's network outputs; None
        for the baseline, which has no alignment."""
        return None

    def alignment_log(self, parts: dict, present: torch.Tensor) -> dict:
        """What a step logs of the alignment besides its loss; nothing for the baseline."""
        return {}

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)
        available = self.case_presence(batch["keys"])
        present = sample_presence(data.shape[0], data.shape[1], self.spec.modality_dropout, device=self.device,
                                  sampling=self.spec.subset_sampling, available=available)
        masked = self.spec.modality_dropout > 0 or available is not None
        if masked:
            data = zero_absent(data, present)

        self.optimizer.zero_grad(set_to_none=True)
        # autocast on CUDA only, as nnU-Net (slow on CPU, unsupported on MPS)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            # every modality present: None lets the network skip the (identity) anchor fill
            parts = self.network(data, present if masked else None, return_parts=True)
            logits = parts["logits"] if self.enable_deep_supervision else parts["logits"][0]
            loss = self.loss(logits, target)
            align = self.alignment_loss(parts)
            if align is not None:
                loss = loss + align[0]

        optimizer_step(loss, self.optimizer, self.grad_scaler, self.network.parameters())

        out = {"loss": loss.detach().cpu().numpy()}
        if align is not None:
            out["align_loss"] = align[1].detach().cpu().numpy()
            out.update(self.alignment_log(parts, present))
        return out

    # ------------------------------------------------------------------------------------------------------------------
    # validation of cases that lack modalities

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step; a teacher is told which modalities each sample's case has (the baseline sees
        their channels zero, as in training)."""
        available = self.case_presence(batch["keys"])
        if available is None or not hasattr(self.net, "assume_presence"):
            return super().validation_step(batch)
        with self.net.assume_presence(available.to(self.device)):
            return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's validation of whole cases; a teacher predicts each case from the modalities it has."""
        net = self.net
        if not self.incomplete_cases or not hasattr(net, "present_modalities"):
            return super().perform_actual_validation(save_probabilities)
        presence, everything = self.incomplete_cases, tuple(range(len(net.modalities)))

        class EachCaseItsModalities(self.dataset_class):
            def load_case(self, identifier):
                have = presence.get(str(identifier))
                net.present_modalities = tuple(j for j, p in enumerate(have) if p) if have else everything
                return super().load_case(identifier)

        dataset_class, self.dataset_class = self.dataset_class, EachCaseItsModalities
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.dataset_class, net.present_modalities = dataset_class, everything

    # ------------------------------------------------------------------------------------------------------------------
    # settings record

    def settings_record(self) -> dict:
        """What ``nnalign_settings.json`` holds: how this model was made."""
        arch = self.configuration_manager.network_arch_init_kwargs
        net = self.net if self.network is not None else None
        return {
            **super().settings_record(),
            "modalities": list(getattr(net, "modalities", None)
                               or plans_modalities(arch, len(self.dataset_json["channel_names"]))),
            "val_iters_per_epoch": self.num_val_iterations_per_epoch,
            "optimizer": dict(self.plans_training) if self.plans_training else
            {"optimizer": "sgd", "initial_lr": self.initial_lr, "weight_decay": self.weight_decay},
            "settings": self.spec.model_settings(),
        }


class nnAlignTeacherTrainer(nnAlignBaselineTrainer):
    """The aligned multi-modal teacher: the baseline's training with per-modality latents, the anchor's fill of
    absent modalities and ``align_weight`` x the anchor loss added.

    Per epoch it logs ``align_losses``, ``modality_gap`` (mean pairwise distance of the modality centroids),
    ``modality_to_anchor`` (each modality centroid's distance to the anchor centroid), ``latent_rms`` (each modality's
    latent RMS: a shrinking latent space shows here), ``relative_gap`` (the gap over the latents' centred RMS:
    alignment that neither shrinking nor a common offset can lower) and, for the anchors that learn weights,
    ``mixture_weights``; plots them in ``alignment.png``; and rewrites the settings record with them.
    """

    spec: TeacherSpec = TeacherSpec()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        log = self.logger.local_logger.my_fantastic_logging
        for key in ("align_losses", "modality_gap", "modality_to_anchor", "latent_rms", "relative_gap"):
            log[key] = []
        if self.spec.kind.learns_weights:
            log["mixture_weights"] = []

    @classmethod
    def network_class_and_kwargs(cls, arch_kwargs: dict, modalities: tuple[str, ...]) -> tuple[str, dict]:
        spec = cls.spec
        return TEACHER_NETWORK, {"modalities": list(modalities), "anchor": spec.anchor,
                                 "shared_encoder": spec.shared_encoder,
                                 "latent_level": spec.latent_level_for(arch_kwargs),
                                 "stop_gradient": spec.stop_gradient, "align_distance": spec.align_distance}

    def alignment_loss(self, parts: dict) -> tuple[torch.Tensor, torch.Tensor]:
        align = self.net.anchor.alignment_loss(parts)
        return self.spec.align_weight * align, align

    def alignment_log(self, parts: dict, present: torch.Tensor) -> dict:
        gap = modality_gap(parts["latents"], present, self.net.anchor)
        # NaN for a modality absent from the whole batch; averaged over the steps that saw it
        return {"modality_gap": float(gap["pairwise_mean"]), "relative_gap": float(gap["relative_gap"]),
                "modality_to_anchor": np.array([gap["to_anchor"].get(j, np.nan) for j in range(present.shape[1])]),
                "latent_rms": np.array([gap["rms"].get(j, np.nan) for j in range(present.shape[1])])}

    # ------------------------------------------------------------------------------------------------------------------
    # per-epoch logging, plot and settings record

    @staticmethod
    def _epoch_mean(values) -> float:
        return float(gathered_over_ranks(values).mean())

    def _per_modality_epoch_mean(self, per_step) -> dict[str, float]:
        """``{modality: mean over the steps (of every rank) whose batch held it}`` of per-step (M,) arrays with NaN
        for a modality the batch lacked."""
        per_step = gathered_over_ranks(per_step).reshape(-1, len(self.net.modalities))
        seen = ~np.isnan(per_step)
        means = np.where(seen, per_step, 0.0).sum(0) / np.maximum(seen.sum(0), 1)
        return {name: float(means[j]) for j, name in enumerate(self.net.modalities) if seen[:, j].any()}

    def mixture_weights(self) -> dict[str, dict[str, float]] | None:
        """``{modality: {"raw", "normalised"}}`` of the mixture anchor, else None."""
        anchor = getattr(self.net, "anchor", None)
        if not isinstance(anchor, MixtureAnchor):
            return None
        return anchor.weights_dict(self.net.modalities)

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        epoch = self.current_epoch
        self.logger.log("align_losses", self._epoch_mean(outputs["align_loss"]), epoch)
        self.logger.log("modality_gap", self._epoch_mean(outputs["modality_gap"]), epoch)
        self.logger.log("relative_gap", self._epoch_mean(outputs["relative_gap"]), epoch)
        for key in ("modality_to_anchor", "latent_rms"):
            self.logger.log(key, self._per_modality_epoch_mean(outputs[key]), epoch)
        weights = self.mixture_weights()
        if weights is not None:
            self.logger.log("mixture_weights", {k: v["normalised"] for k, v in weights.items()}, epoch)

    def on_epoch_end(self) -> None:
        get = self.logger.get_value
        self.print_to_log_file("align_loss", np.round(get("align_losses", step=-1), decimals=4))
        self.print_to_log_file("modality_gap", np.round(get("modality_gap", step=-1), decimals=4),
                               "relative gap", np.round(get("relative_gap", step=-1), decimals=4))
        self.print_to_log_file("modality to anchor",
                               {k: round(v, 4) for k, v in get("modality_to_anchor", step=-1).items()})
        self.print_to_log_file("latent RMS", {k: round(v, 4) for k, v in get("latent_rms", step=-1).items()})
        if self.spec.kind.learns_weights:
            self.print_to_log_file("mixture weights",
                                   {k: round(v, 4) for k, v in get("mixture_weights", step=-1).items()})
        if self.local_rank == 0:
            plot_alignment_png(self.logger.local_logger.my_fantastic_logging, self.output_folder)
        super().on_epoch_end()

    def settings_record(self) -> dict:
        """The baseline's record with the teacher's: its encoders, latents, mixture weights and alignment series."""
        arch = self.configuration_manager.network_arch_init_kwargs
        s = self.spec
        record = super().settings_record()
        # the latent is the per-modality encoders' output at U-Net stage "level" (0: the input resolution)
        record["latent"] = {"level": s.latent_level_for(arch), "channels": arch.get("latent_channels"),
                            "convs": arch.get("latent_convs")}
        weights = self.mixture_weights() if self.network is not None else None
        if weights is not None:
            record["mixture_weights"] = weights
        # per epoch: alignment (relative gap) apart from the latent space's size (RMS)
        log = self.logger.local_logger.my_fantastic_logging
        record["alignment_log"] = {key: list(log.get(key, [])) for key in ("relative_gap", "latent_rms",
                                                                            "modality_gap", "align_losses")}
        return record


# ----------------------------------------------------------------------------------------------------------------------
# trainer classes by name

_GENERATED: dict[str, type] = {}


def teacher_trainer_class(spec_or_name: AnyTeacher | str) -> type:
    """The trainer subclass for a teacher's or the baseline's spec (or a name :meth:`TeacherSpec.trainer_name` or
    :meth:`BaselineSpec.trainer_name` made).

    The same name always gives the same class object. Raises ValueError for a name that is not a teacher name.
    """
    spec = TeacherSpec.parse(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    name = spec.trainer_name()
    cls = _GENERATED.get(name)
    if cls is None:
        base = nnAlignBaselineTrainer if spec.is_original else nnAlignTeacherTrainer
        cls = type(name, (base,), {
            "spec": spec, "__module__": __name__, "__qualname__": name,
            "__doc__": f"nnalign teacher trainer with {spec.model_settings()}."})
        _GENERATED[name] = cls
    return cls


def __getattr__(name: str):
    """PEP 562: ``nnalign.training.teacher_trainer.nnAlignTeacher_mixture`` (etc.) resolves, so generated classes
    pickle by reference and ``pydoc.locate`` finds them."""
    try:
        return teacher_trainer_class(name)
    except ValueError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
