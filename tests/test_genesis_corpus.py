"""Genesis text and tokenizer: sources through `datasets`, bad text, append-only vocabulary growth.

Also home of the small corpus helpers the other test_genesis_* modules import.
"""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import pytest

from neuroray.config import DataConfig
from neuroray.errors import DataError
from neuroray.genesis import (
    BOS, EOS, PAD, SPECIAL_TOKENS, TokenStream, build_dataset, check_tokenizer, dataset_url, decode,
    embedded_corpus, encode, ensure_dataset, extends, grow_tokenizer, iter_documents, load_tokenizer, open_source,
    tokenizer_hash, train_tokenizer,
)
from neuroray.genesis import corpus as corpus_mod

VOCAB = 400
SHARD_TOKENS = 512


# ---------------------------------------------------------------- helpers shared by test_genesis_*


def sentences(n: int = 200, seed: int = 0) -> list[str]:
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


def paragraphs(n: int = 200, seed: int = 0) -> list[str]:
    sents = sentences(n, seed)
    return [" ".join(sents[i:i + 4]) for i in range(0, len(sents), 4)]


def write_corpus(path: Path, n: int = 200, seed: int = 0) -> Path:
    """Paragraphs of four sentences separated by blank lines: each paragraph is one document."""
    path.write_text("\n\n".join(paragraphs(n, seed)) + "\n", encoding="utf-8")
    return path


def small_cfg(tmp: Path, source, **kw) -> DataConfig:
    """Tiny shards and vocabulary, everything under ``tmp``."""
    base = {"source": str(source), "store": str(tmp / "store"), "cache_dir": str(tmp / "cache"),
            "vocab_size": VOCAB, "shard_tokens": SHARD_TOKENS, "eval_shards": 1}
    return DataConfig(**{**base, **kw})


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "tiny.txt")


def _docs(tmp: Path, source, **kw) -> list[str]:
    return list(iter_documents(open_source(small_cfg(tmp, source, **kw))))


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids_roundtrip_and_determinism(tmp_path):
    docs = sentences()
    tok = train_tokenizer(docs, VOCAB)
    assert SPECIAL_TOKENS == [BOS, EOS, PAD]
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.get_vocab_size() <= VOCAB
    for text in ["The cat watches the morning light.", "unseen wörds, 日本語 and\ttabs\n  x", ""]:
        assert decode(tok, encode(tok, text)) == text  # byte-level: nothing is unknown
    assert encode(tok, "The cat")[0] not in (0, 1, 2)  # no specials added implicitly
    assert tokenizer_hash(train_tokenizer(docs, VOCAB)) == tokenizer_hash(tok)
    (tmp_path / "t.json").write_text(tok.to_str())
    assert tokenizer_hash(load_tokenizer(tmp_path / "t.json", tokenizer_hash(tok))) == tokenizer_hash(tok)
    with pytest.raises(DataError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError):
        train_tokenizer(docs, 100)


def test_grown_tokenizer_keeps_every_id_and_adds_new_ones():
    base = train_tokenizer(sentences(200, seed=0), 300)
    more = sentences(400, seed=0) + [f"Quantum chromodynamics number {i} describes gluons." for i in range(200)]
    grown = grow_tokenizer(base, more, 380)
    old_vocab, new_vocab = base.get_vocab(), grown.get_vocab()
    assert extends(grown, base) and not extends(base, grown)
    assert base.get_vocab_size() == 300 and grown.get_vocab_size() == 380
    assert sorted(new_vocab.values()) == list(range(380))  # new ids appended after the old ones
    added = {t for t in new_vocab if t not in old_vocab}
    assert len(added) == 80 and all(new_vocab[t] >= 300 for t in added)
    old_merges = json.loads(base.to_str())["model"]["merges"]
    assert json.loads(grown.to_str())["model"]["merges"][:len(old_merges)] == old_merges  # same ranks
    text = "Quantum chromodynamics describes gluons."
    assert decode(grown, encode(grown, text)) == text
    assert len(encode(grown, text)) < len(encode(base, text))  # the new tokens are used
    assert tokenizer_hash(grow_tokenizer(base, more, 380)) == tokenizer_hash(grown)  # deterministic
    with pytest.raises(DataError, match="only grows"):
        grow_tokenizer(grown, more, 300)


