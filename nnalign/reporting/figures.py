"""The report's figures (matplotlib, Agg backend), each written atomically as a PNG.

- :func:`plot_latent_tsne`: t-SNE of per-modality latent features, coloured by modality, one panel per teacher anchor
  (the paper's Fig. 1 / Fig. 3). The latents come from callables (:func:`teacher_latents` loads a trained teacher on
  the CPU through nnU-Net's predictor and runs it on centre crops of preprocessed cases).
- :func:`plot_overlays`: for a few validation cases, the axial slice with the largest tumour: the ground truth and
  each model's prediction side by side (the paper's Fig. 2).
- :func:`plot_training_curves`: per model, nnU-Net's logged losses and pseudo Dice (and the alignment loss).

Each returns a :class:`FigureResult`: the file written (None when there was nothing to draw), the panels drawn and
one-line notes on what was skipped.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from nnalign.errors import one_line
from nnalign.model_folders import FINAL_CHECKPOINT

# nnU-Net labels: 1 edema, 2 necrosis / non-enhancing core, 3 enhancing tumour.
LABEL_COLOURS = {1: (0.1, 0.8, 0.1, 0.45), 2: (0.9, 0.1, 0.1, 0.55), 3: (1.0, 0.85, 0.0, 0.6)}
MODALITY_COLOURS = {"T1": "tab:blue", "T1ce": "tab:orange", "T2": "tab:green", "FLAIR": "tab:red"}
MAX_CURVE_PANELS = 36


@dataclass
class FigureResult:
    path: Path | None
    panels: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Latents:
    """Per-modality latent features ``values`` (B, M, C, *S) of ``modalities`` (M names); ``mask`` (B, *S) marks the
    voxels to sample from (inside the brain), None for all."""

    values: np.ndarray
    modalities: Sequence[str]
    mask: np.ndarray | None = None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure_atomic(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG to a temporary file beside ``path``, then rename it over ``path``; close the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        _pyplot().close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# (a) t-SNE of the latents


def sample_latents(latents: Latents, per_modality: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``per_modality`` voxels (the same positions for every modality) drawn inside the mask: features (M*k, C) and
    the modality index of each row."""
    values = np.asarray(latents.values, dtype=np.float32)
    if values.ndim < 4:
        raise ValueError(f"latents must be (B, M, C, *S), got shape {values.shape}")
    b, m, c = values.shape[:3]
    if m != len(latents.modalities):
        raise ValueError(f"{m} latent modalities but {len(latents.modalities)} names")
    flat = values.reshape(b, m, c, -1).transpose(1, 0, 3, 2).reshape(m, -1, c)  # (M, B*V, C)
    if latents.mask is None:
        candidates = np.arange(flat.shape[1])
    else:
        mask = np.asarray(latents.mask, dtype=bool).reshape(-1)
        if mask.size != flat.shape[1]:
            raise ValueError(f"mask has {mask.size} voxels, latents {flat.shape[1]}")
        candidates = np.flatnonzero(mask)
    if candidates.size == 0:
        raise ValueError("no voxel to sample (the mask is empty)")
    picked = rng.choice(candidates, size=min(per_modality, candidates.size), replace=False)
    features = flat[:, picked].reshape(-1, c)
    labels = np.repeat(np.arange(m), picked.size)
    return features, labels


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of ``features`` (N, C), perplexity min(30, (N - 1) / 3), started from the PCA of the features (a
    random start for a single latent channel, which has no second principal axis).

    OpenMP threads are capped at half the cores: scikit-learn's Barnes-Hut t-SNE spins its threads, and on a machine
    busy with training it runs 10-20x slower with every core than with one.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = features.shape[0]
    perplexity = float(max(1.0, min(30.0, (n - 1) / 3.0)))
    with threadpool_limits(limits=max(1, (os.cpu_count() or 2) // 2)):
        return TSNE(n_components=2, perplexity=perplexity, init="pca" if features.shape[1] > 1 else "random",
                    learning_rate="auto", random_state=seed).fit_transform(features.astype(np.float64))


def plot_latent_tsne(panels: Mapping[str, Callable[[], Latents]], path: str | os.PathLike, per_modality: int = 300,
                     seed: int = 0) -> FigureResult:
    """One t-SNE panel per entry of ``panels`` (title -> a callable returning :class:`Latents`), coloured by modality.

    A panel whose callable fails is left out with a note; without any panel nothing is written.
    """
    result = FigureResult(None)
    drawn = []
    for title, get in panels.items():
        try:
            latents = get()
            features, labels = sample_latents(latents, per_modality, np.random.default_rng(seed))
            if features.shape[0] < 5:
                raise ValueError(f"only {features.shape[0]} samples")
            drawn.append((title, tsne_embedding(features, seed), labels, list(latents.modalities)))
        except ImportError as e:
            result.notes.append(f"t-SNE skipped: {one_line(e)} (pip install scikit-learn)")
            return result
        except Exception as e:  # noqa: BLE001 - one teacher failing to load must not stop the report
            result.notes.append(f"t-SNE panel {title} skipped: {one_line(e)}")
    if not drawn:
        return result
    plt = _pyplot()
    with plt.style.context("default"):
        fig, axes = plt.subplots(1, len(drawn), figsize=(4.2 * len(drawn), 4.4), squeeze=False, layout="constrained")
        for ax, (title, emb, labels, names) in zip(axes[0], drawn):
            for j, name in enumerate(names):
                pts = emb[labels == j]
                ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.7, label=name, color=MODALITY_COLOURS.get(name))
            ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][0].legend(loc="best", markerscale=2, fontsize=8)
        fig.suptitle("t-SNE of the per-modality latent features")
        result.path = save_figure_atomic(fig, path)
    result.panels = [d[0] for d in drawn]
    return result


