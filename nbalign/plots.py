"""Small matplotlib renderings (Agg, off-screen) shared by the live display and the Run summary."""

from __future__ import annotations

import io

# Curves drawn next to the loss when a run logs them: (metric keys, panel title).
PANELS = [
    (("watch/accuracy", "watch/label_accuracy"), "held-out preference accuracy"),
    (("watch/kl",), "KL to reference"),
    (("watch/length",), "answer length (chars)"),
    (("watch/perplexity",), "general-text perplexity"),
    (("reward",), "mean reward"),
    (("kl",), "KL to reference"),
    (("completions/mean_length",), "answer length (tokens)"),
    (("eval_accuracy",), "held-out accuracy"),
]


def _series(rows: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in rows if key in r and "step" in r and r[key] == r[key]]


def loss_png(rows: list[dict], title: str = "", width: float = 4.2, height: float = 2.6) -> bytes | None:
    """Training (and eval) loss against step, plus a panel per other curve the run logged (preference
    accuracy, KL, answer length, perplexity, reward), as PNG bytes; None before anything was logged."""
    train = _series(rows, "loss")
    evals = _series(rows, "eval_loss")
    panels = []
    for keys, label in PANELS:
        series = next((s for s in (_series(rows, k) for k in keys) if s), None)
        if series and not any(label == p[0] for p in panels):
            panels.append((label, series))
    if not train and not evals and not panels:
        return None
    from matplotlib.figure import Figure

    n = 1 + len(panels)
    cols = min(n, 3)
    nrows = -(-n // cols)
    fig = Figure(figsize=(width * (cols if n > 1 else 1) * (0.8 if n > 1 else 1), height * nrows), dpi=100)
    ax = fig.add_subplot(nrows, cols, 1)
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
    for i, (label, series) in enumerate(panels, start=2):
        ax = fig.add_subplot(nrows, cols, i)
        ax.plot(*zip(*series), marker="o" if len(series) < 30 else None)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
