"""The cluster side of planning: node specs (from Ray or a memory list), the plan, and watching joins.

Node specs come from ``ray.nodes()``: CPUs, GPUs, and host memory: each node's MemTotal, read by a
zero-CPU probe task (``planner.host_memory=total``), the same on every run; Ray's ``memory``
resource is about 70 % of what was free when Ray started and so varies (``planner.host_memory=ray``
uses it, e.g. for nodes started with ``ray start --memory``). Ray does not track GPU memory, so per GPU node it is read, in order, from

1. a declared custom resource, ``planner.gpu_memory_resource`` (default ``gpu_memory_gib``): the
   node's total GPU memory in GiB, e.g. ``ray start --num-gpus=8 --resources='{"gpu_memory_gib": 640}'``;
2. the accelerator type Ray detected (``accelerator_type:H100`` -> 80 GiB, table below, the smaller
   variant where a type comes in several);
3. a probe task pinned to the node that asks ``torch.cuda.mem_get_info()`` (``planner.probe_gpu_memory``),
   waiting at most ``planner.gpu_probe_timeout_s`` for a GPU there (busy GPUs: the memory stays unknown).

Or from ``cluster.nodes``: one entry per node, ``"24GB"`` (host memory), ``"64GB+8x80GB"`` (host and
8 GPUs of 80 GB each), ``"10x4GB"`` (ten nodes of 4 GB), ``"24GB@100mbit"`` (with its uplink rate).
CPUs are then unknown and do not limit holders. Live nodes' uplinks come from ``cluster.links``
(``["10.0.0.2@100mbit", "*@1gbit"]``) or, with ``planner.probe_links=true``, a timed transfer.

**Watching.** :class:`ClusterWatcher` re-reads the nodes; on any join or leave it recomputes the plan
for the current architecture. Every ``planner.upgrade_every_nodes`` joins it asks the scaling law
again and adopts the new architecture only if ``P(new) >= planner.min_growth x P(current)`` and the
current model can grow into it function-preservingly (neuroray.model.growth).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Callable

from neuroray.config import ModelConfig, PlannerConfig, TrainConfig, resolve_batch
from neuroray.errors import ConfigError
from neuroray.planner import scaling
from neuroray.planner.links import RateError, format_rate, parse_rate, sync_bytes_per_value
from neuroray.planner.memory import Batch, MemoryUnitError, activation_bytes, parse_memory
from neuroray.planner.plan_types import STRATEGIES, NodeSpec, Plan, PlanError, PlanRequest
from neuroray.planner.search import plan

log = logging.getLogger(__name__)

GiB = 2**30
# GiB per GPU by Ray accelerator type; where a type ships in several sizes, the smaller one.
ACCELERATOR_GIB = {
    "K80": 12, "P4": 8, "P100": 16, "V100": 16, "T4": 16, "A10G": 24, "L4": 24, "L40S": 48,
    "A100": 40, "A100-40G": 40, "A100-80G": 80, "H100": 80, "H200": 141, "H20": 96, "B200": 180,
    "B300": 288, "GB200": 186, "GB300": 288, "RTX-PRO-6000": 96,
    "AMD-Instinct-MI100": 32, "AMD-Instinct-MI210": 64, "AMD-Instinct-MI250X": 128,
    "AMD-Instinct-MI300X-OAM": 192, "AMD-Instinct-MI325X-OAM": 256,
}
_NODE = re.compile(r"^\s*(?:(\d+)\s*[xX*]\s*)?([^+]+?)\s*(?:\+\s*(\d+(?:\.\d+)?)\s*[xX*]\s*(.+?))?\s*$")


# ----- node specs ----------------------------------------------------------------------------------

def parse_nodes(entries: list) -> list[NodeSpec]:
    """``["8GB", "64GB+8x80GB", "10x4GB", "24GB@100mbit"]`` -> node specs; a bad entry raises ConfigError
    naming it. ``@<rate>`` is the node's uplink (neuroray.planner.links)."""
    nodes: list[NodeSpec] = []
    for entry in entries:
        text = str(entry)
        spec, at, rate_text = text.partition("@")
        try:
            if "@" in rate_text:
                raise RateError("has more than one '@'; write one uplink rate per entry, e.g. 24GB@1gbit")
            rate = parse_rate(rate_text, "uplink rate") if at else 0.0
            m = _NODE.match(spec)
            if m is None:
                raise MemoryUnitError("expected <host memory>[+<gpus>x<memory per GPU>], optionally <count>x in front")
            count = int(m.group(1) or 1)
            host = parse_memory(m.group(2), "node memory")
            gpus = float(m.group(3) or 0)
            gpu_mem = parse_memory(m.group(4), "GPU memory") if m.group(4) else 0
        except (MemoryUnitError, RateError) as exc:
            raise ConfigError(f"bad cluster.nodes entry '{text}': {exc} (one entry per node: 24GB, 64GB+8x80GB, "
                              "10x4GB, 24GB@1gbit)") from None
        if count < 1:
            raise ConfigError(f"bad cluster.nodes entry '{text}': the node count must be at least 1")
        for _i in range(count):
            i = len(nodes)
            label = f"{m.group(2).strip()}" + (f"+{gpus:g}x{m.group(4).strip()}" if gpus else "")
            label += f"@{format_rate(rate)}" if rate else ""
            nodes.append(NodeSpec(node_id=f"node-{i}", name=f"node{i}({label})", memory=host, cpus=None, gpus=gpus,
                                  gpu_memory=gpu_mem, gpu_memory_source="list" if gpus else "", is_head=i == 0,
                                  memory_source="cluster.nodes", link_bps=rate,
                                  link_source="declared" if rate else ""))
    return nodes


