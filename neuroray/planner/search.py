"""From nodes to a plan (:func:`plan`): architecture, layer ranges (stages), replicas, and which node hosts each holder.

Pure code (no Ray): the inputs are :class:`NodeSpec` values, however they were obtained
(neuroray.planner.cluster reads them from ``ray.nodes()`` or from ``cluster.nodes=[8GB,...]``).

1. **Device.** GPU nodes if the cluster has GPUs (``planner.device=auto``), host memory otherwise.
   A holder on a GPU node takes ``gpus_per_holder`` GPUs (1 if unset) and lives in their memory;
   a CPU holder takes ``cpus_per_holder`` CPUs and a share of its node's host memory.
2. **Architecture.** The scaling law on the pool's total memory M (neuroray.planner.scaling), unless
   the config fixes the model. Every node must hold at least one layer (else a clear error, or it is
   left out with ``planner.exclude_small_nodes=true``). If no partition of the law's model fits, the
   planner walks down the law (M / 1.25 per step) to the largest model that does.
3. **Partition** (:func:`partition_layers`). Contiguous ranges, exactly S of them, minimising the
   largest stage cost ``c = mem/sum(mem) + flops/sum(flops)`` (memory and compute weighted equally)
   by dynamic programming, subject to every stage's holder memory fitting the largest holder slot.
   The embedding counts toward the first stage and the final norm + LM head (+ logits) toward the last.
4. **Replicas** (:func:`assign`). Holders are placed replica by replica, each stage's holder on a
   node with room (largest stage first): inside a replica nodes already used by it come first (PACK),
   across replicas nodes hosting the fewest replicas come first (SPREAD), then the node with the most
   free memory. As many replicas as fit (or ``planner.replicas`` exactly). S is chosen among the
   fewest stages that fit and up to ``S_min + 2`` more: most replicas first, then fewest stages.
5. **Outer step room.** One node (the largest host memory) keeps ``reserve_cpus`` CPUs free and host
   memory for one range's outer-step task (``4 B x P_range x (R + 6)``, neuroray.planner.memory); this
   also bounds the number of replicas.
"""

from __future__ import annotations

import dataclasses
import math

from neuroray.config import ModelConfig
from neuroray.planner import scaling
from neuroray.planner.memory import (
    FLOAT_BYTES,
    format_bytes,
    holder_memory,
    outer_step_bytes,
)
from neuroray.planner.plan_types import (
    EXTRA_STAGES, LAW_STEP, STRATEGIES, NodeSpec, OuterReserve, Plan, PlanError, PlanRequest,
)
from neuroray.planner.partition import memory_table, item_costs, partition_layers
from neuroray.planner.explain import Choice, explain, throughput
from neuroray.planner.links import link_cost, link_loads
from neuroray.planner.assign import pick_device, holder_capacity, outer_node, node_pool, holder_slots, stage_plans, assign


