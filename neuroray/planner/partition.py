"""From nodes to a plan: architecture, layer ranges (stages), replicas, and which node hosts each holder.

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

import math
from dataclasses import dataclass, field

from neuroray.config import ModelConfig
from neuroray.errors import NeurorayError
from neuroray.planner import scaling
from neuroray.planner.memory import (
    BYTES_PER_PARAM,
    FLOAT_BYTES,
    Batch,
    HolderMemory,
    activation_elems_per_token_layer,
    format_bytes,
    head_elems_per_token,
    holder_memory,
    outer_step_bytes,
)

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
EXTRA_STAGES = 2  # beyond the fewest stages that fit, how many more stage counts are tried
LAW_STEP = 1.25  # walking down the law: M -> M / 1.25


class PlanError(NeurorayError):
    """The cluster cannot host the requested model, partition or replicas."""


@dataclass(frozen=True)
class NodeSpec:
    """What the planner knows about one node. ``cpus=None``: unknown (a hand-written node list)."""

    node_id: str
    name: str
    memory: int  # host memory available to Ray tasks and actors, bytes
    cpus: float | None = None
    gpus: float = 0.0
    gpu_memory: int = 0  # bytes per GPU; 0 when there are no GPUs
    gpu_memory_source: str = ""  # where gpu_memory came from: resource, accelerator:<type>, probe, list
    is_head: bool = False
    alive: bool = True

    def device_memory(self, device: str) -> int:
        """Memory the scaling law counts: all GPU memory on a GPU node, else host memory."""
        return int(self.gpus * self.gpu_memory) if device == "gpu" else self.memory


@dataclass(frozen=True)
class PlanRequest:
    """Everything the planner needs besides the nodes (``from_config`` builds it from a TrainConfig)."""

    vocab_size: int
    batch: Batch
    base_model: ModelConfig  # sequence length, RoPE base, norm eps, init scale of the law's models
    model: ModelConfig | None = None  # a fixed architecture; None: the scaling law
    device: str = "auto"
    cpus_per_holder: float = 0.5
    gpus_per_holder: float = 0.0  # on GPU nodes 0 means 1
    safety_fraction: float = 0.8
    holder_overhead: int = 400_000_000
    stages: int = 0
    replicas: int = 0
    max_replicas: int = 0
    within_replica: str = "PACK"
    across_replicas: str = "SPREAD"
    reserve_cpus: float = 1.0
    exclude_small_nodes: bool = False


@dataclass(frozen=True)
class StagePlan:
    index: int
    start: int
    end: int  # exclusive
    has_embedding: bool
    has_head: bool
    memory: HolderMemory
    flops_per_token: float  # forward

    @property
    def params(self) -> int:
        return self.memory.params


@dataclass(frozen=True)
class HolderPlacement:
    replica: int
    stage: int
    node_id: str
    node_name: str
    cpus: float
    gpus: float
    host_memory: int  # bytes reserved in the bundle (Ray's "memory" resource)
    device_memory: int  # bytes the holder needs on its device (= host_memory on CPU holders)

    def bundle(self) -> dict:
        """The placement-group bundle: CPUs, GPUs and host memory."""
        b = {"CPU": self.cpus} if self.cpus > 0 else {}
        if self.gpus > 0:
            b["GPU"] = self.gpus
        b["memory"] = float(self.host_memory)
        return b


@dataclass(frozen=True)
class OuterReserve:
    node_id: str
    node_name: str
    cpus: float
    task_bytes: int  # host memory of the largest range's outer-step task


@dataclass(frozen=True)
class Plan:
    model: ModelConfig
    vocab_size: int
    device: str  # "gpu" or "cpu"
    law_memory: int  # total memory M of the pool the architecture was sized from
    nodes: tuple[NodeSpec, ...]  # the pool
    stages: tuple[StagePlan, ...]
    holders: tuple[tuple[HolderPlacement, ...], ...]  # [replica][stage]
    within_replica: str
    across_replicas: str
    outer: OuterReserve
    safety_fraction: float
    excluded: tuple[tuple[str, str], ...] = ()  # (node name, why)
    notes: tuple[str, ...] = ()

    @property
    def replicas(self) -> int:
        return len(self.holders)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(s.start, s.end) for s in self.stages]

    @property
    def params(self) -> scaling.ParamCount:
        return scaling.param_count(self.model, self.vocab_size)

    def bundles(self, replica: int) -> list[dict]:
        return [h.bundle() for h in self.holders[replica]]

    def node_ids(self, replica: int) -> list[str]:
        return [h.node_id for h in self.holders[replica]]

    def node_usage(self) -> dict[str, int]:
        """Device bytes the plan puts on each node (for 'never exceeds any node's memory')."""
        used: dict[str, int] = {}
        for rep in self.holders:
            for h in rep:
                used[h.node_id] = used.get(h.node_id, 0) + h.device_memory
        return used


# ----- partition ---------------------------------------------------------------------------------

def _memory_table(cfg: ModelConfig, req: PlanRequest) -> dict:
    """holder_memory(...).total for every (n_layers, first, last): the DP's O(1) memory lookups."""
    table = {}
    for n in range(1, cfg.n_layers + 1):
        for first in (False, True):
            for last in (False, True):
                table[n, first, last] = holder_memory(cfg, req.vocab_size, n, has_embedding=first, has_head=last,
                                                      batch=req.batch, overhead=req.holder_overhead).total
    return table


def item_costs(cfg: ModelConfig, req: PlanRequest) -> list[float]:
    """Per-layer cost ``mem_i / sum(mem) + flops_i / sum(flops)``, embedding on layer 0, head on the last."""
    pc = scaling.param_count(cfg, req.vocab_size)
    tok, nmb = req.batch.tokens, req.batch.num_microbatches
    a = activation_elems_per_token_layer(cfg)
    layer_mem = BYTES_PER_PARAM * pc.per_layer + FLOAT_BYTES * tok * nmb * a
    mem = [float(layer_mem)] * cfg.n_layers
    flops = [scaling.layer_flops_per_token(cfg, req.batch.seq_len)] * cfg.n_layers
    mem[0] += BYTES_PER_PARAM * pc.embedding + FLOAT_BYTES * tok * nmb * cfg.d_model
    mem[-1] += BYTES_PER_PARAM * pc.head + FLOAT_BYTES * tok * head_elems_per_token(cfg, req.vocab_size)
    flops[-1] += scaling.head_flops_per_token(cfg, req.vocab_size)
    sm, sf = sum(mem), sum(flops)
    return [m / sm + f / sf for m, f in zip(mem, flops)]


def partition_layers(costs: list[float], n_stages: int, fits=lambda start, end, first, last: True) -> list[tuple[int, int]] | None:
    """Exactly ``n_stages`` contiguous ranges of ``costs`` minimising the largest range cost.

    ``fits(start, end, is_first, is_last)`` vetoes ranges (memory). Dynamic programming over
    ``best[k][j]`` = smallest achievable max cost of splitting items ``[0, j)`` into k ranges;
    O(S * L^2). Returns None when no split satisfies ``fits``.
    """
    n = len(costs)
    if not 1 <= n_stages <= n:
        return None
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[-1] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        last = k == n_stages
        # range k covers [i, j); leave at least one item for each later range
        for j in range(k, n - (n_stages - k) + 1):
            if last and j != n:
                continue
            for i in range(k - 1, j):
                if best[k - 1][i] == inf or not fits(i, j, k == 1, last):
                    continue
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    if best[n_stages][n] == inf:
        return None
    ranges, j = [], n
    for k in range(n_stages, 0, -1):
        i = cut[k][j]
        ranges.append((i, j))
        j = i
    return ranges[::-1]


# ----- placement of replicas onto nodes -----------------------------------------------------------

@dataclass
class _Free:
    node: NodeSpec
    host: float  # usable host bytes left
    cpus: float
    gpus: float
    replicas: set = field(default_factory=set)


def _holder_fits(f: _Free, need: int, req: PlanRequest, device: str, gpus_per: float) -> bool:
    if f.cpus + 1e-9 < req.cpus_per_holder:
        return False
    if device == "gpu":
        slot = gpus_per * f.node.gpu_memory * req.safety_fraction
        return f.gpus + 1e-9 >= gpus_per and need <= slot and f.host >= req.holder_overhead
    return f.host >= need


def assign(stages: list[StagePlan], nodes: list[NodeSpec], req: PlanRequest, device: str, max_replicas: int,
           reserve: tuple[str, float, int] | None) -> list[list[HolderPlacement]]:
    """Place up to ``max_replicas`` whole replicas (see the module docstring for the order).

    ``reserve`` = (node_id, cpus, host bytes) withheld from holders for the outer-step tasks.
    """
    gpus_per = (req.gpus_per_holder or 1.0) if device == "gpu" else 0.0
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
                across = len(f.replicas) if req.across_replicas == "SPREAD" else -len(f.replicas)
                room = f.gpus * f.node.gpu_memory if device == "gpu" else f.host
                key = (inside, across, -room, idx)
                if best is None or key < best[0]:
                    best = (key, idx)
            if best is None:
                ok = False
                break
            f = free[best[1]]
            f.cpus -= req.cpus_per_holder
            if device == "gpu":
                f.gpus -= gpus_per
                f.host -= req.holder_overhead
                host = req.holder_overhead
            else:
                f.host -= need
                host = need
            f.replicas.add(r)
            used.add(best[1])
            mine[s] = HolderPlacement(r, s, f.node.node_id, f.node.name, req.cpus_per_holder, gpus_per, int(host), need)
        if not ok:
            for f, (h, c, g, reps) in zip(free, snapshot):
                f.host, f.cpus, f.gpus, f.replicas = h, c, g, reps
            break
        placed.append([mine[s] for s in range(len(stages))])
    return placed


# ----- the planner ---------------------------------------------------------------------------------

def _device(nodes: list[NodeSpec], req: PlanRequest) -> str:
    has_gpus = any(n.gpus > 0 for n in nodes)
    demands = req.device == "gpu" or req.gpus_per_holder > 0
    if demands and not has_gpus:
        why = "planner.device=gpu" if req.device == "gpu" else f"cluster.gpus_per_holder={req.gpus_per_holder:g}"
        raise PlanError(f"the config demands GPUs ({why}) but the cluster has none; add GPU nodes, or set "
                        "cluster.gpus_per_holder=0 and planner.device=cpu")
    if req.device == "cpu" and req.gpus_per_holder > 0:
        raise PlanError("planner.device=cpu contradicts cluster.gpus_per_holder>0; set one of them differently")
    return "gpu" if has_gpus and req.device != "cpu" else "cpu"


def _holder_capacity(n: NodeSpec, req: PlanRequest, device: str) -> float:
    """The most device memory one holder may use on ``n``."""
    if device == "gpu":
        return (req.gpus_per_holder or 1.0) * n.gpu_memory * req.safety_fraction
    return n.memory * req.safety_fraction


def _pool(nodes: list[NodeSpec], req: PlanRequest, device: str) -> tuple[list[NodeSpec], list[tuple[str, str]]]:
    """Nodes that can run a holder at all (alive, enough CPUs, GPUs in GPU mode), and the others."""
    gpus_per = (req.gpus_per_holder or 1.0) if device == "gpu" else 0.0
    pool, excluded = [], []
    for n in nodes:
        if not n.alive:
            continue
        if n.cpus is not None and n.cpus + 1e-9 < req.cpus_per_holder:
            excluded.append((n.name, f"{n.cpus:g} CPUs < cluster.cpus_per_holder={req.cpus_per_holder:g}"))
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


def _stage_plans(cfg: ModelConfig, ranges: list[tuple[int, int]], req: PlanRequest) -> list[StagePlan]:
    out = []
    for i, (a, b) in enumerate(ranges):
        first, last = i == 0, i == len(ranges) - 1
        mem = holder_memory(cfg, req.vocab_size, b - a, has_embedding=first, has_head=last, batch=req.batch,
                            overhead=req.holder_overhead)
        flops = (b - a) * scaling.layer_flops_per_token(cfg, req.batch.seq_len)
        if last:
            flops += scaling.head_flops_per_token(cfg, req.vocab_size)
        out.append(StagePlan(i, a, b, first, last, mem, flops))
    return out


def _outer_node(nodes: list[NodeSpec]) -> NodeSpec:
    """The node kept free for outer-step tasks: most host memory, the head on ties (the driver runs there)."""
    return max(nodes, key=lambda n: (n.memory, n.is_head))


def _slots(n: NodeSpec, req: PlanRequest, device: str) -> float:
    """How many holders ``n`` could take by CPUs and GPUs alone (inf when unknown)."""
    by_cpu = math.inf if n.cpus is None or req.cpus_per_holder <= 0 else n.cpus // req.cpus_per_holder
    by_gpu = n.gpus // (req.gpus_per_holder or 1.0) if device == "gpu" else math.inf
    return min(by_cpu, by_gpu)


def _try_architecture(cfg: ModelConfig, pool: list[NodeSpec], outer: NodeSpec, req: PlanRequest, device: str):
    """Best ``(stages, placements, outer reserve)`` for a fixed architecture, or ``(None, reason)``."""
    cap = max(_holder_capacity(n, req, device) for n in pool)
    table = _memory_table(cfg, req)
    costs = item_costs(cfg, req)

    def fits(i, j, first, last):
        return table[j - i, first, last] <= cap

    max_slots = sum(_slots(n, req, device) for n in pool)
    usable = sum(_holder_capacity(n, req, device) * (1 if device == "cpu" else _slots(n, req, device)) for n in pool)
    # Lower bound on S: the stages' memories add up to at least the one-holder model's memory.
    s_lower = max(1, math.ceil(table[cfg.n_layers, True, True] / cap))
    candidates = [req.stages] if req.stages else list(range(min(s_lower, cfg.n_layers), cfg.n_layers + 1))
    best, reason, s_min = None, "", None
    for s in candidates:
        if s > cfg.n_layers:
            reason = f"planner.stages={s} is more than the model's {cfg.n_layers} layers"
            break
        if s_min is not None and s > s_min + EXTRA_STAGES:
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
        stages = _stage_plans(cfg, ranges, req)
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
                      f"{', '.join(format_bytes(_holder_capacity(n, req, device)) for n in pool)}")
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
                      f"{', '.join(format_bytes(_holder_capacity(n, req, device)) for n in pool)}")
            continue
        key = (len(placed), -s)
        if best is None or key > best[0]:
            best = (key, stages, placed, by_outer)
    if best is None:
        return None, reason or "no stage count fits"
    _, stages, placed, by_outer = best
    outer_res = OuterReserve(outer.node_id, outer.name, req.reserve_cpus,
                             outer_step_bytes(max(st.params for st in stages), len(placed)))
    note = ""
    if len(placed) == by_outer and not req.replicas:
        note = (f"replicas are limited to {by_outer} by the outer step's host memory on {outer.name} "
                f"({format_bytes(outer_res.task_bytes)} per range task); nodes with more host memory allow more")
    return (stages, placed, outer_res, note), ""


