"""``alignment.png``: the teacher's alignment curves beside nnU-Net's ``progress.png``."""
from __future__ import annotations

import os
from pathlib import Path


def plot_alignment_png(logging: dict, output_folder: str | os.PathLike) -> Path | None:
    """Plot ``align_losses``; ``modality_gap`` (the absolute gap) with each modality's ``modality_to_anchor`` distance
    and, on the same panel's right axis, ``relative_gap`` (the gap over the latents' centred RMS, which neither
    shrinking nor a common offset can lower), so the two are read side by side; each modality's ``latent_rms``; and
    ``mixture_weights`` (the last three where logged) per epoch.

    ``logging`` is nnU-Net's ``my_fantastic_logging``: one value per epoch per key. Returns the file written, or None
    when there is nothing to plot yet.
    """
    losses, gaps = logging.get("align_losses") or [], logging.get("modality_gap") or []
    weights = logging.get("mixture_weights") or []
    to_anchor = logging.get("modality_to_anchor") or []
    relative, rms = logging.get("relative_gap") or [], logging.get("latent_rms") or []
    n = min(len(losses), len(gaps))
    if n == 0:
        return None
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = list(range(n))
    rows = 2 + bool(rms) + bool(weights)
    # nnU-Net's progress plot sets seaborn's large-font theme globally; draw this one with matplotlib's defaults
    with plt.style.context("default"):
        fig, axes = plt.subplots(rows, 1, figsize=(10, 3.2 * rows), sharex=True)
        axes[0].plot(epochs, [float(v) for v in losses[:n]], "b.-", label="alignment loss (train)")
        axes[0].set_ylabel("alignment loss")
        axes[1].plot(epochs, [float(v) for v in gaps[:n]], "k.-", label="mean pairwise")
        for name in dict.fromkeys(name for per_epoch in to_anchor[:n] for name in per_epoch):
            axes[1].plot(epochs[:len(to_anchor[:n])], [d.get(name, float("nan")) for d in to_anchor[:n]], ".--",
                         label=f"{name} to anchor")
        axes[1].set_ylabel("modality gap (absolute)")
        if relative:
            k = min(n, len(relative))
            relative_axis = axes[1].twinx()
            relative_axis.plot(epochs[:k], [float(v) for v in relative[:k]], "r.-",
                               label="relative gap (gap / centred RMS)")
            relative_axis.set_ylabel("relative gap", color="r")
            relative_axis.set_ylim(bottom=0)
            relative_axis.legend(loc="lower right", fontsize="small")
        if rms:
            k = min(n, len(rms))
            ax = axes[2]
            for name in dict.fromkeys(name for per_epoch in rms[:k] for name in per_epoch):
                ax.plot(epochs[:k], [d.get(name, float("nan")) for d in rms[:k]], ".:", label=f"{name} latent RMS")
            ax.set_ylabel("latent RMS")
            ax.set_ylim(bottom=0)
        if weights:
            k = min(n, len(weights))
            ax = axes[-1]
            for name in weights[0]:
                ax.plot(epochs[:k], [w[name] for w in weights[:k]], ".-", label=name)
            ax.set_ylabel("mixture weight")
            ax.set_ylim(0, 1)
        for ax in axes:
            ax.legend(loc="best", fontsize="small")
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("epoch")
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        out = Path(output_folder) / "alignment.png"
        fig.savefig(out)
    plt.close(fig)
    return out
