"""The driver-hosted store (neuroray/hoststore) on one Ray node: nrhost:// through real fsspec, a real
actor and Ray's object store; Genesis shards verified through a cache, snapshots written and read back,
refused paths and a gone store. The multi-host behaviour is tested in tests/test_hosts.py (lab)."""

import hashlib

import fsspec
import numpy as np
import pytest
import torch

from neuroray.errors import DataError
from neuroray.hoststore import register
from neuroray.hoststore.fs import host_url
from neuroray.hoststore.service import start_service
from neuroray.snapshot import Snapshot, SnapshotStore, tensors_digest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    ro, rw = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("snaps")
    handle, name = start_service({str(ro): False, str(rw): True}, 4)
    register()
    yield ray_cluster, handle, name, ro, rw
    ray_cluster.kill(handle)


def _url(name, path, chunk=1000):
    return host_url(name, 30, chunk, str(path))


def test_files_round_trip_in_chunks_and_are_counted(served):
    ray, handle, name, ro, rw = served
    data = bytes(range(256)) * 40  # 10,240 bytes: eleven 1,000-byte chunks each way
    fs, path = fsspec.core.url_to_fs(_url(name, rw / "a" / "b.bin"))
    fs.pipe_file(path, data)
    assert (rw / "a" / "b.bin").read_bytes() == data and not list((rw / "a").glob("*.part"))
    assert fs.cat_file(path) == data and fs.cat_file(path, 1500, 2600) == data[1500:2600]
    assert fs.info(path)["size"] == len(data) and fs.exists(path) and not fs.exists(path + ".x")
    assert fs.ls(str(rw / "a"), detail=False) == [str(rw / "a" / "b.bin")]
    with fs.open(path, "rb") as f:
        assert f.read() == data
    moved = ray.get(handle.moved.remote())["by_node"]
    assert sum(v["received"] for v in moved.values()) >= len(data)
    assert sum(v["sent"] for v in moved.values()) >= 2 * len(data)
    fs.rm(str(rw / "a"), recursive=True)
    assert not (rw / "a").exists()


def test_a_failed_write_publishes_nothing(served):
    _, _, name, _, rw = served
    fs, path = fsspec.core.url_to_fs(_url(name, rw / "torn.bin"))
    with pytest.raises(RuntimeError):
        with fs.open(path, "wb") as f:
            f.write(b"half")
            raise RuntimeError("crash mid-write")
    assert not (rw / "torn.bin").exists() and not list(rw.glob(".torn*"))


def test_paths_outside_the_roots_and_writes_to_read_only_roots_are_refused(served, tmp_path):
    _, _, name, ro, _ = served
    (tmp_path / "secret").write_text("no")
    fs, _ = fsspec.core.url_to_fs(_url(name, ro))
    with pytest.raises(PermissionError):
        fs.cat_file(str(tmp_path / "secret"))
    with pytest.raises(PermissionError):
        fs.pipe_file(str(ro / "x.bin"), b"x")
    with pytest.raises(FileNotFoundError):
        fs.cat_file(str(ro / "absent.bin"))


def test_snapshots_round_trip_bit_for_bit(served):
    _, _, name, _, rw = served
    store = SnapshotStore(_url(name, rw / "snaps", chunk=4096), "r0-s0", keep=2)
    tensors = {"w": torch.randn(64, 33), "m": torch.arange(10)}
    for step in (1, 2, 3):
        store.write(Snapshot(step, tensors, {"step_meta": step}))
    assert store.steps() == [2, 3]  # pruned through the store
    got = store.latest()
    assert got.step == 3 and tensors_digest(got.tensors) == tensors_digest(tensors)
    (rw / "snaps" / "r0-s0" / "step-00000003" / "tensors.safetensors").write_bytes(b"torn")
    assert store.latest().step == 2  # a corrupt newest snapshot is skipped, as on any store


def test_genesis_shards_are_verified_through_the_cache(served, tmp_path):
    from neuroray.errors import ShardCorruptError
    from neuroray.genesis.fetch import ShardSource
    from neuroray.genesis.manifest import Manifest

    _, _, name, ro, _ = served
    tokens = np.arange(5000, dtype=np.uint16)
    (ro / "shard_00000.bin").write_bytes(tokens.tobytes())
    shard = {"id": 0, "file": "shard_00000.bin", "split": "train", "tokens": 5000, "bytes": 10000,
             "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}
    manifest = Manifest.from_json(_manifest_json(shard))
    src = ShardSource(_url(name, ro), manifest, cache_dir=tmp_path / "cache", cache_bytes=1 << 20)
    assert src.cache is not None  # nrhost:// is remote: every shard goes through the verified cache
    assert np.array_equal(src.load(shard), tokens)
    assert (tmp_path / "cache" / "shards" / f"{shard['sha256']}.bin").exists()
    (ro / "shard_00000.bin").write_bytes(b"\0" * 10000)  # the driver's copy damaged: both fetches fail
    (tmp_path / "cache" / "shards" / f"{shard['sha256']}.bin").unlink()
    with pytest.raises(ShardCorruptError):
        src.load(shard)


def test_a_store_that_is_gone_is_unreachable_not_missing(served):
    from neuroray.genesis.store import Store

    with pytest.raises(DataError, match="unreachable"):
        Store(host_url("neuroray-store-nosuchactor", 5, 1000, "/nowhere")).read("manifest.json")


def _manifest_json(shard: dict) -> str:
    import json

    from neuroray.genesis.manifest import FORMAT_VERSION

    return json.dumps({"format_version": FORMAT_VERSION, "tokenizer_file": "tokenizer.json",
                       "tokenizer_sha256": "0" * 64, "vocab_size": 4096, "dtype": "uint16", "shards": [shard],
                       "total_tokens": 5000, "total_bytes": 10000, "shard_tokens": 5000, "source": "test",
                       "parent_tokenizer_sha256": None})
