"""Live architecture upgrades: the trainer polls the cluster watcher and migrates running holders.

With ``model=auto`` the trainer asks an :class:`Upgrader` between outer rounds (after the outer step,
when nothing is in flight and every holder of a range holds theta0). At most once per
``planner.watch_interval_s`` it polls the :class:`~neuroray.planner.cluster.ClusterWatcher`, logs
joins, leaves and the recomputed plan, and when the watcher adopts a bigger architecture (every
``planner.upgrade_every_nodes`` joins, only if ``P(new) >= planner.min_growth x P(current)``:
:class:`~neuroray.planner.cluster.UpgradeRule`) it migrates the running swarm with :func:`migrate`:

* every holder grows its stage in place by function-preserving growth (neuroray.model.growth):
  weights, its theta0 and its AdamW moments (``StageHolder.grow``);
* OuterSync's theta0 (as weights) and outer momentum (as a difference) of every range grow by the
  same seeded maps in one Ray task per range, so ``theta0`` there equals the holders' grown weights
  and DiLoCo carries on; the aggregation memory (centered clipping's centre, the stale-replay
  attack's buffer) restarts empty, as on the first round.

**Where new layers go.** The running swarm keeps its stages, replicas and placement groups; only
the layer ranges grow. New identity layers are spread evenly between the old ones
(:func:`~neuroray.model.growth.depth_layout`) and each joins the range of the old layer right before
it (new layers in front of layer 0 join range 0): :func:`~neuroray.model.growth.new_ranges_for`.
So every range grows by about the same factor, every holder grows from its own layers only (no
tensor crosses holders), and the pipeline computes what it did. The new plan's own split and
placement are not applied mid-run, and the upgrade is refused (logged, training goes on with the
current model) if the grown holders would not fit their nodes' memory by the planner's accounting.
A holder that dies inside its growth is brought back grown (:func:`_recover_grown`).

**New holders on joined nodes** (``planner.add_replicas``): after the poll's migration, if any, as
many new replicas of the running model and split as fit beside the running holders
(:func:`~neuroray.planner.expand.place_ranges`) start in placement groups of their own and join the
next round (``Swarm.add_replicas``, ``Trainer.replicas_added``): new holders start on the new
architecture.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import ray
import torch

from neuroray.config import ModelConfig, TrainConfig
from neuroray.errors import PipelineError
from neuroray.model.growth import flat_to_state, grow_state_dict, new_ranges_for, state_to_flat
from neuroray.planner import scaling
from neuroray.planner.cluster import ClusterWatcher, WatchEvent
from neuroray.planner.expand import place_ranges
from neuroray.planner.memory import format_bytes, holder_memory, outer_step_bytes
from neuroray.planner.plan_types import NodeSpec, Plan, PlanError, PlanRequest
from neuroray.swarm.ray_errors import holder_died

MAX_ADDED = 1024  # replicas one poll may add without planner.max_replicas: a bound on trying, not a policy


def migration_ranges(ranges: list[tuple[int, int]], old: ModelConfig, new: ModelConfig) -> list[tuple[int, int]]:
    """The running split grown to ``new``: each new layer joins the range of the old layer before it."""
    return new_ranges_for(list(ranges), old.n_layers, new.n_layers)


def grow_flat(vector: torch.Tensor, old_layout, new_layout, old: ModelConfig, new: ModelConfig, *, seed: int,
              kind: str) -> torch.Tensor:
    """A range's flat vector (theta0: ``kind="weights"``, momentum: ``"delta"``) laid out over the grown range."""
    layers = sorted({int(name.split(".")[1]) for name, _ in new_layout if name.startswith("layers.")})
    grown = grow_state_dict(flat_to_state(vector, old_layout), old, new, seed=seed, layers=layers, kind=kind)
    return state_to_flat(grown, new_layout)


# num_cpus=0 like the outer step: holders may occupy every CPU and the migration must still run.
@ray.remote(num_cpus=0, num_returns=2)
def _grow_outer_task(theta0, momentum, old_layout, new_layout, old, new, seed):
    grown = grow_flat(theta0, old_layout, new_layout, old, new, seed=seed, kind="weights")
    moved = None if momentum is None else grow_flat(momentum, old_layout, new_layout, old, new, seed=seed, kind="delta")
    return grown, moved


