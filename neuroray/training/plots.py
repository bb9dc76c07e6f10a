"""Plots written into a run directory (matplotlib, headless), and the reader of metrics.jsonl they plot."""

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