def plan(nodes: list[NodeSpec], req: PlanRequest) -> Plan:
    """The plan for ``nodes`` (see the module docstring); raises :class:`PlanError` when none exists."""
    if not nodes:
        raise PlanError("no nodes to plan for; start Ray workers or pass cluster.nodes=[8GB,...]")
    for key, value in (("within_replica", req.within_replica), ("across_replicas", req.across_replicas)):
        allowed = STRATEGIES if key == "within_replica" else ("PACK", "SPREAD")
        if value not in allowed:
            raise PlanError(f"planner.{key}={value} is unknown; use one of {', '.join(allowed)}")
    device = _device(nodes, req)
    pool, excluded = _pool(nodes, req, device)
    if not pool:
        raise PlanError("no node can host a stage holder (" + "; ".join(f"{n}: {w}" for n, w in excluded)
                        + "); add nodes or lower cluster.cpus_per_holder")
    notes: list[str] = []
    while True:  # leaving out a small node lowers M, which may change the law's model
        law_memory = sum(n.device_memory(device) for n in pool)
        cfg = req.model or scaling.architecture_for_memory(law_memory, req.base_model)
        one_layer = holder_memory(cfg, req.vocab_size, 1, has_embedding=False, has_head=False, batch=req.batch,
                                  overhead=req.holder_overhead).total
        small = [n for n in pool if _holder_capacity(n, req, device) < one_layer]
        if not small:
            break
        if not req.exclude_small_nodes:
            n = small[0]
            raise PlanError(
                f"node {n.name} is too small for even one layer of {scaling.describe(cfg)}: a holder of one layer "
                f"needs {format_bytes(one_layer)}, the node offers {format_bytes(_holder_capacity(n, req, device))} "
                f"({req.safety_fraction:g} of {format_bytes(_holder_capacity(n, req, device) / req.safety_fraction)}); "
                "remove it, give it more memory, or set planner.exclude_small_nodes=true"
            )
        excluded += [(n.name, f"too small for one layer ({format_bytes(one_layer)})") for n in small]
        pool = [n for n in pool if n not in small]
        if not pool:
            raise PlanError("every node is too small for one layer; add memory or plan a smaller model")
    law_cfg, first_reason, m = cfg, "", float(law_memory)
    # The outer-step tasks run on host memory: any alive node may keep their room, GPU or not.
    outer = _outer_node([n for n in nodes if n.alive])
    while True:
        result, reason = _try_architecture(cfg, pool, outer, req, device)
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
    stages, placed, outer, note = result
    if note:
        notes.append(note)
    holders = tuple(tuple(rep) for rep in placed)
    return Plan(
        model=cfg, vocab_size=req.vocab_size, device=device, law_memory=law_memory, nodes=tuple(pool),
        stages=tuple(stages), holders=holders, within_replica=req.within_replica,
        across_replicas=req.across_replicas, outer=outer, safety_fraction=req.safety_fraction,
        excluded=tuple(excluded), notes=tuple(notes),
    )
