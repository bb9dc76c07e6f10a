"""Snapshots: atomic manifest-last writes on fsspec stores, corruption fallback, exact holder restore."""

import logging

import pytest
import torch

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.artifacts import MANIFEST
from neuroray.snapshot import TENSORS, Snapshot, SnapshotStore, tensors_digest
from neuroray.swarm.holder import HolderSpec, StageHolder


def _snap(step, value=1.0):
    return Snapshot(step, {"w": torch.full((4,), value), "ids": torch.arange(3)}, {"note": f"s{step}"})


def test_roundtrip_and_keep(tmp_path):
    store = SnapshotStore(str(tmp_path), "r0-s0", keep=2)
    assert store.latest() is None
    for step in (10, 20, 30):
        store.write(_snap(step, step))
    assert store.steps() == [20, 30]  # pruned to the newest 2
    snap = store.latest()
    assert snap.step == 30 and torch.equal(snap.tensors["w"], torch.full((4,), 30.0)) and snap.meta["note"] == "s30"


def test_torn_snapshot_is_invisible(tmp_path):
    store = SnapshotStore(str(tmp_path), "r0-s0")
    store.write(_snap(1))
    store.write(_snap(2))
    (tmp_path / "r0-s0" / "step-00000002" / MANIFEST).unlink()  # crashed before the manifest
    assert store.steps() == [1] and store.latest().step == 1


def test_corrupt_newest_falls_back_with_warning(tmp_path, caplog):
    store = SnapshotStore(str(tmp_path), "r0-s0")
    store.write(_snap(1, 1.0))
    store.write(_snap(2, 2.0))
    part = tmp_path / "r0-s0" / "step-00000002" / TENSORS
    data = bytearray(part.read_bytes())
    data[-1] ^= 1
    part.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        snap = store.latest()
    assert snap.step == 1 and torch.equal(snap.tensors["w"], torch.ones(4))
    assert "does not match its manifest" in caplog.text and "step-00000002" in caplog.text


def test_async_write_and_common_step(tmp_path):
    stores = [SnapshotStore(f"memory://snap-test-{id(tmp_path)}", f"r{r}-s0") for r in range(2)]
    for step in (5, 10):
        stores[0].write_async(_snap(step))
    stores[1].write_async(_snap(5))
    for st in stores:
        st.flush()
    assert [st.steps() for st in stores] == [[5, 10], [5]]  # both async writes of r0 landed, in order


def test_s3_store_against_local_server(tmp_path, monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir("snapshots")
        opts = {"endpoint_url": endpoint, "skip_instance_cache": True}
        store = SnapshotStore("s3://snapshots/run1", "r1-s0", keep=2, storage_options=opts)
        store.write(_snap(3, 3.0))
        store.write(_snap(4, 4.0))
        again = SnapshotStore("s3://snapshots/run1", "r1-s0", storage_options=opts)
        assert again.steps() == [3, 4] and torch.equal(again.latest().tensors["w"], torch.full((4,), 4.0))
    finally:
        server.stop()


def _holder(tmp_path, snapshot_root=None):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16)
    return StageHolder(HolderSpec(replica=0, stage=0, ranges=[(0, 2)], model=cfg, vocab_size=64,
                                  diloco=DilocoConfig(inner_lr=1e-2), seed=0, key_path=str(tmp_path / "k.pem"),
                                  snapshot_root=snapshot_root))


def _train(h, steps, seed):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for i in range(steps):
        x = torch.randint(0, 64, (2, 8), generator=g)
        losses.append(h.forward_backward(i, x, torch.roll(x, -1, 1), 1.0)[0])
        h.step()
    return losses


def test_holder_restore_is_exact_and_training_continues_identically(tmp_path):
    a = _holder(tmp_path, str(tmp_path / "snaps"))
    _train(a, 3, seed=0)
    a.snapshot(3)
    a.flush_snapshots()
    saved = a.snapshots.read(3)
    continued = _train(a, 3, seed=1)

    b = _holder(tmp_path)
    b.restore(saved)
    assert b.state_digest() == tensors_digest(saved.tensors)  # bit for bit
    assert b.counters()["inner_steps"] == 3 and b.restored_step == 3
    assert _train(b, 3, seed=1) == continued  # AdamW state came back too, so the next steps match exactly


def test_outer_memory_through_a_snapshot_continues_the_next_round_identically(tmp_path):
    from neuroray.config import AggregatorConfig, AttackConfig
    from neuroray.diloco.sync import OuterMemory, outer_step

    g = torch.Generator().manual_seed(0)
    rounds = [[torch.randn(64, generator=g) * (1 + i) for i in range(8)] for _ in range(2)]
    cc, stale = AggregatorConfig("centered_clip", f=2, tau=1.0), AttackConfig("stale", 0.25)
    theta0, momentum, _, memory = outer_step(cc, DilocoConfig(), 0, torch.zeros(64), None, *rounds[0], attack=stale,
                                             memory=OuterMemory())
    memory.replay.append("not a tensor")  # what a broken holder might have sent: replayed as zeros either way
    store = SnapshotStore(str(tmp_path), "outer-s0")
    tensors, meta = memory.to_snapshot()
    store.write(Snapshot(1, {"theta0": theta0} | tensors, {"rounds": 1} | meta))
    snap = store.read(1)
    restored = OuterMemory.from_snapshot(snap.tensors, snap.meta)
    assert torch.equal(restored.previous, memory.previous) and len(restored.replay) == 3 and restored.replay[2] is None
    assert all(torch.equal(a, b) for a, b in zip(restored.replay[:2], memory.replay[:2]))
    args = (cc, DilocoConfig(), 0, snap.tensors["theta0"], momentum, *rounds[1])
    want = outer_step(*args, attack=stale, memory=memory, round_index=1)
    got = outer_step(*args, attack=stale, memory=restored, round_index=1)
    fresh = outer_step(*args, attack=stale, memory=OuterMemory(), round_index=1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[3].previous, want[3].previous)
    assert not torch.equal(fresh[0], want[0])  # the memory matters here, so the check above can fail