def parse_links(entries: list) -> list[tuple[str, float]]:
    """``cluster.links``: ``["10.0.0.2@100mbit", "*@1gbit"]`` -> (address, node-id prefix or "*", bits/s)."""
    out = []
    for entry in entries:
        text = str(entry)
        where, at, rate_text = text.rpartition("@")
        try:
            if not at or not where.strip():
                raise RateError("expected <address or node-id prefix or *>@<rate>, e.g. 10.0.0.2@100mbit")
            out.append((where.strip(), parse_rate(rate_text, "uplink rate")))
        except RateError as exc:
            raise ConfigError(f"bad cluster.links entry '{text}': {exc}") from None
    return out


def _declared_rate(node_id: str, address: str, links: list[tuple[str, float]]) -> float:
    """The first cluster.links entry naming the node (its address or a node-id prefix), else a "*" entry."""
    for where, bps in links:
        if where == address or (len(where) >= 4 and node_id.startswith(where)):
            return bps
    return next((bps for where, bps in links if where == "*"), 0.0)


def nodes_from_ray(raw: list[dict], planner: PlannerConfig, probe: Callable[[str], int] | None = None,
                   host_memory: Callable[[str], int] | None = None, links: list[tuple[str, float]] = (),
                   measured: dict[str, float] | None = None) -> list[NodeSpec]:
    """Node specs from ``ray.nodes()`` records (pure). ``probe(node_id) -> bytes per GPU`` is the GPU
    memory fallback; ``host_memory(node_id) -> MemTotal bytes`` (0: unknown) is used when
    ``planner.host_memory=total``; ``links`` are cluster.links, ``measured`` probed rates (bits/s)."""
    out = []
    for n in raw:
        if not n.get("Alive", n.get("alive", False)):
            continue
        res = n.get("Resources", {})
        node_id = n["NodeID"]
        gpus = float(res.get("GPU", 0))
        gpu_mem, source = 0, ""
        if gpus > 0:
            declared = res.get(planner.gpu_memory_resource, 0)
            types = [k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")]
            if declared:
                gpu_mem, source = int(declared * GiB / gpus), f"resource {planner.gpu_memory_resource}"
            elif types and types[0] in ACCELERATOR_GIB:
                gpu_mem, source = ACCELERATOR_GIB[types[0]] * GiB, f"accelerator {types[0]}"
            elif planner.probe_gpu_memory and probe is not None:
                gpu_mem, source = int(probe(node_id)), "probe"
        ray_mem = int(res.get("memory", 0))
        memory, mem_source = ray_mem, "ray resource"
        total = host_memory(node_id) if planner.host_memory == "total" and host_memory is not None else 0
        if total > 0:
            memory, mem_source = total, "MemTotal"
        address = n.get("NodeManagerAddress", "?")
        rate, link_source = _declared_rate(node_id, address, list(links)), "declared"
        if measured and measured.get(node_id) and not rate:
            rate, link_source = measured[node_id], "probe"
        out.append(NodeSpec(
            node_id=node_id, name=f"{address}/{node_id[:8]}", memory=memory,
            cpus=float(res.get("CPU", 0)), gpus=gpus, gpu_memory=gpu_mem, gpu_memory_source=source,
            is_head="node:__internal_head__" in res, ray_memory=ray_mem if memory != ray_mem else 0,
            memory_source=mem_source, link_bps=rate, link_source=link_source if rate else "",
        ))
    return out


def _probe_gpu_memory(node_id: str, timeout_s: float) -> int:
    """Total memory of one GPU on ``node_id``, asked of torch.cuda by a task pinned there; 0 if unknown."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_gpus=1, num_cpus=0, max_retries=0)
    def probe() -> int:
        import torch

        return int(torch.cuda.mem_get_info()[1]) if torch.cuda.is_available() else 0

    ref = probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
    try:
        return ray.get(ref, timeout=timeout_s)
    except Exception as exc:  # busy GPUs (timeout), a dead node, no torch there: all mean "unknown"
        ray.cancel(ref, force=True)
        log.warning("GPU memory probe on node %s failed: %s", node_id[:8], str(exc).splitlines()[0])
        return 0


_probed: dict[str, int] = {}  # node id -> bytes per GPU; a node's GPUs do not change while it lives


def _cached_probe(node_id: str, timeout_s: float) -> int:
    """Probe once per node; a failed probe (0) is retried at the next read, e.g. once GPUs are free."""
    if not _probed.get(node_id):
        _probed[node_id] = _probe_gpu_memory(node_id, timeout_s)
    return _probed[node_id]


def read_ray_nodes(planner: PlannerConfig, links: list[tuple[str, float]] = ()) -> list[NodeSpec]:
    """Alive nodes of the connected Ray cluster (host memory and links probed as configured, neuroray.planner.probes)."""
    import ray

    from neuroray.planner import probes

    if not ray.is_initialized():
        raise PlanError("not connected to Ray; call ray.init(address=...) first, or plan for cluster.nodes=[8GB,...]")
    raw = ray.nodes()
    alive = [n["NodeID"] for n in raw if n.get("Alive", n.get("alive", False))]
    totals = probes.host_memory(alive, planner.memory_probe_timeout_s) if planner.host_memory == "total" else {}
    measured = (probes.link_rates(alive, parse_memory(planner.link_probe_bytes, "planner.link_probe_bytes"),
                                  planner.link_probe_timeout_s) if planner.probe_links else None)
    return nodes_from_ray(raw, planner, lambda node_id: _cached_probe(node_id, planner.gpu_probe_timeout_s),
                          lambda node_id: totals.get(node_id, 0), links, measured)


# ----- config -> request -> plan -----------------------------------------------------------------

def check_planner_config(cfg: TrainConfig) -> None:
    """Config-time checks of ``planner.*`` and ``cluster.nodes`` (ConfigError with one line)."""
    p = cfg.planner
    if p.device not in ("auto", "gpu", "cpu"):
        raise ConfigError(f"planner.device={p.device} is unknown; use auto, gpu or cpu")
    if not 0 < p.safety_fraction <= 1:
        raise ConfigError(f"planner.safety_fraction={p.safety_fraction} must be in (0, 1]")
    try:
        parse_memory(p.holder_overhead, "planner.holder_overhead")
    except MemoryUnitError as exc:
        raise ConfigError(str(exc)) from None
    if p.within_replica not in STRATEGIES:
        raise ConfigError(f"planner.within_replica={p.within_replica} is unknown; use one of {', '.join(STRATEGIES)}")
    if p.across_replicas not in ("PACK", "SPREAD"):
        raise ConfigError(f"planner.across_replicas={p.across_replicas} is unknown; use PACK or SPREAD")
    for key in ("microbatch_size", "stages", "replicas", "max_replicas", "reserve_cpus"):
        if getattr(p, key) < 0:
            raise ConfigError(f"planner.{key}={getattr(p, key)} must be >= 0")
    if p.upgrade_every_nodes < 1:
        raise ConfigError(f"planner.upgrade_every_nodes={p.upgrade_every_nodes} must be at least 1")
    if p.min_growth < 1:
        raise ConfigError(f"planner.min_growth={p.min_growth} must be >= 1 (an upgrade never shrinks the model)")
    if p.watch_interval_s <= 0:
        raise ConfigError(f"planner.watch_interval_s={p.watch_interval_s} must be positive")
    if not p.gpu_probe_timeout_s > 0:  # "not >": NaN fails too
        raise ConfigError(f"planner.gpu_probe_timeout_s={p.gpu_probe_timeout_s} must be positive (seconds the GPU "
                          "memory probe waits for a free GPU)")
    if p.host_memory not in ("total", "ray"):
        raise ConfigError(f"planner.host_memory={p.host_memory} is unknown; use total (each node's MemTotal) or ray "
                          "(Ray's memory resource)")
    for key in ("memory_probe_timeout_s", "link_probe_timeout_s"):
        if not getattr(p, key) > 0:
            raise ConfigError(f"planner.{key}={getattr(p, key)} must be positive (seconds)")
    try:
        parse_memory(p.link_probe_bytes, "planner.link_probe_bytes")
    except MemoryUnitError as exc:
        raise ConfigError(str(exc)) from None
    parse_nodes(cfg.cluster.nodes)
    parse_links(cfg.cluster.links)


def request_from_config(cfg: TrainConfig) -> PlanRequest:
    """The planner's inputs: ``model=auto`` (model.name == "auto") lets the scaling law choose."""
    p, d, c = cfg.planner, resolve_batch(cfg).data, cfg.cluster  # a TrainConfig built in Python: derive its batch
    check_planner_config(cfg)
    return PlanRequest(
        vocab_size=d.vocab_size,
        batch=Batch(p.microbatch_size or d.microbatch_size, d.seq_len, d.num_microbatches,
                    activation_bytes(cfg.precision, p.device),
                    cfg.swarm.schedule if cfg.swarm.routing == "fixed" else "gpipe"),
        base_model=cfg.model, model=None if cfg.model.name == "auto" else cfg.model, device=p.device,
        cpus_per_holder=c.cpus_per_holder, gpus_per_holder=c.gpus_per_holder, safety_fraction=p.safety_fraction,
        holder_overhead=parse_memory(p.holder_overhead), stages=p.stages,
        snapshots=cfg.checkpoint.interval_s > 0 or cfg.checkpoint.every_round, replicas=p.replicas,
        max_replicas=p.max_replicas, within_replica=p.within_replica, across_replicas=p.across_replicas,
        reserve_cpus=p.reserve_cpus, exclude_small_nodes=p.exclude_small_nodes,
        threads_per_holder=float(max(c.torch_threads, 1)) if p.fill_cores else 0.0,
        inner_steps=cfg.diloco.inner_steps, compression=cfg.diloco.compression,
        sync_value_bytes=_sync_value_bytes(cfg),
    )


def _sync_value_bytes(cfg: TrainConfig) -> float:
    dl = cfg.diloco
    try:
        return sync_bytes_per_value(dl.compression, dl.compression_block, dl.sparse_density)
    except ValueError:  # an unknown mode is the diloco checks' error to report; count float32 meanwhile
        return 4.0


def cluster_nodes(cfg: TrainConfig) -> list[NodeSpec]:
    """``cluster.nodes`` when given, else the connected Ray cluster's alive nodes."""
    if cfg.cluster.nodes:
        return parse_nodes(cfg.cluster.nodes)
    return read_ray_nodes(cfg.planner, parse_links(cfg.cluster.links))


def plan_for_cluster(cfg: TrainConfig, nodes: list[NodeSpec] | None = None) -> Plan:
    """The plan for ``nodes`` (default: :func:`cluster_nodes`): architecture, ranges, replicas, bundles."""
    return plan(cluster_nodes(cfg) if nodes is None else nodes, request_from_config(cfg))


# ----- upgrades and watching -----------------------------------------------------------------------

@dataclass(frozen=True)
class UpgradeRule:
    """Every ``every_nodes`` joins, adopt the law's model if ``P(new) >= min_growth * P(current)``."""

    every_nodes: int = 50
    min_growth: float = 1.3

    def due(self, joins: int) -> bool:
        return joins >= self.every_nodes

    def decide(self, current: ModelConfig, candidate: ModelConfig, vocab_size: int) -> tuple[bool, float, str]:
        """(adopt?, P(candidate) / P(current), why not)."""
        ratio = scaling.growth_ratio(current, candidate, vocab_size)
        if ratio < self.min_growth:
            return False, ratio, f"growth {ratio:.2f}x < planner.min_growth={self.min_growth:g}"
        blockers = scaling.growth_blockers(current, candidate)
        if blockers:
            return False, ratio, "cannot grow function-preservingly: " + "; ".join(blockers)
        return True, ratio, ""


@dataclass
class WatchEvent:
    """What one poll saw and decided. ``plan`` is None when the current model no longer fits."""

    joined: list[str]
    left: list[str]
    plan: Plan | None
    previous: Plan
    upgraded: bool = False
    evaluated: bool = False  # an upgrade was due and the law was asked
    growth: float = 0.0  # P(law's model) / P(current) when evaluated
    reason: str = ""  # why no upgrade, or why no plan

    @property
    def migrate_from(self) -> ModelConfig | None:
        """The model existing holders grow from (neuroray.model.growth.grow_stages) when upgraded."""
        return self.previous.model if self.upgraded else None


@dataclass
class ClusterWatcher:
    """Re-reads the nodes and replans on joins and leaves; applies the upgrade rule.

    ``read_nodes`` defaults to the connected Ray cluster; tests pass their own. The trainer calls
    ``poll()`` between rounds, at most every ``planner.watch_interval_s`` (neuroray/planner/upgrade.py).
    """

    cfg: TrainConfig
    read_nodes: Callable[[], list[NodeSpec]] | None = None
    current: Plan | None = None
    joins_since_upgrade: int = 0
    known: set = field(default_factory=set)
    nodes: list = field(default_factory=list)  # what the last read saw (new replicas are placed on these)

    def __post_init__(self):
        if self.read_nodes is None:
            self.read_nodes = lambda: cluster_nodes(self.cfg)
        self.request = request_from_config(self.cfg)
        self.rule = UpgradeRule(self.cfg.planner.upgrade_every_nodes, self.cfg.planner.min_growth)
        nodes = self.nodes = self.read_nodes()
        self.known = {n.node_id for n in nodes if n.alive}
        if self.current is None:
            self.current = plan(nodes, self.request)

    def poll(self) -> WatchEvent | None:
        """One look at the cluster; None when no node joined or left."""
        nodes = self.nodes = self.read_nodes()
        ids = {n.node_id for n in nodes if n.alive}
        joined, left = sorted(ids - self.known), sorted(self.known - ids)
        if not joined and not left:
            return None
        self.known = ids
        self.joins_since_upgrade += len(joined)
        previous = self.current
        event = WatchEvent(joined, left, None, previous)
        model = previous.model
        auto = self.request.model is None  # a model fixed by the config never changes
        if auto and self.rule.due(self.joins_since_upgrade):
            self.joins_since_upgrade %= self.rule.every_nodes
            event.evaluated = True
            try:
                law = plan(nodes, self.request)  # what the law would build for today's cluster
                adopt, event.growth, event.reason = self.rule.decide(model, law.model, self.request.vocab_size)
                if adopt:
                    event.plan, event.upgraded = law, True
            except PlanError as exc:
                event.reason = f"the law's model does not fit: {exc}"
        if event.plan is None:
            try:
                event.plan = plan(nodes, dataclasses.replace(self.request, model=model))
            except PlanError as exc:
                event.reason = f"{event.reason}; " if event.reason else ""
                event.reason += f"the current model no longer fits: {exc}"
        if event.plan is not None:
            self.current = event.plan
        return event
