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
from neuroray.swarm.ray_errors import holder_died, unwrap_ray_error, user_error
from neuroray.swarm.spares import FAILED, READY, STARTING, Spare, SparePool


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
        # checkpoint.spares (neuroray/swarm/spares.py): holders then get no Ray restart, so a crash surfaces at once
        self.spares = None if cfg.checkpoint.spares == 0 else SparePool(
            len(self.ranges), cfg.checkpoint.spares, cfg.checkpoint.max_restarts)
        self.placement: dict[tuple[int, int], object] = {}  # (replica, stage) -> strategy, where not its bundle
        self.replicas: list[list] = []
        for r in range(cfg.diloco.replicas):
            pipeline = []
            for s in range(len(self.ranges)):
                cpus, gpus = c.cpus_per_holder, c.gpus_per_holder
                if plan is not None:
                    cpus, gpus = plan.holders[r][s].cpus, plan.holders[r][s].gpus
                pipeline.append(self._holder(r, s, cpus, gpus, bundle_strategy(self.groups[r], s), resume_step))
            self.replicas.append(pipeline)
        for s in range(len(self.ranges)) if self.spares is not None else ():
            for _ in range(self.spares.per_range):
                self._start_spare(s, None)
        t0 = time.monotonic()
        self.infos = self.get([h.info.remote() for p in self.replicas for h in p], c.actor_start_timeout_s,
                              "starting stage holders")
        if self.spares is not None:  # started beside the holders; a crash in round one finds them ready
            self.get([sp.ready for sp in self.spares.all()], c.actor_start_timeout_s,
                     f"starting the spare holders (checkpoint.spares={self.spares.per_range} asks "
                     f"{self.spares.per_range * len(self.ranges)} x cluster.cpus_per_holder/gpus_per_holder more)")
        log(f"swarm: {len(self.replicas)} replicas x {len(self.ranges)} stages up in {time.monotonic() - t0:.1f}s; "
            f"ranges {[(lo, hi - 1) for lo, hi in self.ranges]}"
            + ("" if self.spares is None else f"; {self.spares.per_range} spare(s) per range"))
        self.numels = [self.infos[s]["numel"] for s in range(len(self.ranges))]

    def _holder(self, r: int, s: int, cpus: float, gpus: float, strategy, resume_step: int | None,
                restore_latest: bool = False):
        """Start the holder of range ``s`` in replica ``r`` at the swarm's current model and split; ``restore_latest``:
        it replaces a crashed one and restores the slot's newest snapshot (spares.py)."""
        spec = replace(self._spec(r, s, gpus, resume_step), restore_latest=restore_latest)
        return holder_actor(spec, cpus, gpus, strategy,
                            name=None if self.name_prefix is None else f"{self.name_prefix}{spec.slot}",
                            max_restarts=0 if self.spares is not None else self.cfg.checkpoint.max_restarts,
                            routed=self.cfg.swarm.routing == "router", holder_cls=self.holder_cls,
                            inline_max_bytes=self.cfg.swarm.hop_inline_max_bytes)

    def _spec(self, r: int, s: int, gpus: float, resume_step: int | None) -> HolderSpec:
        """The spec of slot ``r<r>-s<s>`` at the swarm's current model and split."""
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
        return spec

    # ----- warm spares (checkpoint.spares, neuroray/swarm/spares.py) ------------------------------
    def _start_spare(self, s: int, strategy) -> None:
        """Start an idle spare of range ``s`` (not waited for); ``strategy``: where (a freed bundle, or anywhere)."""
        c = self.cfg.cluster
        name = self.spares.name(s)
        spec = replace(self._spec(0, s, c.gpus_per_holder, None), spare=True)
        h = holder_actor(spec, c.cpus_per_holder, c.gpus_per_holder, strategy,
                         name=None if self.name_prefix is None else f"{self.name_prefix}{name}", max_restarts=0,
                         holder_cls=self.holder_cls, inline_max_bytes=self.cfg.swarm.hop_inline_max_bytes)
        self.spares.add(s, Spare(h, name, h.spare_ready.remote(), strategy))

    def _strategy(self, r: int, s: int):
        """Where slot ``r<r>-s<s>``'s holder was placed: its replica's bundle unless it was replaced."""
        return self.placement[r, s] if (r, s) in self.placement else bundle_strategy(self.groups[r], s)

    def take_over(self, r: int, s: int, timeout_s: float) -> tuple[object, str]:
        """The holder of replica ``r`` at stage ``s`` died for good (no Ray restart with spares): a ready spare of
        range ``s`` takes its slot over, else a fresh holder starts for it; either restores the slot's newest good
        snapshot. A new spare starts in the background, where the dead holder was. Returns the new handle (already in
        ``replicas`` and ``infos``) and how: ``spare`` or ``fresh``."""
        c = self.cfg.cluster
        self.spares.charge(r, s)
        freed = self._strategy(r, s)
        ray.kill(self.replicas[r][s], no_restart=True)  # dead already; makes sure the GCS frees it and its name
        deadline = time.monotonic() + timeout_s
        spec = self._spec(r, s, c.gpus_per_holder, None)
        h, how = None, "spare"
        while h is None:
            spare, failed = self.spares.take(s, _spare_state)
            for sp in failed:
                ray.kill(sp.handle, no_restart=True)
            if spare is None:
                break
            try:
                info = ray.get(spare.handle.become.remote(spec), timeout=max(deadline - time.monotonic(), 0.1))
                h, strategy = spare.handle, spare.strategy
            except ray.exceptions.GetTimeoutError:
                raise PipelineError(f"spare {spare.name} did not take r{r}-s{s} over within {timeout_s:g}s "
                                    "(checkpoint.recovery_timeout_s)") from None
            except Exception as exc:
                if not holder_died(exc):
                    raise user_error(exc, f"spare {spare.name} taking r{r}-s{s} over") from None
                ray.kill(spare.handle, no_restart=True)  # died idle: the next one
        if h is None:  # no spare ready: a fresh holder in the dead one's place, as Ray's restart would be
            how, strategy = "fresh", freed
            h = self._named(lambda: self._holder(r, s, c.cpus_per_holder, c.gpus_per_holder, freed, None,
                                                 restore_latest=True), deadline)
            info = self.get([h.info.remote()], max(deadline - time.monotonic(), 0.1), f"starting r{r}-s{s} afresh")[0]
        # the range's spares back to checkpoint.spares (the one taken, any that failed), the first where the dead
        # holder was unless the fresh holder took that place
        for k in range(self.spares.per_range - len(self.spares.idle[s])):
            self._start_spare(s, freed if k == 0 and how == "spare" else None)
        self.placement[r, s] = strategy
        self.replicas[r][s] = h
        self.infos[r * len(self.ranges) + s] = info
        return h, how

    @staticmethod
    def _named(start, deadline: float):
        """``start()`` a named actor, again while the GCS still holds a killed one's name (it frees it shortly)."""
        while True:
            try:
                return start()
            except ValueError as exc:
                if "already" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

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
            # the GCS may not have processed the kill yet: the name is still taken
            h = self._named(lambda: self._holder(r, s, c.cpus_per_holder, c.gpus_per_holder, strategy,
                                                 steps[-1] if steps else None), time.monotonic() + timeout_s)
            self.placement[r, s] = strategy
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
        spares = [] if self.spares is None else [sp.handle for sp in self.spares.all()]
        for h in [h for p in self.replicas for h in p] + spares:
            ray.kill(h)
        release(self.groups)


def _spare_state(spare: Spare) -> str:
    """Whether ``spare``'s start is done (READY), still going (STARTING) or failed (FAILED: it died or raised)."""
    done, _ = ray.wait([spare.ready], timeout=0)
    if not done:
        return STARTING
    try:
        ray.get(spare.ready, timeout=0)
    except Exception:  # noqa: BLE001 - any failure of its start: the spare cannot serve
        return FAILED
    return READY
