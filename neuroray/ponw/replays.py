"""Replayed pseudo-gradients: telling an update trained on this round's batches from an older one.

A holder that trains honestly but sends, at the outer step, an update it made earlier (its previous round's
pseudo-gradient, ``attack=replay``) commits to what it sends: its proof, digests and norm check out, and the
replayed delta was never sent before, so matching earlier payloads cannot find it. What gives it away is the
data it was trained on. As Templar's Gauntlet scores an update on the contributor's assigned data, the
coordinator moves the holder's range by the delta at the round's theta0 and measures the loss it removes
(neuroray/training/replays.py, on the copy check's machinery, :func:`neuroray.training.copies.own_gains`) on:

* ``now``: the batches this holder trained on in this round (the coordinator's own record);
* its neighbours in the stream: ``before``, the batches it trained on in the previous round (a replayed
  update was trained on exactly those), and ``next``, those it will read in the next round (nobody has).

The update's **lead** on its own batches over a neighbour is ``(gain_now - gain_x) / max(|gain_now|,
|gain_x|)`` (between -2 and 2); :func:`own_lead` is its mean over the neighbours at hand (``next`` alone in
the first round). An honest update took its gradient steps on ``now``: it leads. A replayed one fits
``before`` far better than ``now``. Both neighbours are needed, because a stream's consecutive batches are
close in content and an honest update still carries some of the previous round in the inner optimizer's
momentum: against ``before`` alone an honest holder sometimes falls behind; against ``next`` alone a replay
sometimes leads (its old batches resemble this round's). A lead under ``ponw.replay_min_lead`` is a replay:
the update is refused before the rule sees it, and its holder earns nothing for the round. A zero or
non-finite gain everywhere says nothing (a zero update is the free-rider rule's business): no verdict.
"""

from __future__ import annotations

import math


def lead(gain_now: float, gain_other: float) -> float:
    """How much more loss an update removes on its own batches than on others, relative to the larger of the
    two gains; NaN when neither gain is finite and non-zero."""
    if not (math.isfinite(gain_now) and math.isfinite(gain_other)):
        return float("nan")
    scale = max(abs(gain_now), abs(gain_other))
    return (gain_now - gain_other) / scale if scale > 0 else float("nan")


def own_lead(gains: dict[str, float]) -> float:
    """The mean :func:`lead` of ``gains["now"]`` over every other entry (the neighbours); NaN without one."""
    others = [lead(gains["now"], g) for k, g in gains.items() if k != "now"]
    return sum(others) / len(others) if others else float("nan")


def replayed(gains: dict[str, float], min_lead: float) -> bool:
    """True when the update's :func:`own_lead` is under ``min_lead``: it was not trained on this round's batches."""
    x = own_lead(gains)
    return math.isfinite(x) and x < min_lead
