"""The manifest: what a dataset holds and the SHA-256 of every file a node will read.

``manifest.json`` is written last by every build: its presence is what makes a directory a dataset.
It is validated strictly on load (exact keys, types, consistent totals, plain file names), because it
may come from a remote store and it decides which bytes a node trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from neuroray.errors import DataError


class ManifestPinError(DataError):
    """The dataset's manifest is not the pinned one (data.manifest_sha256) or not signed by the pinned
    publisher (data.manifest_publisher): whoever controls the store may have replaced it and its shards."""

FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"  # optional: the publisher's signature of manifest.json's sha256
SIGNATURE_DOMAIN = b"NEURORAY-MANIFEST-v1\n"
SPLITS = ("train", "eval")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
SHARD_KEYS = ("id", "file", "split", "tokens", "bytes", "sha256")


def dtype_for(vocab_size: int) -> str:
    """Smallest shard dtype that holds every id of a ``vocab_size`` vocabulary."""
    return "uint16" if vocab_size <= 65536 else "uint32"


def plain_name(name) -> bool:
    """A bare file name: names come from a possibly remote manifest and must never leave the dataset."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and not name.startswith("."))


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass
class Manifest:
    """Format version; tokenizer file, hash and provenance; per shard its id, split, tokens, bytes, SHA-256; totals."""

    format_version: int
    tokenizer_file: str
    tokenizer_sha256: str
    vocab_size: int
    dtype: str
    shards: list[dict] = field(default_factory=list)
    total_tokens: int = 0
    total_bytes: int = 0
    shard_tokens: int = 0  # the target size; the last shard may be up to one tail longer
    source: str = ""  # what the text was, for humans (`python -m neuroray.genesis info`)
    parent_tokenizer_sha256: str | None = None  # the tokenizer this one grew from, keeping all its ids

    @property
    def train_shards(self) -> list[dict]:
        return [s for s in self.shards if s["split"] == "train"]

    @property
    def eval_shards(self) -> list[dict]:
        return [s for s in self.shards if s["split"] == "eval"]

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def shard(self, shard_id: int) -> dict:
        for s in self.shards:
            if s["id"] == shard_id:
                return s
        raise DataError(f"the dataset has no shard {shard_id} (it has ids 0..{len(self.shards) - 1}); "
                        "check the shard id against `python -m neuroray.genesis info`")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes | dict, where: str = "manifest") -> Manifest:
        """Parse and validate; DataError naming ``where`` if anything is missing or inconsistent."""
        def bad(why: str) -> DataError:
            return DataError(f"{where} is malformed ({why}); rebuild the dataset with "
                             "`python -m neuroray.genesis build` or point data.dataset at a good one")

        if isinstance(text, dict):
            raw = text
        else:
            try:
                raw = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise bad(f"not JSON: {exc}") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) != names:
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise bad(f"expected keys {sorted(names)}, got {got}")
        m = cls(**raw)
        try:
            m._validate(bad)
        except (TypeError, KeyError, AttributeError) as exc:  # a wrong JSON type somewhere
            raise bad(f"wrong field type ({exc!r})") from None
        return m

    def _validate(self, bad) -> None:
        if self.format_version != FORMAT_VERSION:
            raise bad(f"format_version {self.format_version!r}, this code reads {FORMAT_VERSION}")
        if self.dtype not in DTYPES:
            raise bad(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if not (isinstance(self.vocab_size, int) and 0 < self.vocab_size):
            raise bad(f"vocab_size {self.vocab_size!r} is not a positive integer")
        if self.dtype != dtype_for(self.vocab_size) and self.dtype != "uint32":
            raise bad(f"dtype {self.dtype} cannot hold {self.vocab_size} token ids")
        if not (isinstance(self.shard_tokens, int) and self.shard_tokens > 0) or not isinstance(self.source, str):
            raise bad(f"shard_tokens {self.shard_tokens!r} must be a positive integer and source a string")
        if not plain_name(self.tokenizer_file):
            raise bad(f"tokenizer_file {self.tokenizer_file!r} is not a plain file name")
        for key in ("tokenizer_sha256", "parent_tokenizer_sha256"):
            value = getattr(self, key)
            if not (_is_sha256(value) or (key.startswith("parent") and value is None)):
                raise bad(f"{key} {value!r} is not a SHA-256 hex digest")
        if not isinstance(self.shards, list) or not self.shards:
            raise bad("no shards")
        itemsize = DTYPES[self.dtype].itemsize
        for i, s in enumerate(self.shards):
            if not isinstance(s, dict) or set(s) != set(SHARD_KEYS):
                raise bad(f"shard entry {i} needs exactly the keys {list(SHARD_KEYS)}")
            if s["id"] != i:
                raise bad(f"shard entry {i} has id {s['id']!r}; ids must be 0, 1, 2... in order")
            if s["split"] not in SPLITS:
                raise bad(f"shard {i} split {s['split']!r} is not one of {SPLITS}")
            if not plain_name(s["file"]):
                raise bad(f"shard {i} file {s['file']!r} is not a plain file name")
            if not (isinstance(s["tokens"], int) and s["tokens"] > 0):
                raise bad(f"shard {i} tokens {s['tokens']!r} is not a positive integer")
            if s["bytes"] != s["tokens"] * itemsize:
                raise bad(f"shard {i} bytes {s['bytes']!r} != tokens {s['tokens']} x {itemsize}")
            if not _is_sha256(s["sha256"]):
                raise bad(f"shard {i} sha256 {s['sha256']!r} is not a SHA-256 hex digest")
        if len({s["file"] for s in self.shards} | {self.tokenizer_file}) != len(self.shards) + 1:
            raise bad("two entries name the same file")
        if not self.train_shards:
            raise bad("no train shards")
        if self.total_tokens != sum(s["tokens"] for s in self.shards):
            raise bad("total_tokens is not the sum of the shards' tokens")
        if self.total_bytes != sum(s["bytes"] for s in self.shards):
            raise bad("total_bytes is not the sum of the shards' bytes")

    @classmethod
    def load(cls, root: str | os.PathLike) -> Manifest:
        """Read and validate the manifest of the dataset at ``root`` (a path, URL or DatasetRoot)."""
        from neuroray.genesis.store import Store, root_url

        return read_manifest(Store(root_url(root)))


def read_manifest(store) -> Manifest:
    """The validated manifest in ``store``; DataError naming it if missing or malformed."""
    where = store.url_of(MANIFEST_FILE)
    try:
        data = store.read(MANIFEST_FILE)
    except FileNotFoundError:
        raise DataError(f"no dataset at {store.url}: {MANIFEST_FILE} is missing (a build that did not finish "
                        "leaves none); build it with `python -m neuroray.genesis build` or fix the URL") from None
    return Manifest.from_json(data, where=where)


def check_pinned(store, sha256: str = "", publisher: str = "") -> str:
    """Refuse a manifest that is not the pinned one: ``sha256`` of manifest.json's bytes as stored, and/or
    a ``manifest.sig`` that verifies under ``publisher`` (compressed public key, hex). Returns the hash.

    The manifest holds every shard's SHA-256, so authenticating it authenticates the shards: a store
    that swaps shards and manifest together is refused here, before any shard is read.
    """
    if not (sha256 or publisher):
        return ""
    where = store.url_of(MANIFEST_FILE)
    try:
        actual = hashlib.sha256(store.read(MANIFEST_FILE)).hexdigest()
    except FileNotFoundError:
        raise ManifestPinError(f"no {MANIFEST_FILE} at {store.url}, and the run pins one; fix data.dataset") from None
    if sha256 and actual != sha256:
        raise ManifestPinError(f"{where} has sha256 {actual[:16]}…, the run pins data.manifest_sha256={sha256[:16]}…: "
                               "the dataset was replaced; point data.dataset at the pinned one or update the pin")
    if publisher:
        _check_signature(store, actual, publisher)
    return actual


def _check_signature(store, actual: str, publisher: str) -> None:
    from neuroray.ponw.crypto import backend
    from neuroray.ponw.envelope import EnvelopeError, open_envelope

    where = store.url_of(SIGNATURE_FILE)
    fix = "re-sign it with `neuroray.genesis.manifest.sign_manifest` or fix data.manifest_publisher"
    try:
        payload, sig, digest = open_envelope(store.read(SIGNATURE_FILE), SIGNATURE_DOMAIN, 4096, "manifest signature")
        key = backend().load_public_key(bytes.fromhex(publisher))
    except FileNotFoundError:
        raise ManifestPinError(f"{where} is missing and the run trusts only publisher {publisher[:16]}…; {fix}") from None
    except (EnvelopeError, ValueError) as exc:
        raise ManifestPinError(f"{where} is malformed ({exc}); {fix}") from None
    if payload != {"manifest_sha256": actual, "v": 1}:
        raise ManifestPinError(f"{where} signs another manifest than {MANIFEST_FILE} (sha256 {actual[:16]}…): the "
                               f"dataset was replaced; {fix}")
    if not backend().verify(key, digest, sig):
        raise ManifestPinError(f"{where} is not signed by publisher {publisher[:16]}…: the dataset was replaced; {fix}")


def sign_manifest(store, identity) -> str:
    """Publish ``manifest.sig``: the publisher's signature of manifest.json's sha256. Returns the hash."""
    from neuroray.ponw.envelope import seal

    actual = hashlib.sha256(store.read(MANIFEST_FILE)).hexdigest()
    store.write(SIGNATURE_FILE, seal(SIGNATURE_DOMAIN, {"manifest_sha256": actual, "v": 1}, identity))
    return actual
