"""A swarm of stage holders: R pipeline replicas of S stages, placed with Ray placement groups.

``replicas[r][s]`` is the holder of layer range ``s`` in replica ``r``; ``by_range[s]`` lists every
holder of range ``s`` (the group one outer step reduces over).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import ray

from neuroray.config import TrainConfig
from neuroray.config_checks import hop_recheck_off
from neuroray.errors import ConfigError, PipelineError
from neuroray.model import split_layers
from neuroray.planner import scaling
from neuroray.planner.partition import partition_layers
from neuroray.planner.placement import bundle_strategy, release, reserve_plan, reserve_replicas
from neuroray.swarm.direct_transport import resolve
from neuroray.swarm.holder import HolderSpec, StageHolder, holder_actor
from neuroray.swarm.ray_errors import unwrap_ray_error


@dataclass
class DataPlan:
    root: str
    manifest: dict


def stage_ranges(cfg: TrainConfig, vocab_size: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` layer range of every stage of a fixed model: ``swarm.split_points`` if given,
    else equal layer counts (``swarm.balance=layers``) or equal forward FLOPs (``compute``)."""
    s, n = cfg.swarm, cfg.model.n_layers
    if s.split_points:
        cuts = [0, *s.split_points, n]
        return [(a, b) for a, b in zip(cuts, cuts[1:])]
    if s.balance == "layers":
        return split_layers(n, s.num_stages)
    if s.num_stages > n:
        split_layers(n, s.num_stages)  # raises the same clear error as the even split
    layer = scaling.layer_flops_per_token(cfg.model, cfg.data.seq_len)
    costs = [layer] * n
    costs[-1] += scaling.head_flops_per_token(cfg.model, vocab_size)
    ranges = partition_layers(costs, s.num_stages)
    assert ranges is not None, "partition_layers has no memory veto here"
    return ranges


