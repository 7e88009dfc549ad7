"""nnalign's experiment planner: nnU-Net's self-configuration, sized for the teacher and for distillation.

nnU-Net sizes patch and batch from ``compute_conv_feature_map_size`` of the network class in the plans. nnalign's
planner puts the teacher there and budgets, for every candidate patch, the larger of

- training the teacher (its per-modality encoders and latents on top of the planned U-Net), and
- distilling a student (the student's training step plus the frozen teacher's outputs it keeps for the losses),

so neither runs out of memory at the planned sizes, and the plan is never larger than stock nnU-Net's for the same
memory target. Besides ``3d_fullres`` and ``2d`` it plans ``3d_cpu`` (coarse spacing, small network and patch, for
training on a CPU) and ``paper`` (the paper's 80^3 crops, batch 4, Adam 1e-3 -> 1e-5, intensities in [-1, 1]).
"""
from __future__ import annotations

import contextlib
from copy import deepcopy

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

from nnalign import __version__
from nnalign.model_folders import PLANS_NAME
from nnalign.networks.align_unet import LATENT_DEFAULTS, nnAlignStudentUNet, nnAlignTeacherUNet

CPU_SPACING_MM = 2.0
CPU_MEMORY_TARGET_GB = 0.5
CPU_BASE_FEATURES = 16
CPU_MAX_FEATURES = 128
CPU_MAX_PATCH = 64
PAPER_PATCH = 80
PAPER_BATCH = 4
PAPER_TRAINING = {"optimizer": "adam", "initial_lr": 1e-3, "final_lr": 1e-5, "weight_decay": 1e-5}


