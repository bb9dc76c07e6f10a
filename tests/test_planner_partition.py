"""Partition, replicas, node assignment, bad input, the upgrade rule and the plan CLI (no Ray)."""

import dataclasses
import itertools
import random

import pytest

from neuroray.config import ClusterConfig, ModelConfig, PlannerConfig, TrainConfig
from neuroray.configure import load_config
from neuroray.errors import ConfigError
from neuroray.cli.plan import main
from neuroray.planner.report import format_plan
from neuroray.planner import ClusterWatcher, NodeSpec, PlanError, architecture_for_memory, parse_nodes, plan_for_cluster
from neuroray.planner.cluster import UpgradeRule, nodes_from_ray
from neuroray.planner.memory import outer_step_bytes
from neuroray.planner.partition import item_costs, partition_layers
from neuroray.planner.scaling import param_count

TINY = ModelConfig(name="tiny", d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=256)


def _cfg(nodes, model=None, **planner) -> TrainConfig:
    return TrainConfig(model=model or ModelConfig(name="auto"), cluster=ClusterConfig(nodes=list(nodes)),
                       planner=PlannerConfig(**planner))


def _check_never_exceeds(plan):
    """Every node's planned holders (and the outer-step room) fit in safety x its memory."""
    for n in plan.nodes:
        cap = (n.gpu_memory if plan.device == "gpu" else n.memory) * plan.safety_fraction
        on_node = [h for rep in plan.holders for h in rep if h.node_id == n.node_id]
        if plan.device == "gpu":
            assert all(h.device_memory <= cap * h.gpus for h in on_node)
            assert sum(h.gpus for h in on_node) <= n.gpus
            host = sum(h.host_memory for h in on_node)
        else:
            host = sum(h.device_memory for h in on_node)
        if n.node_id == plan.outer.node_id:
            host += plan.outer.task_bytes
        assert host <= n.memory * plan.safety_fraction, n.name
    assert [(s.start, s.end) for s in plan.stages] == plan.ranges
    assert plan.ranges[0][0] == 0 and plan.ranges[-1][1] == plan.model.n_layers
    assert all(a[1] == b[0] for a, b in zip(plan.ranges, plan.ranges[1:]))


# ----- partition -------------------------------------------------------------------------------------

def _brute_force(costs, s):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), s - 1):
        bounds = (0, *cuts, n)
        value = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = value if best is None else min(best, value)
    return best


