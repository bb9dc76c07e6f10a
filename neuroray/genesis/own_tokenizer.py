"""A tokenizer the user brings (``data.tokenizer=``) instead of one Genesis trains.

Accepted: a ``tokenizer.json`` file, or a Hugging Face tokenizer directory holding one (what
``save_pretrained`` of a fast tokenizer writes, and what ``python -m neuroray.export`` writes).

neuroray frames every document as ``BOS ids EOS`` with the fixed ids 0 and 1, pads with 2, and
generation stops at 1 (neuroray.genesis.tokenizer), so a tokenizer is refused unless its BOS, EOS and
PAD tokens sit at exactly those ids; otherwise document boundaries would silently become other tokens.
The identity recorded in the manifest is the SHA-256 of the canonical JSON (``Tokenizer.to_str()``)
with the post-processor removed, the same as :func:`neuroray.genesis.tokenizer.tokenizer_hash` of a
tokenizer Genesis trains (which has none).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer

from neuroray.errors import DataError
from neuroray.genesis.manifest import Manifest
from neuroray.genesis.tokenizer import (
    BOS, BOS_ID, EOS, EOS_ID, PAD, PAD_ID, check_tokenizer, tokenizer_from_bytes, tokenizer_hash,
)

TOKENIZER_JSON = "tokenizer.json"
_ROLES = (("bos_token", BOS, BOS_ID), ("eos_token", EOS, EOS_ID), ("pad_token", PAD, PAD_ID))


def _declared_specials(directory: Path) -> dict[str, str]:
    """bos/eos/pad token strings a HF directory declares (special_tokens_map.json, tokenizer_config.json)."""
    declared: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the latter wins, as in transformers
        try:
            data = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue
        for role, _, _ in _ROLES:
            value = data.get(role) if isinstance(data, dict) else None
            if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
                value = value.get("content")
            if isinstance(value, str):
                declared[role] = value
    return declared


def load_user_tokenizer(path: str | os.PathLike) -> tuple[Tokenizer, str]:
    """``(tokenizer, sha256 of its canonical tokenizer.json)`` for ``data.tokenizer=<path>``.

    DataError (one line, with the fix) if the path is missing, has no tokenizer.json, does not parse,
    or does not put its BOS, EOS and PAD tokens at neuroray's ids 0, 1 and 2.
    """
    src = Path(path).expanduser()
    file = src / TOKENIZER_JSON if src.is_dir() else src
    if src.is_dir() and not file.is_file():
        raise DataError(f"data.tokenizer={src} has no {TOKENIZER_JSON} (a fast tokenizer); save one with "
                        "AutoTokenizer.from_pretrained(...).save_pretrained(dir) or pass a tokenizer.json file")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise DataError(f"data.tokenizer={src}: cannot read {file} ({exc.__class__.__name__}); "
                        "pass a tokenizer.json file or a Hugging Face tokenizer directory") from None
    tok = tokenizer_from_bytes(data, f"data.tokenizer={file}")
    # Genesis adds BOS/EOS itself and never runs a post-processor; without it an exported tokenizer (whose
    # post-processor adds BOS for transformers users) hashes the same as the one the model trained with.
    tok.post_processor = None
    declared = _declared_specials(src) if src.is_dir() else {}
    wrong = []
    for role, default, want in _ROLES:
        token = declared.get(role, default)
        if tok.token_to_id(token) != want:
            wrong.append(f"{role} {token!r} is id {tok.token_to_id(token)}, not {want}")
    if wrong:
        found = ", ".join(repr(tok.id_to_token(i)) for i in (BOS_ID, EOS_ID, PAD_ID))
        raise DataError(f"data.tokenizer={src}: {'; '.join(wrong)} (ids 0-2 are {found}); neuroray frames documents "
                        f"with ids {BOS_ID}, {EOS_ID}, {PAD_ID}: use a tokenizer trained with special_tokens="
                        f"[{BOS!r}, {EOS!r}, {PAD!r}] first")
    return tok, tokenizer_hash(tok)


def check_tokenizer_matches_manifest(tok_sha256: str, manifest: Manifest) -> None:
    """DataError naming both hashes unless the tokenizer is the one ``manifest``'s shards were tokenized with."""
    check_tokenizer(tok_sha256, manifest.tokenizer_sha256, "data.tokenizer", "the dataset's manifest",
                    "its ids would not mean what the shards' ids mean: rebuild the dataset with this "
                    "tokenizer (a new data.name), or pass the dataset's own tokenizer.json")
