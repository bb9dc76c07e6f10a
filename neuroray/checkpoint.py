"""Checkpoints: tensors in safetensors, metadata in JSON. Nothing here ever unpickles.

A checkpoint directory holds ``model.safetensors``, ``meta.json`` (model config, vocabulary size,
tokenizer hash, training counters) and a copy of ``tokenizer.json``. It is written into a temporary
sibling directory and renamed into place, so a half-written checkpoint is never visible.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from neuroray.errors import NeurorayError

MODEL_FILE, META_FILE, TOKENIZER_FILE = "model.safetensors", "meta.json", "tokenizer.json"


class CheckpointError(NeurorayError):
    """A checkpoint is missing, incomplete or does not match what it is loaded into."""


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: dict, tokenizer_file: str | Path | None = None) -> Path:
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / MODEL_FILE))
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path).expanduser()
    if not (path / META_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected {MODEL_FILE} and {META_FILE}); pass the run's checkpoint directory")
    try:
        meta = json.loads((path / META_FILE).read_text())
        state = load_file(str(path / MODEL_FILE))
    except Exception as exc:
        raise CheckpointError(f"checkpoint at {path} is unreadable ({exc}); retrain or use another checkpoint") from None
    return state, meta
