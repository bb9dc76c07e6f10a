"""The planner on a multi-node Ray cluster (ray.cluster_utils.Cluster, injected memory, declared GPUs).

Placement lands on the nodes the plan chose; a joining node triggers a recompute; a group that cannot
be placed is a clear error; GPU memory comes from a declared resource, or a probe when undeclared.
"""

import time

import pytest

from neuroray.config import ClusterConfig, ModelConfig, PlannerConfig, TrainConfig
from neuroray.planner import ClusterWatcher, PlanError, plan_for_cluster
from neuroray.planner.cluster import read_ray_nodes
from neuroray.planner.placement import PlacementError, bundle_strategy, release, reserve_plan


def placed_nodes(pg) -> list[str]:
    """Node id of each bundle of a ready placement group, in bundle order."""
    from ray.util.placement_group import placement_group_table

    table = placement_group_table(pg)["bundles_to_node_id"]
    return [table[i] for i in sorted(table)]

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

GiB = 2**30
TINY = ModelConfig(name="tiny", d_model=128, n_layers=4, n_heads=4, n_kv_heads=4)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    small = dict(object_store_memory=80 * 2**20)
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, memory=2 * GiB, include_dashboard=False, **small))
    gpu = [c.add_node(num_cpus=2, num_gpus=1, memory=6 * GiB, resources={"gpu_memory_gib": 16}, **small) for _ in range(2)]
    cpu = c.add_node(num_cpus=2, memory=8 * GiB, **small)
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, [n.node_id for n in gpu], cpu.node_id
    ray.shutdown()
    c.shutdown()


def _cfg(model=None, **planner):
    # The nodes here share one machine, so their MemTotal is the same: plan from the injected Ray resource.
    planner.setdefault("host_memory", "ray")
    return TrainConfig(model=model or ModelConfig(name="auto"), cluster=ClusterConfig(),
                       planner=PlannerConfig(**planner))


def _node_of_actor(pg, index, cpus, gpus):
    import ray

    @ray.remote
    class Where:
        def node(self):
            return ray.get_runtime_context().get_node_id()

    actor = Where.options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=bundle_strategy(pg, index)).remote()
    try:
        return ray.get(actor.node.remote(), timeout=60)
    finally:
        ray.kill(actor)


def test_placement_lands_where_the_plan_says(cluster):
    _, gpu_nodes, cpu_node = cluster
    nodes = read_ray_nodes(PlannerConfig(host_memory="ray"))
    by_id = {n.node_id: n for n in nodes}
    assert by_id[gpu_nodes[0]].gpu_memory == 16 * GiB and by_id[gpu_nodes[0]].gpu_memory_source.startswith("resource")
    assert by_id[cpu_node].memory == 8 * GiB and sum(n.is_head for n in nodes) == 1

    # model=auto: GPUs exist, so the law sizes from their 2 x 16 GiB and every holder takes one GPU
    plan = plan_for_cluster(_cfg())
    assert plan.device == "gpu" and plan.law_memory == 32 * GiB
    assert {h.node_id for rep in plan.holders for h in rep} == set(gpu_nodes)
    groups = reserve_plan(plan, timeout_s=60)
    try:
        for r, pg in enumerate(groups):
            assert placed_nodes(pg) == plan.node_ids(r)
        h = plan.holders[0][0]
        assert _node_of_actor(groups[0], 0, h.cpus, h.gpus) == h.node_id

        # A second copy of the same plan cannot get the GPUs: a clear error that says what is missing.
        with pytest.raises(PlacementError, match=r"not ready after 2s: bundle 0 needs CPU 0.5, GPU 1, memory .*; "
                                                 r"node \w{8} has free GPU 0"):
            reserve_plan(plan, timeout_s=2, name="second")
    finally:
        release(groups)

    # A fixed model on CPUs, PACK inside each replica and SPREAD across: Ray follows the plan's nodes.
    plan = plan_for_cluster(_cfg(TINY, device="cpu", stages=2, replicas=3, reserve_cpus=0))
    assert plan.device == "cpu" and plan.replicas == 3
    per_replica = [set(plan.node_ids(r)) for r in range(3)]
    assert all(len(s) == 1 for s in per_replica) and len(set.union(*per_replica)) == 3
    groups = reserve_plan(plan, timeout_s=60)
    try:
        assert [placed_nodes(pg) for pg in groups] == [plan.node_ids(r) for r in range(3)]
    finally:
        release(groups)


