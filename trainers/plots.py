"""PNG plots of training runs (matplotlib, headless): the one place that sets the backend and draws a
transformer's validation curve.

    lum pretrain ... --out runs/lum          # writes runs/lum/validation.png (plot_validation)
    lum report DIR DIR --out report.png      # the DLRM's progressive AUC (trainers.dlrm.report)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, out: str | Path, dpi: int = 110) -> Path:
    """Lay out, write (creating the folder) and release ``fig``."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    pyplot().close(fig)
    return out


def draw_validation(ax, history: Sequence[Mapping], best_step: int | None, label: str, color=None,
                    key: str = "ndcg@10") -> None:
    """One run's validation ``key`` per step: each validation as points, the mean that early stopping follows
    (``smoothed_<key>``, when recorded) as a line, the step whose weights were kept as a ring."""
    steps = [h["step"] for h in history]
    if not steps:
        return
    line = ax.plot(steps, [h[key] for h in history], ".", ms=4, alpha=0.5, color=color)[0]
    smooth = f"smoothed_{key}"
    ys = [h.get(smooth, h[key]) for h in history]
    ax.plot(steps, ys, "-", color=line.get_color(), label=label)
    if best_step is not None and best_step in steps:
        i = steps.index(best_step)
        ax.plot([best_step], [ys[i]], "o", ms=9, mfc="none", color=line.get_color())


def plot_validation(history: Sequence[Mapping], best_step: int | None, out: str | Path, title: str) -> Path:
    """Training loss and validation NDCG@10 / HR@10 against the step, with the kept step marked."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    steps = [h["step"] for h in history]
    axes[0].plot(steps, [h["loss"] for h in history], "-o", ms=3)
    axes[0].set_ylabel("training loss (mean since the last validation)")
    for ax, key in zip(axes[1:], ("ndcg@10", "hr@10")):
        draw_validation(ax, history, best_step, "mean of recent validations", key=key)
        ax.set_ylabel(f"validation {key.upper()}")
    for ax in axes:
        ax.set_xlabel("step")
        if best_step is not None:
            ax.axvline(best_step, ls="--", lw=0.8, color="grey")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, title=f"kept: step {best_step}", title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save(fig, out)
