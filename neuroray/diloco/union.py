"""``diloco.sparse_broadcast=union``: the holders rebuild the outer step from the accepted sparse payloads.

With ``resparsify`` the outer step sends the holders its update ``theta0_old - theta0_new`` top-k sparsified
again (compress.encode_update), so theta0 can change in at most ``density`` of each chunk per round, however
many replicas sent different entries. ``union`` sends the payloads themselves, as SparseLoCo does (arXiv
2508.15706: every replica all-gathers the others' sparse pseudo-gradients and applies their mean): the
update's support is the union of the accepted replicas' supports.

The update is ``{"base": digest of theta0_old, "union": [payload, ...], "from": [replica, ...], "weights":
[w, ...], "lr": lr}`` (plus ``"slice"`` for a streaming fragment), and the new theta0 is, by definition,

    theta0_new = theta0_old - lr * sum_i w_i * decode(payload_i)        (float32, on the CPU, in this order)

which the outer step and every holder compute with :func:`apply_union`, so they end bit for bit at the same
theta0. ``w_i`` are the rule's own coefficients (``mean``: 1/n; ``krum``: one 1; reputation weights
included), so only the payloads the rule used cross: screening and robust aggregation stay in the outer
step. There is no outer momentum (SparseLoCo's error feedback stands in for it; config_checks refuses
``outer_momentum > 0`` with union), because a momentum term would be dense and the holders could not
rebuild it from the payloads.

A holder checks every payload before it decodes any (compress.check): a malformed one is refused, its
sender named, and the holder fetches the dense theta0 instead, as it does when the base digest differs.
"""

from __future__ import annotations

import torch

from neuroray.diloco.compress import PayloadError, check, decode

RULES = ("mean", "krum", "multi_krum", "geometric_median")  # their result is a weighted sum of the inputs


def union_update(payloads: list[dict], senders: list[int], weights: list[float], lr: float) -> dict:
    """The union broadcast of one outer step (its ``base`` and ``slice`` are the caller's to add). Payloads
    of weight 0 (not Krum's pick) are left out: they would cost bytes and change nothing."""
    kept = [(p, s, float(w)) for p, s, w in zip(payloads, senders, weights) if w != 0.0]
    return {"union": [p for p, _, _ in kept], "from": [s for _, s, _ in kept],
            "weights": [w for _, _, w in kept], "lr": float(lr)}


def check_union(update: dict, block: int, numel: int, density: float) -> None:
    """Raise :class:`PayloadError` naming the sender of the first malformed payload (or a malformed update)."""
    payloads, senders, weights = update.get("union"), update.get("from"), update.get("weights")
    if not (isinstance(payloads, list) and isinstance(senders, list) and isinstance(weights, list)
            and len(payloads) == len(senders) == len(weights)):
        raise PayloadError("union update: union, from and weights must be lists of one length")
    if not all(isinstance(w, float) and torch.isfinite(torch.tensor(w)) for w in weights + [update.get("lr")]):
        raise PayloadError("union update: weights and lr must be finite floats")
    for payload, sender in zip(payloads, senders):
        try:
            check(payload, "sparse", block, numel, density)
        except PayloadError as exc:
            raise PayloadError(f"union payload from replica {sender}: {exc}") from None


def apply_union(old: torch.Tensor, update: dict) -> torch.Tensor:
    """``old - lr * sum_i w_i decode(payload_i)``: the one definition of the new theta0 (float32, CPU)."""
    if not update["union"]:
        return old.clone()  # a refused step, or nothing with weight: theta0 stays, exactly
    direction = torch.zeros_like(old)
    for payload, w in zip(update["union"], update["weights"]):
        direction.add_(decode(payload), alpha=w)
    return old - update["lr"] * direction
