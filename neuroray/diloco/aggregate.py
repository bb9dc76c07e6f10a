"""Reducers that turn the pseudo-gradients of one layer range into one.

Every contribution is a flat float32 vector ``theta0 - theta`` from one holder of the range.
Inputs are checked before any math: a non-finite, wrong-shape or wrong-dtype contribution is
rejected and reported, never averaged. The robust rules (median, trimmed mean, Krum, ...) plug in
by adding a class to :data:`AGGREGATORS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


class AggregationRefused(RuntimeError):
    """Too few acceptable contributions: theta0 must be left unchanged."""


@dataclass
class Rejection:
    index: int  # position of the contribution, i.e. which holder sent it
    reason: str


@dataclass
class AggregateResult:
    value: torch.Tensor
    accepted: list[int]
    rejected: list[Rejection] = field(default_factory=list)


def screen(contributions: Sequence[torch.Tensor], numel: int, dtype=torch.float32) -> tuple[list[int], list[Rejection]]:
    """Split contributions into accepted indices and rejections (cheap checks, no math on values)."""
    accepted, rejected = [], []
    for i, c in enumerate(contributions):
        if not isinstance(c, torch.Tensor):
            rejected.append(Rejection(i, f"not a tensor ({type(c).__name__})"))
        elif c.dtype != dtype:
            rejected.append(Rejection(i, f"dtype {c.dtype}, expected {dtype}"))
        elif c.dim() != 1 or c.numel() != numel:
            rejected.append(Rejection(i, f"shape {tuple(c.shape)}, expected ({numel},)"))
        elif not torch.isfinite(c).all():
            rejected.append(Rejection(i, "contains NaN or Inf"))
        else:
            accepted.append(i)
    return accepted, rejected


def mean(rows: torch.Tensor) -> torch.Tensor:
    """Plain average ``(1/n) * sum_i x_i``. Accumulates in float64 so the result does not depend on
    input order beyond float32 rounding of the final value."""
    return rows.to(torch.float64).mean(dim=0).to(rows.dtype)


AGGREGATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"mean": mean}


def aggregate(name: str, contributions: Sequence[torch.Tensor], numel: int, min_accepted: int = 1) -> AggregateResult:
    """Screen the contributions, then reduce the accepted ones with the rule ``name``."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose one of {sorted(AGGREGATORS)}")
    accepted, rejected = screen(contributions, numel)
    if len(accepted) < min_accepted:
        why = "; ".join(f"#{r.index}: {r.reason}" for r in rejected) or "no contributions"
        raise AggregationRefused(f"{len(accepted)} acceptable contributions, need {min_accepted} ({why})")
    rows = torch.stack([contributions[i] for i in accepted])
    return AggregateResult(AGGREGATORS[name](rows), accepted, rejected)
