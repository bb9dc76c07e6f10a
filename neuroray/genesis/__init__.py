"""Genesis data: a growing byte-level BPE tokenizer, pre-tokenized SHA-256-verified shards on any fsspec
store, and the deterministic per-node token streams the Drivers train on (shard = sha256(node_id) mod N).

Modules: corpus (text sources through ``datasets``), tokenizer (train, grow, hash), build (shards +
manifest, atomic; extended in place), extend (a dataset extended under a running model, checked), manifest,
store (fsspec), fetch (verified, cached, prefetched shard bytes), shards (assignment, streams,
``batch_for``). CLI: ``python -m neuroray.genesis build|verify|info``.
"""

from neuroray.genesis.build import build_dataset, dataset_url, ensure_dataset
from neuroray.genesis.corpus import EMBEDDED, Source, embedded_corpus, iter_documents, open_source
from neuroray.genesis.manifest import FORMAT_VERSION, MANIFEST_FILE, Manifest, dtype_for
from neuroray.genesis.shards import (
    TokenSpan, TokenStream, batch_for, batch_span, eval_batches, load_shard, shard_for, shard_order, verify_dataset,
)
from neuroray.genesis.store import DatasetRoot, Store
from neuroray.genesis.tokenizer import (
    BOS, EOS, PAD, SPECIAL_TOKENS, check_tokenizer, decode, encode, extends, grow_tokenizer, load_tokenizer,
    tokenizer_hash, train_tokenizer,
)

__all__ = [
    "BOS", "EMBEDDED", "EOS", "FORMAT_VERSION", "MANIFEST_FILE", "PAD", "SPECIAL_TOKENS", "DatasetRoot", "Manifest",
    "Source", "Store", "TokenSpan", "TokenStream", "batch_for", "batch_span", "build_dataset", "check_tokenizer",
    "dataset_url", "decode", "dtype_for", "embedded_corpus", "encode", "ensure_dataset", "eval_batches", "extends",
    "grow_tokenizer", "iter_documents", "load_shard", "load_tokenizer", "open_source", "shard_for", "shard_order",
    "tokenizer_hash", "train_tokenizer", "verify_dataset",
]
