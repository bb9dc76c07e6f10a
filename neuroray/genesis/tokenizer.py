"""Byte-level BPE tokenizer (HF ``tokenizers``) whose vocabulary grows append-only.

Any text encodes (256 byte tokens), nothing maps to an unknown token. The special tokens come first, so
``<|bos|>``, ``<|eos|>`` and ``<|pad|>`` are ids 0, 1 and 2 in every tokenizer made here.

Growth (:func:`grow_tokenizer`) keeps every id and every merge of the old tokenizer, in the same order,
and appends new merges learnt from more data after them. A model trained on the old ids therefore
still reads them correctly; only its embedding and LM head need new rows (neuroray.model.vocab).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from neuroray.errors import DataError

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(docs: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer of at most ``vocab_size`` tokens on ``docs`` (consumed once, streamed).

    Deterministic for the same documents in the same order. A small corpus may yield fewer than
    ``vocab_size`` tokens; read the real size from ``tok.get_vocab_size()``.
    """
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is below {MIN_VOCAB}: byte-level BPE needs 256 bytes + specials")
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


def _merges(model: dict) -> list[tuple[str, str]]:
    # tokenizers writes merges as ["a", "b"] pairs since 0.20 and as "a b" strings before.
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]


def grow_tokenizer(base: Tokenizer, docs: Iterable[str], vocab_size: int) -> Tokenizer:
    """``base`` with new tokens learnt from ``docs`` appended, up to ``vocab_size`` tokens in all.

    Every token of ``base`` keeps its id and every merge its rank; new merges rank after the old ones.
    New merges are taken, in the order a fresh BPE trained on ``docs`` learnt them, whenever both parts
    are already tokens. A fresh tokenizer re-learns many of the base's merges, so it is trained with a
    larger target until enough new ones appear (or ``docs`` has no more to give).
    """
    spec = json.loads(base.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise DataError("data.base_tokenizer is not a BPE tokenizer; grow only tokenizers built by neuroray.genesis")
    vocab: dict[str, int] = dict(model["vocab"])
    if sorted(vocab.values()) != list(range(len(vocab))) or [vocab.get(t) for t in SPECIAL_TOKENS] != [0, 1, 2]:
        raise DataError("data.base_tokenizer does not have contiguous ids with <|bos|>, <|eos|>, <|pad|> first; "
                        "grow only tokenizers built by neuroray.genesis")
    if vocab_size < len(vocab):
        raise DataError(f"data.vocab_size={vocab_size} is smaller than data.base_tokenizer's {len(vocab)} tokens; "
                        "a vocabulary only grows: raise data.vocab_size")
    merges = _merges(model)
    if iter(docs) is docs:
        docs = list(docs)  # a one-shot iterator; pass a re-iterable (a list, Documents) to keep streaming
    target = vocab_size
    for _ in range(3):
        fresh = train_tokenizer(docs, target)
        grown_vocab, grown_merges = dict(vocab), list(merges)
        known = set(grown_merges)
        for a, b in _merges(json.loads(fresh.to_str())["model"]):
            if len(grown_vocab) >= vocab_size:
                break
            if (a, b) in known or a not in grown_vocab or b not in grown_vocab:
                continue
            known.add((a, b))
            grown_merges.append((a, b))
            grown_vocab.setdefault(a + b, len(grown_vocab))  # a merge may reach a token the base already has
        short = vocab_size - len(grown_vocab)
        if short <= 0 or fresh.get_vocab_size() < target:
            break  # enough, or the corpus is exhausted: a larger target would learn nothing more
        target += short
    model["vocab"] = grown_vocab
    model["merges"] = [list(m) for m in grown_merges]
    return Tokenizer.from_str(json.dumps(spec))


def extends(new: Tokenizer, old: Tokenizer) -> bool:
    """True if ``new`` keeps every token of ``old`` at the same id (a model of ``old`` can read ``new``'s ids)."""
    new_vocab = new.get_vocab(with_added_tokens=True)
    return all(new_vocab.get(token) == i for token, i in old.get_vocab(with_added_tokens=True).items())


def load_tokenizer(path: str | os.PathLike, expected_sha256: str | None = None) -> Tokenizer:
    """Load a tokenizer file; DataError if it is missing, unreadable, or not the one ``expected_sha256`` names."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read tokenizer {path} ({exc.__class__.__name__}); rebuild the dataset with "
                        "`python -m neuroray.genesis build` or fix the path") from None
    if expected_sha256 is not None:
        check_tokenizer(hashlib.sha256(data).hexdigest(), expected_sha256, f"tokenizer {path}", "the manifest",
                        "rebuild the dataset, or re-fetch the tokenizer from the dataset's store")
    return tokenizer_from_bytes(data, str(path))


def tokenizer_from_bytes(data: bytes, where: str) -> Tokenizer:
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"cannot load tokenizer {where} ({str(exc)[:120]}); rebuild the dataset with "
                        "`python -m neuroray.genesis build`") from None


_MODEL_FIX = ("use the dataset the model was trained on, or grow the model's vocabulary to the new tokenizer "
              "(data.base_tokenizer + neuroray.model.vocab.grow_vocab)")


def check_tokenizer(actual_sha256: str, expected_sha256: str, what: str = "the dataset's tokenizer",
                    expected_by: str = "the model", fix: str = _MODEL_FIX) -> None:
    """DataError unless the two tokenizer hashes match: token ids mean nothing under another tokenizer."""
    if actual_sha256 != expected_sha256:
        raise DataError(f"{what} has sha256 {actual_sha256[:12]}… but {expected_by} expects "
                        f"{expected_sha256[:12]}…; {fix}")


def read_checked_tokenizer(store, manifest, what: str = "", expected_by: str = "the manifest",
                           fix: str = "rebuild or republish the dataset") -> bytes:
    """The bytes of the dataset's ``tokenizer.json``, checked against its manifest before any id is trusted."""
    where = what or f"tokenizer {store.url_of(manifest.tokenizer_file)}"
    try:
        data = store.read(manifest.tokenizer_file)
    except FileNotFoundError:
        raise DataError(f"{where} is missing; {fix}") from None
    check_tokenizer(hashlib.sha256(data).hexdigest(), manifest.tokenizer_sha256, where, expected_by, fix)
    return data


def tokenizer_hash(tok: Tokenizer) -> str:
    """SHA-256 hex of the tokenizer's canonical JSON (= the SHA-256 of the ``tokenizer.json`` a build writes)."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text``, with no special tokens added."""
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Text of ``ids``; special tokens (BOS/EOS/PAD) are dropped."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)


def encode_documents(tok: Tokenizer, docs: list[str]) -> Iterator[list[int]]:
    """Each document's ids, without specials, through the parallel Rust batch encoder.

    ``encode_batch_fast`` skips the character offsets a build never uses (tokenizers >= 0.20).
    """
    batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    for enc in batch(docs, add_special_tokens=False):
        yield enc.ids
