"""Replicas onto nodes: which node hosts each stage's holder, replica by replica (step 4 of
neuroray/planner/search.py's plan), and the device, pool and slots those decisions read."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from neuroray.config import ModelConfig
from neuroray.planner import scaling
from neuroray.planner.links import link_cost
from neuroray.planner.memory import holder_memory
from neuroray.planner.plan_types import HolderPlacement, NodeSpec, PlanError, PlanRequest, StagePlan


@dataclass
class _Free:
    node: NodeSpec
    host: float  # usable host bytes left
    cpus: float
    gpus: float
    replicas: set = field(default_factory=set)


def holder_cpus(req: PlanRequest, device: str, node: NodeSpec | None = None) -> float:
    """CPUs a holder takes: with planner.fill_cores a CPU holder on a node of known CPUs takes the cores it
    computes on (a hand-written node list has no CPU count, and its bundles ask what they always did)."""
    known = node is None or node.cpus is not None
    return req.cores_per_holder if req.fills_cores and device == "cpu" and known else req.cpus_per_holder


def _holder_fits(f: _Free, need: int, req: PlanRequest, device: str, gpus_per: float) -> bool:
    if f.cpus + 1e-9 < holder_cpus(req, device, f.node):
        return False
    if device == "gpu":
        slot = gpus_per * f.node.gpu_memory * req.safety_fraction
        return f.gpus + 1e-9 >= gpus_per and need <= slot and f.host >= req.holder_overhead
    return f.host >= need


def assign(stages: list[StagePlan], nodes: list[NodeSpec], req: PlanRequest, device: str, max_replicas: int,
           reserve: tuple[str, float, int] | None) -> list[list[HolderPlacement]]:
    """Place up to ``max_replicas`` whole replicas (see the module docstring for the order).

    ``reserve`` = (node_id, cpus, host bytes) withheld from holders for the outer-step tasks.

    With link rates declared, a byte on a node's uplink costs ``fastest rate / its rate``: SPREAD counts a
    node's replicas times that cost (a 10x slower node takes a replica once the fast ones hold ten each, or
    are full), and among otherwise equal nodes the faster one wins, so a replica that must span nodes is
    cut on the fastest links. Without rates every cost is 1 and the order is exactly the one above.
    """
    gpus_per = (req.gpus_per_holder or 1.0) if device == "gpu" else 0.0
    cost = link_cost(nodes)
    free = []
    for n in nodes:
        f = _Free(n, n.memory * req.safety_fraction, math.inf if n.cpus is None else n.cpus, n.gpus)
        if reserve is not None and n.node_id == reserve[0]:
            f.cpus -= reserve[1]
            f.host -= reserve[2]
        free.append(f)
    order = sorted(range(len(stages)), key=lambda s: -stages[s].memory.total)
    placed: list[list[HolderPlacement]] = []
    for r in range(max_replicas):
        snapshot = [(f.host, f.cpus, f.gpus, set(f.replicas)) for f in free]
        mine: dict[int, HolderPlacement] = {}
        used: set[int] = set()
        ok = True
        for s in order:
            need = stages[s].memory.total
            best = None
            for idx, f in enumerate(free):
                if not _holder_fits(f, need, req, device, gpus_per):
                    continue
                if req.within_replica == "STRICT_SPREAD" and idx in used:
                    continue
                if req.within_replica == "STRICT_PACK" and used and idx not in used:
                    continue
                inside = 0 if (idx in used) == (req.within_replica in ("PACK", "STRICT_PACK")) else 1
                c = cost[f.node.node_id]
                across = (len(f.replicas) + 1) * c if req.across_replicas == "SPREAD" else -len(f.replicas)
                room = f.gpus * f.node.gpu_memory if device == "gpu" else f.host
                key = (inside, across, c, -room, idx)
                if best is None or key < best[0]:
                    best = (key, idx)
            if best is None:
                ok = False
                break
            f = free[best[1]]
            cpus_per = holder_cpus(req, device, f.node)
            f.cpus -= cpus_per
            if device == "gpu":
                f.gpus -= gpus_per
                f.host -= req.holder_overhead
                host = req.holder_overhead
            else:
                f.host -= need
                host = need
            f.replicas.add(r)
            used.add(best[1])
            mine[s] = HolderPlacement(r, s, f.node.node_id, f.node.name, cpus_per, gpus_per, int(host), need,
                                      int(host * _bundle_scale(f.node, req)))
        if not ok:
            for f, (h, c, g, reps) in zip(free, snapshot):
                f.host, f.cpus, f.gpus, f.replicas = h, c, g, reps
            break
        placed.append([mine[s] for s in range(len(stages))])
    return placed


def _bundle_scale(n: NodeSpec, req: PlanRequest) -> float:
    """Ray's ``memory`` resource may be less than the memory planned for (about 70 % of what was free when
    Ray started, against MemTotal): bundles then ask for proportionally less, so a plan that fits the
    node's memory also fits Ray's resource, which is only bookkeeping (Ray does not cap a process's memory)."""
    planned = n.memory * req.safety_fraction
    return min(1.0, n.ray_memory / planned) if n.ray_memory and planned > 0 else 1.0


# ----- the planner ---------------------------------------------------------------------------------

def pick_device(nodes: list[NodeSpec], req: PlanRequest) -> str:
    has_gpus = any(n.gpus > 0 for n in nodes)
    demands = req.device == "gpu" or req.gpus_per_holder > 0
    if demands and not has_gpus:
        why = "planner.device=gpu" if req.device == "gpu" else f"cluster.gpus_per_holder={req.gpus_per_holder:g}"
        raise PlanError(f"the config demands GPUs ({why}) but the cluster has none; add GPU nodes, or set "
                        "cluster.gpus_per_holder=0 and planner.device=cpu")
    if req.device == "cpu" and req.gpus_per_holder > 0:
        raise PlanError("planner.device=cpu contradicts cluster.gpus_per_holder>0; set one of them differently")
    return "gpu" if has_gpus and req.device != "cpu" else "cpu"


def holder_capacity(n: NodeSpec, req: PlanRequest, device: str) -> float:
    """The most device memory one holder may use on ``n``."""
    if device == "gpu":
        return (req.gpus_per_holder or 1.0) * n.gpu_memory * req.safety_fraction
    return n.memory * req.safety_fraction


def node_pool(nodes: list[NodeSpec], req: PlanRequest, device: str) -> tuple[list[NodeSpec], list[tuple[str, str]]]:
    """Nodes that can run a holder at all (alive, enough CPUs, GPUs in GPU mode), and the others."""
    gpus_per = (req.gpus_per_holder or 1.0) if device == "gpu" else 0.0
    pool, excluded = [], []
    for n in nodes:
        if not n.alive:
            continue
        if n.cpus is not None and n.cpus + 1e-9 < holder_cpus(req, device, n):
            per = holder_cpus(req, device, n)
            why = (f"cluster.cpus_per_holder={per:g}" if per == req.cpus_per_holder
                   else f"{per:g} per holder (planner.fill_cores: cluster.torch_threads)")
            excluded.append((n.name, f"{n.cpus:g} CPUs < {why}"))
        elif device == "gpu" and n.gpus + 1e-9 < gpus_per:
            excluded.append((n.name, f"{n.gpus:g} GPUs < {gpus_per:g} per holder"))
        elif device == "gpu" and n.gpu_memory <= 0:
            raise PlanError(
                f"node {n.name} has {n.gpus:g} GPUs of unknown memory (Ray does not track GPU memory); declare it, "
                "e.g. ray start --resources='{\"gpu_memory_gib\": 80}' (total GiB, planner.gpu_memory_resource), "
                "or keep planner.probe_gpu_memory=true on a node with CUDA"
            )
        else:
            pool.append(n)
    return pool, excluded


def stage_plans(cfg: ModelConfig, ranges: list[tuple[int, int]], req: PlanRequest) -> list[StagePlan]:
    out = []
    for i, (a, b) in enumerate(ranges):
        first, last = i == 0, i == len(ranges) - 1
        mem = holder_memory(cfg, req.vocab_size, b - a, has_embedding=first, has_head=last, batch=req.batch,
                            overhead=req.holder_overhead, snapshots=req.snapshots, stage=i, stages=len(ranges))
        flops = (b - a) * scaling.layer_flops_per_token(cfg, req.batch.seq_len)
        if last:
            flops += scaling.head_flops_per_token(cfg, req.vocab_size)
        out.append(StagePlan(i, a, b, first, last, mem, flops))
    return out


def outer_node(nodes: list[NodeSpec]) -> NodeSpec:
    """The node kept free for outer-step tasks: the best-connected (every remote holder's pseudo-gradient
    crosses its link; all equal without declared rates), then most host memory, the head on ties."""
    cost = link_cost(nodes)
    return max(nodes, key=lambda n: (-cost[n.node_id], n.memory, n.is_head))


def holder_slots(n: NodeSpec, req: PlanRequest, device: str) -> float:
    """How many holders ``n`` could take by CPUs and GPUs alone (inf when unknown)."""
    per = holder_cpus(req, device, n)
    by_cpu = math.inf if n.cpus is None or per <= 0 else n.cpus // per
    by_gpu = n.gpus // (req.gpus_per_holder or 1.0) if device == "gpu" else math.inf
    return min(by_cpu, by_gpu)