def migrate(swarm, outer, old: ModelConfig, new: ModelConfig, ranges: list[tuple[int, int]], *, seed: int,
            timeout_s: float, recovery_timeout_s: float = 0.0, log: Callable[[str], None] = print) -> None:
    """Grow every holder of ``swarm`` and every range's theta0 and momentum in ``outer`` from ``old`` to ``new``.

    Call between outer rounds (nothing in flight). ``ranges``: :func:`migration_ranges` of the swarm's.
    A holder that dies during its growth is waited for (``recovery_timeout_s``; 0: fail at once) and brought
    to where the others are: :func:`_recover_grown`.
    """
    holders = [h for p in swarm.replicas for h in p]
    old_layouts = swarm.get([hs[0].param_layout.remote() for hs in swarm.by_range], timeout_s, "reading the ranges")
    old_theta0 = list(outer.theta0)  # the ranges' theta0 before the growth: a restarted holder re-grows from it
    refs = [h.grow.remote(new, ranges, seed) for h in holders]
    if ray.wait(refs, num_returns=len(refs), timeout=timeout_s)[1]:
        raise PipelineError(f"growing the stage holders took longer than {timeout_s:g}s; raise cluster.step_timeout_s "
                            "or check the Ray dashboard for stuck holders")
    infos, died = [], []
    for k, ref in enumerate(refs):
        try:
            infos.append(ray.get(ref))
        except Exception as exc:  # noqa: BLE001 - a death is recovered below; anything else is the holder's error
            if not holder_died(exc) or recovery_timeout_s <= 0:
                swarm.get(ref, timeout_s, "growing the stage holders")  # raises it, unwrapped from Ray's
            infos.append(None)
            died.append(k)
    for k in died:
        infos[k] = _recover_grown(swarm, holders, infos, k, old_theta0, new, ranges, seed=seed, rounds=outer.rounds,
                                  timeout_s=timeout_s, deadline=time.monotonic() + recovery_timeout_s, log=log)
    new_layouts = swarm.get([hs[0].param_layout.remote() for hs in swarm.by_range], timeout_s, "reading the ranges")
    refs = []
    for s in range(len(ranges)):
        theta0, momentum = _grow_outer_task.remote(old_theta0[s], outer.momentum[s], old_layouts[s], new_layouts[s],
                                                   old, new, seed)
        outer.theta0[s] = theta0
        outer.momentum[s] = None if outer.momentum[s] is None else momentum
        outer.memory[s] = None  # centered clipping's centre and replay buffers restart, as on round 1
        refs.append(theta0)
    ray.get(refs, timeout=timeout_s)  # surface a failed growth here, not at the next outer step
    outer.slices = None  # streaming: grown ranges are cut into fragments anew
    swarm.ranges, swarm.infos, swarm.model = list(ranges), infos, new
    swarm.numels = [infos[s]["numel"] for s in range(len(ranges))]


def _recover_grown(swarm, holders: list, infos: list, k: int, old_theta0: list, new: ModelConfig,
                   ranges: list[tuple[int, int]], *, seed: int, rounds: int, timeout_s: float, deadline: float,
                   log: Callable[[str], None]) -> dict:
    """Holder ``k`` died during its growth: wait for Ray's restart (on its original spec; it restores its
    newest snapshot, taken before this growth), then bring it to the grown state of its range.

    With a peer of its range that grew, it copies that peer's range (grown weights = grown theta0, the
    architecture, AdamW state), as a holder added mid-run does. Without one (a single replica, or every
    holder of the range died) it rejoins at the range's theta0 from before the growth and grows again:
    the growth is seeded, so it lands where the others did. Either way it takes the swarm's round count.
    """
    from neuroray.training.trainer import wait_alive

    stages = len(ranges)
    r, s, h = k // stages, k % stages, holders[k]
    try:
        wait_alive(h, deadline)
        peers = [holders[j] for j in range(s, len(holders), stages) if j != k and infos[j] is not None]
        if peers:
            ray.get(h.join.remote(peers[0].export_range.remote(optimizer=True), rounds), timeout=timeout_s)
            info = ray.get(h.info.remote(), timeout=timeout_s)
            how = "copied its grown range from a peer"
        else:
            ray.get(h.rejoin.remote(old_theta0[s], rounds), timeout=timeout_s)
            info = ray.get(h.grow.remote(new, ranges, seed), timeout=timeout_s)
            how = "grew again from the range's theta0"
    except Exception as exc:  # noqa: BLE001 - restarts exhausted, node lost, or it died once more
        raise PipelineError(
            f"holder r{r}-s{s} died during the upgrade to {scaling.describe(new)} and could not be brought back "
            f"({type(exc).__name__}); the snapshot set before the upgrade is kept: rerun with resume=true, or raise "
            "checkpoint.max_restarts / checkpoint.recovery_timeout_s") from None
    log(f"upgrade: holder r{r}-s{s} died during its growth; restarted and {how}")
    return info