def _centre_crop(array: np.ndarray, size: Sequence[int], fill=0) -> np.ndarray:
    """Centre crop of the last ``len(size)`` axes to ``size``, padded with ``fill`` where smaller."""
    lead = array.ndim - len(size)
    out = np.full(array.shape[:lead] + tuple(size), fill, dtype=array.dtype)
    src, dst = [slice(None)] * lead, [slice(None)] * lead
    for n, p in zip(array.shape[lead:], size):
        if n >= p:
            start = (n - p) // 2
            src.append(slice(start, start + p))
            dst.append(slice(None))
        else:
            start = (p - n) // 2
            src.append(slice(None))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = array[tuple(src)]
    return out


def teacher_latents(model_dir: Path, fold: str, preprocessed: Path, cases: Sequence[str] = (), max_cases: int = 2,
                    checkpoint: str = FINAL_CHECKPOINT) -> Latents:
    """Load a teacher on the CPU with nnU-Net's predictor and run it on centre crops (the configuration's patch size)
    of up to ``max_cases`` preprocessed cases (``cases`` first, e.g. the fold's validation cases).

    ``preprocessed`` is ``{nnUNet_preprocessed}/{dataset}``. Returns the latents and the in-brain mask (nnU-Net's
    preprocessed segmentation is -1 outside the non-zero region).
    """
    import torch

    from nnalign.paths import setup_env

    setup_env()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnalign.checkpoints import CheckpointError, safe_torch_load
    from nnalign.plans_check import PlansError, check_model_folder

    try:
        check_model_folder(model_dir)  # nnU-Net builds the network from names in plans.json
    except PlansError as e:  # the panel's note names the model: the file name and the reason suffice
        raise PlansError(Path(e.path).name, e.reason) from None
    # the predictor prints about the device; the checkpoint is loaded weights-only (nnalign.checkpoints)
    with contextlib.redirect_stdout(io.StringIO()), safe_torch_load():
        predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
        try:
            predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(fold,),
                                                           checkpoint_name=checkpoint)
        except CheckpointError as e:  # the panel's note names the model: the file name and the reason suffice
            raise CheckpointError(f"fold_{fold}/{Path(e.path).name}", e.reason) from None
    network = getattr(predictor.network, "_orig_mod", predictor.network)
    if not hasattr(network, "modalities"):
        raise ValueError(f"{Path(model_dir).name} has no per-modality latents")
    network.eval()
    patch = tuple(int(p) for p in predictor.configuration_manager.patch_size)
    folder = Path(preprocessed) / predictor.configuration_manager.data_identifier
    if not folder.is_dir():
        raise FileNotFoundError(f"no preprocessed data {folder}")
    dataset_class = infer_dataset_class(str(folder))
    available = sorted(dataset_class.get_identifiers(str(folder)))
    preferred = [c for c in dict.fromkeys(cases) if c in available]
    chosen = (preferred + [c for c in available if c not in preferred])[:max_cases]
    if not chosen:
        raise FileNotFoundError(f"no preprocessed cases in {folder}")
    dataset = dataset_class(str(folder), identifiers=list(chosen))
    values, masks = [], []
    for case in chosen:
        data, seg, _, _ = dataset.load_case(case)
        data = np.asarray(data[:], dtype=np.float32)
        seg = np.asarray(seg[:])
        x = torch.from_numpy(_centre_crop(data, patch))[None]
        with torch.no_grad():
            parts = network(x, return_parts=True)
        values.append(parts["latents"].float().numpy())
        mask = seg[0] >= 0 if seg.ndim == data.ndim else np.any(data != 0, axis=0)
        masks.append(_centre_crop(mask, patch, fill=False)[None])
    values_arr = np.concatenate(values)
    mask_arr = mask_on_grid(np.concatenate(masks), values_arr.shape[3:])
    return Latents(values_arr, tuple(network.modalities), mask_arr)


