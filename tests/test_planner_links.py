"""Placement that knows the links, the bytes per link, the node grammar's rates, and model=auto on one CPU node
(MemTotal instead of Ray's free-memory resource, holders sized to the cores, the why lines). No Ray."""

import dataclasses

import pytest
import torch

from neuroray.config import ClusterConfig, DataConfig, DilocoConfig, ModelConfig, PlannerConfig, TrainConfig
from neuroray.diloco.compress import encode, payload_bytes
from neuroray.errors import ConfigError
from neuroray.planner import NodeSpec, parse_nodes, plan, plan_for_cluster
from neuroray.planner.cluster import check_planner_config, nodes_from_ray, request_from_config
from neuroray.planner.explain import throughput
from neuroray.planner.links import hop_bytes, link_loads, sync_bytes_per_value
from neuroray.planner.report import format_plan
from neuroray.planner.scaling import param_count

TINY = ModelConfig(name="tiny", d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=256)
BIG = ModelConfig(name="big", d_model=1024, n_layers=16, n_heads=16, n_kv_heads=4)


def _cfg(nodes, model=None, links=(), diloco=None, **planner) -> TrainConfig:
    return TrainConfig(model=model or ModelConfig(name="auto"), diloco=diloco or DilocoConfig(),
                       data=DataConfig(microbatch_size=8, num_microbatches=2),  # the batch shape these plans assume
                       cluster=ClusterConfig(nodes=list(nodes), links=list(links)), planner=PlannerConfig(**planner))


def _bytes_on(p, index: int) -> float:
    return {ld.node_id: ld.bytes_per_step for ld in link_loads(p)}[f"node-{index}"]


# ----- placement ---------------------------------------------------------------------------------------

def test_the_slow_node_carries_the_least_traffic():
    p = plan_for_cluster(_cfg(["24GB@100mbit", "24GB@1gbit", "24GB@1gbit"], TINY, replicas=2))
    assert p.outer.node_id != "node-0"  # the outer step is on a fast node
    assert _bytes_on(p, 0) == 0 < min(_bytes_on(p, 1), _bytes_on(p, 2))
    # Without rates the same cluster puts the outer step on the head, node 0: its link carries every sync.
    blind = plan_for_cluster(_cfg(["24GB", "24GB", "24GB"], TINY, replicas=2))
    assert blind.outer.node_id == "node-0" and _bytes_on(blind, 0) == max(_bytes_on(blind, i) for i in range(3))


def test_a_replica_that_must_span_nodes_is_cut_on_fast_links():
    # One 12 GB node cannot hold a replica of BIG: each replica spans two nodes; the slow head takes none of it.
    p = plan_for_cluster(_cfg(["12GB@100mbit", "12GB@1gbit", "12GB@1gbit", "12GB@1gbit"], BIG, replicas=1, stages=2))
    assert len(set(p.node_ids(0))) == 2 and "node-0" not in p.node_ids(0) and p.outer.node_id != "node-0"
    assert _bytes_on(p, 0) == 0
    loads = {ld.node_id: ld for ld in link_loads(p)}
    hops = [loads[n].hop_bytes_per_step for n in p.node_ids(0)]
    assert min(hops) > 0


def test_equal_rates_place_exactly_as_no_rates():
    for nodes, kw in ((["12GB", "12GB", "24GB"], {}), (["4x8GB"], dict(model=TINY, stages=2, replicas=4)),
                      (["6x4GB", "16GB"], dict(within_replica="SPREAD")), (["64GB+8x80GB", "32GB"], {})):
        kw = dict(kw)
        model = kw.pop("model", None)
        rated = [f"{n}@1gbit" for n in nodes]
        a, b = plan_for_cluster(_cfg(nodes, model, **kw)), plan_for_cluster(_cfg(rated, model, **kw))
        assert a.ranges == b.ranges and a.outer.node_id == b.outer.node_id
        assert [a.node_ids(r) for r in range(a.replicas)] == [b.node_ids(r) for r in range(b.replicas)]


# ----- bytes per link ------------------------------------------------------------------------------------

