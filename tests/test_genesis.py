"""Genesis data: tokenizer, corpus, atomic builds, verified shards, deterministic token streams."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroray.config import DataConfig
from neuroray.errors import DataError, ShardCorruptError
from neuroray.genesis import (
    BOS, EOS, PAD, SPECIAL_TOKENS, Manifest, TokenStream, build_dataset, dataset_dir, decode,
    embedded_corpus, encode, ensure_dataset, eval_batches, iter_documents, load_shard, load_tokenizer,
    shard_for, tokenizer_hash, train_tokenizer,
)
from neuroray.genesis import corpus as corpus_mod

VOCAB = 400
SHARD_TOKENS = 512
EVAL_SHARDS = 1


def _sentences(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    subjects = ["The cat", "A small dog", "My neighbour", "The old river", "Every student", "The engineer",
                "A quiet town", "The red train", "Our teacher", "The busy market"]
    verbs = ["watches", "builds", "remembers", "carries", "paints", "follows", "describes", "forgets"]
    objects = ["the morning light", "a wooden bridge", "seven green apples", "the distant hills",
               "an unfinished letter", "the noisy harbour", "a list of numbers", "the winter garden"]
    tails = ["before dinner.", "with great care.", "every Sunday!", "without a word.", "in 1987.",
             "near the café.", "when it rains?", "for no reason at all."]
    return [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}"
            for _ in range(n)]


def _write_corpus(path: Path) -> Path:
    sents = _sentences()
    # Paragraphs of four sentences separated by blank lines: each paragraph is one document.
    paras = [" ".join(sents[i:i + 4]) for i in range(0, len(sents), 4)]
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "tiny.txt")


@pytest.fixture(scope="module")
def built(corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "ds"
    manifest = build_dataset(str(corpus_file), out, VOCAB, SHARD_TOKENS, EVAL_SHARDS,
                             cache_dir=out.parent / "cache", log=lambda s: None)
    return out, manifest


@pytest.fixture
def built_copy(built, tmp_path):
    root, manifest = built
    dst = tmp_path / "ds"
    shutil.copytree(root, dst)
    return dst, manifest


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids_roundtrip_and_determinism(tmp_path):
    docs = _sentences()
    tok = train_tokenizer(docs, VOCAB)
    assert SPECIAL_TOKENS == [BOS, EOS, PAD]
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.get_vocab_size() <= VOCAB
    for text in ["The cat watches the morning light.", "unseen wörds, 日本語 and\ttabs\n  x", ""]:
        assert decode(tok, encode(tok, text)) == text
    assert encode(tok, "The cat")[0] not in (0, 1, 2)  # no specials added implicitly
    assert tokenizer_hash(train_tokenizer(docs, VOCAB)) == tokenizer_hash(tok)
    tok.save(str(tmp_path / "t.json"))
    assert tokenizer_hash(load_tokenizer(tmp_path / "t.json")) == tokenizer_hash(tok)
    with pytest.raises(DataError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError):
        train_tokenizer(docs, 100)


# ---------------------------------------------------------------- corpus


def test_iter_documents_txt_jsonl_and_directory(tmp_path, corpus_file):
    docs = list(iter_documents(str(corpus_file), tmp_path))
    assert len(docs) == 50 and all(d.count(".") + d.count("!") + d.count("?") >= 4 for d in docs)
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second file\n\nthird doc\n")
    (d / "sub" / "a.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n\n" + json.dumps({"text": "x"}) + "\n")
    (d / "ignored.csv").write_text("not read")
    assert list(iter_documents(str(d), tmp_path)) == ["second file", "third doc", "from jsonl", "x"]
    (d / "sub" / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1"):
        list(iter_documents(str(d / "sub" / "bad.jsonl"), tmp_path))


def test_unknown_source_is_a_data_error(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="nope.txt.*data.source=embedded"):
        iter_documents(str(missing), tmp_path)  # raised at the call, not on first next()
    with pytest.raises(DataError, match="nope.txt"):
        dataset_dir(DataConfig(source=str(missing), store=str(tmp_path)))
    (tmp_path / "data.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match="neither .txt nor .jsonl"):
        iter_documents(str(tmp_path / "data.parquet"), tmp_path)


def test_embedded_corpus_is_large_and_cached(tmp_path, monkeypatch):
    docs = embedded_corpus(tmp_path)
    assert sum(map(len, docs)) > 1_000_000
    assert all(len(d) >= corpus_mod.MIN_DOC_CHARS for d in docs)
    assert any("for" in d and "statement" in d for d in docs[:200])  # pydoc topics come first
    assert len(list(tmp_path.glob("*.jsonl"))) == 1 and not list(tmp_path.glob("*.tmp"))

    def boom():
        raise AssertionError("second call must read the cache, not recollect")

    monkeypatch.setattr(corpus_mod, "_collect_embedded", boom)
    assert embedded_corpus(tmp_path) == docs
    assert list(iter_documents("embedded", tmp_path))[:3] == docs[:3]


# ---------------------------------------------------------------- build


def test_build_manifest_fields_and_hashes(built):
    root, m = built
    assert Manifest.load(root) == m
    assert m.format_version == 1 and m.dtype == "uint16" and m.vocab_size <= VOCAB
    assert m.tokenizer_sha256 == hashlib.sha256((root / m.tokenizer_file).read_bytes()).hexdigest()
    assert m.tokenizer_sha256 == tokenizer_hash(load_tokenizer(root / m.tokenizer_file))
    assert len(m.shards) >= 4, "the test corpus should give several shards"
    assert [s["split"] for s in m.shards] == ["train"] * (len(m.shards) - 1) + ["eval"]
    assert m.eval_shards == m.shards[-1:] and m.train_shards == m.shards[:-1]
    assert all(s["tokens"] == SHARD_TOKENS for s in m.shards[:-1])
    assert SHARD_TOKENS // 2 <= m.shards[-1]["tokens"] < SHARD_TOKENS + SHARD_TOKENS // 2
    assert m.total_tokens == sum(s["tokens"] for s in m.shards)
    stream = []
    for s in m.shards:
        data = (root / s["file"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["bytes"] == len(data) == 2 * s["tokens"]
        stream.append(np.frombuffer(data, dtype="<u2"))
        assert np.array_equal(load_shard(root, m, s), stream[-1])
    flat = np.concatenate(stream)
    assert flat[0] == 0 and flat.max() < m.vocab_size
    assert (flat == 0).sum() == (flat == 1).sum() == 50  # one BOS and one EOS per document
    tok = load_tokenizer(root / m.tokenizer_file)
    first_doc = flat[1:np.argmax(flat == 1)]
    assert decode(tok, first_doc.tolist()) == " ".join(_sentences()[:4])
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_manifest_roundtrip_and_malformed(built, tmp_path):
    _, m = built
    assert Manifest.from_json(m.to_json()) == m
    with pytest.raises(DataError, match=str(tmp_path / "manifest.json")):
        Manifest.load(tmp_path)  # no manifest: not a dataset
    raw = json.loads(m.to_json())
    raw["shards"][0]["file"] = "../../etc/passwd"
    with pytest.raises(DataError, match="plain file name"):
        Manifest.from_json(json.dumps(raw))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="malformed"):
        Manifest.load(tmp_path)


def test_failed_build_leaves_nothing(corpus_file, tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(DataError, match="lower data.shard_tokens"):
        build_dataset(str(corpus_file), out, VOCAB, 10**6, 1, cache_dir=tmp_path, log=lambda s: None)
    assert not out.exists() and list(tmp_path.iterdir()) == [], "a failed build must leave no files"


def test_large_vocab_uses_uint32(tmp_path):
    from neuroray.genesis.shards import dtype_for

    assert dtype_for(65535) == "uint16" and dtype_for(65536) == "uint32"


# ---------------------------------------------------------------- shards and streams


def test_shard_for_is_deterministic_and_in_range():
    ids = [f"node-{i}" for i in range(1000)]
    for n in (1, 3, 7, 64):
        got = [shard_for(i, n) for i in ids]
        assert got == [shard_for(i, n) for i in ids] and all(0 <= g < n for g in got)
        assert got == [int(hashlib.sha256(i.encode()).hexdigest(), 16) % n for i in ids]
        assert len(set(got)) == n  # 1000 nodes reach every shard
    with pytest.raises(ValueError):
        shard_for("x", 0)


def test_token_stream_shifted_deterministic_and_starts_at_own_shard(built):
    root, m = built
    node = "driver-7"
    a = TokenStream(root, m, node, seq_len=16, microbatch_size=4)
    b = TokenStream(root, m, node, seq_len=16, microbatch_size=4)
    start = m.train_shards[shard_for(node, len(m.train_shards))]
    assert a.shard_id == start["id"]
    first = load_shard(root, m, start)
    for k in range(5):
        (x, y), (x2, y2) = a.next_microbatch(), b.next_microbatch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x[:, 1:], y[:, :-1])
        if k == 0:
            assert np.array_equal(x[0].numpy(), first[:16]) and np.array_equal(y[0].numpy(), first[1:17])
    assert a.position == 5


def test_token_stream_wraps_through_the_ring(built):
    root, m = built
    train = m.train_shards
    node = next(f"n{i}" for i in range(100) if shard_for(f"n{i}", len(train)) == len(train) - 1)
    ring = train[-1:] + train[:-1]  # starts at the last train shard, wraps to shard 0
    expected = np.concatenate([load_shard(root, m, s) for s in ring] * 2)
    seq, mb = 31, 3
    s = TokenStream(root, m, node, seq_len=seq, microbatch_size=mb)
    n = (2 * sum(r["tokens"] for r in ring)) // (mb * (seq + 1))
    got = []
    for _ in range(n):
        x, y = s.next_microbatch()
        got.append(torch.cat([x, y[:, -1:]], dim=1).reshape(-1).numpy())
    got = np.concatenate(got)
    assert np.array_equal(got, expected[:got.size])
    assert s.shard_id in {r["id"] for r in ring}


def test_token_stream_seek_and_state_resume(built):
    root, m = built
    a = TokenStream(root, m, "resume-me", seq_len=24, microbatch_size=2)
    for _ in range(37):
        a.next_microbatch()
    state = json.loads(json.dumps(a.state()))
    b = TokenStream.from_state(root, m, state)
    c = TokenStream(root, m, "resume-me", seq_len=24, microbatch_size=2)
    c.seek(37)
    for _ in range(3):
        xa, _ = a.next_microbatch()
        assert torch.equal(xa, b.next_microbatch()[0]) and torch.equal(xa, c.next_microbatch()[0])
    assert a.position == b.position == c.position == 40
    with pytest.raises(DataError, match="different dataset"):
        TokenStream.from_state(root, m, {**state, "tokenizer_sha256": "0" * 64})


def test_eval_batches(built):
    root, m = built
    batches = eval_batches(root, m, seq_len=16, microbatch_size=2, max_batches=3)
    assert len(batches) == 3
    eval_tokens = load_shard(root, m, m.eval_shards[0])
    assert np.array_equal(batches[0][0][0].numpy(), eval_tokens[:16])
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in batches)
    again = eval_batches(root, m, seq_len=16, microbatch_size=2, max_batches=3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(batches, again))


def test_corrupt_shard_is_rejected_before_use(built_copy):
    root, m = built_copy
    shard = m.train_shards[0]
    path = root / shard["file"]
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardCorruptError) as info:
        load_shard(root, m, shard)
    assert info.value.path == str(path) and shard["file"] in str(info.value)
    node = next(f"n{i}" for i in range(100) if shard_for(f"n{i}", len(m.train_shards)) == 0)
    with pytest.raises(ShardCorruptError):
        TokenStream(root, m, node, 8, 2).next_microbatch()
    path.write_bytes(bytes(data[:-2]))  # truncated
    with pytest.raises(ShardCorruptError):
        load_shard(root, m, shard)
    path.unlink()
    with pytest.raises(DataError, match=shard["file"]):
        load_shard(root, m, shard)


# ---------------------------------------------------------------- ensure_dataset


def test_ensure_dataset_caches_and_rebuilds_corrupt_shards(corpus_file, tmp_path):
    cfg = DataConfig(source=str(corpus_file), store=str(tmp_path / "store"), vocab_size=VOCAB,
                     shard_tokens=SHARD_TOKENS, eval_shards=EVAL_SHARDS)
    half_built = dataset_dir(cfg)
    half_built.mkdir(parents=True)
    (half_built / "shard_00000.bin").write_bytes(b"\1\0" * 8)  # shards but no manifest: not a dataset
    lines: list[str] = []
    root, m = ensure_dataset(cfg, log=lines.append)
    assert root == half_built and root.parent == tmp_path / "store"
    assert (root / "shard_00000.bin").stat().st_size == m.shards[0]["bytes"]
    assert any("shard 0 written" in line for line in lines) and "built dataset" in lines[-1]

    lines.clear()
    root2, m2 = ensure_dataset(cfg, log=lines.append)
    assert (root2, m2) == (root, m) and lines == [
        f"genesis: using cached dataset {root} ({len(m.shards)} shards, {m.total_tokens} tokens)"]

    bad = root / m.shards[1]["file"]
    bad.write_bytes(b"\0" * m.shards[1]["bytes"])
    lines.clear()
    _, m3 = ensure_dataset(cfg, log=lines.append)
    assert "warning" in lines[0] and str(bad) in lines[0]
    assert m3 == m and hashlib.sha256(bad.read_bytes()).hexdigest() == m.shards[1]["sha256"]

    (root / "manifest.json").write_text("[]")
    lines.clear()
    _, m4 = ensure_dataset(cfg, log=lines.append)
    assert "warning" in lines[0] and "manifest.json" in lines[0] and m4 == m
    assert sorted(p.name for p in root.parent.iterdir()) == [root.name], "old or temp dirs left behind"


def test_dataset_dir_keys_on_settings_and_content(corpus_file, tmp_path):
    base = DataConfig(source=str(corpus_file), store=str(tmp_path))
    assert dataset_dir(base) == dataset_dir(DataConfig(source=str(corpus_file), store=str(tmp_path)))
    assert dataset_dir(base) != dataset_dir(DataConfig(source=str(corpus_file), store=str(tmp_path), vocab_size=512))
    assert dataset_dir(base) != dataset_dir(DataConfig(source=str(corpus_file), store=str(tmp_path), shard_tokens=9))
    assert dataset_dir(DataConfig(store=str(tmp_path))).name.startswith("embedded-")
    edited = _write_corpus(tmp_path / "edited.txt")
    key = dataset_dir(DataConfig(source=str(edited), store=str(tmp_path)))
    edited.write_text(edited.read_text() + "\n\nOne more paragraph of text here.\n")
    assert dataset_dir(DataConfig(source=str(edited), store=str(tmp_path))) != key
