"""Genesis assignment and reading: sha256(node_id) mod N, streams, batch_for, verified fetches, cache, prefetch."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroray.errors import DataError, ShardCorruptError
from neuroray.genesis import (
    Manifest, TokenStream, batch_for, batch_span, build_dataset, ensure_dataset, eval_batches, load_shard, shard_for, shard_order,
)
from neuroray.genesis.fetch import ShardSource
from neuroray.genesis.store import Store
from tests.test_genesis_corpus import corpus_file, quiet, small_cfg

__all__ = ["corpus_file"]  # a fixture, used by name
MEM = "memory://genesis-shards"


@pytest.fixture(scope="module")
def local(corpus_file, tmp_path_factory):
    return ensure_dataset(small_cfg(tmp_path_factory.mktemp("local"), corpus_file), log=quiet)


@pytest.fixture(scope="module")
def remote_base(corpus_file, tmp_path_factory):
    url = f"{MEM}/base"
    build_dataset(small_cfg(tmp_path_factory.mktemp("remote"), corpus_file), url, log=quiet)
    return url


@pytest.fixture
def remote(remote_base, corpus_file, tmp_path, request):
    """This test's own copy of a dataset on a memory:// store (remote to fsspec), and its own cache."""
    url = f"{MEM}/{re.sub(r'[^A-Za-z0-9]+', '_', request.node.name)}"
    base, copy = Store(remote_base), Store(url)
    for name in base.sizes():
        copy.write(name, base.read(name))
    yield ensure_dataset(small_cfg(tmp_path, corpus_file, dataset=url), log=quiet)
    copy.fs.rm(copy.path, recursive=True)


def _flip(store: Store, name: str, at: int = 7) -> None:
    data = bytearray(store.read(name))
    data[at] ^= 0x10
    store.write(name, bytes(data))


# ---------------------------------------------------------------- assignment


def test_shard_for_is_sha256_mod_n_on_every_machine():
    ids = [f"node-{i}" for i in range(1000)]
    for n in (1, 3, 7, 64):
        got = [shard_for(i, n) for i in ids]
        assert got == [int(hashlib.sha256(i.encode()).hexdigest(), 16) % n for i in ids]
        assert len(set(got)) == n  # 1000 nodes reach every shard
    # pinned values: a change here would silently reassign every node's data
    assert [shard_for("driver-7", 10), shard_for("a" * 64, 1000)] == [
        int(hashlib.sha256(b"driver-7").hexdigest(), 16) % 10, int(hashlib.sha256(b"a" * 64).hexdigest(), 16) % 1000]
    with pytest.raises(ValueError):
        shard_for("x", 0)


def test_shard_order_starts_at_own_shard_then_the_following_ones(local):
    _, m = local
    train = m.train_shards
    for node in ("a", "b", "c", "d"):
        order = [s["id"] for s in shard_order(m, node)]
        start = shard_for(node, len(train))
        assert order == [train[(start + k) % len(train)]["id"] for k in range(len(train))]


# ---------------------------------------------------------------- streams


def test_token_stream_shifted_deterministic_and_starts_at_own_shard(local):
    root, m = local
    node = "driver-7"
    a = TokenStream(root, m, node, seq_len=16, microbatch_size=4)
    b = TokenStream(str(root), Manifest.from_json(m.to_json()), node, seq_len=16, microbatch_size=4)  # as a holder
    start = shard_order(m, node)[0]
    assert a.shard_id == start["id"]
    first = load_shard(root, m, start)
    for k in range(5):
        (x, y), (x2, y2) = a.next_microbatch(), b.next_microbatch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(x[:, 1:], y[:, :-1])
        if k == 0:
            assert np.array_equal(x[0].numpy(), first[:16]) and np.array_equal(y[0].numpy(), first[1:17])
    assert a.position == 5


