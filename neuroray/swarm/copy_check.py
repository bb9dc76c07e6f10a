"""What a holder checks before it takes a peer's copy of its range (issue 21: weights copied on join).

A restarted holder without a snapshot, or a holder added mid-run, loads a peer's ``export_range``. A faulty or
dishonest peer could hand over anything; the coordinator knows one thing the copy must match exactly: the
range's theta0, which every honest holder of the range shares. So a copy is taken only when

* its theta0 equals the theta0 the coordinator passes (the range's current one, or the one the round in flight
  started from: under ``diloco.overlap`` holders keep the old one until the outer step lands);
* every tensor in it (weights, theta0, the AdamW moments) is finite;
* for a holder joining between rounds with no outer step in flight (``at_theta0``), its weights are theta0 too:
  between rounds every holder of a fixed pipeline restarts from theta0.

A refused copy raises :class:`CopyRejected`; the caller names the peer and tries the next one.
"""

from __future__ import annotations

import torch

from neuroray.digest import tensor_digest


class CopyRejected(ValueError):
    """A peer's copy of a range that does not match what the coordinator knows about the range."""


def _tensors(obj, prefix: str):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def check_copy(tensors: dict, accepted_theta0: list[torch.Tensor], weights: torch.Tensor | None = None) -> None:
    """Raise :class:`CopyRejected` unless the copy ``tensors`` (an ``export_range``) may be taken.

    ``accepted_theta0``: the theta0 vectors the coordinator vouches for. ``weights``: the copy's weights as one
    flat vector, when they must equal its theta0 (a join between rounds)."""
    for name, t in _tensors({k: v for k, v in tensors.items() if k != "architecture"}, ""):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CopyRejected(f"non-finite values in {name}")
    theta0 = tensors["theta0"]
    if not any(theta0.shape == a.shape and torch.equal(theta0, a.to(theta0.device)) for a in accepted_theta0):
        raise CopyRejected(f"its theta0 (sha256 {tensor_digest(theta0)[:12]}) is not the range's theta0 "
                           f"(sha256 {', '.join(tensor_digest(a)[:12] for a in accepted_theta0)})")
    if weights is not None and not torch.equal(weights, theta0.to(weights.device)):
        raise CopyRejected("its weights are not at its theta0 between rounds "
                           f"(largest difference {float((weights - theta0.to(weights.device)).abs().max()):.3g})")
