"""Small matplotlib renderings (Agg, off-screen) shared by the live display and the Run summary."""

from __future__ import annotations

import io


def loss_png(rows: list[dict], title: str = "", width: float = 4.2, height: float = 2.6) -> bytes | None:
    """Training (and eval) loss against step, as PNG bytes; None before the first logged loss."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and "step" in r]
    if not train and not evals:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), marker="." if len(train) < 30 else None, label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    if evals:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
