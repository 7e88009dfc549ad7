"""Teacher training on nnU-Net's loop: settings names, the trainer shim, train steps, nnalign_train end to end.

The slow part is one module-scoped synthetic dataset (4 cases of 48^3, configuration 3d_cpu: 2 mm, patch 20x24x20)
shared by the in-process trainer tests and the CLI runs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnalign.errors import NnalignError
from nnalign.training.presence import sample_presence, zero_absent
from nnalign.training.record import METHOD_VERSION
from nnalign.runs import TeacherSpec, teacher_spec

DATASET_ID = 990
DATASET = "Dataset990_SyntheticBraTS"
CONFIG = "3d_cpu"
ANCHORS = ("none", "normal", "modality:T1ce", "mixture", "original")


# ----------------------------------------------------------------------------------------------------------------------
# modality dropout


def test_presence_without_dropout_is_all_present():
    present = sample_presence(7, 4, 0.0)
    assert present.dtype == torch.bool and present.shape == (7, 4) and bool(present.all())


@pytest.mark.parametrize("p", [0.3, 0.5, 0.9, 0.999])
def test_presence_never_drops_every_modality(p):
    gen = torch.Generator().manual_seed(0)
    present = sample_presence(4000, 4, p, generator=gen)
    assert bool(present.any(1).all())
    if p <= 0.5:
        # conditioned on at least one present: P(present) = (1 - p) / (1 - p^4)
        assert present.float().mean().item() == pytest.approx((1 - p) / (1 - p ** 4), abs=0.03)
    assert not bool(present.all(1).all())  # some samples do miss modalities


def test_balanced_presence_keeps_all_modalities_or_a_uniform_proper_subset():
    gen = torch.Generator().manual_seed(0)
    present = sample_presence(30000, 4, 0.5, generator=gen, sampling="balanced")
    assert bool(present.any(1).all())
    codes = (present.long() * torch.tensor([1, 2, 4, 8])).sum(1)
    counts = torch.bincount(codes, minlength=16).float() / len(codes)
    assert counts[0].item() == 0.0  # never none
    assert counts[15].item() == pytest.approx(0.5, abs=0.015)  # all four with probability 1 - p
    # each of the 14 proper subsets (the single modalities among them) with probability p / 14 = 0.0357
    torch.testing.assert_close(counts[1:15], torch.full((14,), 0.5 / 14), atol=0.006, rtol=0)
    # one modality: nothing to drop
    assert bool(sample_presence(5, 1, 0.5, sampling="balanced").all())
    with pytest.raises(ValueError, match="subset sampling"):
        sample_presence(2, 4, 0.5, sampling="uniform")


def test_presence_rejects_dropout_one_and_zeroes_absent_channels():
    with pytest.raises(ValueError):
        sample_presence(2, 4, 1.0)
    data = torch.ones(2, 3, 2, 2)
    out = zero_absent(data, torch.tensor([[True, False, True], [False, False, True]]))
    assert out[:, :, 0, 0].tolist() == [[1, 0, 1], [0, 0, 1]]


def test_poly_lr_with_floor_goes_from_initial_to_final():
    from nnalign.training.optim import optimizer_from_plans

    opt, sched = optimizer_from_plans([torch.nn.Parameter(torch.zeros(1))],
                                      {"optimizer": "adam", "initial_lr": 1e-3, "final_lr": 1e-5,
                                       "weight_decay": 1e-5}, 10)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["weight_decay"] == 1e-5
    lrs = []
    for epoch in range(11):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-5)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(NnalignError):
        optimizer_from_plans([torch.nn.Parameter(torch.zeros(1))], {"optimizer": "lamb", "initial_lr": 1}, 10)


# ----------------------------------------------------------------------------------------------------------------------
# the weights' memory layout while training on the CPU


def _is_channels_last(network: torch.nn.Module) -> bool:
    """Every 5D weight channels-last, and not all of them also in the default layout (as a 1x1x1 kernel is)."""
    weights = [p for p in network.parameters() if p.dim() == 5]
    return (all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in weights)
            and not all(w.is_contiguous() for w in weights))


def test_the_training_layout_keeps_the_parameters_and_what_the_network_computes():
    from nnalign.training.common import set_training_layout

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 8, 3, padding=1), torch.nn.InstanceNorm3d(8, affine=True),
                              torch.nn.LeakyReLU(), torch.nn.Conv3d(8, 3, 3, padding=1))
    x = torch.randn(2, 2, 12, 10, 8)
    params = list(net.parameters())
    before = net(x)
    before.square().mean().backward()
    grads = [p.grad.clone() for p in params]
    net.zero_grad()
    set_training_layout(net, torch.device("cpu"), True)
    assert _is_channels_last(net) and list(net.parameters()) == params  # the same objects: an optimizer keeps them
    after = net(x)
    after.square().mean().backward()
    assert torch.allclose(after, before, atol=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-5) for p, g in zip(params, grads))
    set_training_layout(net, torch.device("cpu"), False)
    assert all(p.is_contiguous() for p in net.parameters())


def test_the_training_layout_leaves_other_devices_and_2d_networks_alone():
    from nnalign.training.common import set_training_layout

    net3d = torch.nn.Conv3d(2, 4, 3)
    set_training_layout(net3d, torch.device("cuda"), True)  # nothing moves: no GPU is needed to check it
    assert net3d.weight.is_contiguous()
    net2d = torch.nn.Conv2d(2, 4, 3)
    set_training_layout(net2d, torch.device("cpu"), True)
    assert net2d.weight.is_contiguous()


# ----------------------------------------------------------------------------------------------------------------------
# the synthetic dataset shared by everything below


@pytest.fixture(scope="module")
def planned(tmp_path_factory, plan_synthetic):
    """Raw + preprocessed 4-case synthetic dataset; yields the root holding raw/, pre/ (results go elsewhere)."""
    return plan_synthetic(tmp_path_factory.mktemp("teacher"), DATASET_ID, num_cases=4, shape=(48, 48, 48))


@pytest.fixture
def env(planned, tmp_path, monkeypatch, nnunet_env):
    """nnU-Net's variables for one test: the shared data, a fresh results folder, the trainer shim registered."""
    nnunet_env(planned, tmp_path / "results")
    return planned


