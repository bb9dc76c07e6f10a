"""Ray placement groups for stage holders: one bundle per holder, one group per pipeline replica.

Holders of one replica talk on every microbatch, so a replica's bundles are PACKed onto as few
nodes as possible; replicas only talk at outer steps and may sit anywhere.

Two entry points:

* :func:`reserve_plan` reserves a :class:`~neuroray.planner.partition.Plan`: each bundle asks for the
  holder's CPUs, GPUs and host memory (Ray's ``memory`` resource) and is pinned to the node the plan
  chose with the ``ray.io/node-id`` label selector, so Ray puts it exactly where the planner counted
  its memory; the group's strategy is ``planner.within_replica``. The plan already kept
  ``planner.reserve_cpus`` CPUs and the outer step's host memory free on one node, so the outer-step
  tasks (neuroray.diloco.sync) can always run.
* :func:`reserve_replicas` is the uniform form for a fixed config (R x S equal bundles, no pinning).

Both wait with ``pg.wait(timeout)`` and, when a group is not ready, remove what they created and
raise :class:`PlacementError` naming each bundle that cannot be placed and what its node lacks.
"""

from __future__ import annotations

import math

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from neuroray.planner.memory import format_bytes
from neuroray.planner.plan_types import Plan, PlanError

NODE_LABEL = "ray.io/node-id"  # Ray labels every node with its id; bundles select on it


class PlacementError(PlanError):
    """The cluster cannot host the requested holders (now)."""


def _fmt(resources: dict) -> str:
    return ", ".join(f"{k} {format_bytes(v) if k == 'memory' else f'{v:g}'}" for k, v in sorted(resources.items()))


def _free_by_node() -> dict[str, dict]:
    """Available resources per alive node (Ray's state API; falls back to totals if it moves)."""
    try:
        from ray._private.state import available_resources_per_node

        return available_resources_per_node()
    except Exception:  # a private API: on any change, report totals rather than fail the error path
        return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n.get("Alive")}


def missing_for(bundles: list[dict], node_ids: list[str | None]) -> list[str]:
    """Why each bundle cannot be placed now: its node is gone, or lacks a resource (what it has free)."""
    free = _free_by_node()
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    cluster_free = ray.available_resources()
    problems, want_by_node = [], {}
    for i, (bundle, node) in enumerate(zip(bundles, node_ids)):
        if node is not None and node not in alive:
            problems.append(f"bundle {i}: node {node[:8]} is not in the cluster")
            continue
        pool = free.get(node, {}) if node is not None else cluster_free
        want = want_by_node.setdefault(node, {})
        for k, v in bundle.items():
            want[k] = want.get(k, 0.0) + v
        short = {k: v for k, v in want.items() if pool.get(k, 0.0) + 1e-6 < v}
        if short:
            where = f"node {node[:8]}" if node is not None else "the cluster"
            problems.append(f"bundle {i} needs {_fmt(bundle)}; {where} has free "
                            f"{_fmt({k: pool.get(k, 0.0) for k in short})}")
    return problems


def _wait_all(groups: list, timeout_s: float, describe, node_ids_of, bundles_of) -> None:
    for r, pg in enumerate(groups):
        if pg is None or pg.wait(timeout_seconds=timeout_s):
            continue
        problems = missing_for(bundles_of(r), node_ids_of(r)) or ["resources are held by other work"]
        release(groups)
        raise PlacementError(
            f"placement group of replica {r} ({describe(r)}) not ready after {timeout_s:g}s: "
            f"{'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}; free those resources, add nodes, "
            "or raise cluster.actor_start_timeout_s"
        )


def reserve_plan(plan: Plan, timeout_s: float, name: str = "neuroray") -> list:
    """One placement group per replica of ``plan``, bundles pinned to the planned nodes; waits for all."""
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    unknown = sorted({h.node_name for rep in plan.holders for h in rep if h.node_id not in alive})
    if unknown:
        raise PlacementError(
            f"the plan puts holders on nodes that are not in this Ray cluster ({', '.join(unknown[:3])}); "
            "replan with neuroray.planner.plan_for_cluster on the live cluster (not cluster.nodes)"
        )
    groups = []
    for r in range(plan.replicas):
        # named by the holders' replica number: a plan of replicas added mid-run starts after the running ones
        groups.append(placement_group(
            plan.bundles(r), strategy=plan.within_replica, name=f"{name}-replica-{plan.holders[r][0].replica}",
            bundle_label_selector=[{NODE_LABEL: node} for node in plan.node_ids(r)],
        ))
    _wait_all(groups, timeout_s, lambda r: f"{plan.num_stages} stage(s) on {', '.join(sorted(set(plan.node_ids(r))))}",
              plan.node_ids, plan.bundles)
    return groups


def reserve_replicas(replicas: int, num_stages: int, cpus: float, gpus: float, timeout_s: float,
                     strategy: str = "PACK") -> list:
    """One group of ``num_stages`` equal bundles per replica (no pinning); waits for all."""
    bundle = {"CPU": cpus} if cpus > 0 else {}
    if gpus > 0:
        bundle["GPU"] = gpus
    if not bundle:  # zero-resource holders need no reservation
        return [None] * replicas
    total = {k: v * replicas * num_stages for k, v in bundle.items()}
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in total.items() if have.get(k, 0.0) + 1e-9 < v}
    if short:
        missing = ", ".join(f"{k}: need {v:g}, cluster has {h:g}" for k, (v, h) in short.items())
        holders = replicas * num_stages
        # the largest per-holder share that fits, rounded down to what an override can say exactly
        fits = "; ".join(f"cluster.{'cpus' if k == 'CPU' else 'gpus'}_per_holder={math.floor(h / holders * 100) / 100:g} "
                         "fits" for k, (_, h) in short.items() if h / holders >= 0.01)
        raise PlacementError(
            f"cannot place {replicas} replicas x {num_stages} stages ({missing}); lower diloco.replicas, "
            "swarm.num_stages or cluster.cpus_per_holder/gpus_per_holder, or add nodes" + (f" ({fits})" if fits else "")
        )
    groups = [placement_group([dict(bundle) for _ in range(num_stages)], strategy=strategy, name=f"neuroray-replica-{r}")
              for r in range(replicas)]
    _wait_all(groups, timeout_s, lambda r: f"{num_stages} x {_fmt(bundle)}", lambda r: [None] * num_stages,
              lambda r: [bundle] * num_stages)
    return groups


def bundle_strategy(pg, index: int):
    """Scheduling strategy that runs an actor in bundle ``index`` of ``pg`` (None: no group)."""
    return None if pg is None else PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)


def release(groups: list) -> None:
    for pg in groups:
        if pg is not None:
            remove_placement_group(pg)
