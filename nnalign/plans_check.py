"""Plans and dataset.json files that name only known building blocks.

nnU-Net turns strings in a plans file into Python objects and calls them: ``pydoc.locate`` for the network class and
for every ``arch_kwargs`` key listed in ``_kw_requires_import`` (which can name any importable function, e.g.
``os.system``, with its keyword arguments taken from the plans), and a search by name inside its own package for the
preprocessor, the resampling functions, the normalisation schemes, the label manager and the image reader. A plans
file from a shared model folder could therefore run code the moment a network is built from it.

nnalign checks every such name against the allow-lists below before nnU-Net sees the file, and refuses anything else
with one line naming the file and the key. The lists hold the classes and functions nnunetv2 2.8.1,
dynamic_network_architectures and nnalign use in these places (and torch.nn layers of the same kinds); a test
resolves every entry. Nothing here imports torch or nnU-Net.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from nnalign.errors import NnalignError

_TORCH_LAYERS = {
    "conv": ("Conv1d", "Conv2d", "Conv3d"),
    "instancenorm": ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"),
    "batchnorm": ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"),
    "normalization": ("GroupNorm", "LayerNorm"),
    "dropout": ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout"),
    "activation": ("LeakyReLU", "ReLU", "PReLU", "ELU", "GELU", "SiLU", "Mish", "Tanh", "Sigmoid", "Hardswish"),
}
#: The layer classes a plans file may name for ``conv_op``, ``norm_op``, ``dropout_op`` and ``nonlin``, in both the
#: spellings nnU-Net writes (``torch.nn.LeakyReLU`` and ``torch.nn.modules.conv.Conv3d``).
ALLOWED_LAYERS: frozenset[str] = frozenset(
    name for module, classes in _TORCH_LAYERS.items() for cls in classes
    for name in (f"torch.nn.{cls}", f"torch.nn.modules.{module}.{cls}"))
#: The network classes a plans file may name (``network_class_name``).
ALLOWED_NETWORKS: frozenset[str] = frozenset(
    [f"dynamic_network_architectures.architectures.unet.{c}"
     for c in ("PlainConvUNet", "ResidualEncoderUNet", "ResidualUNet")]
    + [f"dynamic_network_architectures.architectures.primus.Primus{size}" for size in "SBML"]
    + [f"nnalign.networks.align_unet.{c}" for c in ("nnAlignTeacherUNet", "nnAlignStudentUNet")])
#: Names nnU-Net looks up inside its own package: kind -> (where it is looked up, the names allowed, what they are).
ALLOWED_BY_NAME: dict[str, tuple[str, frozenset[str], str]] = {
    "preprocessor_name": ("nnunetv2.preprocessing", frozenset({"DefaultPreprocessor"}), "nnU-Net's preprocessor"),
    "resampling_fn": ("nnunetv2.preprocessing.resampling", frozenset({
        "resample_data_or_seg_to_shape", "resample_data_or_seg_to_spacing", "resample_torch_fornnunet",
        "resample_torch_simple", "no_resampling_hack"}), "one of nnU-Net's resampling functions"),
    "normalization_schemes": ("nnunetv2.preprocessing.normalization", frozenset({
        "ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization",
        "RGBTo01Normalization"}), "one of nnU-Net's normalisations"),
    "label_manager": ("nnunetv2.utilities.label_handling", frozenset({"LabelManager"}), "nnU-Net's LabelManager"),
    "image_reader_writer": ("nnunetv2.imageio", frozenset({
        "SimpleITKIO", "NibabelIO", "NibabelIOWithReorient", "NaturalImage2DIO", "Tiff3DIO"}),
        "one of nnU-Net's image readers"),
}
#: The ``arch_kwargs`` that nnU-Net's own plans pass through ``pydoc.locate``.
LAYER_KEYS = ("conv_op", "norm_op", "dropout_op", "nonlin")
_RESAMPLING_KEYS = ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities")


class PlansError(NnalignError):
    """A plans or dataset.json file that cannot be read or names something it may not; the message is one line,
    ``PATH: REASON``."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason

    def __reduce__(self):
        return type(self), (self.path, self.reason)


def _refuse(source: str, key: str, value, where: str, allowed: str) -> PlansError:
    """``PATH: refused: KEY 'VALUE' (WHERE) is not ALLOWED``: short, so that the key survives a long path."""
    return PlansError(source, f"refused: {key} {value!r}{f' ({where})' if where else ''} is not {allowed}")