def fit_problem(placement: Plan, nodes: list[NodeSpec], new: ModelConfig, ranges: list[tuple[int, int]],
                req: PlanRequest) -> str:
    """Why the running holders, grown to ``new`` and ``ranges`` on their nodes, would not fit; "" if they do.

    The planner's accounting (neuroray.planner.memory): per GPU holder, its GPUs' memory; per CPU node,
    the sum of its holders plus, on the outer-step node, the largest range's outer-step task; each
    within ``safety_fraction``.
    """
    by_id = {n.node_id: n for n in placement.nodes} | {n.node_id: n for n in nodes}
    req = req.on(placement.device)
    grown = [holder_memory(new, placement.vocab_size, b - a, has_embedding=s == 0, has_head=s == len(ranges) - 1,
                           batch=req.batch, overhead=req.holder_overhead, snapshots=req.snapshots, stage=s,
                           stages=len(ranges))
             for s, (a, b) in enumerate(ranges)]
    needs = [m.total for m in grown]
    used: dict[str, int] = {}
    for rep in placement.holders:
        for h in rep:
            node = by_id[h.node_id]
            if placement.device == "gpu":
                cap = h.gpus * node.gpu_memory * req.safety_fraction
                if needs[h.stage] > cap:
                    return (f"stage {h.stage} would need {format_bytes(needs[h.stage])} on {node.name}'s GPUs, which "
                            f"offer {format_bytes(cap)}")
            else:
                used[h.node_id] = used.get(h.node_id, 0) + needs[h.stage]
    if placement.device == "cpu":
        outer = outer_step_bytes(max(m.params for m in grown), placement.replicas)
        used[placement.outer.node_id] = used.get(placement.outer.node_id, 0) + outer
        for node_id, need in used.items():
            node = by_id[node_id]
            if need > node.memory * req.safety_fraction:
                return (f"{node.name} would need {format_bytes(need)} for its grown holders (and outer step), "
                        f"it offers {format_bytes(node.memory * req.safety_fraction)}")
    return ""


def _short(node_ids: list[str]) -> str:
    return ", ".join(x[:8] for x in node_ids) or "none"


