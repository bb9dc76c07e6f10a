"""The outer step as Ray tasks: one task per layer range, all ranges in parallel.

theta0 and the outer momentum of every range live in Ray's object store, owned by the training
driver (:class:`OuterSync`). Each round, every holder of a range puts its pseudo-gradient
``theta0 - theta`` in the object store; the range's task receives them as object refs, screens and
aggregates them, applies the outer optimizer to **theta0** and returns the new theta0 and momentum.
Every holder of the range then loads the new theta0, so all of them restart identical.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import ray
import torch

from neuroray.config import DilocoConfig
from neuroray.diloco.aggregate import AggregationRefused, aggregate
from neuroray.diloco.outer import OuterOptimizer

log = logging.getLogger(__name__)


@dataclass
class OuterReport:
    range_index: int
    accepted: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (holder index, reason)
    refused: str = ""  # non-empty: the step was refused and theta0 left unchanged


def outer_step(aggregator: str, diloco: DilocoConfig, range_index: int, theta0: torch.Tensor,
               momentum: torch.Tensor | None, *deltas: torch.Tensor):
    """Aggregate the range's pseudo-gradients and apply the outer optimizer to theta0.

    Returns ``(new_theta0, new_momentum, report)``; a refused step returns the inputs unchanged.
    """
    report = OuterReport(range_index)
    try:
        result = aggregate(aggregator, deltas, theta0.numel())
    except AggregationRefused as exc:
        report.refused = str(exc)
        return theta0, momentum, report
    report.accepted = result.accepted
    report.rejected = [(r.index, r.reason) for r in result.rejected]
    opt = OuterOptimizer(diloco.outer_lr, diloco.outer_momentum, diloco.nesterov)
    opt.buf = None if momentum is None else momentum.clone()
    new_theta0 = opt.step(theta0, result.value.to(theta0.dtype))
    return new_theta0, opt.buf, report


# The holders may occupy every CPU; an outer step must still be schedulable.
outer_step_task = ray.remote(num_cpus=0, num_returns=3)(outer_step)


class OuterSync:
    """Driver-side owner of every range's theta0 and momentum (as object refs)."""

    def __init__(self, holders_by_range: list[list], diloco: DilocoConfig, aggregator: str):
        self.holders_by_range, self.diloco, self.aggregator = holders_by_range, diloco, aggregator
        # Holders start from the same seeded init, so the first holder's weights are every holder's theta0.
        self.theta0 = [holders[0].flat_params.remote() for holders in holders_by_range]
        self.momentum: list = [None] * len(holders_by_range)
        self.rounds = 0

    def submit(self) -> tuple[list, list]:
        """Submit one outer step for every range; returns (report refs, holder load refs)."""
        reports, loads = [], []
        for s, holders in enumerate(self.holders_by_range):
            deltas = [h.pseudo_gradient.remote() for h in holders]
            theta0, momentum, report = outer_step_task.remote(
                self.aggregator, self.diloco, s, self.theta0[s], self.momentum[s], *deltas)
            self.theta0[s], self.momentum[s] = theta0, momentum
            reports.append(report)
            loads += [h.load_theta0.remote(theta0) for h in holders]
        self.rounds += 1
        return reports, loads