def test_bytes_per_link_match_a_hand_worked_example():
    # TINY, V = 320: per layer 2*128^2 + 2*128*128 + 3*128*384 + 2*128 = 213,248; embedding 320*128 = 40,960;
    # head 320*128 + 128 = 41,088. Two stages of two layers: 467,456 and 467,584 parameters.
    stage_params = {0: 2 * 213_248 + 40_960, 1: 2 * 213_248 + 41_088}
    pc = param_count(TINY, 320)
    assert (pc.per_layer, pc.embedding, pc.head) == (213_248, 40_960, 41_088)
    cfg = _cfg(["8GB@100mbit", "8GB@100mbit"], TINY, stages=2, replicas=1, within_replica="STRICT_SPREAD",
               reserve_cpus=0)
    cfg.data.vocab_size, cfg.data.seq_len, cfg.data.microbatch_size, cfg.data.num_microbatches = 320, 16, 2, 2
    p = plan_for_cluster(cfg)
    # hop: 2 (forward + back) x 2 sequences x 16 tokens x 128 wide x 4 B x 2 microbatches = 65,536 B per step
    assert hop_bytes(2, 16, 128, 2) == 65_536
    remote = next(h.stage for h in p.holders[0] if h.node_id != p.outer.node_id)
    sync = 2 * 4 * stage_params[remote]  # pseudo-gradient out + update back, float32, per round
    for ld in link_loads(p):  # both uplinks carry the boundary and the remote holder's sync
        assert (ld.hop_bytes_per_step, ld.sync_bytes_per_round) == (65_536, sync)
        assert ld.seconds_per_step == pytest.approx((65_536 + sync / 20) * 8 / 1e8)
    int8 = plan_for_cluster(dataclasses.replace(cfg, diloco=DilocoConfig(compression="int8")))
    assert link_loads(int8)[0].sync_bytes_per_round == pytest.approx(sync / 4 * (1 + 4 / 256))


@pytest.mark.parametrize("mode", ["none", "fp16", "int8", "sparse"])
def test_sync_bytes_per_value_match_the_encoders_payloads(mode):
    n = 256 * 4000
    payload = encode(torch.randn(n, generator=torch.Generator().manual_seed(0)), mode, 256, 0.015)
    fixed = {"none": 0, "fp16": 0, "int8": 8, "sparse": 24}[mode]  # the block size / (n, block, k) as int64
    assert payload_bytes(payload) - fixed == pytest.approx(n * sync_bytes_per_value(mode, 256, 0.015))
    assert 4 / sync_bytes_per_value("sparse") == pytest.approx(113.8, abs=0.1)


# ----- grammar -------------------------------------------------------------------------------------------

def test_rates_in_the_node_grammar():
    nodes = parse_nodes(["24GB@100mbit", "2x8GB+1x16GB@1gbit", "4GB"])
    assert [n.link_bps for n in nodes] == [1e8, 1e9, 1e9, 0.0]
    assert nodes[1].gpus == 1 and nodes[0].name == "node0(24GB@100mbit)"


@pytest.mark.parametrize("nodes, says", [
    (["24GB@"], "uplink rate '' is not a rate"),
    (["24GB@100"], "uplink rate '100' has no unit; write it with one, e.g. 100mbit"),
    (["24GB@100mb"], "has unknown unit 'mb'; use one of kbit, mbit, gbit, tbit"),
    (["24GB@0gbit"], "must be more than zero"),
    (["24GB@1gbit@2gbit"], "more than one '@'"),
    (["@1gbit"], "expected <host memory>"),
])
def test_bad_rates_are_one_line_config_errors(nodes, says):
    with pytest.raises(ConfigError, match="bad cluster.nodes entry") as exc:
        check_planner_config(_cfg(nodes))
    assert says in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("links, says", [
    (["10.0.0.2"], "expected <address or node-id prefix or *>@<rate>"),
    (["@1gbit"], "expected <address"),
    (["*@fast"], "is not a rate"),
])
def test_bad_cluster_links_are_one_line_config_errors(links, says):
    with pytest.raises(ConfigError, match="bad cluster.links entry") as exc:
        check_planner_config(_cfg([], links=links))
    assert says in str(exc.value) and "\n" not in str(exc.value)