@pytest.mark.slow
def test_plans_name_the_modalities(planned):
    plans = json.loads((planned / "pre" / DATASET / "nnAlignPlans.json").read_text())
    for cfg in plans["configurations"].values():
        if "architecture" in cfg:
            assert cfg["architecture"]["arch_kwargs"]["modalities"] == ["T1", "T1ce", "T2", "FLAIR"]


# ----------------------------------------------------------------------------------------------------------------------
# the shim: nnU-Net finds generated trainers by name


@pytest.mark.slow
def test_nnunet_finds_generated_trainers_through_the_shim(env):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnalign.training.teacher_trainer import nnAlignTeacherTrainer, teacher_trainer_class

    cls = recursive_find_trainer_class_by_name("nnAlignTeacher_mixture")
    assert issubclass(cls, nnAlignTeacherTrainer) and issubclass(cls, nnUNetTrainer)
    assert cls is teacher_trainer_class("nnAlignTeacher_mixture")
    assert cls is recursive_find_trainer_class_by_name("nnAlignTeacher_mixture")  # cached: same class every time
    assert cls.__name__ == "nnAlignTeacher_mixture" and cls.__module__ == "nnalign.training.teacher_trainer"
    assert cls.spec == TeacherSpec("mixture", modality_dropout=0.0)  # a name without _drop: no dropout
    other = recursive_find_trainer_class_by_name("nnAlignTeacher_modalityT1ce_w0p5_sep_drop0p3_nosg")
    assert other.spec == TeacherSpec("modality:T1ce", 0.5, False, 0.3, False)
    assert recursive_find_trainer_class_by_name("nnAlignOriginal").spec.is_original
    import nnalign.training.teacher_trainer as tt

    assert tt.nnAlignTeacher_mixture is cls  # PEP 562 on the defining module too (pickling, pydoc.locate)
    with pytest.raises(RuntimeError, match="Could not find"):
        recursive_find_trainer_class_by_name("nnAlignTeacher_bogus")


# ----------------------------------------------------------------------------------------------------------------------
# the trainer in process: one train step per anchor, and a one-epoch run per anchor


