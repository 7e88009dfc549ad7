"""Plans files may name only allow-listed building blocks (nnalign.plans_check): every entry of the allow-lists
resolves to what nnU-Net would find, the planner's own plans pass, and each place nnU-Net turns a string into code is
refused with one line naming the file and the key. The end-to-end cases (nnalign_predict, nnalign_report,
nnalign_train on a plans file that would run a command) are in test_hostile_models.py."""
from __future__ import annotations

import copy
import importlib
import inspect
import json
import pkgutil
import pydoc

import pytest

from nnalign.plans_check import (ALLOWED_BY_NAME, ALLOWED_LAYERS, ALLOWED_NETWORKS, PlansError, check_dataset_json,
                                 check_plans, read_checked_plans)

ARCH = {
    "network_class_name": "nnalign.networks.align_unet.nnAlignTeacherUNet",
    "arch_kwargs": {"n_stages": 2, "conv_op": "torch.nn.modules.conv.Conv3d",
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5},
                    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                    "nonlin_kwargs": {"inplace": True}},
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
PLANS = {
    "dataset_name": "Dataset001_X", "image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager",
    "configurations": {
        "3d_cpu": {"preprocessor_name": "DefaultPreprocessor", "resampling_fn_data": "resample_data_or_seg_to_shape",
                   "resampling_fn_seg": "resample_data_or_seg_to_shape",
                   "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                   "normalization_schemes": ["ZScoreNormalization"] * 4, "architecture": ARCH},
        "3d_lowres": {"inherits_from": "3d_cpu", "batch_size": 1},
    },
}


def find_by_name(package: str, name: str):
    """What nnU-Net's name search (``recursive_find_python_class``) finds for ``name`` under ``package``."""
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    return recursive_find_python_class(importlib.import_module(package).__path__[0], name, package)


def test_every_allowed_name_resolves_to_a_building_block_of_its_package():
    import torch

    for name in ALLOWED_LAYERS:
        layer = pydoc.locate(name)
        assert inspect.isclass(layer) and issubclass(layer, torch.nn.Module), name
    for name in ALLOWED_NETWORKS:
        network = pydoc.locate(name)
        assert inspect.isclass(network) and issubclass(network, torch.nn.Module), name
    for key, (package, names, _) in ALLOWED_BY_NAME.items():
        for name in names:
            found = find_by_name(package, name)
            assert found is not None and found.__module__.startswith(package), (key, name, found)


def test_the_allowed_names_cover_what_nnunet_ships():
    """Every image reader and normalisation class nnU-Net 2.8.1 offers is allowed (a missing one would refuse
    honest plans)."""
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES
    from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes

    assert {c.__name__ for c in LIST_OF_IO_CLASSES} <= ALLOWED_BY_NAME["image_reader_writer"][1]
    normalisers = {n for n, c in vars(schemes).items() if inspect.isclass(c) and issubclass(c, schemes.ImageNormalization)
                   and c is not schemes.ImageNormalization}
    assert normalisers == set(ALLOWED_BY_NAME["normalization_schemes"][1])
    resampling = set()
    import nnunetv2.preprocessing.resampling as package
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        resampling |= {n for n, f in vars(module).items()
                       if inspect.isfunction(f) and f.__module__ == module.__name__ and n.startswith(("resample_", "no_"))
                       and n not in ("resample_data_or_seg",)}
    assert resampling == set(ALLOWED_BY_NAME["resampling_fn"][1])


def test_plans_like_the_planners_pass():
    check_plans(copy.deepcopy(PLANS), "plans.json")  # the planner's real plans: test_hostile_models.py


def _set(plans: dict, path: tuple, value) -> dict:
    plans = copy.deepcopy(plans)
    target = plans
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return plans


CFG = ("configurations", "3d_cpu")
KWARGS = (*CFG, "architecture", "arch_kwargs")
HOSTILE = [
    ((*KWARGS, "dropout_op"), "os.system", "dropout_op 'os.system' (configuration 3d_cpu) is not a torch.nn layer"),
    ((*KWARGS, "nonlin"), "builtins.exec", "nonlin 'builtins.exec' (configuration 3d_cpu)"),
    ((*KWARGS, "conv_op"), "subprocess.Popen", "conv_op 'subprocess.Popen' (configuration 3d_cpu)"),
    ((*CFG, "architecture", "network_class_name"), "os.system", "network_class_name 'os.system'"),
    ((*CFG, "architecture", "network_class_name"), "PlainConvUNet", "network_class_name 'PlainConvUNet'"),
    ((*CFG, "preprocessor_name"), "rmtree", "preprocessor_name 'rmtree' (configuration 3d_cpu)"),
    ((*CFG, "resampling_fn_seg"), "maybe_mkdir_p", "resampling_fn_seg 'maybe_mkdir_p'"),
    ((*CFG, "normalization_schemes"), ["ZScoreNormalization", "join"], "normalization_schemes 'join'"),
    (("label_manager",), "load_pickle", "label_manager 'load_pickle' is not"),
    (("image_reader_writer",), "os", "image_reader_writer 'os' is not one of nnU-Net's image readers"),
]


@pytest.mark.parametrize("path, value, key", HOSTILE, ids=[f"{h[0][-1]}={h[1]}" for h in HOSTILE])
def test_a_name_outside_the_allow_list_is_refused_naming_file_and_key(path, value, key):
    with pytest.raises(PlansError) as info:
        check_plans(_set(PLANS, path, value), "/m/plans.json")
    message = str(info.value)
    assert message.startswith("/m/plans.json: refused: ") and key in message and "\n" not in message, message


def test_a_name_smuggled_through_kw_requires_import_is_refused():
    plans = _set(PLANS, (*KWARGS, "conv_bias"), "os.system")
    plans["configurations"]["3d_cpu"]["architecture"]["_kw_requires_import"].append("conv_bias")
    with pytest.raises(PlansError, match=r"refused: conv_bias 'os\.system' \(configuration 3d_cpu\)"):
        check_plans(plans, "plans.json")


@pytest.mark.parametrize("imports", ["conv_op", ["missing_key"], [3]])
def test_a_malformed_import_list_is_refused(imports):
    with pytest.raises(PlansError, match=r"_kw_requires_import \(configuration 3d_cpu\) must list keys of"):
        check_plans(_set(PLANS, (*CFG, "architecture", "_kw_requires_import"), imports), "plans.json")


@pytest.mark.parametrize("plans", [[1, 2], {"configurations": []}, {"configurations": {"x": 5}},
                                   {"configurations": {"x": {"architecture": "os.system"}}}])
def test_plans_of_the_wrong_shape_are_one_line(plans):
    with pytest.raises(PlansError) as info:
        check_plans(plans, "plans.json")
    assert str(info.value).startswith("plans.json: ")


def test_dataset_json_reader_must_be_one_of_nnunets_readers():
    check_dataset_json({"overwrite_image_reader_writer": "NibabelIOWithReorient"}, "dataset.json")
    check_dataset_json({"overwrite_image_reader_writer": "None"}, "dataset.json")
    with pytest.raises(PlansError, match=r"dataset.json: refused: overwrite_image_reader_writer 'system' is not"):
        check_dataset_json({"overwrite_image_reader_writer": "system"}, "dataset.json")


@pytest.mark.parametrize("content, reason", [(b'{"configurations": {', "not a readable plans file"),
                                             (b"\xff\xfe\x00", "not a readable plans file")])
def test_an_unreadable_plans_file_is_one_line(tmp_path, content, reason):
    path = tmp_path / "plans.json"
    path.write_bytes(content)
    with pytest.raises(PlansError, match=reason) as info:
        read_checked_plans(path)
    assert "\n" not in str(info.value)
    json.dumps(str(info.value))
