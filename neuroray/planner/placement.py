"""Ray placement groups for stage holders: one bundle per holder, one group per pipeline replica.

Holders of one replica talk on every microbatch, so a replica's bundles are PACKed onto as few
nodes as possible; replicas only talk at outer steps and may sit anywhere.
"""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from neuroray.errors import NeurorayError


class PlacementError(NeurorayError):
    """The cluster cannot host the requested holders."""


def _need(num_stages: int, cpus: float, gpus: float) -> dict:
    bundle = {"CPU": cpus} if cpus > 0 else {}
    if gpus > 0:
        bundle["GPU"] = gpus
    return bundle


def reserve_replicas(replicas: int, num_stages: int, cpus: float, gpus: float, timeout_s: float, strategy: str = "PACK") -> list:
    """Create and wait for one placement group per replica; a clear error lists what is missing."""
    bundle = _need(num_stages, cpus, gpus)
    if not bundle:  # zero-resource holders need no reservation
        return [None] * replicas
    total = {k: v * replicas * num_stages for k, v in bundle.items()}
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in total.items() if have.get(k, 0.0) + 1e-9 < v}
    if short:
        missing = ", ".join(f"{k}: need {v:g}, cluster has {h:g}" for k, (v, h) in short.items())
        raise PlacementError(
            f"cannot place {replicas} replicas x {num_stages} stages ({missing}); lower diloco.replicas, "
            "swarm.num_stages or cluster.cpus_per_holder/gpus_per_holder, or add nodes"
        )
    groups = [placement_group([dict(bundle) for _ in range(num_stages)], strategy=strategy, name=f"neuroray-replica-{r}")
              for r in range(replicas)]
    for r, pg in enumerate(groups):
        if not pg.wait(timeout_seconds=timeout_s):
            free = ray.available_resources()
            release(groups)
            raise PlacementError(
                f"placement group of replica {r} ({num_stages} x {bundle}) not ready after {timeout_s:g}s; "
                f"free now: CPU {free.get('CPU', 0):g}, GPU {free.get('GPU', 0):g}; "
                "free resources or raise cluster.actor_start_timeout_s"
            )
    return groups


def bundle_strategy(pg, index: int):
    return None if pg is None else PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)


def release(groups: list) -> None:
    for pg in groups:
        if pg is not None:
            remove_placement_group(pg)