def test_token_stream_wraps_through_the_ring(local):
    root, m = local
    ring = shard_order(m, "wrapper")
    expected = np.concatenate([load_shard(root, m, s) for s in ring] * 2)
    seq, mb = 31, 3
    s = TokenStream(root, m, "wrapper", seq_len=seq, microbatch_size=mb)
    got = []
    for _ in range((2 * expected.size // 2) // (mb * (seq + 1))):
        x, y = s.next_microbatch()
        got.append(torch.cat([x, y[:, -1:]], dim=1).reshape(-1).numpy())
    got = np.concatenate(got)
    assert np.array_equal(got, expected[:got.size])


def test_token_stream_seek_and_state_resume(local):
    root, m = local
    a = TokenStream(root, m, "resume-me", seq_len=24, microbatch_size=2)
    for _ in range(37):
        a.next_microbatch()
    b = TokenStream.from_state(root, m, json.loads(json.dumps(a.state())))
    c = TokenStream(root, m, "resume-me", seq_len=24, microbatch_size=2)
    c.seek(37)
    for _ in range(3):
        xa, _ = a.next_microbatch()
        assert torch.equal(xa, b.next_microbatch()[0]) and torch.equal(xa, c.next_microbatch()[0])
    assert a.position == b.position == c.position == 40


def test_eval_batches_are_the_same_for_everyone(local):
    root, m = local
    batches = eval_batches(root, m, seq_len=16, microbatch_size=2, max_batches=3)
    assert len(batches) == 3
    assert np.array_equal(batches[0][0][0].numpy(), load_shard(root, m, m.eval_shards[0])[:16])
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in batches)
    again = eval_batches(str(root), m, seq_len=16, microbatch_size=2, max_batches=3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(batches, again))


def test_batch_for_recomputes_what_a_driver_trained_on(local, remote, tmp_path):
    """A Driver takes M microbatches per inner step; a peer recomputes any step from the manifest alone."""
    seq, mb, M = 12, 3, 2
    root, m = local
    driver = TokenStream(root, m, "driver-x", seq, mb)
    trained = [[driver.next_microbatch() for _ in range(M)] for _ in range(45)]  # wraps the ring at least once
    assert 45 * M * mb * (seq + 1) > sum(s["tokens"] for s in m.train_shards)
    remote_root, remote_m = remote
    assert remote_m.shards == m.shards  # same data on the remote store
    for step in (0, 1, 7, 44):
        for got in (batch_for(root, m, "driver-x", step, seq_len=seq, microbatch_size=mb, microbatches_per_step=M),
                    batch_for(str(remote_root), remote_m, "driver-x", step, seq_len=seq, microbatch_size=mb,
                              microbatches_per_step=M, cache_dir=str(tmp_path / "verifier-cache"))):
            assert len(got) == M
            for (x, y), (tx, ty) in zip(got, trained[step]):
                assert torch.equal(x, tx) and torch.equal(y, ty)
        spans = batch_span(m, "driver-x", step, seq_len=seq, microbatch_size=mb, microbatches_per_step=M)
        from_spans = np.concatenate([load_shard(root, m, m.shard(s.shard_id))[s.start:s.end] for s in spans])
        windows = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in trained[step]]).reshape(-1)
        assert np.array_equal(from_spans, windows.numpy())
        assert sum(s.end - s.start for s in spans) == M * mb * (seq + 1)
    with pytest.raises(DataError, match="no shard 999"):
        m.shard(999)


# ---------------------------------------------------------------- verification of remote shards


def test_remote_shards_are_fetched_verified_and_cached(remote, tmp_path):
    root, m = remote
    assert str(root).startswith(MEM) and Path(root) != Path(str(root))  # URL for holders, local mirror here
    assert Manifest.load(Path(root)) == m and (Path(root) / m.tokenizer_file).is_file()
    cache = tmp_path / "driver-cache"
    stream = TokenStream(str(root), m, "n1", 16, 2, cache_dir=str(cache))
    x, _ = stream.next_microbatch()
    first = shard_order(m, "n1")[0]
    assert (cache / "shards" / f"{first['sha256']}.bin").read_bytes() == Store(str(root)).read(first["file"])
    assert np.array_equal(x[0].numpy(), load_shard(root, m, first)[:16])


