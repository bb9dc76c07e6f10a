"""Upgrade bookkeeping without Ray: where new layers go, whether grown holders still fit their nodes, and the
trainer's polling of the watcher."""

import dataclasses

from neuroray.config import ClusterConfig, DataConfig, ModelConfig, PlannerConfig, TrainConfig
from neuroray.planner import plan_for_cluster, request_from_config, scaling
from neuroray.planner.upgrade import fit_problem, migration_ranges


def _cfg(nodes, **planner):
    return TrainConfig(model=ModelConfig(name="auto", max_seq_len=64), data=DataConfig(seq_len=16, microbatch_size=2,
                                                                                   num_microbatches=2),
                       cluster=ClusterConfig(nodes=list(nodes)), planner=PlannerConfig(**planner))


def test_new_layers_join_the_range_of_the_layer_before_them():
    base = ModelConfig(name="auto")
    small, deep = scaling.shape(8, 256, base), scaling.shape(16, 512, base)
    assert migration_ranges([(0, 4), (4, 8)], small, deep) == [(0, 8), (8, 16)]  # 16 = 8 old + 8 identity, evenly
    assert migration_ranges([(0, 3), (3, 6), (6, 8)], small, deep) == [(0, 6), (6, 12), (12, 16)]
    assert migration_ranges([(0, 4), (4, 8)], small, scaling.shape(8, 512, base)) == [(0, 4), (4, 8)]  # width only


def test_grown_holders_must_fit_the_nodes_they_run_on():
    cfg = _cfg(["2GiB"], stages=2, max_replicas=1, holder_overhead="100MB")
    running = plan_for_cluster(cfg)
    assert (running.model.n_layers, running.model.d_model) == (8, 256)
    req = request_from_config(cfg)
    deeper = scaling.shape(16, 256, running.model)  # 8 x 512 would not: 2.29 GB with its snapshot copies
    assert fit_problem(running, list(running.nodes), deeper, migration_ranges(running.ranges, running.model, deeper),
                       req) == ""
    big = scaling.shape(16, 1024, running.model)  # the 40 GB model cannot grow on a 2 GiB node
    problem = fit_problem(running, list(running.nodes), big, migration_ranges(running.ranges, running.model, big), req)
    assert problem.startswith("node0(2GiB) would need") and "for its grown holders (and outer step), it offers" in problem


def test_the_trainer_polls_at_its_interval_and_refuses_an_upgrade_that_does_not_fit():
    """The Upgrader between rounds, on a cluster read from a list that gains a big node: polls only every
    planner.watch_interval_s, logs the join and the recomputed plan, and refuses the law's 16 x 512
    because the running holders' 2 GiB node cannot take it; the running model stays the one to grow from."""
    from types import SimpleNamespace

    from neuroray.planner import ClusterWatcher, parse_nodes
    from neuroray.planner.upgrade import Upgrader

    cfg = _cfg(["2GiB"], stages=2, max_replicas=1, holder_overhead="100MB", upgrade_every_nodes=1,
               watch_interval_s=10.0)
    running = plan_for_cluster(cfg)
    nodes = parse_nodes(["2GiB"])
    watcher = ClusterWatcher(cfg, read_nodes=lambda: nodes, current=running)
    now, lines = [0.0], []
    up = Upgrader(cfg, running, watcher=watcher, log=lines.append, clock=lambda: now[0])
    # the running state the Upgrader reads before any migration: the model and the swarm's ranges
    trainer = SimpleNamespace(cfg=dataclasses.replace(cfg, model=running.model),
                              swarm=SimpleNamespace(ranges=running.ranges), ledger=None)
    nodes = parse_nodes(["2GiB", "10GiB"])
    now[0] = 5.0
    assert up.between_rounds(trainer) is False and lines == []  # not polled yet: the interval has not passed
    now[0] = 10.0
    assert up.between_rounds(trainer) is False
    assert lines[0].startswith("cluster watch: joined node-1; left none")
    assert lines[1].startswith("cluster watch: recomputed plan: 16 x 512")
    assert lines[2].startswith("upgrade to 16 x 512") and "refused: node0(2GiB) would need" in lines[2]
    assert watcher.current is running and up.upgrades == []


def _usage(plans, req) -> dict:
    """Host bytes per node: every plan's holders plus the last plan's outer-step room."""
    used = {}
    for p in plans:
        for rep in p.holders:
            for h in rep:
                used[h.node_id] = used.get(h.node_id, 0) + p.stages[h.stage].memory.total
    used[plans[-1].outer.node_id] = used.get(plans[-1].outer.node_id, 0) + plans[-1].outer.task_bytes
    return used


def test_new_replicas_fit_in_what_the_running_holders_leave_free():
    """place_ranges (planner.add_replicas) puts new replicas of the running model and split beside the running
    holders, numbered after them, never beyond any node's safety fraction counting the outer step of all
    replicas; a grown model counts grown, so fewer fit; max_replicas-style caps hold; a node that cannot
    take a whole replica gets none."""
    from neuroray.planner import parse_nodes
    from neuroray.planner.expand import place_ranges

    cfg = _cfg(["2GiB"], stages=2, max_replicas=1, holder_overhead="100MB")
    running = plan_for_cluster(cfg)
    req = request_from_config(cfg)
    nodes = parse_nodes(["2GiB", "3GiB"])
    extra = place_ranges(nodes, req, running.model, running.ranges, running=list(running.holders),
                         device=running.device, most=100)
    assert extra.replicas >= 2 and extra.ranges == running.ranges and extra.model == running.model
    assert [rep[0].replica for rep in extra.holders] == list(range(1, extra.replicas + 1))
    by_id = {n.node_id: n for n in nodes}
    for node_id, used in _usage([running, extra], req).items():
        assert used <= by_id[node_id].memory * req.safety_fraction, (node_id, used)
    assert place_ranges(nodes, req, running.model, running.ranges, running=list(running.holders),
                        device=running.device, most=1).replicas == 1
    # grown to 16 x 256 the running holders take more of node0 and each new replica is bigger: fewer fit
    deep = scaling.shape(16, 256, running.model)
    grown = migration_ranges(running.ranges, running.model, deep)
    bigger = place_ranges(nodes, req, deep, grown, running=list(running.holders), device=running.device, most=100)
    assert 1 <= bigger.replicas < extra.replicas
    for node_id, used in _usage([dataclasses.replace(running, stages=bigger.stages), bigger], req).items():
        assert used <= by_id[node_id].memory * req.safety_fraction, (node_id, used)
    # a joined node too small for a whole replica of the running model: nothing is placed
    tiny = parse_nodes(["2GiB", "500MB"])
    assert place_ranges(tiny, req, deep, grown, running=list(running.holders), device=running.device,
                        most=100).replicas == 0