@dataclass
class Upgrader:
    """Polls the watcher between outer rounds and migrates the swarm when it adopts a bigger model.

    ``plan``: the plan the swarm was started from (its holders' nodes do not change mid-run).
    """

    cfg: TrainConfig
    plan: Plan
    watcher: ClusterWatcher | None = None
    log: Callable[[str], None] = print
    clock: Callable[[], float] = time.monotonic
    upgrades: list[dict] = field(default_factory=list)  # one record per migration done
    additions: list[dict] = field(default_factory=list)  # one record per set of replicas added mid-run

    def __post_init__(self):
        if self.watcher is None:
            self.watcher = ClusterWatcher(self.cfg, current=self.plan)
        self._last_poll = self.clock()

    def between_rounds(self, trainer) -> bool:
        """Poll if ``planner.watch_interval_s`` has passed; log what changed; migrate on an upgrade.

        True when the holders grew (the trainer then snapshots at once)."""
        if self.clock() - self._last_poll < self.cfg.planner.watch_interval_s:
            return False
        self._last_poll = self.clock()
        try:
            event = self.watcher.poll()
        except Exception as exc:  # noqa: BLE001 - a failed read of the cluster must not stop training; next poll retries
            self.log(f"cluster watch: {str(exc).splitlines()[0]}")
            return False
        if event is None:
            return False
        self.log(f"cluster watch: joined {_short(event.joined)}; left {_short(event.left)}")
        if event.plan is not None:
            p = event.plan
            self.log(f"cluster watch: recomputed plan: {scaling.describe(p.model)}, {p.num_stages} stages x "
                     f"{p.replicas} replicas on {len(p.nodes)} nodes ({format_bytes(p.law_memory)})")
        if event.evaluated and not event.upgraded:
            self.log(f"cluster watch: architecture kept ({event.reason})")
        if event.plan is None:
            self.log(f"cluster watch: {event.reason}; training goes on with the running holders")
        grew = event.upgraded and self._upgrade(trainer, event)
        # after a growth: new holders start on the new architecture
        added = bool(event.joined) and self._add_replicas(trainer)
        return grew or added

    def _add_replicas(self, trainer) -> bool:
        """Start as many new replicas as fit in what the running holders leave free (planner.add_replicas).

        At the running model and split (just grown, if it grew), numbered after the running replicas, in
        placement groups of their own pinned where :func:`~neuroray.planner.expand.place_ranges` counted
        them; they take replica 0's range at theta0 and join the next round's outer step."""
        req, model = self.watcher.request, trainer.cfg.model
        if not self.cfg.planner.add_replicas or req.replicas:  # planner.replicas fixes the count
            return False
        if trainer.cfg.swarm.routing == "router":
            self.log("cluster watch: no replicas added: swarm.routing=router keeps the holders it started with")
            return False
        running = self.plan.replicas
        most = req.max_replicas - running if req.max_replicas else MAX_ADDED
        if most < 1:
            self.log(f"cluster watch: no replicas added: planner.max_replicas={req.max_replicas} are running")
            return False
        try:
            extra = place_ranges(self.watcher.nodes, req, model, trainer.swarm.ranges, running=list(self.plan.holders),
                                 device=self.plan.device, most=most)
        except PlanError as exc:
            self.log(f"cluster watch: no replicas added: {exc}")
            return False
        if not extra.holders:
            self.log(f"cluster watch: no replica of {scaling.describe(model)} fits in what the running holders "
                     "leave free")
            return False
        t0 = time.monotonic()
        try:
            outer = trainer.outer  # the added holders' copies must carry each range's theta0
            new = trainer.swarm.add_replicas(extra, outer.rounds, [[outer.theta0[s], outer.round_theta0[s]]
                                                                   for s in range(len(outer.theta0))])
        except Exception as exc:  # noqa: BLE001 - no room after all, a node gone: training goes on as it was
            self.log(f"cluster watch: adding {extra.replicas} replicas failed ({str(exc).splitlines()[0]}); "
                     f"training goes on with {running}")
            return False
        trainer.replicas_added(new)
        by_id = {n.node_id: n for n in self.plan.nodes + extra.nodes}
        self.plan = dataclasses.replace(self.plan, holders=self.plan.holders + extra.holders,
                                        nodes=tuple(by_id.values()), outer=extra.outer)
        nodes = sorted({h.node_name for rep in extra.holders for h in rep})
        infos = trainer.swarm.infos[running * len(trainer.swarm.ranges):]
        record = {"round": trainer.outer.rounds, "replicas": [rep[0].replica for rep in extra.holders],
                  "nodes": nodes, "model": dataclasses.asdict(model), "node_ids": [i["node_id"] for i in infos],
                  "seconds": time.monotonic() - t0}
        self.additions.append(record)
        self.log(f"grow: after round {record['round']} added replica(s) {record['replicas']} of "
                 f"{scaling.describe(model)} on {', '.join(nodes)} in {record['seconds']:.1f}s; "
                 f"{len(trainer.swarm.replicas)} replicas from round {record['round'] + 1}")
        return True

    def _upgrade(self, trainer, event: WatchEvent) -> bool:
        old, new = trainer.cfg.model, event.plan.model
        ranges = migration_ranges(trainer.swarm.ranges, old, new)
        problem = fit_problem(self.plan, list(event.plan.nodes), new, ranges, self.watcher.request)
        if problem:
            self.log(f"upgrade to {scaling.describe(new)} refused: {problem}; training goes on with "
                     f"{scaling.describe(old)}")
            self.watcher.current = event.previous  # the running model stays what the next upgrade grows from
            return False
        t0 = time.monotonic()
        migrate(trainer.swarm, trainer.outer, old, new, ranges, seed=self.cfg.seed,
                timeout_s=self.cfg.cluster.step_timeout_s,
                recovery_timeout_s=self.cfg.checkpoint.recovery_timeout_s, log=self.log)
        trainer.cfg = dataclasses.replace(trainer.cfg, model=new)
        if trainer.ledger is not None:  # proofs now claim the grown ranges of a deeper model: tell the ledger
            holders = [h for p in trainer.swarm.replicas for h in p]
            records = trainer.swarm.get([h.ponw_registration.remote() for h in holders],
                                        self.cfg.cluster.step_timeout_s, "re-registering the grown holders")
            ray.get(trainer.ledger.grow_model.remote(trainer.coordinator.sign_registration(records, new.n_layers)),
                    timeout=self.cfg.cluster.step_timeout_s)
        record = {"round": trainer.outer.rounds, "from": dataclasses.asdict(old), "to": dataclasses.asdict(new),
                  "growth": event.growth, "ranges": [list(r) for r in ranges], "seconds": time.monotonic() - t0}
        self.upgrades.append(record)
        self.log(f"upgrade: after round {record['round']} grew {scaling.describe(old)} -> {scaling.describe(new)} "
                 f"({event.growth:.2f}x parameters) in place in {record['seconds']:.1f}s; ranges "
                 f"{[(a, b - 1) for a, b in ranges]}")
        return True
