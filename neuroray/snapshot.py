"""Hot snapshots of stage holders on any fsspec store: safetensors + JSON, manifest last.

Layout, one folder per holder slot (``r<replica>-s<stage>``) and per global inner step::

    <root>/<slot>/step-00000120/tensors.safetensors   weights, AdamW state, theta0, outer momentum, RNG
    <root>/<slot>/step-00000120/meta.json             counters, data position, optimizer hyper-parameters
    <root>/<slot>/step-00000120/MANIFEST.json         SHA-256 of both parts, written last

A snapshot exists only once its manifest does, and is used only if both parts hash to what the
manifest says; a torn or corrupt newest snapshot is skipped, with a warning, for the previous one.
Nothing is ever unpickled: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

log = logging.getLogger(__name__)

TENSORS, META, MANIFEST = "tensors.safetensors", "meta.json", "MANIFEST.json"
FORMAT_VERSION = 1


@dataclass
class Snapshot:
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SnapshotStore:
    """Snapshots of one holder slot under an fsspec URL (local path, ``s3://``, ``memory://``)."""

    def __init__(self, root: str, slot: str, keep: int = 5, storage_options: dict | None = None):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be at least 1")
        self.fs, base = fsspec.core.url_to_fs(root, **(storage_options or {}))
        self.dir = f"{base.rstrip('/')}/{slot}"
        self.keep = keep
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"snapshot-{slot}")
        self._pending: list[Future] = []

    def _step_dir(self, step: int) -> str:
        return f"{self.dir}/step-{step:08d}"

    # ----- writing ------------------------------------------------------------------------------
    def write(self, snap: Snapshot) -> None:
        """Write synchronously: parts first, then the manifest; then prune beyond ``keep``."""
        d = self._step_dir(snap.step)
        self.fs.makedirs(d, exist_ok=True)
        tensors = st_save({k: v.detach().cpu().contiguous() for k, v in snap.tensors.items()})
        meta = json.dumps({**snap.meta, "format_version": FORMAT_VERSION, "step": snap.step}, sort_keys=True).encode()
        for name, data in ((TENSORS, tensors), (META, meta)):
            with self.fs.open(f"{d}/{name}", "wb") as f:
                f.write(data)
        manifest = {"step": snap.step, "created": time.time(), "parts": {TENSORS: _sha256(tensors), META: _sha256(meta)}}
        with self.fs.open(f"{d}/{MANIFEST}", "wb") as f:
            f.write(json.dumps(manifest, sort_keys=True).encode())
        self._prune()

    def write_async(self, snap: Snapshot) -> Future:
        """Queue a write on the background thread; the caller must not mutate ``snap`` afterwards."""
        fut = self._writer.submit(self.write, snap)
        self._pending = [f for f in self._pending if not f.done()] + [fut]
        return fut

    def flush(self) -> None:
        """Wait for queued writes; re-raise the first failure."""
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()

    def _prune(self) -> None:
        steps = self.steps(complete_only=False)
        for step in steps[: max(0, len(steps) - self.keep)]:
            self.fs.rm(self._step_dir(step), recursive=True)

    # ----- reading ------------------------------------------------------------------------------
    def steps(self, complete_only: bool = True) -> list[int]:
        """Steps that have a snapshot folder (with a manifest when ``complete_only``), ascending."""
        if not self.fs.exists(self.dir):
            return []
        out = []
        for path in self.fs.ls(self.dir, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("step-") and name[5:].isdigit():
                if not complete_only or self.fs.exists(f"{path.rstrip('/')}/{MANIFEST}"):
                    out.append(int(name[5:]))
        return sorted(out)

    def read(self, step: int) -> Snapshot:
        """Read and verify one snapshot; ``ValueError`` naming the part when it is torn or corrupt."""
        d = self._step_dir(step)
        try:
            manifest = json.loads(self.fs.cat_file(f"{d}/{MANIFEST}"))
            parts = {name: self.fs.cat_file(f"{d}/{name}") for name in (TENSORS, META)}
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            raise ValueError(f"snapshot {d} is incomplete ({exc})") from None
        for name, data in parts.items():
            if _sha256(data) != manifest["parts"].get(name):
                raise ValueError(f"snapshot {d}/{name} does not match its manifest's SHA-256")
        meta = json.loads(parts[META])
        return Snapshot(step, st_load(parts[TENSORS]), meta)

    def latest(self, at_most: int | None = None) -> Snapshot | None:
        """The newest snapshot that verifies (optionally at or before ``at_most``), skipping bad ones."""
        for step in reversed(self.steps()):
            if at_most is not None and step > at_most:
                continue
            try:
                return self.read(step)
            except ValueError as exc:
                log.warning("%s; falling back to the previous snapshot", exc)
        return None


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes and raw bytes of a tensor dict: equal digests mean bit-identical state."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def latest_common_step(stores: list[SnapshotStore]) -> int | None:
    """The newest step for which every slot has a complete snapshot: a consistent set to resume."""
    common = None
    for store in stores:
        steps = set(store.steps())
        common = steps if common is None else common & steps
    return max(common) if common else None
