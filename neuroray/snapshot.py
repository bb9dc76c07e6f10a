"""Hot snapshots of stage holders on any fsspec store: safetensors + JSON, manifest last.

Layout, one folder per holder slot (``r<replica>-s<stage>``) and per global inner step::

    <root>/<slot>/step-00000120/tensors.safetensors   weights, AdamW state, theta0, outer momentum, RNG
    <root>/<slot>/step-00000120/meta.json             counters, data position, optimizer hyper-parameters
    <root>/<slot>/step-00000120/MANIFEST.json         SHA-256 of both parts, written last

A snapshot exists only once its manifest does, and is used only if both parts hash to what the
manifest says; a torn or corrupt newest snapshot is skipped, with a warning, for the previous one.
Writing and checking go through neuroray/artifacts.py, the project's one artefact writer.
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

from neuroray.artifacts import is_complete, read_artifact, tensor_bytes, tensors_from, write_artifact
from neuroray.hoststore import register

log = logging.getLogger(__name__)

TENSORS, META = "tensors.safetensors", "meta.json"
FORMAT_VERSION = 1


@dataclass
class Snapshot:
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict


class SnapshotStore:
    """Snapshots of one holder slot under an fsspec URL (local path, ``s3://``, ``memory://``)."""

    def __init__(self, root: str, slot: str, keep: int = 5, storage_options: dict | None = None):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be at least 1")
        register()  # nrhost://, the driver-hosted store of a multi-node run
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
        meta = json.dumps({**snap.meta, "format_version": FORMAT_VERSION, "step": snap.step}, sort_keys=True).encode()
        write_artifact(self.fs, self._step_dir(snap.step), {TENSORS: tensor_bytes(snap.tensors), META: meta},
                       step=snap.step, created=time.time())
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
                if not complete_only or is_complete(self.fs, path.rstrip("/")):
                    out.append(int(name[5:]))
        return sorted(out)

    def read(self, step: int) -> Snapshot:
        """Read and verify one snapshot; ``ValueError`` naming the part when it is torn or corrupt."""
        parts = read_artifact(self.fs, self._step_dir(step), (TENSORS, META), what="snapshot")
        return Snapshot(step, tensors_from(parts[TENSORS]), json.loads(parts[META]))

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