def test_flipped_byte_in_cache_is_discarded_and_refetched(remote, tmp_path, caplog):
    root, m = remote
    shard = m.train_shards[1]
    source = ShardSource(str(root), m, tmp_path / "c")
    good = source.load(shard).copy()
    cached = source.cache.path(shard["sha256"])
    data = bytearray(cached.read_bytes())
    data[3] ^= 0x80
    cached.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="neuroray.genesis"):
        assert np.array_equal(source.load(shard), good)  # recovered
    assert "cached copy of shard 1" in caplog.text and "discarded; re-fetching" in caplog.text
    cached.write_bytes(cached.read_bytes()[:-4])  # truncated cache file: same recovery
    assert np.array_equal(source.load(shard), good) and cached.stat().st_size == shard["bytes"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_shard_in_the_store_is_refetched_once_then_refused(remote, tmp_path, monkeypatch, damage, caplog):
    root, m = remote
    store = Store(str(root))
    shard = m.train_shards[2]
    if damage == "flip":
        _flip(store, shard["file"])
    else:
        store.write(shard["file"], store.read(shard["file"])[:-2])
    reads = []
    real_read = Store.read
    monkeypatch.setattr(Store, "read", lambda self, name: (reads.append(name), real_read(self, name))[1])
    source = ShardSource(str(root), m, tmp_path / "c")
    with caplog.at_level(logging.WARNING, logger="neuroray.genesis"):
        with pytest.raises(ShardCorruptError, match=rf"shard 2 \({store.url_of(shard['file'])}\) is corrupt.*"
                                                    "fetched twice"):
            source.load(shard)
    assert reads == [shard["file"]] * 2, "discard, re-fetch once, then fail"
    assert "re-fetching once" in caplog.text
    assert not source.cache.path(shard["sha256"]).exists(), "unverified bytes must never reach the cache"
    node = next(f"n{i}" for i in range(200) if shard_order(m, f"n{i}")[0]["id"] == shard["id"])
    with pytest.raises(ShardCorruptError):  # a Driver never gets a single token of it
        TokenStream(str(root), m, node, 8, 2, cache_dir=str(tmp_path / "d")).next_microbatch()


def test_remote_dataset_checks_catch_missing_and_truncated_shards(remote, corpus_file, tmp_path):
    root, m = remote
    store = Store(str(root))
    cfg = small_cfg(tmp_path, corpus_file, dataset=str(root))
    store.write(m.shards[1]["file"], store.read(m.shards[1]["file"])[:-2])
    with pytest.raises(DataError, match=r"shard 1 .* has \d+ bytes, the manifest says \d+ \(truncated"):
        ensure_dataset(cfg, log=quiet)
    store.remove([m.shards[3]["file"]])
    with pytest.raises(DataError, match=r"shard 3 .* is missing: the manifest names it"):
        ShardSource(str(root), m, tmp_path / "c").load(m.shards[3])


def test_cache_has_a_size_limit_and_the_next_shard_is_prefetched(remote, tmp_path):
    root, m = remote
    shard_bytes = m.train_shards[0]["bytes"]  # every train shard has this size
    limit = int(2.5 * shard_bytes)
    cache = tmp_path / "small-cache"
    stream = TokenStream(str(root), m, "n7", 16, 4, cache_dir=str(cache), cache_bytes=limit)
    ring = shard_order(m, "n7")
    stream.next_microbatch()
    stream.source.wait()
    assert (cache / "shards" / f"{ring[1]['sha256']}.bin").exists(), "the next shard is prefetched"
    per_shard = min(s["tokens"] for s in m.train_shards) // stream.tokens_per_microbatch
    for _ in range(per_shard * len(ring) * 2):
        stream.next_microbatch()
    stream.source.wait()
    files = list((cache / "shards").glob("*.bin"))
    assert sum(f.stat().st_size for f in files) <= limit and 1 <= len(files) <= 2
    assert not list((cache / "shards").glob(".*")), "no temp files left"