class Swarm:
    def __init__(self, cfg: TrainConfig, vocab_size: int, data: DataPlan | None, log=print,
                 snapshot_root: str | None = None, resume_step: int | None = None, name_prefix: str | None = None,
                 plan=None, holder_cls: type | None = None):
        """``plan`` (from :func:`neuroray.planner.plan_for_cluster`, for ``model=auto``) pins every holder to the
        node and resources the planner chose; without one, holders get ``cluster.cpus_per_holder``/``gpus_per_holder``
        in one placement group per replica (strategy ``planner.within_replica``, PACK by default). ``holder_cls``: the class every holder runs, StageHolder by
        default (tests and benchmarks pass :class:`neuroray.swarm.faults.FaultyStageHolder` to inject faults)."""
        self.cfg, self.holder_cls = cfg, holder_cls or StageHolder
        c = cfg.cluster
        if plan is not None:
            self.ranges = list(plan.ranges)
            self.groups = reserve_plan(plan, c.actor_start_timeout_s)
        else:
            self.ranges = stage_ranges(cfg, vocab_size)
            self.groups = reserve_replicas(  # within_replica=STRICT_SPREAD puts a replica's hops on the wire
                cfg.diloco.replicas, len(self.ranges), c.cpus_per_holder, c.gpus_per_holder, c.actor_start_timeout_s,
                strategy=cfg.planner.within_replica,
            )
        self.model, self.vocab_size, self.data = cfg.model, vocab_size, data
        gpus = [h.gpus for rep in plan.holders for h in rep] if plan is not None else [c.gpus_per_holder]
        # how hops cross (swarm.hop_transport; auto resolved here, where the holders' GPUs are known)
        self.hop_transport = resolve(cfg.swarm.hop_transport, all(g > 0 for g in gpus), cfg.swarm.routing,
                                     cfg.swarm.hop_compression)
        if self.hop_transport == "nccl" and not all(g > 0 for g in gpus):
            raise ConfigError("swarm.hop_transport=nccl needs a GPU on every holder, and the plan gives some none; "
                              "use swarm.hop_transport=auto or gloo")
        self.snapshot_root, self.name_prefix = snapshot_root, name_prefix
        self.replicas: list[list] = []
        for r in range(cfg.diloco.replicas):
            pipeline = []
            for s in range(len(self.ranges)):
                cpus, gpus = c.cpus_per_holder, c.gpus_per_holder
                if plan is not None:
                    cpus, gpus = plan.holders[r][s].cpus, plan.holders[r][s].gpus
                pipeline.append(self._holder(r, s, cpus, gpus, bundle_strategy(self.groups[r], s), resume_step))
            self.replicas.append(pipeline)
        t0 = time.monotonic()
        self.infos = self.get([h.info.remote() for p in self.replicas for h in p], c.actor_start_timeout_s,
                              "starting stage holders")
        log(f"swarm: {len(self.replicas)} replicas x {len(self.ranges)} stages up in {time.monotonic() - t0:.1f}s; "
            f"ranges {[(lo, hi - 1) for lo, hi in self.ranges]}")
        self.numels = [self.infos[s]["numel"] for s in range(len(self.ranges))]

    def _holder(self, r: int, s: int, cpus: float, gpus: float, strategy, resume_step: int | None):
        """Start the holder of range ``s`` in replica ``r`` at the swarm's current model and split."""
        cfg, c = self.cfg, self.cfg.cluster
        key_path = Path(cfg.swarm.key_dir).expanduser() / f"holder-r{r}-s{s}.pem"
        spec = HolderSpec(
            replica=r, stage=s, ranges=self.ranges, model=self.model, vocab_size=self.vocab_size,
            diloco=cfg.diloco, seed=cfg.seed, key_path=str(key_path),
            torch_threads=c.torch_threads, use_gpu=gpus > 0, precision=cfg.precision,
            snapshot_root=self.snapshot_root, snapshot_keep=cfg.checkpoint.keep, resume_step=resume_step,
            tokens_per_batch=cfg.data.seq_len * cfg.data.microbatch_size if cfg.ponw.enabled else 0,
            init_from=cfg.init_from, hop_compression=cfg.swarm.hop_compression, hop_block=cfg.swarm.hop_block,
            hop_transport=self.hop_transport,
            hop_ratio=cfg.swarm.hop_ratio, hop_check=cfg.swarm.hop_check, hop_check_history=cfg.swarm.hop_check_history,
            hop_check_warmup=cfg.swarm.hop_check_warmup, hop_check_factor=cfg.swarm.hop_check_factor,
            seq_len=cfg.data.seq_len, microbatch_size=cfg.data.microbatch_size,
            hop_record=hop_recheck_off(cfg) is None,
            round_redo=hop_recheck_off(cfg) is None and cfg.swarm.routing == "router",
        )
        routed = cfg.swarm.routing == "router"
        if s == 0 and self.data is not None:
            spec = replace(spec, data_root=self.data.root, manifest=self.data.manifest, data_start=0 if routed else None)
        return holder_actor(spec, cpus, gpus, strategy,
                            name=None if self.name_prefix is None else f"{self.name_prefix}{spec.slot}",
                            max_restarts=cfg.checkpoint.max_restarts, routed=routed, holder_cls=self.holder_cls,
                            inline_max_bytes=cfg.swarm.hop_inline_max_bytes)

    def add_replicas(self, plan, outer_rounds: int, theta0_boxes: list[list] | None = None) -> list[list]:
        """Start the replicas of ``plan`` (neuroray.planner.expand: pinned to nodes, numbered after the running
        ones) at the running model and split, between outer rounds: each holder takes replica 0's range (at
        theta0, with its AdamW state) and the round count; ``theta0_boxes``: per range, the theta0 refs its copy must
        match (neuroray/swarm/copy_check.py). Returns the new pipelines, already in
        ``replicas``; on any failure nothing is added (the started holders and groups are removed)."""
        c = self.cfg.cluster
        groups = reserve_plan(plan, c.actor_start_timeout_s,
                              name=f"{self.name_prefix or 'neuroray-'}added-{len(self.replicas)}")
        new = []
        try:
            for g, rep in enumerate(plan.holders):
                new.append([self._holder(h.replica, h.stage, h.cpus, h.gpus, bundle_strategy(groups[g], h.stage), None)
                            for h in rep])
            infos = self.get([h.info.remote() for p in new for h in p], c.actor_start_timeout_s,
                             "starting the added holders")
            peers = self.replicas[0]
            self.get([h.join.remote(peers[s].export_range.remote(optimizer=True), outer_rounds,
                                    None if theta0_boxes is None else theta0_boxes[s])
                      for p in new for s, h in enumerate(p)], c.step_timeout_s, "loading the added holders")
        except BaseException:
            for h in (h for p in new for h in p):
                ray.kill(h)
            release(groups)
            raise
        self.replicas += new
        self.groups += groups
        self.infos += infos
        return new

    def replace_holders(self, r: int, stages: list[int], lost_nodes: set[str], timeout_s: float) -> list:
        """Holders of replica ``r`` at ``stages`` sit on lost nodes (neuroray.swarm.liveness): end them and start
        fresh ones on a live node, each restoring its slot's newest complete snapshot from the snapshot store
        (which the driver's node serves). Ray would restart them itself only once its health check declares
        the node dead. Returns the new handles, already in ``replicas``, ``infos`` and ``by_range``."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from neuroray.snapshot import SnapshotStore
        from neuroray.swarm.liveness import live_node

        c = self.cfg.cluster
        new = []
        for s in stages:
            ray.kill(self.replicas[r][s], no_restart=True)  # the GCS frees its name now, whatever the node hears
            steps = [] if not self.snapshot_root else SnapshotStore(self.snapshot_root, f"r{r}-s{s}").steps()
            node = live_node(c.cpus_per_holder, c.gpus_per_holder, lost_nodes)
            strategy = None if node is None else NodeAffinitySchedulingStrategy(node, soft=False)
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    h = self._holder(r, s, c.cpus_per_holder, c.gpus_per_holder, strategy, steps[-1] if steps else None)
                    break
                except ValueError as exc:  # the GCS may not have processed the kill yet: the name is still taken
                    if "already" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            self.replicas[r][s] = h
            new.append(h)
        infos = self.get([h.info.remote() for h in new], timeout_s, f"starting replacements of replica {r}'s holders")
        for s, info in zip(stages, infos):
            self.infos[r * len(self.ranges) + s] = info
        return new

    @property
    def by_range(self) -> list[list]:
        return [[p[s] for p in self.replicas] for s in range(len(self.ranges))]

    @property
    def drivers(self) -> list:
        return [p[0] for p in self.replicas]

    def get(self, refs, timeout_s: float, what: str):
        """``ray.get`` with a deadline and the holder's own error, not Ray's wrapper, on failure."""
        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise PipelineError(
                f"{what} took longer than {timeout_s:g}s; raise cluster.step_timeout_s or "
                "cluster.actor_start_timeout_s, or check the Ray dashboard for stuck holders"
            ) from None
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
            cause = unwrap_ray_error(exc)
            if cause is not exc:
                raise cause from None
            first = str(exc).strip().splitlines()[0]
            raise PipelineError(f"{what} failed: a stage holder died ({first})") from None

    def shutdown(self) -> None:
        for p in self.replicas:
            for h in p:
                ray.kill(h)
        release(self.groups)
