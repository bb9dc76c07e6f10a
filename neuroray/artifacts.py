"""The one writer of safetensors + JSON artefacts: holder snapshots, outer-state snapshots, model checkpoints.

An artefact is a folder of parts on any fsspec store (a local path, ``s3://``, ``memory://``) plus a
``MANIFEST.json`` with each part's SHA-256, written last. It exists only once its manifest does, and it
is read only when every part hashes to what the manifest says, so a torn write (a crash, a full disk,
an object store without an atomic rename) is never taken for a good one. Nothing is ever unpickled:
tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

MANIFEST = "MANIFEST.json"


class ArtifactError(ValueError):
    """An artefact is incomplete, or a part does not match its manifest (callers skip or report it)."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def tensors_from(data: bytes) -> dict[str, torch.Tensor]:
    return st_load(data)


def write_artifact(fs, directory: str, parts: dict[str, bytes], **manifest_fields) -> None:
    """Write ``parts`` (file name -> bytes) into ``directory``, then the manifest that makes them visible."""
    fs.makedirs(directory, exist_ok=True)
    manifest_path = f"{directory}/{MANIFEST}"
    if fs.exists(manifest_path):  # rewritten in place: invisible until every new part is down
        fs.rm(manifest_path)
    for name, data in parts.items():
        with fs.open(f"{directory}/{name}", "wb") as f:
            f.write(data)
    manifest = {**manifest_fields, "parts": {name: sha256(data) for name, data in parts.items()}}
    with fs.open(manifest_path, "wb") as f:
        f.write(json.dumps(manifest, sort_keys=True).encode())


def is_complete(fs, directory: str) -> bool:
    return fs.exists(f"{directory}/{MANIFEST}")


def read_artifact(fs, directory: str, names: tuple[str, ...], what: str = "artefact") -> dict[str, bytes]:
    """The parts ``names`` of a complete artefact, each checked against its manifest."""
    try:
        manifest = json.loads(fs.cat_file(f"{directory}/{MANIFEST}"))
        parts = {name: fs.cat_file(f"{directory}/{name}") for name in names}
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{what} {directory} is incomplete ({exc})") from None
    for name, data in parts.items():
        if sha256(data) != manifest["parts"].get(name):
            raise ArtifactError(f"{what} {directory}/{name} does not match its manifest's SHA-256")
    return parts
