"""Why a plan is what it is: the throughput rule that picks the stage count on CPU nodes, and the
"why: ..." lines ``format_plan`` prints (memory source, cores, stage/replica choice, links).

**The rule on CPU nodes** (``planner.fill_cores``). A CPU holder computes on ``cluster.torch_threads``
cores, so a node hosts at most ``(CPUs - reserve) / threads`` holders: more would only share cores.
A replica of S stages keeps at most S cores busy, less its pipeline bubble (GPipe order: of
``m + S - 1`` microbatch slots per stage, m do work) and less its imbalance (every stage waits for
the slowest), so the work done per unit of time is, in cores' worth,

    throughput = R x (sum of stage FLOPs / largest stage FLOPs) x m / (m + S - 1)

R replicas of one stage are therefore worth R cores and beat one replica of R stages; the planner
adds stages when memory caps the replicas below the cores (a big model: each replica holds
28 B/parameter), because then the cores a replica cannot have are only used by splitting it.
Among equal predictions: more replicas, then fewer stages. This ignores DiLoCo's statistics
(more replicas train on more data per round but each sees less) and the hop and sync traffic,
which on one node is local.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from neuroray.planner import scaling
from neuroray.planner.links import format_rate, link_cost
from neuroray.planner.memory import format_bytes


def throughput(stages, replicas: int, microbatches: int) -> float:
    """Predicted work per unit of time, in cores' worth (module docstring)."""
    flops = [st.flops_per_token for st in stages]
    s, m = len(stages), max(microbatches, 1)
    return replicas * (sum(flops) / max(flops)) * m / (m + s - 1)


@dataclass(frozen=True)
class Choice:
    """What the stage search tried and what bound the replicas (for the why lines)."""

    tried: list = field(default_factory=list)  # (stages, replicas, throughput)
    by_cores: bool = False
    bounds: dict = field(default_factory=dict)  # what limits replicas -> the most it allows
    key: tuple = ()  # the search's score of the kept candidate (compared across outer-step nodes)


def _memory_line(plan, req, nodes) -> str:
    sources = sorted({n.memory_source or "ray resource" for n in plan.nodes})
    what = "GPU memory" if plan.device == "gpu" else "host memory"
    line = (f"memory: {format_bytes(plan.law_memory)} of {what} on {len(plan.nodes)} node"
            f"{'s' if len(plan.nodes) != 1 else ''}")
    if plan.device == "cpu":
        line += f" (from {', '.join(sources)})"
        ray_mem = [n for n in plan.nodes if n.ray_memory and n.ray_memory != n.memory]
        if ray_mem:
            line += (f"; Ray's memory resource says {format_bytes(sum(n.ray_memory for n in ray_mem))} (about 70 % "
                     "of what was free when Ray started, so it varies run to run); bundles ask for that share")
    what = "the config's" if req.model is not None else "the law's"
    return line + f" -> {what} {scaling.describe(plan.model)}"


def _cores_line(plan, req) -> str:
    total = sum(n.cpus for n in plan.nodes)
    per = req.cores_per_holder
    slots = sum(int(max(n.cpus - (req.reserve_cpus if n.node_id == plan.outer.node_id else 0), 0) // per)
                for n in plan.nodes)
    return (f"cores: {total:g} CPUs - {req.reserve_cpus:g} kept on {plan.outer.node_name} for the driver and the "
            f"outer step, {per:g} per holder (cluster.torch_threads={req.threads_per_holder:g}) -> at most {slots} "
            f"holders (stages x replicas); the plan uses {sum(len(r) for r in plan.holders)}")


def _choice_line(plan, req, choice: Choice) -> str:
    S, R = plan.num_stages, plan.replicas
    if req.stages:
        return f"stages: {S} (planner.stages)"
    seen = ", ".join(f"{s}x{r} {t:.2f}" for s, r, t in choice.tried)
    if choice.by_cores:
        m = req.batch.num_microbatches
        return (f"stages x replicas: chose {S} x {R} for the most predicted work, replicas x balance x m/(m+S-1) "
                f"with m={m} microbatches (GPipe bubble), in cores' worth: {seen}")
    tried = ", ".join(f"{s}x{r}" for s, r, _ in choice.tried)
    return f"stages x replicas: the fewest stages with the most replicas (tried {tried})"


def _replica_line(plan, req, choice: Choice) -> str:
    if req.replicas:
        return f"replicas: {req.replicas} (planner.replicas)"
    bounds = dict(choice.bounds)
    if req.max_replicas:
        bounds["planner.max_replicas"] = req.max_replicas
    parts = ", ".join(f"{k} {v:.1f}" if v != float("inf") else f"{k} unbounded" for k, v in bounds.items())
    return f"replicas: {plan.replicas} (at most, by {parts}; whole replicas placed node by node)"


def _links_line(plan, nodes) -> str | None:
    rated = [n for n in nodes if n.link_bps > 0]
    if not rated:
        return None
    cost = link_cost(nodes)
    slow = max(nodes, key=lambda n: cost[n.node_id])
    line = (f"links: outer step on {plan.outer.node_name} (of the best-connected nodes, the one whose plan has the "
            f"fewest s/step on its busiest link); a byte on a node's uplink costs fastest/its rate, SPREAD counts "
            f"replicas x that cost")
    if cost[slow.node_id] > 1:
        line += f" ({slow.name} at {format_rate(slow.link_bps)}: x{cost[slow.node_id]:.3g}, takes replicas last)"
    return line


def explain(plan, req, choice: Choice, nodes) -> list[str]:
    """The why lines of ``plan`` (printed by ``format_plan``)."""
    lines = [_memory_line(plan, req, nodes)]
    if choice.by_cores:
        lines.append(_cores_line(plan, req))
    lines += [_choice_line(plan, req, choice), _replica_line(plan, req, choice)]
    links = _links_line(plan, nodes)
    if links:
        lines.append(links)
    return lines