def _try_architecture(cfg: ModelConfig, pool: list[NodeSpec], outer: NodeSpec, req: PlanRequest, device: str):
    """Best ``(stages, placements, outer reserve)`` for a fixed architecture, or ``(None, reason)``."""
    cap = max(holder_capacity(n, req, device) for n in pool)
    table = memory_table(cfg, req)
    costs = item_costs(cfg, req)

    def fits(i, j, first, last):
        return table[j - i, first, last] <= cap

    max_slots = sum(holder_slots(n, req, device) for n in pool)
    usable = sum(holder_capacity(n, req, device) * (1 if device == "cpu" else holder_slots(n, req, device)) for n in pool)
    # Lower bound on S: the stages' memories add up to at least the one-holder model's memory.
    s_lower = max(1, math.ceil(table[cfg.n_layers, True, True] / cap))
    candidates = [req.stages] if req.stages else list(range(min(s_lower, cfg.n_layers), cfg.n_layers + 1))
    best, reason, s_min = None, "", None
    # planner.fill_cores on CPU nodes whose cores are known: every stage count that fits is tried and the one
    # with the most predicted tokens/s kept (explain.throughput); else the fewest stages with the most replicas.
    by_cores = req.fills_cores and device == "cpu" and all(n.cpus is not None for n in pool)
    tried: list[tuple[int, int, float]] = []  # (stages, replicas, predicted cores' worth of work)
    for s in candidates:
        if s > cfg.n_layers:
            reason = f"planner.stages={s} is more than the model's {cfg.n_layers} layers"
            break
        if s_min is not None and s > s_min + EXTRA_STAGES and not by_cores:
            break
        if s > max_slots:
            reason = reason or f"{s} stages need {s} holder slots but the cluster has {max_slots:g}"
            break
        ranges = partition_layers(costs, s, fits)
        if ranges is None:
            reason = (f"no split of {cfg.n_layers} layers into {s} stages fits the largest holder slot "
                      f"({format_bytes(cap)}); the last stage alone (1 layer + head) needs "
                      f"{format_bytes(table[1, cfg.n_layers == 1, True])}")
            continue
        s_min = s if s_min is None else s_min
        stages = stage_plans(cfg, ranges, req)
        replica_bytes = sum(st.memory.total for st in stages)
        # Replicas are bounded by holder slots, by memory, and by the outer-step room one node keeps:
        # 4 B x P_range x (R + 6) <= that node's usable host memory.
        range_bytes = FLOAT_BYTES * max(st.params for st in stages)
        by_outer = int(outer.memory * req.safety_fraction // range_bytes) - 6
        limit = min(max_slots / s, usable / replica_bytes, by_outer)  # "/" not "//": inf // s is nan
        if req.max_replicas:
            limit = min(limit, req.max_replicas)
        want = req.replicas or int(math.floor(limit))
        if by_outer < 1 or req.replicas > by_outer:
            reason = (f"the outer step of a range with {max(want, 1)} replicas needs "
                      f"{format_bytes(outer_step_bytes(max(st.params for st in stages), max(want, 1)))} of host memory "
                      f"but the largest node ({outer.name}) offers {format_bytes(outer.memory * req.safety_fraction)}")
            continue
        if want < 1:
            reason = (f"not even one replica of {s} stages fits: the holders need "
                      f"{', '.join(format_bytes(st.memory.total) for st in stages)}; usable memory per node is "
                      f"{', '.join(format_bytes(holder_capacity(n, req, device)) for n in pool)}")
            continue
        reserve = (outer.node_id, req.reserve_cpus, outer_step_bytes(max(st.params for st in stages), want))
        placed = assign(stages, pool, req, device, want, reserve)
        if req.replicas and len(placed) < req.replicas:
            reason = (f"only {len(placed)} of planner.replicas={req.replicas} replicas of {s} stages fit "
                      f"(one replica needs {format_bytes(replica_bytes)})")
            continue
        if not placed:
            reason = (f"not even one replica of {s} stages fits: the holders need "
                      f"{', '.join(format_bytes(st.memory.total) for st in stages)}; usable memory per node is "
                      f"{', '.join(format_bytes(holder_capacity(n, req, device)) for n in pool)}")
            continue
        tput = throughput(stages, len(placed), req.batch.num_microbatches)
        tried.append((s, len(placed), tput))
        key = (round(tput, 9), len(placed), -s) if by_cores else (len(placed), -s)
        if best is None or key > best[0]:
            best = (key, stages, placed, by_outer)
    if best is None:
        return None, reason or "no stage count fits"
    key, stages, placed, by_outer = best
    bounds = {"holder slots": max_slots / len(stages), "memory": usable / sum(st.memory.total for st in stages),
              "the outer step's host memory": by_outer}
    outer_res = OuterReserve(outer.node_id, outer.name, req.reserve_cpus,
                             outer_step_bytes(max(st.params for st in stages), len(placed)), outer.link_bps)
    note = ""
    if len(placed) == by_outer and not req.replicas:
        note = (f"replicas are limited to {by_outer} by the outer step's host memory on {outer.name} "
                f"({format_bytes(outer_res.task_bytes)} per range task); nodes with more host memory allow more")
    return (stages, placed, outer_res, note, Choice(tried, by_cores, bounds, key)), ""


OUTER_CANDIDATES = 8  # with link rates: how many nodes (distinct rate and memory) are tried for the outer step


def _try_outers(cfg: ModelConfig, pool: list[NodeSpec], alive: list[NodeSpec], req: PlanRequest, device: str,
                assemble):
    """:func:`_try_architecture` with the outer step's node chosen.

    Without link rates: :func:`outer_node` (most host memory), as always. With them, the best-connected
    nodes first, up to OUTER_CANDIDATES of distinct (rate, memory), each keeping the outer step in turn;
    kept is the best plan by the stage search's own key (replicas, or predicted work), then the fewest
    seconds per step on its busiest link: the outer node's room can push a replica onto a slow link, and
    the best-connected node is not always the best place for it.
    """
    first = outer_node(alive)
    if not any(n.link_bps > 0 for n in alive):
        return _try_architecture(cfg, pool, first, req, device)
    cost = link_cost(alive)
    order = sorted(alive, key=lambda n: (cost[n.node_id], -n.memory, n is not first, not n.is_head))
    seen, best, reason = set(), None, ""
    for n in order:
        if (cost[n.node_id], n.memory) in seen:
            continue
        seen.add((cost[n.node_id], n.memory))
        if len(seen) > OUTER_CANDIDATES:
            break
        result, why = _try_architecture(cfg, pool, n, req, device)
        if result is None:
            reason = reason or why
            continue
        busiest = max((ld.seconds_per_step or 0.0 for ld in link_loads(assemble(result))), default=0.0)
        key = (result[4].key, -busiest)
        if best is None or key > best[0]:
            best = (key, result)
    return (best[1], "") if best else (None, reason)


def plan(nodes: list[NodeSpec], req: PlanRequest) -> Plan:
    """The plan for ``nodes`` (see the module docstring); raises :class:`PlanError` when none exists."""
    if not nodes:
        raise PlanError("no nodes to plan for; start Ray workers or pass cluster.nodes=[8GB,...]")
    for key, value in (("within_replica", req.within_replica), ("across_replicas", req.across_replicas)):
        allowed = STRATEGIES if key == "within_replica" else ("PACK", "SPREAD")
        if value not in allowed:
            raise PlanError(f"planner.{key}={value} is unknown; use one of {', '.join(allowed)}")
    device = pick_device(nodes, req)
    req = req.on(device)
    pool, excluded = node_pool(nodes, req, device)
    if not pool:
        raise PlanError("no node can host a stage holder (" + "; ".join(f"{n}: {w}" for n, w in excluded)
                        + "); add nodes or lower cluster.cpus_per_holder")
    notes: list[str] = []
    while True:  # leaving out a small node lowers M, which may change the law's model
        law_memory = sum(n.device_memory(device) for n in pool)
        cfg = req.model or scaling.architecture_for_memory(law_memory, req.base_model)
        one_layer = holder_memory(cfg, req.vocab_size, 1, has_embedding=False, has_head=False, batch=req.batch,
                                  overhead=req.holder_overhead, snapshots=req.snapshots).total
        small = [n for n in pool if holder_capacity(n, req, device) < one_layer]
        if not small:
            break
        if not req.exclude_small_nodes:
            n = small[0]
            raise PlanError(
                f"node {n.name} is too small for even one layer of {scaling.describe(cfg)}: a holder of one layer "
                f"needs {format_bytes(one_layer)}, the node offers {format_bytes(holder_capacity(n, req, device))} "
                f"({req.safety_fraction:g} of {format_bytes(holder_capacity(n, req, device) / req.safety_fraction)}); "
                "remove it, give it more memory, or set planner.exclude_small_nodes=true"
            )
        excluded += [(n.name, f"too small for one layer ({format_bytes(one_layer)})") for n in small]
        pool = [n for n in pool if n not in small]
        if not pool:
            raise PlanError("every node is too small for one layer; add memory or plan a smaller model")
    law_cfg, first_reason, m = cfg, "", float(law_memory)
    # The outer-step tasks run on host memory: any alive node may keep their room, GPU or not.
    alive = [n for n in nodes if n.alive]

    def assemble(result) -> Plan:
        stages, placed, outer, _, _ = result
        return Plan(
            model=cfg, vocab_size=req.vocab_size, device=device, law_memory=law_memory, nodes=tuple(pool),
            stages=tuple(stages), holders=tuple(tuple(rep) for rep in placed), within_replica=req.within_replica,
            across_replicas=req.across_replicas, outer=outer, safety_fraction=req.safety_fraction,
            excluded=tuple(excluded), batch=req.batch, inner_steps=req.inner_steps,
            compression=req.compression, sync_value_bytes=req.sync_value_bytes,
        )

    while True:
        result, reason = _try_outers(cfg, pool, alive, req, device, assemble)
        if result is not None:
            break
        first_reason = first_reason or reason
        if req.model is not None:
            raise PlanError(f"cannot place {scaling.describe(cfg)}: {reason}; lower data.microbatch_size, "
                            "add nodes, or choose a smaller model")
        smaller = cfg  # walk down the law until its rounded model changes
        while smaller == cfg and m > 1e6:
            m /= LAW_STEP
            smaller = scaling.architecture_for_memory(m, req.base_model)
        if smaller == cfg:
            raise PlanError(f"not even the smallest model fits: {reason}; add memory or lower data.microbatch_size")
        cfg = smaller
    if cfg != law_cfg:
        notes.append(f"the law gives {scaling.describe(law_cfg)} for {format_bytes(law_memory)} but it does not fit "
                     f"({first_reason}); planned the law's model for {format_bytes(m)} instead")
    note, choice = result[3], result[4]
    if note:
        notes.append(note)
    out = dataclasses.replace(assemble(result), notes=tuple(notes))
    return dataclasses.replace(out, why=tuple(explain(out, req, choice, alive)))
