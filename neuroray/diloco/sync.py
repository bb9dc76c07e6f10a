"""The outer step as Ray tasks: one reduce task per layer range.

Every holder of a range puts its pseudo-gradient in the object store; the reduce task receives
them as object refs (Ray resolves them where the task runs), screens and aggregates them, and
returns the aggregated pseudo-gradient. Every holder of the range then applies the same outer
step to its own copy of theta0 and momentum, so all holders of a range restart identical.
"""

from __future__ import annotations

import logging

import ray

from neuroray.diloco.aggregate import aggregate

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)  # the holders may occupy every CPU; a reduce must still be schedulable
def reduce_range(aggregator: str, range_index: int, numel: int, *deltas):
    result = aggregate(aggregator, deltas, numel)
    for r in result.rejected:
        log.warning("range %d: rejected contribution of holder #%d: %s", range_index, r.index, r.reason)
    return result.value


def outer_sync(holders_by_range: list[list], aggregator: str, numels: list[int]) -> list:
    """Submit one outer step for every layer range; returns the refs of the holders' apply calls."""
    applied = []
    for s, holders in enumerate(holders_by_range):
        deltas = [h.pseudo_gradient.remote() for h in holders]
        agg = reduce_range.remote(aggregator, s, numels[s], *deltas)
        applied += [h.apply_outer.remote(agg) for h in holders]
    return applied