def test_build_grows_the_base_tokenizer_append_only(corpus_file, tmp_path):
    _, first = ensure_dataset(small_cfg(tmp_path, corpus_file, vocab_size=320), log=quiet)
    first_url = dataset_url(small_cfg(tmp_path, corpus_file, vocab_size=320))
    bigger = tmp_path / "bigger.txt"
    bigger.write_text(corpus_file.read_text() + "\n\n" + "\n\n".join(paragraphs(200, seed=7)))
    cfg = small_cfg(tmp_path, bigger, vocab_size=360, base_tokenizer=first_url)
    root, grown = ensure_dataset(cfg, log=quiet)
    assert grown.parent_tokenizer_sha256 == first.tokenizer_sha256 != grown.tokenizer_sha256
    old = load_tokenizer(Path(first_url) / first.tokenizer_file)
    new = load_tokenizer(Path(root) / grown.tokenizer_file, grown.tokenizer_sha256)
    assert extends(new, old) and new.get_vocab_size() > old.get_vocab_size()
    # the base can also be named by its tokenizer.json; the dataset key follows the base's content
    by_file = small_cfg(tmp_path, bigger, vocab_size=360, base_tokenizer=f"{first_url}/tokenizer.json")
    assert dataset_url(by_file) == dataset_url(cfg)
    with pytest.raises(DataError, match="does not exist"):
        dataset_url(small_cfg(tmp_path, bigger, base_tokenizer=str(tmp_path / "nope.json")))


def test_tokenizer_hash_that_does_not_match_the_model_is_refused(corpus_file, tmp_path):
    root, m = ensure_dataset(small_cfg(tmp_path, corpus_file), log=quiet)
    model_sha = "ab" * 32  # the hash recorded with a checkpoint trained on other data
    with pytest.raises(DataError, match=r"sha256 .* but the model expects abababababab.*grow the model's vocabulary"):
        check_tokenizer(m.tokenizer_sha256, model_sha)
    with pytest.raises(DataError, match="tokenizer.json has sha256"):
        load_tokenizer(Path(root) / m.tokenizer_file, model_sha)
    state = TokenStream(root, m, "n", 8, 2).state()
    with pytest.raises(DataError, match="different dataset"):
        TokenStream.from_state(root, m, {**state, "tokenizer_sha256": model_sha})
    # a tokenizer file replaced under a manifest is caught by the dataset check too
    (Path(root) / m.tokenizer_file).write_text(train_tokenizer(sentences(50), 300).to_str())
    with pytest.raises(DataError, match="the manifest expects"):
        ensure_dataset(small_cfg(tmp_path, corpus_file, dataset=str(root)), log=quiet)


# ---------------------------------------------------------------- sources


