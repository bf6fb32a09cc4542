"""The training-dynamics figure: loss, gradient norm and explanation length against step, from `metrics.jsonl`.

    python -c "from services.trainer.plots import plot_training_curve, read_metrics; \\
               plot_training_curve(read_metrics('runs/demo/adapter/metrics.jsonl'), 'curve.png')"
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The metric lines of a run, in order; an absent file has none. A last line cut short (the run killed while it
    wrote it) is left out; a bad line before it is an error."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    metrics = [json.loads(line) for line in lines[:-1]]
    try:
        metrics += [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:
        pass
    return metrics


def plot_training_curve(metrics: Sequence[dict], path: str | Path) -> Path:
    """Draw three panels (loss with its KL and CE parts, gradient norm, mean explanation tokens) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [m["step"] for m in metrics]
    fig, (loss_ax, norm_ax, length_ax) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    loss_ax.plot(steps, [m["loss"] for m in metrics], label="loss", marker=".")
    loss_ax.plot(steps, [m["kl"] for m in metrics], label="KL (T^2-scaled)", linestyle="--")
    ce = [(m["step"], m["ce"]) for m in metrics if m.get("ce") is not None]
    if ce:
        loss_ax.plot([s for s, _ in ce], [v for _, v in ce], label="CE", linestyle=":")
    loss_ax.set_ylabel("loss")
    loss_ax.legend(loc="upper right")
    norm_ax.plot(steps, [m["grad_norm"] for m in metrics], marker=".", color="tab:orange")
    norm_ax.set_ylabel("gradient norm")
    length_ax.plot(steps, [m["explanation_tokens"] for m in metrics], marker=".", color="tab:green")
    length_ax.set_ylabel("explanation tokens\n(mean per pair)")
    length_ax.set_xlabel("optimizer step")
    length_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (loss_ax, norm_ax, length_ax):
        ax.grid(alpha=0.3)
    fig.suptitle("SSB training dynamics")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