def _check_name(source: str, key: str, value, where: str, kind: str) -> None:
    _, names, allowed = ALLOWED_BY_NAME[kind]
    if value not in names:
        raise _refuse(source, key, value, where, allowed)


def check_architecture(architecture, source: str, where: str) -> None:
    """PlansError unless a configuration's ``architecture`` names an allowed network and allowed layers only."""
    if not isinstance(architecture, dict):
        raise PlansError(source, f"architecture ({where}) must be a JSON object, got {type(architecture).__name__}")
    network = architecture.get("network_class_name")
    if network not in ALLOWED_NETWORKS:
        raise _refuse(source, "network_class_name", network, where, "one of nnU-Net's or nnalign's networks")
    kwargs = architecture.get("arch_kwargs")
    imports = architecture.get("_kw_requires_import", [])
    if not isinstance(kwargs, dict):
        raise PlansError(source, f"arch_kwargs ({where}) must be a JSON object")
    if not isinstance(imports, list) or not all(isinstance(k, str) and k in kwargs for k in imports):
        raise PlansError(source, f"_kw_requires_import ({where}) must list keys of arch_kwargs, got {imports!r}")
    for key in dict.fromkeys([*LAYER_KEYS, *imports]):
        value = kwargs.get(key)
        if value is not None and value not in ALLOWED_LAYERS:
            raise _refuse(source, key, value, where, "a torch.nn layer")


def check_plans(plans, source: str | os.PathLike) -> None:
    """PlansError (one line naming ``source`` and the key) unless every name nnU-Net would resolve in ``plans`` is
    on the allow-lists of this module."""
    source = os.fspath(source)
    if not isinstance(plans, dict):
        raise PlansError(source, f"not a plans file (expected a JSON object, got {type(plans).__name__})")
    for key in ("label_manager", "image_reader_writer"):
        if key in plans:
            _check_name(source, key, plans[key], "", key)
    configurations = plans.get("configurations", {})
    if not isinstance(configurations, dict):
        raise PlansError(source, "configurations must be a JSON object")
    for name, configuration in configurations.items():
        where = f"configuration {name}"
        if not isinstance(configuration, dict):
            raise PlansError(source, f"{where} must be a JSON object")
        if "architecture" in configuration:
            check_architecture(configuration["architecture"], source, where)
        if "preprocessor_name" in configuration:
            _check_name(source, "preprocessor_name", configuration["preprocessor_name"], where, "preprocessor_name")
        for key in _RESAMPLING_KEYS:
            if key in configuration:
                _check_name(source, key, configuration[key], where, "resampling_fn")
        schemes = configuration.get("normalization_schemes", [])
        for scheme in schemes if isinstance(schemes, list) else [schemes]:
            _check_name(source, "normalization_schemes", scheme, where, "normalization_schemes")


def check_dataset_json(dataset_json, source: str | os.PathLike) -> None:
    """PlansError unless ``dataset.json``'s ``overwrite_image_reader_writer`` (when set) names one of nnU-Net's
    image readers."""
    reader = dataset_json.get("overwrite_image_reader_writer") if isinstance(dataset_json, dict) else None
    if reader not in (None, "None"):
        _check_name(os.fspath(source), "overwrite_image_reader_writer", reader, "", "image_reader_writer")


def read_checked_plans(path: str | os.PathLike) -> dict:
    """The plans in ``path``, checked with :func:`check_plans`; PlansError (one line) for a file that cannot be
    read, is not JSON, or names what it may not."""
    try:
        plans = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise PlansError(path, f"cannot read the plans ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise PlansError(path, f"not a readable plans file (not JSON: {e})") from None
    check_plans(plans, path)
    return plans


def check_model_folder(folder: str | os.PathLike) -> None:
    """Check a trained model folder's ``plans.json`` and ``dataset.json`` (the files nnU-Net's predictor reads)."""
    folder = Path(folder)
    read_checked_plans(folder / "plans.json")
    dataset_file = folder / "dataset.json"
    if dataset_file.is_file():
        try:
            dataset_json = json.loads(dataset_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise PlansError(dataset_file, f"not a readable dataset.json ({e})") from None
        check_dataset_json(dataset_json, dataset_file)