def test_sources_txt_json_jsonl_parquet_directories_and_globs(tmp_path, corpus_file):
    docs = _docs(tmp_path, corpus_file)
    assert docs == paragraphs()  # paragraphs of a .txt are documents, in order
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second file\n\nthird doc\n")
    (d / "sub" / "a.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    (d / "sub" / "c.json").write_text(json.dumps([{"text": "from json", "n": 1}]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["from parquet", "  ", "row two"], "id": [1, 2, 3]}), d / "sub" / "d.parquet")
    (d / "ignored.csv").write_text("not read")
    assert _docs(tmp_path, d) == ["second file", "third doc", "from jsonl", "x", "from json", "from parquet",
                                  "row two"]  # sorted paths; blank documents skipped
    assert _docs(tmp_path, str(d / "**" / "*.jsonl")) == ["from jsonl", "x"]  # a glob
    pq.write_table(pa.table({"body": ["p1", "p2"]}), tmp_path / "body.parquet")
    assert _docs(tmp_path, tmp_path / "body.parquet", text_field="body") == ["p1", "p2"]
    with pytest.raises(DataError, match=r"a\.jsonl has no 'body' field.*data\.text_field"):
        _docs(tmp_path, d / "sub" / "a.jsonl", text_field="body")
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(DataError, match="holds int values, not text"):
        _docs(tmp_path, tmp_path / "num.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"cannot read .*broken\.jsonl as json"):
        _docs(tmp_path, tmp_path / "broken.jsonl")


def test_unknown_sources_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="nope.txt does not exist.*data.source=embedded"):
        open_source(small_cfg(tmp_path, tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="nope.txt"):
        dataset_url(small_cfg(tmp_path, tmp_path / "nope.txt"))
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(DataError, match="data.csv is not one of"):
        open_source(small_cfg(tmp_path, tmp_path / "data.csv"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no"):
        open_source(small_cfg(tmp_path, tmp_path / "empty_dir"))
    with pytest.raises(DataError, match="encoding_errors"):
        open_source(small_cfg(tmp_path, "embedded", encoding_errors="bogus"))


def test_hub_source_goes_through_datasets_and_fails_clearly_offline(tmp_path, monkeypatch):
    import datasets.config

    repo = tmp_path / "hub_like"  # load_dataset reads a local dataset directory like a Hub repository
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train.jsonl").write_text("".join(json.dumps({"content": p}) + "\n" for p in paragraphs(20)))
    assert _docs(tmp_path, f"hf:{repo}", text_field="content") == paragraphs(20)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # this sandbox has no network anyway
    with pytest.raises(DataError, match="cannot read Hub dataset nobody/nothing.*network"):
        _docs(tmp_path, "hf:nobody/nothing")
    with pytest.raises(DataError, match="names no dataset"):
        open_source(small_cfg(tmp_path, "hf:"))


def test_embedded_corpus_is_large_and_cached(tmp_path, monkeypatch):
    docs = embedded_corpus(tmp_path / "corpus")
    assert sum(map(len, docs)) > 1_000_000
    assert all(len(d) >= corpus_mod.MIN_DOC_CHARS for d in docs)
    assert any("for" in d and "statement" in d for d in docs[:200])  # pydoc topics come first
    files = list((tmp_path / "corpus").iterdir())
    assert len(files) == 1 and files[0].suffix == ".jsonl", "one cache file, no temp files"

    def boom():
        raise AssertionError("second call must read the cache, not recollect")

    monkeypatch.setattr(corpus_mod, "_collect_embedded", boom)
    assert embedded_corpus(tmp_path / "corpus") == docs
    it = iter(open_source(DataConfig(source="embedded", cache_dir=str(tmp_path))))
    assert [next(it) for _ in range(3)] == docs[:3]  # the embedded corpus streams through datasets too


def test_corpus_streams_in_bounded_memory(tmp_path):
    """Peak Python memory while reading does not grow with the corpus: it is streamed, never loaded whole."""
    para = "\n\n".join(paragraphs(400)) + "\n\n"

    def peak_reading(copies: int) -> tuple[int, int]:
        path = tmp_path / f"corpus{copies}.txt"
        with path.open("w", encoding="utf-8") as f:
            for _ in range(copies):
                f.write(para)
        source = open_source(small_cfg(tmp_path, path))
        next(iter(source))  # imports and first-load caches are not the corpus: warm them up first
        tracemalloc.start()
        try:
            count = sum(1 for _ in source)
            return tracemalloc.get_traced_memory()[1], count
        finally:
            tracemalloc.stop()

    small_peak, small_count = peak_reading(180)  # ~4 MB: a few read chunks
    big_peak, big_count = peak_reading(720)  # ~16 MB
    assert (small_count, big_count) == (18000, 72000)
    assert big_peak < 1.5 * small_peak + (1 << 20), (
        f"4x the text raised peak memory from {small_peak} to {big_peak} bytes: the corpus is not streamed")


# ---------------------------------------------------------------- bad text


def test_non_utf8_text_is_named_or_replaced(tmp_path):
    bad_txt = tmp_path / "latin1.txt"
    bad_txt.write_bytes("hello world\n\n".encode() + "café au lait\n".encode("latin-1"))
    bad_json = tmp_path / "latin1.jsonl"
    bad_json.write_bytes(b'{"text": "fine"}\n' + '{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8 text \(invalid byte at offset 16\).*"
                                        r"encoding_errors=replace"):
        _docs(tmp_path, bad_txt)
    with pytest.raises(DataError, match=r"latin1\.jsonl is not UTF-8 text \(invalid byte at offset 30\)"):
        _docs(tmp_path, bad_json)
    assert _docs(tmp_path, bad_txt, encoding_errors="replace") == ["hello world", "caf\ufffd au lait"]
    assert _docs(tmp_path, bad_json, encoding_errors="replace") == ["fine", "caf\ufffd"]
    assert _docs(tmp_path, bad_json, encoding_errors="ignore") == ["fine", "caf"]
    cfg = small_cfg(tmp_path, bad_txt)
    with pytest.raises(DataError, match="latin1.txt is not UTF-8"):
        build_dataset(cfg, log=quiet)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir()), "nothing half-written"


def test_empty_corpus_is_an_error_and_writes_nothing(tmp_path):
    empties = tmp_path / "empties"
    empties.mkdir()
    (empties / "a.txt").write_text("")
    (empties / "b.txt").write_text("\n\n   \n\n")
    (empties / "c.jsonl").write_text(json.dumps({"text": "   "}) + "\n")
    (empties / "d.jsonl").write_text("")
    for source in (empties / "a.txt", empties / "b.txt", empties / "c.jsonl", empties):
        cfg = small_cfg(tmp_path, source)
        with pytest.raises(DataError, match="holds no text.*add documents"):
            ensure_dataset(cfg, log=quiet)
        store = tmp_path / "store"
        assert not store.exists() or not any(store.iterdir()), f"{source}: a failed build left files"
