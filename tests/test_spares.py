"""Warm spares without Ray (neuroray/swarm/spares.py): the pool's bookkeeping, a spare taking a slot over in process
(StageHolder.become), and the combinations the config refuses. The Ray runs are in tests/test_spares_ray.py."""

import pytest
import torch

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.configure import load_config
from neuroray.errors import ConfigError, PipelineError
from neuroray.snapshot import SnapshotStore, tensors_digest
from neuroray.swarm.holder import HolderSpec, StageHolder
from neuroray.swarm.spares import FAILED, READY, STARTING, Spare, SparePool


def _pool_with(states: list[str], stage: int = 1) -> tuple[SparePool, dict[str, str]]:
    pool, by_name = SparePool(ranges=2, per_range=len(states), max_restarts=2), {}
    for st in states:
        name = pool.name(stage)
        by_name[name] = st
        pool.add(stage, Spare(handle=None, name=name, ready=None, strategy=None))
    return pool, by_name


def test_the_pool_takes_the_first_ready_spare_and_drops_the_failed_ones():
    pool, states = _pool_with([STARTING, FAILED, READY, READY])
    spare, failed = pool.take(1, lambda sp: states[sp.name])
    assert spare.name == "spare-s1-2" and [sp.name for sp in failed] == ["spare-s1-1"]
    # the one still starting and the other ready one stay; range 0 has none
    assert [sp.name for sp in pool.idle[1]] == ["spare-s1-0", "spare-s1-3"]
    assert pool.take(0, lambda sp: READY) == (None, [])


def test_the_pool_waits_for_no_spare_still_starting():
    pool, states = _pool_with([STARTING])
    assert pool.take(1, lambda sp: states[sp.name]) == (None, [])
    assert len(pool.idle[1]) == 1


def test_spare_names_are_never_reused_per_range():
    pool = SparePool(ranges=2, per_range=1, max_restarts=3)
    assert [pool.name(0), pool.name(1), pool.name(0)] == ["spare-s0-0", "spare-s1-0", "spare-s0-1"]


def test_a_slot_is_replaced_at_most_max_restarts_times():
    pool = SparePool(ranges=2, per_range=1, max_restarts=2)
    assert [pool.charge(1, 1), pool.charge(1, 1), pool.charge(0, 1)] == [1, 2, 1]
    with pytest.raises(PipelineError, match=r"r1-s1 crashed 3 times, more than checkpoint.max_restarts=2"):
        pool.charge(1, 1)


def _spec(tmp_path, **kw) -> HolderSpec:
    model = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16)
    return HolderSpec(replica=1, stage=1, ranges=[(0, 1), (1, 2)], model=model, vocab_size=64,
                      diloco=DilocoConfig(inner_lr=1e-2), seed=0, key_path=str(tmp_path / "holder-r1-s1.pem"),
                      snapshot_root=str(tmp_path / "snaps"), **kw)


def test_a_spare_becomes_the_slot_s_holder_at_its_newest_snapshot(tmp_path):
    """What a Ray-restarted holder is: the slot's key, its snapshot store, its newest snapshot restored bit for bit."""
    spec = _spec(tmp_path)
    holder = StageHolder(spec)
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    for i in range(2):
        holder.forward_backward(i, x, labels, 1.0)
        holder.step()
    holder.snapshot(2)
    holder.flush_snapshots()
    at_snapshot = holder.state_digest()
    holder.forward_backward(9, x, labels, 1.0)
    holder.step()  # lost with the process

    spare = StageHolder(_spec(tmp_path / "elsewhere", spare=True))
    assert spare.is_spare and spare.spare_ready() == "validator[r1 L1-1]"
    assert not (tmp_path / "elsewhere").exists()  # an idle spare makes no key and opens no store
    info = spare.become(spec)
    assert not spare.is_spare and info["node_id"] == holder.node_id  # the slot's own key file
    assert spare.counters() == {"inner_steps": 2, "outer_rounds": 0, "microbatches": 2, "restored_step": 2}
    stored = SnapshotStore(spec.snapshot_root, "r1-s1").read(2)
    assert spare.state_digest() == tensors_digest(stored.tensors) == at_snapshot
    with pytest.raises(AssertionError, match="in service already"):
        spare.become(spec)


def _cfg(*extra):
    return load_config(["checkpoint.spares=1", *extra])


def test_spares_are_accepted_under_fixed_routing():
    assert _cfg().checkpoint.spares == 1 and load_config([]).checkpoint.spares == 0


@pytest.mark.parametrize("extra, message", [
    (["swarm.routing=router"], "checkpoint.spares with swarm.routing=router"),
    (["model=auto"], "checkpoint.spares with model=auto"),
    (["checkpoint.max_restarts=0"], "set checkpoint.max_restarts >= 1"),
    (["checkpoint.spares=-1"], "checkpoint.spares=-1 must be >= 0"),
])
def test_spares_refuse_what_they_cannot_run_beside(extra, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*extra)