def test_a_joining_node_triggers_a_recompute(cluster):
    c, _, _ = cluster
    watcher = ClusterWatcher(_cfg(TINY, device="cpu", stages=2, reserve_cpus=0))
    before = watcher.current
    assert watcher.poll() is None
    added = c.add_node(num_cpus=2, memory=8 * GiB, object_store_memory=80 * 2**20)
    event, deadline = None, time.monotonic() + 60  # a deadline against hanging, not a timing assertion
    while event is None and time.monotonic() < deadline:
        event = watcher.poll()
        time.sleep(0.2)
    assert event is not None and event.joined == [added.node_id] and not event.left
    assert event.plan is watcher.current and event.plan.model == before.model
    assert event.plan.replicas > before.replicas
    assert added.node_id in {h.node_id for rep in event.plan.holders for h in rep}


def test_undeclared_gpu_memory_is_probed_then_a_clear_error(cluster, caplog):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    c, _, _ = cluster
    added = c.add_node(num_cpus=1, num_gpus=1, memory=2 * GiB, object_store_memory=80 * 2**20)
    c.wait_for_nodes()
    nodes = read_ray_nodes(PlannerConfig(host_memory="ray"))
    probed = [n for n in nodes if n.gpus and not n.gpu_memory]
    assert len(probed) == 1 and probed[0].gpu_memory_source == "probe"  # CUDA absent here: the probe says 0
    with pytest.raises(PlanError, match="GPUs of unknown memory"):
        plan_for_cluster(_cfg(), nodes=nodes)

    # With the node's GPU taken, the probe cannot start: it gives up after planner.gpu_probe_timeout_s (not the
    # default 60 s) with a warning, and the memory stays unknown. (An idle probe here says 0 without a warning.)
    @ray.remote(num_gpus=1, num_cpus=0)
    class Busy:
        def node(self):
            return ray.get_runtime_context().get_node_id()

    busy = Busy.options(scheduling_strategy=NodeAffinitySchedulingStrategy(added.node_id, soft=False)).remote()
    try:
        assert ray.get(busy.node.remote(), timeout=60) == added.node_id
        with caplog.at_level("WARNING", logger="neuroray.planner.cluster"):
            nodes = read_ray_nodes(PlannerConfig(host_memory="ray", gpu_probe_timeout_s=1.0))
        assert [n.gpu_memory for n in nodes if n.node_id == added.node_id] == [0]
        assert any(f"GPU memory probe on node {added.node_id[:8]} failed" in r.getMessage() for r in caplog.records)
    finally:
        ray.kill(busy)


def test_host_memory_is_memtotal_and_links_are_probed(cluster):
    """planner.host_memory=total reads every node's MemTotal (the same on every read, whatever Ray's resource
    says); bundles then ask for their share of Ray's smaller resource, so the groups still get placed; and
    the link probe measures every node but the driver's."""
    import psutil
    import ray

    _, _, cpu_node = cluster
    planner = PlannerConfig(probe_links=True, link_probe_bytes="1MB", link_probe_timeout_s=30.0)
    nodes = read_ray_nodes(planner)
    total = psutil.virtual_memory().total
    assert {n.memory for n in nodes} == {total} and {n.memory_source for n in nodes} == {"MemTotal"}
    assert {n.node_id: n.ray_memory for n in nodes}[cpu_node] == 8 * GiB
    here = ray.get_runtime_context().get_node_id()
    assert all(n.link_bps > 0 and n.link_source == "probe" for n in nodes if n.node_id != here)
    assert [n.link_bps for n in nodes if n.node_id == here] == [0.0]
    assert [n.memory for n in read_ray_nodes(planner)] == [n.memory for n in nodes]

    cfg = TrainConfig(model=TINY, cluster=ClusterConfig(), planner=PlannerConfig(device="cpu", stages=2, replicas=2,
                                                                                  reserve_cpus=0))
    plan = plan_for_cluster(cfg, nodes=nodes)
    for rep in plan.holders:
        for h in rep:
            ray_mem = {n.node_id: n.ray_memory for n in nodes}[h.node_id]
            assert h.bundle()["memory"] <= ray_mem * h.device_memory / (total * plan.safety_fraction) + 1
    groups = reserve_plan(plan, timeout_s=60)
    try:
        assert [placed_nodes(pg) for pg in groups] == [plan.node_ids(r) for r in range(plan.replicas)]
    finally:
        release(groups)