def _trainer(anchor: str, length: tuple[int, int] | None = None, **settings):
    """The trainer of a teacher in process; ``length`` (epochs, iterations) is written into the fold's settings
    record first, as ``nnalign_train`` does."""
    from nnalign.model_folders import fold_folder, model_folder
    from nnalign.training.record import write_training_inputs
    from nnalign.training.teacher_trainer import teacher_trainer_class

    pre = Path(os.environ["nnUNet_preprocessed"]) / DATASET
    plans = json.loads((pre / "nnAlignPlans.json").read_text())
    plans["continue_training"] = False
    cls = teacher_trainer_class(teacher_spec(anchor, **settings))
    if length is not None:
        folder = fold_folder(model_folder(Path(os.environ["nnUNet_results"]) / DATASET, cls.__name__, CONFIG), 0)
        write_training_inputs(folder, {"epochs": length[0], "iters_per_epoch": length[1]}, continuing=False)
    return cls(plans=plans, configuration=CONFIG, fold=0, dataset_json=json.loads((pre / "dataset.json").read_text()),
               device=torch.device("cpu"))


def _batch(trainer, b=2):
    patch = trainer.configuration_manager.patch_size
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(b, 4, *patch, generator=gen)
    targets, shape = [], list(patch)
    for stride in [[1, 1, 1]] + trainer.configuration_manager.pool_op_kernel_sizes[1:-1]:
        shape = [s // k for s, k in zip(shape, stride)]
        targets.append(torch.rand(b, 3, *shape, generator=gen) > 0.7)
    return {"data": data, "target": targets, "keys": np.array(["a", "b"][:b])}


@pytest.mark.slow
@pytest.mark.parametrize("anchor, extra", [
    ("none", {}), ("normal", {}), ("modality:T1ce", {}), ("modality:T1ce", {"stop_gradient": False}),
    ("mixture", {}), ("mixture", {"shared_encoder": False}), ("original", {}),
    ("mixture", {"latent_level": 1}), ("normal", {"latent_level": 2}),
    ("mixture-scaled", {}), ("mixture", {"align_distance": "relative"}),
    ("modality:T1ce", {"align_distance": "relative"}),
])
def test_train_step_every_anchor_updates_every_parameter(env, anchor, extra):
    trainer = _trainer(anchor, modality_dropout=0.5, **extra)
    trainer.initialize()
    if anchor != "original":  # the run's alignment distance reaches the network's anchor
        assert getattr(trainer.net.anchor, "distance", "mse") == extra.get("align_distance", "mse")
        assert trainer.net.anchor.name == anchor.partition(":")[0] or anchor.startswith("modality")
    before = {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}
    out = trainer.train_step(_batch(trainer))
    assert np.isfinite(out["loss"])
    if anchor == "original":
        assert set(out) == {"loss"}
    else:
        assert set(out) == {"loss", "align_loss", "modality_gap", "modality_to_anchor", "latent_rms", "relative_gap"}
        assert np.isfinite(out["align_loss"]) and out["modality_gap"] >= 0 and out["relative_gap"] >= 0
        for key in ("modality_to_anchor", "latent_rms"):
            assert out[key].shape == (4,)  # NaN only for a modality the whole batch lacked
            seen = np.isfinite(out[key])
            assert seen.any() and (out[key][seen] >= 0).all()
        if anchor == "none":
            assert float(out["align_loss"]) == 0.0
    # every parameter took part (no find_unused_parameters needed under DDP), except the lowest-resolution
    # segmentation head (the decoder's first stage) that nnU-Net's deep-supervision weights drop (weight 0; nnU-Net
    # sets 1e-6 under DDP for exactly this reason)
    lowest_head = "unet.decoder.seg_layers.0."
    missing = [n for n, p in trainer.network.named_parameters() if p.grad is None and not n.startswith(lowest_head)]
    assert not missing
    changed = [k for k, v in trainer.network.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    if anchor == "original":
        from nnalign.networks.align_unet import nnAlignStudentUNet

        assert isinstance(trainer.network, nnAlignStudentUNet) and trainer.network.channels == (0, 1, 2, 3)
    else:
        assert trainer.network.anchor.name == anchor
        assert len(trainer.network.encoders) == (1 if extra.get("shared_encoder", True) else 4)
        level = extra.get("latent_level", 0)
        assert trainer.network.latent_level == level and trainer.settings_record()["latent"]["level"] == level
        if anchor.startswith("modality"):
            assert trainer.network.anchor.stop_gradient == extra.get("stop_gradient", True)


@pytest.mark.slow
def test_paper_style_configuration_trains_with_adam_and_poly_to_floor(env):
    trainer = _trainer("mixture")
    trainer.configuration_manager.configuration["nnalign_training"] = {
        "optimizer": "adam", "initial_lr": 1e-3, "final_lr": 1e-5, "weight_decay": 1e-5}
    trainer.plans_training = trainer.configuration_manager.configuration["nnalign_training"]
    trainer.initialize()
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    trainer.lr_scheduler.step(trainer.num_epochs)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("anchor", ANCHORS)
def test_one_epoch_per_anchor_logs_plots_and_records(env, anchor):
    trainer = _trainer(anchor, length=(1, 1))
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (1, 1, 1)
    layouts = []
    train_step = trainer.train_step
    trainer.train_step = lambda batch: layouts.append(_is_channels_last(trainer.network)) or train_step(batch)
    trainer.run_training()
    # on the CPU the network trains channels-last, and is back in the default layout for the final validation
    assert layouts == [True] and all(p.is_contiguous() for p in trainer.network.parameters())
    folder = Path(trainer.output_folder)
    assert (folder / "checkpoint_final.pth").is_file() and (folder / "progress.png").is_file()
    log = trainer.logger.local_logger.my_fantastic_logging
    record = json.loads((folder / "nnalign_settings.json").read_text())
    assert record["settings"]["anchor"] == anchor and record["epochs_completed"] == 1 and record["epochs"] == 1
    assert record["dataset"] == DATASET and record["configuration"] == CONFIG and record["fold"] == 0
    if anchor == "original":
        assert "align_losses" not in log and not (folder / "alignment.png").exists() and "latent" not in record
    else:
        assert len(log["align_losses"]) == len(log["modality_gap"]) == len(log["train_losses"]) == 1
        assert (folder / "alignment.png").is_file()
        arch = trainer.configuration_manager.network_arch_init_kwargs
        assert record["latent"] == {"level": 0, "channels": arch["latent_channels"], "convs": arch["latent_convs"]}
    assert ("mixture_weights" in log) == (anchor == "mixture") == ("mixture_weights" in record)


def _epoch_end_on_rank(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    """One DDP rank (gloo, CPU): log one epoch of made-up per-step outputs that differ between the ranks."""
    from torch import distributed as dist

    trainer = _trainer("mixture")
    trainer.initialize()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        trainer.is_ddp = True  # set after construction: nnU-Net's __init__ would move a DDP trainer to CUDA
        to_anchor = np.array([1.0 + rank, np.nan if rank == 0 else 3.0, 1.0, 1.0])  # T1ce absent on rank 0
        outputs = [{"loss": np.array(1.0 + rank), "align_loss": np.array(2.0 * (rank + 1)),
                    "modality_gap": 0.5 * (rank + 1), "modality_to_anchor": to_anchor,
                    "relative_gap": 0.1 * (rank + 1), "latent_rms": 2 * to_anchor}]
        trainer.on_train_epoch_end(outputs)
        log = trainer.logger.local_logger.my_fantastic_logging
        if rank == 0:
            Path(result_file).write_text(json.dumps({k: log[k] for k in (
                "train_losses", "align_losses", "modality_gap", "modality_to_anchor", "relative_gap", "latent_rms")}))
        dist.barrier()  # no rank tears gloo down while another still talks to it (else SIGABRT at exit)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_epoch_logs_average_over_every_ddp_rank(env, tmp_path):
    """The alignment logs gather every rank's steps, as nnU-Net's train loss does (2 gloo processes on the CPU)."""
    import torch.multiprocessing as mp

    result = tmp_path / "log.json"
    mp.spawn(_epoch_end_on_rank, args=(2, str(tmp_path / "rendezvous"), str(result)), nprocs=2, join=True)
    log = json.loads(result.read_text())
    assert log["train_losses"] == [pytest.approx(1.5)]
    assert log["align_losses"] == [pytest.approx(3.0)] and log["modality_gap"] == [pytest.approx(0.75)]
    # each modality averaged over the steps that saw it: T1ce only on rank 1
    assert log["modality_to_anchor"] == [{"T1": pytest.approx(1.5), "T1ce": pytest.approx(3.0), "T2": 1.0,
                                          "FLAIR": 1.0}]
    assert log["relative_gap"] == [pytest.approx(0.15)]
    assert log["latent_rms"] == [{"T1": pytest.approx(3.0), "T1ce": pytest.approx(6.0), "T2": 2.0, "FLAIR": 2.0}]


# ----------------------------------------------------------------------------------------------------------------------
# nnalign_train end to end (subprocess, as a user runs it)


@pytest.fixture(scope="module")
def trained(planned, tmp_path_factory, run_train):
    """A mixture teacher with modality dropout 0.5, trained by nnalign_train for 2 epochs x 8 iterations.

    (With 3 iterations per epoch the epoch-2 loss was above epoch 1 in 1 of 5 probe runs; with 8 the drop was
    0.14-0.32 in 4 of 4.)
    """
    results = tmp_path_factory.mktemp("results")
    proc = run_train(planned, results, str(DATASET_ID), CONFIG, "0", "--role", "teacher", "--anchor", "mixture",
                     "--epochs", "2", "--iters-per-epoch", "8", "-device", "cpu")  # P*'s default dropout: 0.5
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model_dir = results / DATASET / f"nnAlignTeacher_mixture_drop0p5__nnAlignPlans__{CONFIG}"
    return {"data_root": planned, "results": results, "model_dir": model_dir, "fold_dir": model_dir / "fold_0"}


@pytest.mark.slow
def test_cli_trains_a_teacher_that_learns(trained):
    fold_dir = trained["fold_dir"]
    assert (fold_dir / "checkpoint_final.pth").is_file()
    assert (fold_dir / "validation" / "summary.json").is_file()
    assert (fold_dir / "progress.png").is_file() and (fold_dir / "alignment.png").is_file()
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnAlignTeacher_mixture_drop0p5"
    log = ckpt["logging"]
    losses = [float(v) for v in log["train_losses"]]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    assert len(log["align_losses"]) == len(log["modality_gap"]) == len(log["mixture_weights"]) == 2
    assert len(log["modality_to_anchor"]) == 2 and set(log["modality_to_anchor"][-1]) == {"T1", "T1ce", "T2", "FLAIR"}
    assert all(d >= 0 for d in log["modality_to_anchor"][-1].values())
    train_log = next(fold_dir.glob("training_log_*.txt")).read_text()
    assert "modality to anchor" in train_log and "mixture weights" in train_log
    assert set(log["mixture_weights"][-1]) == {"T1", "T1ce", "T2", "FLAIR"}
    assert sum(log["mixture_weights"][-1].values()) == pytest.approx(1.0)
    assert "anchor.raw_weights" in ckpt["network_weights"]
    record = json.loads((fold_dir / "nnalign_settings.json").read_text())
    assert record["trainer"] == "nnAlignTeacher_mixture_drop0p5" and record["settings"]["modality_dropout"] == 0.5
    assert record["epochs"] == 2 and record["iters_per_epoch"] == 8 and record["epochs_completed"] == 2
    weights = record["mixture_weights"]
    from nnalign.networks.anchors import MixtureAnchor

    logits = (MixtureAnchor.WEIGHT_GAIN * ckpt["network_weights"]["anchor.raw_weights"]).tolist()
    assert MixtureAnchor.WEIGHT_GAIN == 1.0  # the paper's P*: the softmax of the parameter, no gain, no floor
    assert [weights[m]["raw"] for m in ("T1", "T1ce", "T2", "FLAIR")] == pytest.approx(logits)
    norm = [weights[m]["normalised"] for m in ("T1", "T1ce", "T2", "FLAIR")]
    assert norm == pytest.approx(torch.softmax(torch.tensor(logits), 0).tolist())
    assert norm != pytest.approx([0.25] * 4, abs=1e-6)  # they learnt through the fill of the dropped modalities
    assert record["settings"]["align_distance"] == "mse" and "align_distance" not in record  # settings stored once
    assert record["method_version"] == METHOD_VERSION and "collapse_warning" in record
    assert len(record["alignment_log"]["relative_gap"]) == len(record["alignment_log"]["latent_rms"]) == 2


@pytest.mark.slow
def test_nnunet_predictor_loads_the_teacher_and_predicts_any_subset(trained, env):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    images = sorted((env / "raw" / DATASET / "imagesTr").glob("SYN_0000_*.nii.gz"))
    img, props = SimpleITKIO().read_images([str(p) for p in images])
    predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(trained["model_dir"]), use_folds=(0,))
    seg, probs = predictor.predict_single_npy_array(img, props, save_or_return_probabilities=True)
    assert seg.shape == img.shape[1:] and set(np.unique(seg)) <= {0, 1, 2, 3}
    predictor.network.present_modalities = (1,)  # T1ce only: absent latents filled by the mixture anchor
    seg1, probs1 = predictor.predict_single_npy_array(img, props, save_or_return_probabilities=True)
    assert seg1.shape == img.shape[1:] and set(np.unique(seg1)) <= {0, 1, 2, 3}
    assert not np.allclose(probs, probs1)


@pytest.mark.slow
def test_cli_trains_a_teacher_with_deeper_latents_that_nnunet_predicts_with(env, tmp_path, run_train):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    results = tmp_path / "results"
    proc = run_train(env, results, str(DATASET_ID), CONFIG, "0", "--anchor", "normal", "--latent-level", "2",
                     "--modality-dropout", "0.5", "--epochs", "1", "--iters-per-epoch", "2", "-device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model_dir = results / DATASET / f"nnAlignTeacher_normal_lvl2_drop0p5__nnAlignPlans__{CONFIG}"
    record = json.loads((model_dir / "fold_0" / "nnalign_settings.json").read_text())
    assert record["latent"]["level"] == 2 and record["settings"]["latent_level"] == 2

    images = sorted((env / "raw" / DATASET / "imagesTr").glob("SYN_0000_*.nii.gz"))
    img, props = SimpleITKIO().read_images([str(p) for p in images])
    predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(0,))
    assert predictor.network.latent_level == 2 and len(predictor.network.upsample) == 2
    predictor.network.present_modalities = (3,)  # FLAIR only
    seg = predictor.predict_single_npy_array(img, props)
    assert seg.shape == img.shape[1:] and set(np.unique(seg)) <= {0, 1, 2, 3}


@pytest.mark.slow
def test_cli_continues_the_same_run_with_more_epochs(trained, run_train):
    """--c --epochs 3 continues the 2-epoch run in the same folder (the length is not part of the trainer name)."""
    before = torch.load(trained["fold_dir"] / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    proc = run_train(trained["data_root"], trained["results"], DATASET, CONFIG, "0", "--anchor", "mixture",
                     "--modality-dropout", "0.5", "--c", "--epochs", "3", "-device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = torch.load(trained["fold_dir"] / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert before["current_epoch"] == 2 and after["current_epoch"] == 3
    assert len(after["logging"]["train_losses"]) == len(after["logging"]["align_losses"]) == 3
    assert [float(v) for v in after["logging"]["train_losses"][:2]] == \
        [float(v) for v in before["logging"]["train_losses"]]
    record = json.loads((trained["fold_dir"] / "nnalign_settings.json").read_text())
    assert record["epochs"] == 3 and record["epochs_completed"] == 3 and record["iters_per_epoch"] == 8  # kept


@pytest.mark.slow
def test_a_run_recorded_before_the_record_was_an_input_continues_and_predicts(trained, tmp_path, run_train):
    """A run of nnalign 0.2.0, whose length reached the trainer through the environment and whose record (written by
    the trainer alone) kept it under ``settings`` too, continues with its own iterations and predicts."""
    results = tmp_path / "results"
    model_dir = results / DATASET / trained["model_dir"].name
    shutil.copytree(trained["model_dir"], model_dir)
    record_file = model_dir / "fold_0" / "nnalign_settings.json"
    record = json.loads(record_file.read_text())
    record["settings"].update(epochs=record["epochs"], iters_per_epoch=record["iters_per_epoch"])
    record_file.write_text(json.dumps(record))
    done = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    proc = run_train(trained["data_root"], results, DATASET, CONFIG, "0", "--anchor", "mixture",
                     "--modality-dropout", "0.5", "--c", "--epochs", str(done["current_epoch"] + 1), "-device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(record_file.read_text())
    assert record["epochs_completed"] == done["current_epoch"] + 1 and record["iters_per_epoch"] == 8

    cases = tmp_path / "cases"
    cases.mkdir()
    for image in (trained["data_root"] / "raw" / DATASET / "imagesTr").glob("SYN_0000_000[03].nii.gz"):
        shutil.copy(image, cases / image.name)  # T1 and FLAIR only: the dropout teacher's missing-modality path
    proc = subprocess.run([sys.executable, "-m", "nnalign.cli.predict", "-i", str(cases), "-o", str(tmp_path / "out"),
                           "-m", str(model_dir), "-device", "cpu", "--disable-tta"], capture_output=True, text=True,
                          env={**os.environ, "nnUNet_results": str(results)}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "out" / "SYN_0000.nii.gz").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit 1, no traceback


@pytest.mark.slow
@pytest.mark.parametrize("args, fragments", [
    (["--anchor", "bogus"], ["unknown anchor 'bogus'"]),
    (["--anchor", "modality:T5"], ["unknown modality 'T5'"]),
    (["--anchor", "mixture", "--no-stop-gradient"], ["anchor 'mixture' has no anchor modality"]),
    (["--modality-dropout", "1"], ["[0, 1)"]),
    (["--val"], ["no checkpoint_final.pth"]),
    (["--c", "--val"], ["cannot be combined"]),
    (["--latent-level", "9"], ["--latent-level 9: the 3d_cpu U-Net has stages 0 to "]),
    (["--anchor", "original", "--latent-level", "1"], ["no latents"]),
    (["--role", "student", "--latent-level", "1"], ["--latent-level applies to --role teacher only"]),
    (["--role", "student", "--anchor", "normal"], ["--anchor applies to --role teacher only"]),
    (["--kd", "kdnet"], ["--kd applies to --role student only"]),
])
def test_bad_settings_and_run_state_are_one_line_errors(planned, tmp_path, args, fragments, run_train,
                                                        assert_one_line_error):
    assert_one_line_error(run_train(planned, tmp_path, str(DATASET_ID), CONFIG, "0", "-device", "cpu", *args),
                          *fragments)


def _copy_with_edited_plans(planned: Path, tmp_path: Path, edit) -> tuple[Path, Path]:
    """A copy of the preprocessed data whose nnAlignPlans.json went through ``edit(plans)``: (data root, plans file)."""
    root = tmp_path / "data"
    shutil.copytree(planned / "pre", root / "pre")
    (root / "raw").mkdir()
    plans_file = root / "pre" / DATASET / "nnAlignPlans.json"
    plans = json.loads(plans_file.read_text())
    edit(plans)
    plans_file.write_text(json.dumps(plans))
    return root, plans_file


@pytest.mark.slow
@pytest.mark.parametrize("key, value, fragments", [
    ("latent_channels", 0, ["latent_channels must be a whole number >= 1, got 0"]),
    ("latent_convs", 1.5, ["latent_convs must be a whole number >= 1, got 1.5"]),
    ("latent_level", 7, ["latent_level must be a stage of the U-Net, 0 to ", "got 7"]),
])
def test_bad_latent_settings_in_the_plans_are_one_line_errors(planned, tmp_path, key, value, fragments, run_train,
                                                              assert_one_line_error):
    """Users edit the plans as nnU-Net's; a bad latent setting is named with the file, not a traceback."""
    def edit(plans):
        plans["configurations"][CONFIG]["architecture"]["arch_kwargs"][key] = value

    root, plans_file = _copy_with_edited_plans(planned, tmp_path, edit)
    assert_one_line_error(run_train(root, tmp_path / "results", DATASET, CONFIG, "0", "-device", "cpu"),
                          str(plans_file), f"configuration {CONFIG}: ", *fragments)


@pytest.mark.slow
def test_a_configuration_inheriting_from_the_plans_sets_other_latent_channels(planned, tmp_path, run_train):
    """nnU-Net's way to try other settings side by side: a configuration in the plans that inherits from a planned
    one. Its name is part of the model folder, so the runs never share one."""
    def edit(plans):
        architecture = json.loads(json.dumps(plans["configurations"][CONFIG]["architecture"]))
        architecture["arch_kwargs"]["latent_channels"] = 2
        plans["configurations"]["3d_cpu_latent2"] = {"inherits_from": CONFIG, "architecture": architecture}

    root, _ = _copy_with_edited_plans(planned, tmp_path, edit)
    results = tmp_path / "results"
    proc = run_train(root, results, DATASET, "3d_cpu_latent2", "0", "--anchor", "mixture", "--epochs", "1",
                     "--iters-per-epoch", "2", "-device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fold = results / DATASET / f"{TeacherSpec('mixture').trainer_name()}__nnAlignPlans__3d_cpu_latent2" / "fold_0"
    assert json.loads((fold / "nnalign_settings.json").read_text())["latent"]["channels"] == 2
    weights = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert weights["unet.encoder.stages.0.0.convs.0.conv.weight"].shape[1] == 4 * 2  # 4 modalities x 2 channels
    assert weights["encoders.0.0.convs.0.conv.weight"].shape[0] == 2


@pytest.mark.slow
def test_continue_without_a_checkpoint_lists_the_existing_runs(trained, run_train, assert_one_line_error):
    line = assert_one_line_error(
        run_train(trained["data_root"], trained["results"], str(DATASET_ID), CONFIG, "0", "--anchor", "normal", "--c",
                  "-device", "cpu"), "--c: no checkpoint of nnAlignTeacher_normal")
    assert line.endswith("nnAlignTeacher_mixture_drop0p5"), line


@pytest.mark.slow
def test_dataset_problems_are_one_line_errors_with_the_command_to_run(planned, tmp_path, run_train,
                                                                      assert_one_line_error):
    root = tmp_path / "data"
    shutil.copytree(planned / "pre", root / "pre")
    (root / "raw" / "Dataset991_RawOnly").mkdir(parents=True)
    other = root / "pre" / "Dataset992_Other"
    shutil.copytree(root / "pre" / DATASET, other)  # plans still say Dataset990_...
    results = tmp_path / "results"
    assert_one_line_error(run_train(root, results, "991", CONFIG, "0", "-device", "cpu"),
                          "Dataset991_RawOnly is not preprocessed", "nnalign_plan_and_preprocess -d 991")
    assert_one_line_error(run_train(root, results, "993", CONFIG, "0", "-device", "cpu"), "no dataset '993'")
    assert_one_line_error(run_train(root, results, "992", CONFIG, "0", "-device", "cpu"),
                          "belongs to dataset 'Dataset990_SyntheticBraTS'", "nnalign_plan_and_preprocess -d 992")
    assert_one_line_error(run_train(root, results, DATASET, "3d_fullres", "0", "-device", "cpu"),
                          "3d_fullres of Dataset990_SyntheticBraTS is not preprocessed",
                          "nnalign_plan_and_preprocess -d 990 -c 3d_fullres")
    assert_one_line_error(run_train(root, results, "SyntheticBraTS", "3d_nope", "0", "-device", "cpu"),
                          "configuration '3d_nope' is not in nnAlignPlans.json")
    (root / "pre" / DATASET / "nnAlignPlans.json").unlink()
    assert_one_line_error(run_train(root, results, "990", CONFIG, "0", "-device", "cpu"),
                          "no nnAlignPlans.json", "nnalign_plan_and_preprocess -d 990 -c 3d_cpu")
    assert_one_line_error(run_train(root, results, "990", CONFIG, "x", "-device", "cpu"), "fold must be")


@pytest.mark.slow
def test_help_names_the_roles_and_anchors():
    proc = subprocess.run([sys.executable, "-m", "nnalign.cli.train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--anchor" in proc.stdout
    assert "--role {teacher,student}" in proc.stdout
