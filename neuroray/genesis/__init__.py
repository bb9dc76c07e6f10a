"""Genesis data: a byte-level BPE tokenizer, pre-tokenized SHA-256-verified shards, and the
deterministic per-node token streams the Drivers train on (shard = sha256(node_id) mod N).
"""

from neuroray.genesis.build import build_dataset, dataset_dir, ensure_dataset
from neuroray.genesis.corpus import embedded_corpus, iter_documents
from neuroray.genesis.shards import (
    Manifest, TokenStream, eval_batches, load_shard, shard_for, verify_dataset,
)
from neuroray.genesis.tokenizer import (
    BOS, EOS, PAD, SPECIAL_TOKENS, decode, encode, load_tokenizer, tokenizer_hash, train_tokenizer,
)

__all__ = [
    "BOS", "EOS", "PAD", "SPECIAL_TOKENS", "Manifest", "TokenStream", "build_dataset", "dataset_dir",
    "decode", "embedded_corpus", "encode", "ensure_dataset", "eval_batches", "iter_documents",
    "load_shard", "load_tokenizer", "shard_for", "tokenizer_hash", "train_tokenizer", "verify_dataset",
]
