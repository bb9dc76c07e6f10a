"""Upgrade bookkeeping without Ray: where new layers go, whether grown holders still fit their nodes, and the
trainer's polling of the watcher."""

import dataclasses

from neuroray.config import ClusterConfig, DataConfig, ModelConfig, PlannerConfig, TrainConfig
from neuroray.planner import plan_for_cluster, request_from_config, scaling
from neuroray.planner.upgrade import fit_problem, migration_ranges


def _cfg(nodes, **planner):
    return TrainConfig(model=ModelConfig(name="auto", max_seq_len=64), data=DataConfig(seq_len=16, microbatch_size=2),
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
    width = scaling.shape(8, 512, running.model)
    assert fit_problem(running, list(running.nodes), width, running.ranges, req) == ""
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
