"""The planner's values: what it is asked (:class:`PlanRequest`), what it sees (:class:`NodeSpec`) and
what it answers (:class:`Plan`: stages, holder placements, the outer step's reserve)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from neuroray.config import ModelConfig
from neuroray.errors import NeurorayError
from neuroray.planner import scaling
from neuroray.planner.memory import Batch, HolderMemory

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
    memory: int  # host memory the plan may fill a safety_fraction of, bytes (MemTotal, or Ray's resource)
    cpus: float | None = None
    gpus: float = 0.0
    gpu_memory: int = 0  # bytes per GPU; 0 when there are no GPUs
    gpu_memory_source: str = ""  # where gpu_memory came from: resource, accelerator:<type>, probe, list
    is_head: bool = False
    alive: bool = True
    ray_memory: int = 0  # Ray's ``memory`` resource where it differs from ``memory`` (bundles must fit it); 0: same
    memory_source: str = ""  # where ``memory`` came from: MemTotal, ray resource, list
    link_bps: float = 0.0  # the node's uplink, bits per second; 0: unknown (links do not steer placement)
    link_source: str = ""  # declared, probe

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
    holder_overhead: int = 420_000_000
    snapshots: bool = True  # holders take hot snapshots (checkpoint.interval_s or every_round): count their copies
    stages: int = 0
    replicas: int = 0
    max_replicas: int = 0
    within_replica: str = "PACK"
    across_replicas: str = "SPREAD"
    reserve_cpus: float = 1.0
    exclude_small_nodes: bool = False
    # planner.fill_cores: cores one CPU holder computes on (cluster.torch_threads); 0: CPUs limit holders
    # only by cpus_per_holder and the stage count is the fewest that gives the most replicas
    threads_per_holder: float = 0.0
    inner_steps: int = 20  # H: sync traffic is counted per round of H inner steps
    compression: str = "none"  # diloco.compression, for the report
    sync_value_bytes: float = 4.0  # bytes per parameter of a pseudo-gradient on the wire (links.sync_bytes_per_value)

    def on(self, device: str) -> PlanRequest:
        """This request for holders on ``device``: a GPU holder's snapshot copies are host memory, not its GPU's."""
        return replace(self, snapshots=self.snapshots and device == "cpu")

    @property
    def fills_cores(self) -> bool:
        return self.threads_per_holder > 0

    @property
    def cores_per_holder(self) -> float:
        """CPUs one holder is counted (and reserved) for: what it computes on, or what the config asks if more."""
        return max(self.cpus_per_holder, self.threads_per_holder)


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
    host_memory: int  # host bytes the holder needs (the plan's accounting)
    device_memory: int  # bytes the holder needs on its device (= host_memory on CPU holders)
    ray_memory: int = -1  # bytes the bundle reserves of Ray's "memory" resource; -1: host_memory

    def bundle(self) -> dict:
        """The placement-group bundle: CPUs, GPUs and host memory."""
        b = {"CPU": self.cpus} if self.cpus > 0 else {}
        if self.gpus > 0:
            b["GPU"] = self.gpus
        b["memory"] = float(self.host_memory if self.ray_memory < 0 else self.ray_memory)
        return b


@dataclass(frozen=True)
class OuterReserve:
    node_id: str
    node_name: str
    cpus: float
    task_bytes: int  # host memory of the largest range's outer-step task
    link_bps: float = 0.0  # the outer node's uplink (every remote holder's sync crosses it)


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
    why: tuple[str, ...] = ()  # the reasoning behind the choice, printed as "why: ..." lines
    batch: Batch | None = None  # what the activations and the hop traffic are counted for
    inner_steps: int = 20
    compression: str = "none"
    sync_value_bytes: float = 4.0

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
