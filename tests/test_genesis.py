"""Genesis builds: shard format, manifest, atomic writes, reuse/rebuild, and the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from neuroray.config import DataConfig
from neuroray.errors import DataError, ShardCorruptError
from neuroray.genesis import (
    FORMAT_VERSION, DatasetRoot, Manifest, TokenStream, build_dataset, dataset_url, decode, dtype_for,
    ensure_dataset, load_shard, load_tokenizer, tokenizer_hash, verify_dataset,
)
from neuroray.genesis import build as build_mod
from neuroray.cli.genesis import main as cli
from neuroray.genesis.store import Store
from tests.test_genesis_corpus import SHARD_TOKENS, VOCAB, corpus_file, paragraphs, quiet, small_cfg, write_corpus

__all__ = ["corpus_file"]  # a fixture, used by name


@pytest.fixture(scope="module")
def built(corpus_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("built")
    root, manifest = ensure_dataset(small_cfg(tmp, corpus_file), log=quiet)
    return root, manifest


@pytest.fixture
def built_copy(built, tmp_path):
    root, manifest = built
    dst = tmp_path / "ds"
    shutil.copytree(root, dst)
    return dst, manifest


# ---------------------------------------------------------------- format


def test_build_manifest_fields_hashes_and_eos_separated_documents(built):
    root, m = built
    assert isinstance(root, DatasetRoot) and str(root) == root.url == str(Path(root))  # local: one place
    assert Manifest.load(root) == m and Manifest.from_json(m.to_json()) == m
    assert m.format_version == FORMAT_VERSION and m.dtype == "uint16" and m.vocab_size <= VOCAB
    assert m.tokenizer_sha256 == hashlib.sha256((Path(root) / m.tokenizer_file).read_bytes()).hexdigest()
    assert m.tokenizer_sha256 == tokenizer_hash(load_tokenizer(Path(root) / m.tokenizer_file))
    assert len(m.shards) >= 4 and [s["id"] for s in m.shards] == list(range(len(m.shards)))
    assert [s["split"] for s in m.shards] == ["train"] * (len(m.shards) - 1) + ["eval"]
    assert all(s["tokens"] == SHARD_TOKENS for s in m.shards[:-1]) and m.shard_tokens == SHARD_TOKENS
    assert SHARD_TOKENS // 2 <= m.shards[-1]["tokens"] < SHARD_TOKENS + SHARD_TOKENS // 2
    assert m.total_tokens == sum(s["tokens"] for s in m.shards)
    assert m.total_bytes == sum(s["bytes"] for s in m.shards) and "tiny.txt" in m.source
    stream = []
    for s in m.shards:
        data = (Path(root) / s["file"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["bytes"] == len(data) == 2 * s["tokens"]
        stream.append(np.frombuffer(data, dtype="<u2"))
        assert np.array_equal(load_shard(root, m, s), stream[-1])
    flat = np.concatenate(stream)
    assert flat.max() < m.vocab_size
    docs = paragraphs()
    assert (flat == 0).sum() == (flat == 1).sum() == len(docs)  # BOS ... EOS around every document
    tok = load_tokenizer(Path(root) / m.tokenizer_file)
    bos = np.flatnonzero(flat == 0)
    eos = np.flatnonzero(flat == 1)
    assert [decode(tok, flat[b + 1:e].tolist()) for b, e in zip(bos, eos)] == docs
    assert not [p for p in Path(root).parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_shard_dtype_and_default_size(tmp_path):
    assert dtype_for(300) == dtype_for(65536) == "uint16" and dtype_for(65537) == "uint32"
    assert DataConfig().shard_tokens == 2_500_000  # the Genesis default
    writer = build_mod.ShardWriter(Store(tmp_path), 1000, "uint32")
    writer.add(np.arange(70000, 72300, dtype=np.uint32))
    shards = writer.finish()
    assert [s["tokens"] for s in shards] == [1000, 1300]  # a tail under 500 joins the shard before it
    assert shards[0]["bytes"] == 4000 and np.array_equal(
        np.frombuffer((tmp_path / shards[1]["file"]).read_bytes(), "<u4"), np.arange(71000, 72300))
    base = json.loads(Manifest(FORMAT_VERSION, "tokenizer.json", "0" * 64, 70000, "uint32", shards, 2300,
                               9200, 1000).to_json())
    assert Manifest.from_json(json.dumps(base)).dtype == "uint32"
    with pytest.raises(DataError, match="cannot hold 70000"):
        Manifest.from_json(json.dumps({**base, "dtype": "uint16"}))


# ---------------------------------------------------------------- manifest: missing, malformed, names a missing shard


def test_manifest_missing_malformed_or_naming_a_missing_shard(built_copy, tmp_path):
    root, m = built_copy
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no dataset at .*empty: manifest.json is missing.*genesis build"):
        Manifest.load(empty)
    raw = json.loads(m.to_json())
    bad_cases = {
        "plain file name": {**raw, "shards": [{**raw["shards"][0], "file": "../../etc/passwd"}, *raw["shards"][1:]]},
        "total_tokens": {**raw, "total_tokens": raw["total_tokens"] + 1},
        "expected keys": {k: v for k, v in raw.items() if k != "shards"},
        "format_version": {**raw, "format_version": 99},
        "not a SHA-256": {**raw, "tokenizer_sha256": "xyz"},
        "ids must be": {**raw, "shards": raw["shards"][1:]},
    }
    for why, bad in bad_cases.items():
        with pytest.raises(DataError, match=f"malformed.*{why}"):
            Manifest.from_json(json.dumps(bad))
    (empty / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest.json is malformed \(not JSON"):
        Manifest.load(empty)

    victim = m.shards[2]
    (root / victim["file"]).unlink()
    with pytest.raises(DataError, match=rf"shard 2 \(.*{victim['file']}\) is missing"):
        verify_dataset(root)
    with pytest.raises(DataError, match=rf"shard 2 \(.*{victim['file']}\) is missing"):
        load_shard(root, m, victim)
    with pytest.raises(DataError, match="is missing"):  # a dataset named explicitly is never rebuilt
        ensure_dataset(small_cfg(tmp_path, "embedded", dataset=str(root)), log=quiet)


# ---------------------------------------------------------------- atomic builds


def test_failed_builds_leave_nothing_visible(corpus_file, tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path, corpus_file)
    with pytest.raises(DataError, match="lower data.shard_tokens"):
        build_dataset(small_cfg(tmp_path, corpus_file, shard_tokens=10**6), log=quiet)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())

    real_write = Store.write
    calls = []

    def crash_on_third_shard(self, name, data):
        calls.append(name)
        if name == "shard_00002.bin":
            raise OSError("disk full")
        real_write(self, name, data)

    monkeypatch.setattr(Store, "write", crash_on_third_shard)
    with pytest.raises(OSError, match="disk full"):
        build_dataset(cfg, log=quiet)
    assert "shard_00001.bin" in calls
    assert not any((tmp_path / "store").iterdir()), "a crashed local build must leave no files"
    mem = "memory://genesis-test/crash"
    with pytest.raises(OSError, match="disk full"):
        build_dataset(cfg, mem, log=quiet)
    monkeypatch.setattr(Store, "write", real_write)
    assert Store(mem).sizes() == {}, "a crashed object-store build must remove what it wrote"
    with pytest.raises(DataError, match="manifest.json is missing"):
        Manifest.load(mem)


def test_manifest_is_written_last_and_a_rebuild_hides_the_old_one_first(corpus_file, tmp_path, monkeypatch):
    url = "memory://genesis-test/order"
    events = []
    real_write, real_remove = Store.write, Store.remove
    monkeypatch.setattr(Store, "write", lambda self, name, data: (events.append(("write", name)),
                                                                   real_write(self, name, data))[1])
    monkeypatch.setattr(Store, "remove", lambda self, names: (events.append(("remove", tuple(names))),
                                                              real_remove(self, names))[1])
    m = build_dataset(small_cfg(tmp_path, corpus_file), url, log=quiet)
    writes = [name for kind, name in events if kind == "write"]
    assert writes[-1] == "manifest.json" and writes.count("manifest.json") == 1
    assert set(writes[:-1]) == {"tokenizer.json", *(s["file"] for s in m.shards)}
    events.clear()
    build_dataset(small_cfg(tmp_path, corpus_file), url, log=quiet)
    assert events[0] == ("remove", ("manifest.json",)), "a rebuild must hide the old dataset before writing"
    assert events[-2] == ("write", "manifest.json")


# ---------------------------------------------------------------- reuse and rebuild


def test_ensure_dataset_reuses_and_rebuilds_damaged_local_data(corpus_file, tmp_path):
    cfg = small_cfg(tmp_path, corpus_file)
    url = dataset_url(cfg)
    half = Path(url)
    half.mkdir(parents=True)
    (half / "shard_00000.bin").write_bytes(b"\1\0" * 8)  # shards but no manifest: not a dataset
    lines: list[str] = []
    root, m = ensure_dataset(cfg, log=lines.append)
    assert str(root) == url and Path(url).parent == tmp_path / "store"
    assert (Path(root) / "shard_00000.bin").stat().st_size == m.shards[0]["bytes"]
    assert lines[0].startswith("genesis: building") and lines[-1].startswith("genesis: built dataset")

    lines.clear()
    root2, m2 = ensure_dataset(cfg, log=lines.append)
    assert (str(root2), m2) == (str(root), m) and lines == [
        f"genesis: using dataset {url} ({len(m.shards)} shards, {m.total_tokens} tokens)"]

    for damage in ("flip", "truncate", "manifest"):
        bad = Path(root) / m.shards[1]["file"]
        data = bytearray(bad.read_bytes())
        if damage == "flip":
            data[5] ^= 0x40
            bad.write_bytes(bytes(data))
        elif damage == "truncate":
            bad.write_bytes(bytes(data[:-3]))
        else:
            (Path(root) / "manifest.json").write_text("[]")
        lines.clear()
        _, again = ensure_dataset(cfg, log=lines.append)
        assert "warning" in lines[0] and (str(bad) in lines[0] or "manifest.json" in lines[0]), lines[0]
        assert again == m and hashlib.sha256(bad.read_bytes()).hexdigest() == m.shards[1]["sha256"]
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [Path(url).name], "old or temp dirs left"


def test_dataset_url_keys_on_settings_and_content(corpus_file, tmp_path):
    base = small_cfg(tmp_path, corpus_file)
    assert dataset_url(base) == dataset_url(small_cfg(tmp_path, corpus_file))
    assert dataset_url(base) != dataset_url(small_cfg(tmp_path, corpus_file, vocab_size=512))
    assert dataset_url(base) != dataset_url(small_cfg(tmp_path, corpus_file, shard_tokens=9))
    assert dataset_url(base) != dataset_url(small_cfg(tmp_path, corpus_file, text_field="body"))
    assert Path(dataset_url(small_cfg(tmp_path, "embedded"))).name.startswith("embedded-")
    assert dataset_url(small_cfg(tmp_path, "embedded", store="s3://bucket/genesis")).startswith("s3://bucket/genesis/")
    assert dataset_url(small_cfg(tmp_path, corpus_file, dataset="https://cdn.example/ds/")) == "https://cdn.example/ds"
    edited = write_corpus(tmp_path / "edited.txt")
    key = dataset_url(small_cfg(tmp_path, edited))
    edited.write_text(edited.read_text() + "\n\nOne more paragraph of text here.\n")
    assert dataset_url(small_cfg(tmp_path, edited)) != key


# ---------------------------------------------------------------- CLI


def _args(tmp: Path, source: Path) -> list[str]:
    return [f"source={source}", f"store={tmp / 'store'}", f"cache_dir={tmp / 'cache'}", f"vocab_size={VOCAB}",
            f"shard_tokens={SHARD_TOKENS}"]


def test_cli_build_info_verify(corpus_file, tmp_path, capsys):
    args = _args(tmp_path, corpus_file)
    assert cli(["build", *args]) == 0
    out, err = capsys.readouterr()
    url = dataset_url(small_cfg(tmp_path, corpus_file))
    assert f"dataset    {url}" in out and "train, 1 eval" in out
    assert "shards:" in err and "tok" in err, "a progress bar on build"
    assert cli(["build", *args]) == 0 and "using dataset" in capsys.readouterr().err  # reused, not rebuilt
    assert cli(["info", *args, "--node", "node-a"]) == 0
    out = capsys.readouterr().out
    assert "tokens" in out and "node-a: starts on shard" in out
    assert cli(["info", f"data.dataset={url}", "--json"]) == 0
    assert Manifest.from_json(capsys.readouterr().out) == Manifest.load(url)
    assert cli(["verify", f"dataset={url}"]) == 0 and "ok:" in capsys.readouterr().out

    m = Manifest.load(url)
    shard = Path(url) / m.shards[1]["file"]
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    assert cli(["verify", f"dataset={url}"]) == 1
    err = capsys.readouterr().err
    assert f"shard 1 ({shard}) is corrupt" in err and "verify failed" in err
    assert cli(["build", "--force", *args]) == 0 and verify_dataset(url) == m  # a forced rebuild repairs it
    capsys.readouterr()


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert cli(["verify", f"dataset={tmp_path / 'nothing'}"]) == 1
    assert "manifest.json is missing" in capsys.readouterr().err
    assert cli(["frobnicate"]) == 2 and "unknown command" in capsys.readouterr().err
    assert cli(["info", "--bogus"]) == 2 and "unknown option --bogus" in capsys.readouterr().err
    assert cli(["build", "no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neuroray: error: bad config") and err.count("\n") == 1
    assert cli(["build", f"source={tmp_path / 'missing.txt'}"]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert cli(["--help"]) == 0 and "build" in capsys.readouterr().out


def test_token_stream_refuses_a_corrupt_local_shard_before_use(built_copy):
    root, m = built_copy
    shard = m.train_shards[0]
    path = root / shard["file"]
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardCorruptError) as info:
        load_shard(root, m, shard)
    assert info.value.path == str(path) and "rebuild it" in str(info.value)
    node = next(f"n{i}" for i in range(100) if TokenStream(root, m, f"n{i}", 8, 2).shard_id == shard["id"])
    with pytest.raises(ShardCorruptError):
        TokenStream(root, m, node, 8, 2).next_microbatch()
    path.write_bytes(bytes(data[:-2]))  # truncated
    with pytest.raises(ShardCorruptError, match=shard["file"]):
        load_shard(root, m, shard)


def test_data_config_checks():
    from neuroray.configure import load_config
    from neuroray.errors import ConfigError

    cfg = load_config(["data.source=hf:owner/name", "data.store=s3://bucket/genesis", "data.cache_size_mb=16"]).data
    assert (cfg.source, cfg.store, cfg.cache_size_mb, cfg.dataset) == ("hf:owner/name", "s3://bucket/genesis", 16, "")
    for bad, why in (("data.encoding_errors=bogus", "strict, replace or ignore"), ("data.cache_size_mb=0", "positive"),
                     ("data.eval_shards=-1", ">= 0"), ("data.source=", "must not be empty")):
        with pytest.raises(ConfigError, match=why):
            load_config([bad])