def test_declared_links_of_live_nodes():
    raw = [{"NodeID": "aa" * 14, "Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 4, "memory": 8e9}},
           {"NodeID": "bb" * 14, "Alive": True, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 4, "memory": 8e9}}]
    nodes = nodes_from_ray(raw, PlannerConfig(host_memory="ray"), links=[("10.0.0.2", 1e8), ("*", 1e9)],
                           measured={"bb" * 14: 5e8})
    assert [(n.link_bps, n.link_source) for n in nodes] == [(1e8, "declared"), (1e9, "declared")]
    nodes = nodes_from_ray(raw, PlannerConfig(host_memory="ray"), measured={"bb" * 14: 5e8})
    assert [(n.link_bps, n.link_source) for n in nodes] == [(0.0, ""), (5e8, "probe")]


# ----- model=auto on one CPU node (#19 item 9) -----------------------------------------------------------------

def _one_node(ray_memory: float, cpus: float, total: float = 16e9):
    raw = [{"NodeID": "cc" * 14, "Alive": True, "NodeManagerAddress": "10.0.0.9",
            "Resources": {"CPU": cpus, "memory": ray_memory, "node:__internal_head__": 1.0}}]
    return nodes_from_ray(raw, PlannerConfig(), host_memory=lambda node_id: int(total))


def test_host_memory_is_memtotal_whatever_ray_says():
    # The two runs on one idle machine: Ray's resource was 15.6 GB, then 17.2 GB; MemTotal did not move.
    cfg = _cfg([])
    a, b = (plan(_one_node(m, 8.0, total=23e9), request_from_config(cfg)) for m in (15.6e9, 17.2e9))
    assert a.law_memory == b.law_memory == 23e9 and a.nodes[0].memory_source == "MemTotal"
    assert (a.model, a.ranges, a.replicas) == (b.model, b.ranges, b.replicas)
    for p, ray_mem in ((a, 15.6e9), (b, 17.2e9)):  # bundles ask for their share of Ray's smaller resource
        assert sum(h.bundle()["memory"] for rep in p.holders for h in rep) <= ray_mem
        assert "MemTotal" in format_plan(p) and "why: memory: 23.0 GB" in format_plan(p)
    with pytest.raises(ConfigError, match="planner.host_memory=free is unknown"):
        check_planner_config(_cfg([], host_memory="free"))


@pytest.mark.parametrize("cpus", [2, 4, 8, 16, 32])
def test_one_cpu_node_uses_its_cores(cpus):
    cfg = _cfg([])
    req = request_from_config(cfg)
    p = plan(_one_node(16e9, cpus), req)
    holders = p.num_stages * p.replicas
    assert holders <= cpus - cfg.planner.reserve_cpus  # one holder per core (torch_threads=1), driver's core kept
    assert all(h.cpus == 1 and h.bundle()["CPU"] == 1 for rep in p.holders for h in rep)
    best = throughput(p.stages, p.replicas, req.batch.num_microbatches)
    line = next(w for w in p.why if w.startswith("stages x replicas"))
    tried = [float(t.split()[1]) for t in line.split("cores' worth: ")[1].split(", ")]
    assert best == pytest.approx(max(tried), abs=0.005)  # the kept split is the best predicted one
    if cpus >= 8:  # memory caps one-stage replicas at 2 < the cores: a pipeline uses the rest
        assert p.num_stages >= 2 and holders > 2
    else:
        assert p.num_stages == 1 and p.replicas == min(cpus - 1, 2)
    text = format_plan(p)
    assert f"why: cores: {cpus:g} CPUs - 1 kept" in text and "why: replicas:" in text


def test_fill_cores_off_is_the_old_rule():
    p = plan(_one_node(16e9, 4), request_from_config(_cfg([], fill_cores=False)))
    assert all(h.cpus == 0.5 for rep in p.holders for h in rep)
    assert p.num_stages * p.replicas <= (4 - 1) / 0.5
