"""The lab's state file: what `up` created, so `down`, `status`, `cut` and `exec` work from any process.

`up` rewrites it after every step, before the next one starts: if `up` is killed halfway, the file still
names what exists (and `down` also discovers by name prefix what the file may have missed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from neuroray.errors import LabError

STATE = "state.json"


def path(lab_dir: str) -> Path:
    return Path(lab_dir) / STATE


def load(lab_dir: str) -> dict | None:
    p = path(lab_dir)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise LabError(f"{p} is unreadable ({exc}); run `python -m neuroray.lab down` to clear the lab") from None


def save(lab_dir: str, state: dict) -> None:
    """Atomic replace: a crash mid-write leaves the previous state, never half a file."""
    p = path(lab_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, p)


def remove(lab_dir: str) -> None:
    for p in (path(lab_dir), path(lab_dir).with_suffix(".tmp")):
        p.unlink(missing_ok=True)


def load_quiet(lab_dir: str) -> dict | None:
    """Like load, but a torn or unreadable file counts as absent: `down` must still clean up after it."""
    try:
        return load(lab_dir)
    except LabError:
        return None
