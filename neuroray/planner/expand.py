"""Placing replicas of a model whose split is already fixed, beside holders that already run (pure).

:func:`~neuroray.planner.partition.plan` plans an empty cluster: it chooses the architecture and the
split. Two moments need less and more than that:

* **Nodes joined mid-run** (``planner.add_replicas``, neuroray.planner.upgrade): the running swarm keeps
  its holders, model and split, so new replicas must use the *running* (possibly just grown) model and
  ranges, or they could not join the ranges' outer steps, and must fit in what the running holders
  leave free on every node (counted at the running model's size, so a grown holder counts grown).
* **Resuming a ``model=auto`` run**: the snapshots fix the model, the split and the number of
  replicas (after an upgrade they are not what the law would plan for the cluster today); only the
  nodes are chosen anew.

Both go through :func:`place_ranges`, which uses the planner's own accounting and replica assignment
(:func:`~neuroray.planner.partition.assign`): per node, ``safety_fraction`` of its memory, and one node
keeps ``planner.reserve_cpus`` CPUs and host memory for an outer step of *all* the replicas (the running
ones and the new ones) -- the node with the most host memory left, as the planner picks it.
"""

from __future__ import annotations

import dataclasses

from neuroray.config import ModelConfig, TrainConfig
from neuroray.planner import scaling
from neuroray.planner.cluster import cluster_nodes, request_from_config
from neuroray.planner.memory import outer_step_bytes
from neuroray.planner.assign import assign, node_pool, pick_device, stage_plans
from neuroray.planner.plan_types import HolderPlacement, NodeSpec, OuterReserve, Plan, PlanError, PlanRequest


def remaining(pool: list[NodeSpec], running: list[HolderPlacement], needs: list[int], req: PlanRequest,
              device: str) -> list[NodeSpec]:
    """The nodes as seen by new holders: CPUs, GPUs and host memory the ``running`` holders take are gone.

    A running holder takes ``needs[stage]`` (its size at the running model) of its node's usable host
    memory on CPU nodes, ``holder_overhead`` of host memory on GPU nodes (it lives in its GPUs). Holders
    on nodes that left take nothing.
    """
    used: dict[str, list[float]] = {}
    for h in running:
        u = used.setdefault(h.node_id, [0.0, 0.0, 0.0])
        u[0] += needs[h.stage] if device == "cpu" else req.holder_overhead
        u[1] += h.cpus
        u[2] += h.gpus
    out = []
    for n in pool:
        host, cpus, gpus = used.get(n.node_id, (0.0, 0.0, 0.0))
        # assign() fills safety_fraction of ``memory``; what the running holders fill comes off before it
        out.append(dataclasses.replace(n, memory=max(int(n.memory - host / req.safety_fraction), 0),
                                       cpus=None if n.cpus is None else max(n.cpus - cpus, 0.0),
                                       gpus=max(n.gpus - gpus, 0.0)))
    return out


def place_ranges(nodes: list[NodeSpec], req: PlanRequest, model: ModelConfig, ranges: list[tuple[int, int]], *,
                 running: list[list[HolderPlacement]] = (), device: str | None = None, count: int = 0,
                 most: int = 0) -> Plan:
    """A plan of new replicas of ``model`` split into ``ranges``, numbered after ``running``'s replicas.

    ``count``: exactly this many (fewer fitting is a plan with fewer holders: the caller says what that
    means); else as many as fit, at most ``most``. ``device``: the running swarm's (GPU or host memory);
    None: as :func:`~neuroray.planner.partition.plan` decides it. The plan's ``holders`` are the new
    replicas only; its ``outer`` is where the outer step of all of them is counted.
    """
    device = device or pick_device(nodes, req)
    req = req.on(device)
    pool, excluded = node_pool(nodes, req, device)
    stages = stage_plans(model, list(ranges), req)
    running_holders = [h for rep in running for h in rep]
    free = remaining(pool, running_holders, [st.memory.total for st in stages], req, device)
    base = len(running)
    range_params = max(st.params for st in stages)
    placed, outer = [], None
    if free:
        outer = max(free, key=lambda n: (n.memory, n.is_head))

        def attempt(k: int) -> list[list[HolderPlacement]]:
            reserve = (outer.node_id, req.reserve_cpus, outer_step_bytes(range_params, base + k))
            return assign(stages, free, req, device, k, reserve)

        if count:
            placed = attempt(count)
        else:  # the outer step's room grows with the number of replicas: try 1, 2, ... new ones in turn
            for k in range(1, most + 1):
                got = attempt(k)
                if len(got) < k:
                    break
                placed = got
    holders = tuple(tuple(dataclasses.replace(h, replica=base + r) for h in rep) for r, rep in enumerate(placed))
    reserve = OuterReserve(outer.node_id if outer else "", outer.name if outer else "", req.reserve_cpus,
                           outer_step_bytes(range_params, base + len(holders)))
    return Plan(model=model, vocab_size=req.vocab_size, device=device,
                law_memory=sum(n.device_memory(device) for n in pool), nodes=tuple(pool), stages=tuple(stages),
                holders=holders, within_replica=req.within_replica, across_replicas=req.across_replicas,
                outer=reserve, safety_fraction=req.safety_fraction, excluded=tuple(excluded))


def plan_recorded(cfg: TrainConfig, model: ModelConfig, ranges: list[tuple[int, int]], replicas: int) -> Plan:
    """The plan that resumes a ``model=auto`` run: the snapshots' model, split and replica count, placed
    on the cluster's nodes today (:func:`place_ranges`); PlanError when they no longer fit."""
    placed = place_ranges(cluster_nodes(cfg), request_from_config(cfg), model, ranges, count=replicas)
    if placed.replicas < replicas:
        raise PlanError(f"resume: the snapshots hold {replicas} replicas of {scaling.describe(model)} in "
                        f"{len(ranges)} ranges, but only {placed.replicas} fit on this cluster now; add nodes "
                        "(or memory) and resume again")
    return placed
