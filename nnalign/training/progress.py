"""``alignment.png``: the teacher's alignment curves beside nnU-Net's ``progress.png``."""
from __future__ import annotations

import os
from pathlib import Path


def plot_alignment_png(logging: dict, output_folder: str | os.PathLike) -> Path | None:
    """Plot ``align_losses`` and ``modality_gap`` (and ``mixture_weights``, if logged) per epoch.

    ``logging`` is nnU-Net's ``my_fantastic_logging``: one value per epoch per key. Returns the file written, or None
    when there is nothing to plot yet.
    """
    losses, gaps = logging.get("align_losses") or [], logging.get("modality_gap") or []
    weights = logging.get("mixture_weights") or []
    n = min(len(losses), len(gaps))
    if n == 0:
        return None
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    epochs = list(range(n))
    rows = 2 + bool(weights)
    fig, axes = plt.subplots(rows, 1, figsize=(10, 3.2 * rows), sharex=True)
    axes[0].plot(epochs, [float(v) for v in losses[:n]], color="b", label="alignment loss (train)")
    axes[0].set_ylabel("alignment loss")
    axes[1].plot(epochs, [float(v) for v in gaps[:n]], color="r", label="modality gap (mean pairwise)")
    axes[1].set_ylabel("modality gap")
    if weights:
        for name in weights[0]:
            axes[2].plot(epochs[:len(weights)], [w[name] for w in weights[:n]], label=name)
        axes[2].set_ylabel("mixture weight")
        axes[2].set_ylim(0, 1)
    for ax in axes:
        ax.legend(loc="upper right")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("epoch")
    fig.tight_layout()
    out = Path(output_folder) / "alignment.png"
    fig.savefig(out)
    plt.close(fig)
    return out
