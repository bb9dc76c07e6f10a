"""Genesis on real stores: S3 (moto's server over HTTP), a read-only HTTP CDN, and unreachable stores.

S3 follows s3fs's own tests: a moto server on 127.0.0.1, the endpoint given to s3fs through fsspec's
config (what ``FSSPEC_S3_ENDPOINT_URL`` sets in production), dummy credentials from the environment.
"""

from __future__ import annotations

import functools
import http.server
import socket
import threading
from pathlib import Path

import fsspec.config
import pytest
import torch

from neuroray.errors import DataError, ShardCorruptError
from neuroray.genesis import (
    Manifest, TokenStream, build_dataset, dataset_url, ensure_dataset, shard_order, verify_dataset,
)
from neuroray.cli.genesis import main as cli
from neuroray.genesis.store import Store
from tests.test_genesis_corpus import corpus_file, quiet, small_cfg

__all__ = ["corpus_file"]  # a fixture, used by name


@pytest.fixture(scope="module")
def s3_endpoint():
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        mp.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
        try:
            yield endpoint
        finally:
            server.stop()
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def local(corpus_file, tmp_path_factory):
    return ensure_dataset(small_cfg(tmp_path_factory.mktemp("local"), corpus_file), log=quiet)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def cdn(local, tmp_path):
    """A plain HTTP server on 127.0.0.1 serving a copy of the local dataset, like a CDN would."""
    import shutil

    root, _ = local
    site = tmp_path / "site"
    shutil.copytree(Path(root), site / "genesis" / "ds")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/genesis/ds", site / "genesis" / "ds"
    server.shutdown()
    server.server_close()


def _same_batches(a: TokenStream, b: TokenStream, n: int = 30) -> None:
    for _ in range(n):
        (x, y), (x2, y2) = a.next_microbatch(), b.next_microbatch()
        assert torch.equal(x, x2) and torch.equal(y, y2)


# ---------------------------------------------------------------- S3


def test_s3_build_fetch_verify_over_http(s3_endpoint, corpus_file, local, tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path, corpus_file, store="s3://genesis-test/datasets")
    root, m = ensure_dataset(cfg, log=quiet)  # builds straight into the bucket
    url = dataset_url(cfg)
    assert str(root) == url and url.startswith("s3://genesis-test/datasets/tiny-")
    assert Path(root).is_relative_to(tmp_path / "cache") and Manifest.load(Path(root)) == m
    local_root, local_m = local
    assert m.shards == local_m.shards and m.tokenizer_sha256 == local_m.tokenizer_sha256  # deterministic build
    assert verify_dataset(url) == m
    assert ensure_dataset(cfg, log=quiet)[1] == m  # reused: the manifest, tokenizer and listing check out

    # A Driver on another machine gets only the URL and the manifest JSON, and its own cache directory.
    monkeypatch.setenv("NEURORAY_CACHE_DIR", str(tmp_path / "other-machine"))
    driver = TokenStream(str(root), Manifest.from_json(m.to_json()), "driver-s3", 16, 4)
    _same_batches(driver, TokenStream(local_root, local_m, "driver-s3", 16, 4))
    assert list((tmp_path / "other-machine" / "shards").glob("*.bin")), "fetched into the Driver's own cache"

    store = Store(url)
    shard = shard_order(m, "late-driver")[0]
    data = bytearray(store.read(shard["file"]))
    data[-1] ^= 0xFF
    store.write(shard["file"], bytes(data))
    with pytest.raises(ShardCorruptError, match=rf"shard {shard['id']} \(s3://.*{shard['file']}\) is corrupt"):
        verify_dataset(url)
    with pytest.raises(ShardCorruptError, match="fetched twice"):
        TokenStream(url, m, "late-driver", 16, 4, cache_dir=str(tmp_path / "late")).next_microbatch()
    assert cli(["verify", f"dataset={url}"]) == 1


# ---------------------------------------------------------------- a read-only HTTP(S) CDN


def test_http_cdn_is_read_only_and_verified(cdn, local, corpus_file, tmp_path):
    url, served = cdn
    local_root, local_m = local
    cfg = small_cfg(tmp_path, corpus_file, dataset=url)
    root, m = ensure_dataset(cfg, log=quiet)
    assert str(root) == url and m == local_m
    _same_batches(TokenStream(str(root), m, "cdn-driver", 8, 2, cache_dir=str(tmp_path / "c")),
                  TokenStream(local_root, local_m, "cdn-driver", 8, 2))
    assert verify_dataset(url) == m
    with pytest.raises(DataError, match=r"store http://.* is read-only .*build to a local path or s3://"):
        build_dataset(cfg, url, log=quiet)

    shard = shard_order(m, "cdn-late")[0]
    data = bytearray((served / shard["file"]).read_bytes())
    data[0] ^= 1
    (served / shard["file"]).write_bytes(bytes(data))
    with pytest.raises(ShardCorruptError, match=rf"shard {shard['id']} \(http://.*\) is corrupt.*fetched twice"):
        TokenStream(url, m, "cdn-late", 8, 2, cache_dir=str(tmp_path / "d")).next_microbatch()
    (served / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"no dataset at data.dataset=http://.*manifest.json is missing"):
        ensure_dataset(cfg, log=quiet)


# ---------------------------------------------------------------- unreachable stores


def test_unreachable_stores_fail_with_one_clear_line(corpus_file, local, tmp_path, monkeypatch):
    dead_http = f"http://127.0.0.1:{_closed_port()}/genesis/ds"
    with pytest.raises(DataError, match=rf"store {dead_http}/manifest.json is unreachable.*check the URL"):
        ensure_dataset(small_cfg(tmp_path, corpus_file, dataset=dead_http), log=quiet)
    _, m = local
    with pytest.raises(DataError, match="is unreachable"):  # a Driver whose store went away mid-run
        TokenStream(dead_http, m, "n", 8, 2, cache_dir=str(tmp_path / "c")).next_microbatch()

    # S3 endpoint that refuses connections: fail fast (one attempt), before any corpus is read
    monkeypatch.setitem(fsspec.config.conf, "s3", {
        "endpoint_url": f"http://127.0.0.1:{_closed_port()}",
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    cfg = small_cfg(tmp_path, corpus_file, store="s3://nowhere/genesis")
    with pytest.raises(DataError, match=r"store s3://nowhere/genesis/tiny-\w+.* is unreachable.*credentials"):
        build_dataset(cfg, log=quiet)
    assert not (tmp_path / "cache").exists(), "nothing was read or written before the store check"
    assert cli(["build", f"source={corpus_file}", "store=s3://nowhere/genesis"]) == 2
