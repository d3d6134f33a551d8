"""Training curves as PNG (matplotlib, headless)."""

from __future__ import annotations

import io
from pathlib import Path

from .fileio import atomic_write_bytes


def plot_history(history: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Loss per logged step (left) and eval metrics per evaluation (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval"]) for r in history if "eval" in r]
    if not losses and not evals:
        return None
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.6))
    if losses:
        ax_loss.plot(*zip(*losses), color="tab:blue")
    ax_loss.set(xlabel="step", ylabel="train loss (target tokens)", title="loss")
    for name in ("accuracy", "macro_f1", "bleu", "rouge_l"):
        pts = [(s, m[name]) for s, m in evals if name in m]
        if pts:
            ax_eval.plot(*zip(*pts), marker="o", label=name)
    ax_eval.set(xlabel="step", title="eval (subset)")
    if evals:
        ax_eval.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = save_png(fig, path, dpi=100)
    plt.close(fig)
    return path


def save_png(fig, path: str | Path, dpi: int) -> Path:
    """Write a matplotlib figure as PNG atomically (a reader never sees half a picture)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(path, buf.getvalue())
