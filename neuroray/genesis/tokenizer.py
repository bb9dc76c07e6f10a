"""Byte-level BPE tokenizer (HF ``tokenizers``): any text encodes, nothing maps to an unknown token.

The special tokens come first, so ``<|bos|>``, ``<|eos|>`` and ``<|pad|>`` are ids 0, 1 and 2 in every
tokenizer this module trains.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from neuroray.errors import DataError

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2


def train_tokenizer(docs: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer of at most ``vocab_size`` tokens on ``docs``.

    Deterministic for the same documents in the same order. A small corpus may yield fewer than
    ``vocab_size`` tokens; read the real size from ``tok.get_vocab_size()``.
    """
    min_size = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size} is below {min_size}: byte-level BPE needs 256 bytes + specials")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    for want, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == want, "BpeTrainer no longer puts special tokens first"
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved with ``tok.save(path)``; DataError if it is missing or unreadable."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for both missing and malformed files
        raise DataError(f"cannot load tokenizer {path} ({exc}); delete the dataset directory to rebuild it") from None


def tokenizer_hash(tok: Tokenizer) -> str:
    """SHA-256 hex of the tokenizer's canonical JSON: two tokenizers encode alike iff hashes match."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text``, with no special tokens added."""
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Text of ``ids``; special tokens (BOS/EOS/PAD) are dropped."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)
