"""Per-holder reputation: an exponential moving average of held-out scores, kept by node id.

Each round every scored pseudo-gradient has a score, the held-out loss it removes (neuroray/training/
reputation.py computes them: ``loss(theta0) - loss(theta0 - outer_lr * delta)``). Scores are normalised per
layer range to [0, 1] by the range's best score (:func:`normalized`): the best update of the range scores 1,
an update that removes half as much 0.5, one that leaves the loss as it was (a lazy holder's zero delta) or
raises it (a sign flip, noise) 0. Normalising by the round's best makes scores comparable across rounds and
ranges whose loss changes differ by orders of magnitude. A round in which no update of a range lowers the
held-out loss tells nothing about who helped: its scores are skipped, reputations stay as they were.

``reputation <- decay * reputation + (1 - decay) * score``, from ``prior`` for a node never seen (a newcomer
starts below a holder with a record, so fresh keys cannot outweigh it). :meth:`ReputationBook.factor` is what
the reputation pays: the reputation itself, or 0 below ``floor`` (a holder that keeps scoring nothing stops
earning and stops counting in the aggregate after a few rounds, yet is still scored, so it can earn its way
back). The factor weighs the holder's pseudo-gradient in the outer step (neuroray/diloco/aggregate.py) and
its reward: the coordinator's receipt carries it as ``reward_bp`` (basis points), which the ledger checks is
in [0, 10000] and multiplies into the reward (neuroray/ponw/ledger.py).

Pure bookkeeping: no Ray, no torch. The state is a JSON dict (:meth:`state` / :meth:`load`), which the
trainer's snapshots carry, so ``resume=true`` restores it.
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping

from neuroray.ponw.rules import BP  # the receipt's reward factor is an integer in [0, BP]


def normalized(scores: Mapping[Hashable, float]) -> dict[Hashable, float]:
    """Each score over the best one, clamped to [0, 1] (a non-finite score: 0); {} when no score is
    positive (no update helped: the round carries no information about who did)."""
    finite = [s for s in scores.values() if math.isfinite(s)]
    best = max(finite, default=0.0)
    if not best > 0:
        return {}
    return {k: min(1.0, max(0.0, s / best)) if math.isfinite(s) else 0.0 for k, s in scores.items()}


class ReputationBook:
    """Reputation by node id (see the module docstring)."""

    def __init__(self, decay: float, prior: float, floor: float):
        if not (0 <= decay < 1 and 0 <= prior <= 1 and 0 <= floor <= 1):
            raise ValueError(f"reputation decay {decay} must be in [0, 1), prior {prior} and floor {floor} in [0, 1]")
        self.decay, self.prior, self.floor = decay, prior, floor
        self.values: dict[str, float] = {}
        self.rounds = 0  # rounds whose scores were booked

    def value(self, node_id: str) -> float:
        return self.values.get(node_id, self.prior)

    def factor(self, node_id: str) -> float:
        """What the node's reputation pays: the reputation, or 0 below the floor."""
        v = self.value(node_id)
        return v if v >= self.floor else 0.0

    def reward_bp(self, node_id: str) -> int:
        """The factor in basis points, rounded down (the receipt's ``reward_bp``)."""
        return max(0, min(BP, int(self.factor(node_id) * BP)))

    def update(self, scores: Mapping[str, float]) -> None:
        """Book one round's normalised scores (node id -> score in [0, 1])."""
        for node, score in scores.items():
            if not (math.isfinite(score) and 0 <= score <= 1):
                raise ValueError(f"a normalised score is in [0, 1], got {score!r} for {node[:12]}")
            self.values[node] = self.decay * self.value(node) + (1 - self.decay) * score
        self.rounds += 1

    def weights(self, node_ids: list[str]) -> list[float] | None:
        """Aggregation weights for these nodes' pseudo-gradients; None when they are all equal (the rule's
        unweighted path, bit-identical) or all 0 (nothing to prefer: every input counts alike)."""
        w = [self.factor(n) for n in node_ids]
        if not w or all(x == w[0] for x in w) or sum(w) <= 0:
            return None
        return w

    def state(self) -> dict:
        return {"values": dict(sorted(self.values.items())), "rounds": self.rounds}

    def load(self, state: Mapping) -> None:
        values = dict(state.get("values", {}))
        for node, v in values.items():
            if not (isinstance(node, str) and isinstance(v, (int, float)) and 0 <= v <= 1):
                raise ValueError(f"reputation state: {node!r} -> {v!r} is not a node id and a value in [0, 1]")
        self.values = {k: float(v) for k, v in values.items()}
        self.rounds = int(state.get("rounds", 0))