def test_partition_is_optimal_and_contiguous():
    rng = random.Random(0)
    for _ in range(40):
        costs = [rng.uniform(0.1, 3) for _ in range(rng.randint(1, 9))]
        for s in range(1, len(costs) + 1):
            ranges = partition_layers(costs, s)
            assert len(ranges) == s and ranges[0][0] == 0 and ranges[-1][1] == len(costs)
            assert all(b > a for a, b in ranges) and all(x[1] == y[0] for x, y in zip(ranges, ranges[1:]))
            got = max(sum(costs[a:b]) for a, b in ranges)
            assert got == pytest.approx(_brute_force(costs, s))
    assert partition_layers([1.0] * 8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert partition_layers([1.0] * 3, 4) is None


def test_embedding_and_head_count_toward_their_stages():
    """With a large vocabulary the last stage (head + logits) and the first (embedding) hold fewer layers."""
    cfg = dataclasses.replace(TINY, n_layers=12)
    req = dataclasses.replace(_request(cfg), vocab_size=50_000)
    costs = item_costs(cfg, req)
    assert costs[-1] > costs[0] > costs[5]
    ranges = partition_layers(costs, 3)
    sizes = [b - a for a, b in ranges]
    assert sizes[1] > sizes[0] and sizes[1] > sizes[2]


def test_memory_veto_makes_impossible_partitions_none():
    assert partition_layers([1.0] * 4, 2, fits=lambda i, j, first, last: j - i <= 1) is None
    assert partition_layers([1.0] * 4, 4, fits=lambda i, j, first, last: j - i <= 1) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def _request(model):
    from neuroray.planner.cluster import request_from_config

    return request_from_config(_cfg(["8GB"], model=model))


# ----- plans ---------------------------------------------------------------------------------------------

def test_plan_for_a_memory_list():
    plan = plan_for_cluster(_cfg(["12GB", "12GB", "24GB"]))
    assert (plan.model.n_layers, plan.model.d_model) == (16, 1024)  # 48 GB: the law's anchor (40 GB) rounds to it
    assert plan.device == "cpu" and plan.replicas >= 2 and plan.num_stages >= 2
    _check_never_exceeds(plan)
    stage_params = sum(s.params for s in plan.stages)
    assert stage_params == param_count(plan.model, plan.vocab_size).total
    text = format_plan(plan)
    assert "16 x 1024" in text and "holder total" in text and "outer step" in text


def test_plans_never_exceed_any_node_on_random_clusters():
    rng = random.Random(1)
    sizes = ["2GB", "4GB", "6GB", "8GB", "16GB", "24GB", "64GB", "32GB+1x16GB", "64GB+2x24GB", "128GB+8x80GB"]
    checked = 0
    for _ in range(60):
        nodes = [rng.choice(sizes) for _ in range(rng.randint(1, 12))]
        within = rng.choice(["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"])
        try:
            plan = plan_for_cluster(_cfg(nodes, within_replica=within, across_replicas=rng.choice(["PACK", "SPREAD"]),
                                         exclude_small_nodes=True))
        except PlanError:
            continue
        _check_never_exceeds(plan)
        for rep in plan.holders:
            nodes_used = [h.node_id for h in rep]
            if within == "STRICT_SPREAD":
                assert len(set(nodes_used)) == len(nodes_used)
            if within == "STRICT_PACK":
                assert len(set(nodes_used)) == 1
        checked += 1
    assert checked > 30


def test_replicas_follow_the_cluster_size():
    small = plan_for_cluster(_cfg(["10x4GB"], model=ModelConfig(name="small", d_model=512, n_layers=8, n_heads=8,
                                                                 n_kv_heads=2)))
    big = plan_for_cluster(_cfg(["20x4GB"], model=small.model))
    assert big.replicas > small.replicas >= 1
    assert big.model == small.model  # a fixed model is placed, not resized
    capped = plan_for_cluster(_cfg(["20x4GB"], model=small.model, max_replicas=2))
    assert capped.replicas == 2
    exact = plan_for_cluster(_cfg(["20x4GB"], model=small.model, replicas=3, stages=2))
    assert (exact.replicas, exact.num_stages) == (3, 2)


def test_pack_within_spread_across():
    model = dataclasses.replace(TINY, n_layers=4)
    spread = plan_for_cluster(_cfg(["4x8GB"], model=model, stages=2, replicas=4, reserve_cpus=0))
    # each replica packed onto one node, the four replicas on four different nodes
    assert all(len(set(spread.node_ids(r))) == 1 for r in range(4))
    assert len({spread.node_ids(r)[0] for r in range(4)}) == 4
    packed = plan_for_cluster(_cfg(["4x8GB"], model=model, stages=2, replicas=4, across_replicas="PACK"))
    assert len({n for r in range(4) for n in packed.node_ids(r)}) == 1  # all on one node: it has room
    apart = plan_for_cluster(_cfg(["4x8GB"], model=model, stages=2, replicas=2, within_replica="STRICT_SPREAD"))
    assert all(len(set(apart.node_ids(r))) == 2 for r in range(2))


def test_gpu_nodes_hold_holders_in_gpu_memory():
    plan = plan_for_cluster(_cfg(["64GB+8x80GB", "32GB"]))
    assert plan.device == "gpu" and [n.name for n in plan.nodes] == ["node0(64GB+8x80GB)"]
    assert ("node1(32GB)", "0 GPUs < 1 per holder") in plan.excluded
    assert all(h.gpus == 1 and h.bundle()["GPU"] == 1 for rep in plan.holders for h in rep)
    assert plan.law_memory == 8 * 80 * 10**9
    _check_never_exceeds(plan)


def test_law_walks_down_when_the_embedding_does_not_fit():
    """A huge vocabulary on small nodes: the law's model cannot be split, a smaller one of the law is planned."""
    cfg = _cfg(["8x4GB"])
    cfg.data.vocab_size = 45_000  # the last stage (head + logits) of 16 x 1024 needs 4.33 GB > 3.2 GB usable
    cfg.data.microbatch_size, cfg.data.num_microbatches = 8, 2  # logits of 8-sequence microbatches
    plan = plan_for_cluster(cfg)
    assert plan.notes and "does not fit" in plan.notes[0]
    _check_never_exceeds(plan)


def test_outer_step_room_is_kept():
    plan = plan_for_cluster(_cfg(["8GB", "8GB", "24GB"]))
    assert plan.outer.node_name == "node2(24GB)"
    assert plan.outer.task_bytes == outer_step_bytes(max(s.params for s in plan.stages), plan.replicas)


# ----- bad input -----------------------------------------------------------------------------------------

def test_node_too_small_for_one_layer():
    with pytest.raises(PlanError, match=r"node node1\(500MB\) is too small for even one layer of 16 x 1024.*"
                                        r"planner.exclude_small_nodes=true"):
        plan_for_cluster(_cfg(["8GB", "500MB", "8GB", "24GB"]))
    plan = plan_for_cluster(_cfg(["8GB", "500MB", "8GB", "24GB"], exclude_small_nodes=True))
    assert plan.excluded and plan.excluded[0][0] == "node1(500MB)"
    assert all(h.node_name != "node1(500MB)" for rep in plan.holders for h in rep)


def test_zero_gpus_when_the_config_demands_them():
    cfg = _cfg(["8GB", "8GB"], device="gpu")
    with pytest.raises(PlanError, match=r"demands GPUs \(planner.device=gpu\) but the cluster has none"):
        plan_for_cluster(cfg)
    cfg = _cfg(["8GB"])
    cfg.cluster.gpus_per_holder = 1
    with pytest.raises(PlanError, match=r"cluster.gpus_per_holder=1\) but the cluster has none"):
        plan_for_cluster(cfg)


@pytest.mark.parametrize("nodes, says", [("[8,8GB]", "entry '8': node memory '8' has no unit"),
                                         ("[8GiBs]", "unknown unit 'GiBs'"),
                                         ("[64GB+2x80]", "GPU memory '80' has no unit")])
def test_memory_in_wrong_units(nodes, says):
    with pytest.raises(ConfigError, match=says) as info:
        load_config([f"cluster.nodes={nodes}"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="planner.holder_overhead '400' has no unit"):
        load_config(["planner.holder_overhead=400"])


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_gpu_probe_timeout_must_be_positive(value):
    with pytest.raises(ConfigError, match=r"planner.gpu_probe_timeout_s=.* must be positive") as info:
        load_config([f"planner.gpu_probe_timeout_s={value}"])
    assert "\n" not in str(info.value)
    assert load_config(["planner.gpu_probe_timeout_s=5"]).planner.gpu_probe_timeout_s == 5.0


def test_impossible_partition_of_a_fixed_model():
    big = ModelConfig(name="big", d_model=2048, n_layers=8, n_heads=32, n_kv_heads=8)
    cfg = _cfg(["8GB", "8GB"], model=big)
    cfg.data.vocab_size = 200_000  # a layer fits a node, the 200k x 2048 head does not
    with pytest.raises(PlanError, match=r"cannot place 8 x 2048 .* fits the largest holder slot \(6.40 GB\); "
                                        r"the last stage alone \(1 layer \+ head\) needs"):
        plan_for_cluster(cfg)
    with pytest.raises(PlanError, match="planner.stages=9 is more than the model's 4 layers"):
        plan_for_cluster(_cfg(["8GB"], model=TINY, stages=9))


def test_gpu_of_unknown_memory_is_a_clear_error():
    raw = [{"NodeID": "a" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.1",
            "Resources": {"CPU": 8.0, "GPU": 2.0, "memory": 64e9}}]
    nodes = nodes_from_ray(raw, PlannerConfig(), probe=lambda node_id: 0)
    with pytest.raises(PlanError, match="GPUs of unknown memory .*gpu_memory_gib"):
        plan_for_cluster(_cfg([]), nodes=nodes)


def test_nodes_from_ray_reads_gpu_memory_in_order():
    def node(i, **res):
        return {"NodeID": f"{i:056x}", "Alive": True, "NodeManagerAddress": "10.0.0.1",
                "Resources": {"CPU": 4.0, "memory": 32 * 2**30, **res}}

    raw = [node(1, GPU=4.0, gpu_memory_gib=96.0, **{"accelerator_type:A100": 1.0}),  # declared wins
           node(2, GPU=1.0, **{"accelerator_type:H100": 1.0}),
           node(3, GPU=1.0),  # neither: probe
           node(4, **{"node:__internal_head__": 1.0}),
           {**node(5), "Alive": False}]
    probed = []
    nodes = nodes_from_ray(raw, PlannerConfig(), probe=lambda nid: probed.append(nid) or 24 * 2**30)
    assert [n.gpu_memory // 2**30 for n in nodes] == [24, 80, 24, 0]
    assert [n.gpu_memory_source for n in nodes] == ["resource gpu_memory_gib", "accelerator H100", "probe", ""]
    assert probed == [f"{3:056x}"] and nodes[3].is_head and len(nodes) == 4
    assert nodes_from_ray(raw[2:3], PlannerConfig(probe_gpu_memory=False), probe=lambda nid: 1)[0].gpu_memory == 0


def test_parse_nodes_forms():
    nodes = parse_nodes(["2x4GB", "64GB+8x80GB"])
    assert [(n.memory, n.gpus, n.gpu_memory) for n in nodes] == [(4e9, 0, 0), (4e9, 0, 0), (64e9, 8, 80e9)]
    assert [n.node_id for n in nodes] == ["node-0", "node-1", "node-2"]


# ----- upgrades and watching ------------------------------------------------------------------------------

def _fleet(n, size=8 * 10**9):
    return [NodeSpec(node_id=f"n{i}", name=f"n{i}", memory=size, cpus=8.0) for i in range(n)]


def test_upgrade_rule():
    rule = UpgradeRule(every_nodes=50, min_growth=1.3)
    a = ModelConfig(name="auto", d_model=1024, n_layers=16, n_heads=16, n_kv_heads=4, ffn_hidden=2752)
    b = dataclasses.replace(a, n_layers=24)
    adopt, ratio, _ = rule.decide(a, b, 4096)
    assert adopt and ratio > 1.3
    adopt, ratio, why = rule.decide(a, dataclasses.replace(a, n_layers=18), 4096)
    assert not adopt and "< planner.min_growth=1.3" in why
    assert not rule.due(49) and rule.due(50)


def test_watcher_recomputes_on_joins_and_leaves_and_upgrades_every_50_joins():
    fleet = _fleet(5)  # 40 GB: 16 x 1024
    cfg = _cfg([])
    watcher = ClusterWatcher(cfg, read_nodes=lambda: list(fleet))
    first = watcher.current
    assert (first.model.n_layers, first.model.d_model) == (16, 1024)
    assert watcher.poll() is None  # nothing changed

    fleet += _fleet(10)[5:]  # 5 joins: replan the same model, more replicas
    event = watcher.poll()
    assert event.joined == ["n5", "n6", "n7", "n8", "n9"] and not event.evaluated
    assert event.plan.model == first.model and event.plan.replicas > first.replicas

    del fleet[-2:]  # 2 leave
    event = watcher.poll()
    assert event.left == ["n8", "n9"] and event.plan.model == first.model

    fleet += [NodeSpec(node_id=f"m{i}", name=f"m{i}", memory=8 * 10**9, cpus=8.0) for i in range(45)]
    event = watcher.poll()  # 50 joins so far: the law is asked for 53 x 8 GB = 424 GB -> 32 x 2560
    assert event.evaluated and event.upgraded and event.growth >= 1.3
    assert event.plan.model == architecture_for_memory(424 * 10**9, cfg.model)
    assert (event.plan.model.n_layers, event.plan.model.d_model) == (32, 2560)
    assert event.migrate_from == first.model and watcher.current is event.plan
    _check_never_exceeds(event.plan)


def test_watcher_keeps_the_model_when_growth_is_below_min_growth():
    fleet = _fleet(5)
    watcher = ClusterWatcher(_cfg([], upgrade_every_nodes=2, min_growth=1.3), read_nodes=lambda: list(fleet))
    fleet += [NodeSpec(node_id="x1", name="x1", memory=4 * 10**9, cpus=8.0),
              NodeSpec(node_id="x2", name="x2", memory=4 * 10**9, cpus=8.0)]
    event = watcher.poll()  # 48 GB: the law still says 16 x 1024 -> growth 1.0
    assert event.evaluated and not event.upgraded and "min_growth" in event.reason
    assert event.plan.model == watcher.current.model


# ----- the CLI ---------------------------------------------------------------------------------------------

def test_cli_prints_the_plan_table(capsys):
    assert main(["cluster.nodes=[8GB,8GB,24GB]"]) == 0
    out = capsys.readouterr().out
    assert "16 x 1024" in out and "node2(24GB)" in out and "P = L*(2d^2" in out


def test_cli_bad_input_is_one_line(capsys):
    assert main(["cluster.nodes=[8,8GB]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("neuroray: error: bad cluster.nodes entry '8'")
    assert main(["cluster.nodes=[8GB,100MB]"]) == 2
    assert "too small for even one layer" in capsys.readouterr().err
