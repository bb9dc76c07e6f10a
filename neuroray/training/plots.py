"""Plots written into a run directory (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def loss_curve(metrics_jsonl: Path, out_png: Path, inner_steps: int, title: str = "") -> Path:
    """Training loss per inner step, with the outer-round boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2, label="train loss (mean of replicas)")
    last = rows[-1]["step"] if rows else 0
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