def mask_on_grid(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A (B, *S) mask on the coarser grid ``shape`` of latents taken at a deeper level (each S divisible by its
    ``shape`` entry): a coarse voxel is inside where at least half of the fine voxels it covers are."""
    if tuple(mask.shape[1:]) == tuple(shape):
        return mask
    factors = [s // g for s, g in zip(mask.shape[1:], shape)]
    blocks = mask.reshape(mask.shape[0], *(n for g, f in zip(shape, factors) for n in (g, f)))
    return blocks.mean(axis=tuple(range(2, blocks.ndim, 2))) >= 0.5


# ----------------------------------------------------------------------------------------------------------------------
# (b) slice overlays


@dataclass
class OverlayModel:
    """A model column of the overlay figure: its title and its predictions by case."""

    label: str
    predictions: Mapping[str, Path]


def _read(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _label_rgba(seg: np.ndarray) -> np.ndarray:
    rgba = np.zeros(seg.shape + (4,), dtype=np.float32)
    for label, colour in LABEL_COLOURS.items():
        rgba[seg == label] = colour
    return rgba


def _case_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    from nnalign.evaluation.metrics import dice, region_masks

    p, r = region_masks(pred, "nnunet"), region_masks(ref, "nnunet")
    return float(np.mean([dice(p[k], r[k]) for k in p]))


def plot_overlays(models: Sequence[OverlayModel], gt_folder: Path | None, path: str | os.PathLike,
                  image_for: Callable[[str], Path | None] | None = None, max_cases: int = 3,
                  title: str = "") -> FigureResult:
    """Rows: up to ``max_cases`` cases (those most models predicted); columns: the ground truth, then each model.

    Each panel is the axial slice with the largest ground-truth tumour area, on the image ``image_for(case)`` (e.g.
    the raw FLAIR; blank when None or of another shape), with the labels filled in and the ground-truth whole tumour
    outlined in white. A model's title carries its 3-D average Dice on that case.
    """
    from nnalign.evaluation.validation import reference_file

    result = FigureResult(None)
    if gt_folder is None:
        result.notes.append("overlays skipped: no ground truth (gt_segmentations) found")
        return result
    counts: dict[str, int] = {}
    for model in models:
        for case in model.predictions:
            if reference_file(gt_folder, case) is not None:
                counts[case] = counts.get(case, 0) + 1
    cases = sorted(counts, key=lambda c: (-counts[c], c))[:max_cases]
    if not cases:
        result.notes.append("overlays skipped: no validation prediction with a ground truth")
        return result
    plt = _pyplot()
    with plt.style.context("default"):
        ncols = 1 + len(models)
        fig, axes = plt.subplots(len(cases), ncols, figsize=(2.6 * ncols, 3.0 * len(cases) + 0.4), squeeze=False,
                                 layout="constrained")
        for row, case in zip(axes, cases):
            ref = _read(reference_file(gt_folder, case))
            z = int(np.argmax((ref > 0).reshape(ref.shape[0], -1).sum(1))) if ref.any() else ref.shape[0] // 2
            image = None
            image_path = image_for(case) if image_for is not None else None
            if image_path is not None:
                try:
                    image = _read(image_path).astype(np.float32)
                except RuntimeError:
                    image = None
                if image is not None and image.shape != ref.shape:
                    image = None
            background = image[z] if image is not None else np.zeros(ref.shape[1:], np.float32)
            panels = [("ground truth", ref, None)]
            for model in models:
                pred_path = model.predictions.get(case)
                pred = _read(pred_path) if pred_path is not None else None
                if pred is not None and pred.shape != ref.shape:
                    pred = None
                panels.append((model.label, pred, None if pred is None else _case_dice(pred, ref)))
            for ax, (name, seg, score) in zip(row, panels):
                ax.imshow(background, cmap="gray")
                if seg is not None:
                    ax.imshow(_label_rgba(seg[z]))
                if (ref[z] > 0).any():
                    ax.contour(ref[z] > 0, levels=[0.5], colors="white", linewidths=0.7)
                text = name if seg is not None else f"{name}\n(no prediction)"
                if score is not None:
                    text += f"\nDice {100 * score:.1f}"
                ax.set_title(text, fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
            row[0].set_ylabel(f"{case}\nz={z}", fontsize=7)
        if title:
            fig.suptitle(title, fontsize=9)
        result.path = save_figure_atomic(fig, path)
    result.panels = [f"{c}: {m.label}" for c in cases for m in models]
    return result


# ----------------------------------------------------------------------------------------------------------------------
# (c) training curves


def read_training_log(checkpoint: Path) -> dict | None:
    """The ``logging`` dict nnU-Net saves in a checkpoint (loaded weights-only and memory-mapped on the CPU), or None.

    Raises ValueError for a checkpoint that cannot or must not be loaded (:mod:`nnalign.checkpoints`); its message is
    the reason only, as the caller names the file.
    """
    import zipfile

    from nnalign.checkpoints import CheckpointError, load_checkpoint_safely

    try:
        payload = load_checkpoint_safely(checkpoint, "cpu", mmap=zipfile.is_zipfile(checkpoint))
    except CheckpointError as e:
        raise ValueError(e.reason) from None
    log = payload.get("logging") if isinstance(payload, dict) else None
    return log if isinstance(log, dict) else None


def _series(log: Mapping, key: str) -> list[float]:
    values = log.get(key) or []
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return []


def plot_training_curves(logs: Mapping[str, Mapping], path: str | os.PathLike, columns: int = 3) -> FigureResult:
    """One panel per model (title -> nnU-Net ``logging``): train/val loss and the alignment loss on the left axis,
    pseudo Dice (per epoch and its EMA) on the right."""
    result = FigureResult(None)
    usable = {k: v for k, v in logs.items() if _series(v, "train_losses")}
    for k in logs:
        if k not in usable:
            result.notes.append(f"training curves: {k} has no logged epochs")
    if len(usable) > MAX_CURVE_PANELS:
        result.notes.append(f"training curves: the first {MAX_CURVE_PANELS} of {len(usable)} models are shown")
        usable = dict(list(usable.items())[:MAX_CURVE_PANELS])
    if not usable:
        return result
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    with plt.style.context("default"):
        n = len(usable)
        ncols = min(columns, n)
        nrows = -(-n // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 * nrows), squeeze=False, layout="constrained")
        for ax, (title, log) in zip(axes.flat, usable.items()):
            handles = []
            for key, style, name in (("train_losses", "b-", "train loss"), ("val_losses", "r-", "val loss"),
                                     ("align_losses", "m--", "alignment loss")):
                ys = _series(log, key)
                if ys:
                    handles += ax.plot(range(len(ys)), ys, style, linewidth=1, label=name)
            ax.set_xlabel("epoch", fontsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("loss", fontsize=7)
            right = ax.twinx()
            for key, style, name in (("mean_fg_dice", "g:", "pseudo Dice"), ("ema_fg_dice", "g-", "pseudo Dice (EMA)")):
                ys = _series(log, key)
                if ys:
                    handles += right.plot(range(len(ys)), ys, style, linewidth=1, label=name)
            right.set_ylabel("pseudo Dice", fontsize=7)
            right.set_ylim(0, 1)
            ax.set_title(title, fontsize=8)
            ax.tick_params(labelsize=7)
            right.tick_params(labelsize=7)
            ax.legend(handles=handles, fontsize=6, loc="center right")
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        result.path = save_figure_atomic(fig, path)
    result.panels = list(usable)
    return result
