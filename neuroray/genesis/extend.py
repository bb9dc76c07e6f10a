"""A dataset extended under a running model: its store re-read, the grown tokenizer checked against the old one.

A dataset rebuilt in place with ``data.base_tokenizer`` (``build.py``: new files under new names, the
old manifest's files kept, the manifest replaced last) holds the same text under a tokenizer that keeps
every old id and appends new ones. A run that re-reads the manifest (``data.watch_rounds``) calls
:func:`read_extension`: nothing when the manifest is the one it trains on, else the new manifest and
tokenizer once they pass every check a starting run makes (pin, tokenizer hash, shard listing) plus
the ones only growth needs: the tokenizer's size is the manifest's, no token moved, none was removed.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from neuroray.errors import DataError, VocabularyShrankError
from neuroray.genesis.manifest import MANIFEST_FILE, Manifest, check_pinned
from neuroray.genesis.store import Store
from neuroray.genesis.tokenizer import tokenizer_from_bytes

_FIX = "rebuild the dataset with data.base_tokenizer=<the run's dataset or tokenizer.json> (ids are kept, new ones appended)"


@dataclass
class Extension:
    """The dataset as its store holds it now: the manifest, its tokenizer (checked) and the vocabulary size."""

    manifest: Manifest
    tokenizer: Tokenizer
    tokenizer_bytes: bytes

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


def check_ids(tokenizer: Tokenizer, manifest: Manifest, where: str) -> None:
    """DataError unless ``tokenizer`` has exactly the ``vocab_size`` tokens ``manifest`` records: the shards'
    ids were counted against that size (a hash can match a manifest written wrong)."""
    size = tokenizer.get_vocab_size()
    if size != manifest.vocab_size:
        raise DataError(f"{where}: the tokenizer has {size} tokens but the manifest records vocab_size="
                        f"{manifest.vocab_size}, so its ids disagree with the shards'; rebuild the dataset "
                        "(python -m neuroray.genesis build)")


def check_grown(new: Tokenizer, old: Tokenizer, where: str) -> None:
    """Refuse a tokenizer a model of ``old`` cannot read: smaller (:class:`VocabularyShrankError`), or one
    in which a token of ``old`` has another id (DataError naming the first such token)."""
    old_vocab, new_vocab = old.get_vocab(with_added_tokens=True), new.get_vocab(with_added_tokens=True)
    if len(new_vocab) < len(old_vocab):
        raise VocabularyShrankError(where, len(new_vocab), len(old_vocab))
    for token, i in sorted(old_vocab.items(), key=lambda kv: kv[1]):
        if new_vocab.get(token) != i:
            now = "is gone" if token not in new_vocab else f"is id {new_vocab[token]}"
            raise DataError(f"{where}: the tokenizer moved token {token!r} (id {i} in the model, {now}), so the "
                            f"shards' ids mean other text than the model learnt; {_FIX}")


def read_extension(url: str, current: Manifest, current_tokenizer: Tokenizer, manifest_sha256: str = "",
                   manifest_publisher: str = "") -> Extension | None:
    """The dataset at ``url`` if its manifest is no longer ``current``, checked for a model of
    ``current_tokenizer`` to train on (None while it is ``current``, or while a remote rebuild has removed
    the manifest and not yet written the new one)."""
    from neuroray.genesis.build import check_store  # build imports this module's checks

    store = Store(url)
    try:
        raw = store.read(MANIFEST_FILE)
    except FileNotFoundError:
        return None
    if Manifest.from_json(raw, where=store.url_of(MANIFEST_FILE)).to_json() == current.to_json():
        return None
    check_pinned(store, manifest_sha256, manifest_publisher)  # a replaced manifest is refused, never trained on
    manifest, data = check_store(store)
    where = f"the dataset at {store.url}"
    tokenizer = tokenizer_from_bytes(data, store.url_of(manifest.tokenizer_file))
    check_ids(tokenizer, manifest, where)
    check_grown(tokenizer, current_tokenizer, where)
    return Extension(manifest, tokenizer, data)
