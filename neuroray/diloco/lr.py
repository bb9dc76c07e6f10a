"""The inner learning rate of every step: constant, or linear warmup then cosine decay (as nanoGPT).

The driver computes it from the global inner step and hands it to every holder with the step, so a
holder restarted from a snapshot, added mid-run or grown uses the same rate as its peers.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def inner_lr_at(step: int, total_steps: int, lr: float, schedule: str = "constant", warmup_steps: int = 0,
                min_lr_ratio: float = 0.1) -> float:
    """Learning rate of inner step ``step`` (0-based) of ``total_steps``.

    ``cosine``: ``lr * (step + 1) / warmup_steps`` during warmup, then a cosine from ``lr`` down to
    ``lr * min_lr_ratio`` at the last step. ``constant``: ``lr`` after the warmup."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / decay, 1.0)
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
