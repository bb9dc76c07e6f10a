"""The final model checkpoint: ``model.safetensors``, ``meta.json`` and a copy of ``tokenizer.json``.

``meta.json`` holds the model config, vocabulary size, tokenizer hash and training counters. The folder
is written by neuroray/artifacts.py like every snapshot: parts first, the manifest last, every part
checked against it on load, so a half-written checkpoint is never loaded. Nothing here unpickles.
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import torch

from neuroray.artifacts import ArtifactError, read_artifact, tensor_bytes, tensors_from, write_artifact
from neuroray.errors import NeurorayError

MODEL_FILE, META_FILE, TOKENIZER_FILE = "model.safetensors", "meta.json", "tokenizer.json"


class CheckpointError(NeurorayError):
    """A checkpoint is missing, incomplete or does not match what it is loaded into."""


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: dict, tokenizer_file: str | Path | None = None) -> Path:
    path = Path(path)
    parts = {MODEL_FILE: tensor_bytes(state), META_FILE: json.dumps(meta, indent=2, sort_keys=True).encode()}
    if tokenizer_file is not None:
        parts[TOKENIZER_FILE] = Path(tokenizer_file).read_bytes()
    write_artifact(fsspec.filesystem("file"), str(path.resolve()), parts)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path).expanduser()
    if not (path / META_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected {MODEL_FILE} and {META_FILE}); pass the run's checkpoint directory")
    try:
        parts = read_artifact(fsspec.filesystem("file"), str(path.resolve()), (MODEL_FILE, META_FILE), what="checkpoint")
        meta = json.loads(parts[META_FILE])
        state = tensors_from(parts[MODEL_FILE])
    except (ArtifactError, ValueError) as exc:
        raise CheckpointError(f"checkpoint at {path} is unreadable ({exc}); retrain or use another checkpoint") from None
    return state, meta
