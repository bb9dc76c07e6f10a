"""Plots written into a run directory (matplotlib, headless), an overlay of several runs against wall time, and
the reader of metrics.jsonl they plot."""

from __future__ import annotations

import json
from pathlib import Path


def metric_rows(metrics_jsonl: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out eval rows) of a run's metrics.jsonl: a training row has ``loss``, an eval
    row ``eval_loss`` and ``eval_perplexity`` (neuroray/training/evaluation.py); both have ``step``."""
    path = Path(metrics_jsonl)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def loss_curve(metrics_jsonl: Path, out_png: Path, inner_steps: int, title: str = "") -> Path:
    """Training loss per inner step and held-out eval loss, with the outer-round boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    rows, evals = metric_rows(metrics_jsonl)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2, label="train loss (mean of replicas)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", lw=1.2, ms=4,
                label=f"held-out eval loss (theta0; last {evals[-1]['eval_loss']:.3f}, "
                      f"perplexity {evals[-1]['eval_perplexity']:,.1f})")
    last = max([r["step"] for r in rows + evals], default=0)
    for boundary in range(inner_steps, last + 1, inner_steps):
        ax.axvline(boundary, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel(f"inner step (grey lines: outer steps every {inner_steps})")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title or "neuroray training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png



def wall_time_series(metrics_jsonl: Path, smooth: int = 5) -> tuple[list[float], list[float], float | None]:
    """(loop wall time of each training row, its loss as a running mean over the last ``smooth`` steps, the
    final held-out eval loss or None): what :func:`loss_vs_wall_time` draws for one run."""
    rows, evals = metric_rows(metrics_jsonl)
    window, losses, mean = max(1, smooth), [r["loss"] for r in rows], []
    for i in range(len(losses)):
        part = losses[max(0, i - window + 1):i + 1]
        mean.append(sum(part) / len(part))
    return [r["elapsed_s"] for r in rows], mean, (evals[-1]["eval_loss"] if evals else None)


def loss_vs_wall_time(runs: dict[str, Path], out_png: Path, title: str = "", smooth: int = 5) -> Path:
    """Several runs on one axis: training loss against the loop's wall time (``elapsed_s`` of each training
    row), one line per run labelled by its key (a link rate, a setup), each a running mean over ``smooth``
    steps (single steps of a small batch are noisy); a run's final held-out eval loss, if it has one, is a
    dot at its last step's time. Runs with no training rows are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, path in runs.items():
        times, mean, final = wall_time_series(path, smooth)
        if not times:
            continue
        line, = ax.plot(times, mean, lw=1.2, label=label + ("" if final is None else f" (eval {final:.3f})"))
        if final is not None:
            ax.plot([times[-1]], [final], "o", ms=5, color=line.get_color())
    ax.set_xlabel("wall time since the training loop started (s)")
    ax.set_ylabel(f"train loss, mean of {max(1, smooth)} steps (nats)")
    ax.set_title(title or "loss against wall time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