def teacher_and_distillation_size(patch_size, input_channels: int, output_channels: int, arch_kwargs: dict,
                                  arch_kwargs_req_import) -> int:
    """Activation voxels budgeted for a patch: max(teacher training, student distillation)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    def build(cls, **extra):
        return get_network_from_plans(f"{cls.__module__}.{cls.__name__}", {**arch_kwargs, **extra},
                                      arch_kwargs_req_import, input_channels, output_channels, allow_init=False)

    teacher = build(nnAlignTeacherUNet)
    student = build(nnAlignStudentUNet)
    teacher_train = teacher.compute_conv_feature_map_size(patch_size)
    voxels = int(np.prod(patch_size, dtype=np.int64))
    kept_teacher_outputs = (teacher.unet.encoder.compute_conv_feature_map_size(patch_size)
                            + arch_kwargs["features_per_stage"][0] * voxels)
    distill = student.compute_conv_feature_map_size(patch_size) + kept_teacher_outputs
    return int(max(teacher_train, distill))


@contextlib.contextmanager
def _overridden(obj, **values):
    old = {k: getattr(obj, k) for k in values}
    for k, v in values.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


class nnAlignPlanner(ExperimentPlanner):
    """Teacher-aware nnU-Net planner writing ``nnAlignPlans`` with 2d, 3d_fullres, 3d_cpu and paper."""

    def __init__(self, dataset_name_or_id: str | int, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = PLANS_NAME,
                 overwrite_target_spacing=None, suppress_transpose: bool = False) -> None:
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.UNet_class = nnAlignTeacherUNet
        self.lowres_creation_threshold = 0  # nnalign trains no cascade
        self._saving = True

    @staticmethod
    def static_estimate_VRAM_usage(patch_size, input_channels, output_channels, arch_class_name, arch_kwargs,
                                   arch_kwargs_req_import) -> int:
        return teacher_and_distillation_size(patch_size, input_channels, output_channels, arch_kwargs,
                                             arch_kwargs_req_import)

    def estimated_memory_gb(self, configuration: dict) -> float:
        """Training memory of a planned configuration, in the calibration nnU-Net's planner uses."""
        arch = configuration["architecture"]
        n_in = len(self.dataset_json["channel_names"])
        size = self.static_estimate_VRAM_usage(configuration["patch_size"], n_in, len(self.dataset_json["labels"]),
                                               arch["network_class_name"], arch["arch_kwargs"],
                                               arch["_kw_requires_import"])
        two_d = len(configuration["patch_size"]) == 2
        ref_val = self.UNet_reference_val_2d if two_d else self.UNet_reference_val_3d
        ref_bs = self.UNet_reference_val_corresp_bs_2d if two_d else self.UNet_reference_val_corresp_bs_3d
        return size * configuration["batch_size"] / ref_bs / ref_val * self.UNet_reference_val_corresp_GB

    def save_plans(self, plans: dict) -> None:
        if self._saving:
            super().save_plans(plans)

    def plan_experiment(self) -> dict:
        with _overridden(self, _saving=False):
            plans = super().plan_experiment()
        configs = plans["configurations"]
        fullres = configs.get("3d_fullres")
        for cfg in configs.values():
            if "architecture" in cfg:
                cfg["architecture"]["arch_kwargs"].update(LATENT_DEFAULTS)
        if fullres is not None:
            configs["3d_cpu"] = self._plan_cpu(fullres)
            configs["paper"] = self._plan_paper(fullres)
        plans["nnalign"] = {"version": __version__, "latent_defaults": LATENT_DEFAULTS,
                            "gpu_memory_target_gb": self.UNet_vram_target_GB}
        # The networks' modality names (channel order), so that a network can be rebuilt from the plans alone
        # (nnU-Net's predictor calls build_network_architecture without dataset.json).
        from nnalign.modalities import modalities_from_dataset_json

        modalities = list(modalities_from_dataset_json(self.dataset_json))
        for cfg in configs.values():
            if "architecture" in cfg:
                cfg["architecture"]["arch_kwargs"]["modalities"] = modalities
        for cfg in configs.values():
            if "architecture" in cfg:
                self._fit_batch_to_target(cfg)
                cfg["nnalign_estimated_memory_gb"] = round(self.estimated_memory_gb(cfg), 2)
        self.plans = plans
        self.save_plans(plans)
        return plans

    def _fit_batch_to_target(self, configuration: dict) -> None:
        """Lower the batch size (never below nnU-Net's minimum) until the estimate fits the memory target.

        nnU-Net rounds the batch size to the nearest integer, which can overshoot the target by up to half a sample.
        The CPU and paper configurations have their own fixed budgets and are left alone.
        """
        if configuration["data_identifier"].endswith(("3d_cpu", "paper")):
            return
        while (configuration["batch_size"] > self.UNet_min_batch_size
               and self.estimated_memory_gb(configuration) > self.UNet_vram_target_GB):
            configuration["batch_size"] -= 1

    def _median_shape_at(self, fullres: dict, spacing) -> np.ndarray:
        return np.array(fullres["median_image_size_in_voxels"]) * np.array(fullres["spacing"]) / np.array(spacing)

    def _approx_voxels(self, median_shape) -> float:
        return float(np.prod(median_shape, dtype=np.float64) * self.dataset_json["numTraining"])

    def _plan_cpu(self, fullres: dict) -> dict:
        spacing = [max(CPU_SPACING_MM, float(s)) for s in fullres["spacing"]]
        median_shape = self._median_shape_at(fullres, spacing)
        clipped = np.minimum(median_shape, CPU_MAX_PATCH)
        with _overridden(self, UNet_base_num_features=CPU_BASE_FEATURES, UNet_max_features_3d=CPU_MAX_FEATURES,
                         UNet_vram_target_GB=CPU_MEMORY_TARGET_GB):
            plan = self.get_plans_for_configuration(spacing, clipped, self.generate_data_identifier("3d_cpu"),
                                                    self._approx_voxels(median_shape), {})
        plan["architecture"]["arch_kwargs"].update(LATENT_DEFAULTS)
        plan["median_image_size_in_voxels"] = [float(i) for i in median_shape]
        plan["batch_dice"] = fullres.get("batch_dice", False)
        return plan

    def _plan_paper(self, fullres: dict) -> dict:
        spacing = fullres["spacing"]
        patch = [PAPER_PATCH] * len(spacing)
        _, strides, kernels, patch, _ = get_pool_and_conv_props(spacing, patch, self.UNet_featuremap_min_edge_length,
                                                                999999)
        plan = deepcopy(fullres)
        n_stages = len(strides)
        plan["architecture"]["arch_kwargs"].update({
            "n_stages": n_stages, "kernel_sizes": kernels, "strides": strides,
            "features_per_stage": [min(self.UNet_max_features_3d, self.UNet_base_num_features * 2 ** i)
                                   for i in range(n_stages)],
            "n_conv_per_stage": list(self.UNet_blocks_per_stage_encoder[:n_stages]),
            "n_conv_per_stage_decoder": list(self.UNet_blocks_per_stage_decoder[:n_stages - 1]),
            "input_scale": [2.0, -1.0], **LATENT_DEFAULTS})
        n_channels = len(self.dataset_json["channel_names"])
        plan.update({"data_identifier": self.generate_data_identifier("paper"), "patch_size": list(patch),
                     "batch_size": PAPER_BATCH, "normalization_schemes": ["RescaleTo01Normalization"] * n_channels,
                     "use_mask_for_norm": [False] * n_channels, "nnalign_training": dict(PAPER_TRAINING)})
        return plan
