"""Upgrade bookkeeping without Ray: where new layers go, and whether grown holders still fit their nodes."""

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
