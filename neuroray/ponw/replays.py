"""Replayed pseudo-gradients: telling an update trained on this round's batches from an older one.

Two scores, by range (neuroray/training/replays.py applies them):

* **Fresh rows** (:func:`fresh_rows`), on the range that holds the embedding. A token's embedding row gets a
  gradient only from batches whose inputs contain it; AdamW moves a row that never had one by its weight decay
  alone (its first moment is zero), a fraction ``lr x wd`` of itself per step, the same for every such row. So the
  rows of the tokens that appear in this round's batches for the first time in the holder's history ("fresh")
  moved far more, relative to themselves, than the rows of tokens the holder never saw, in an honest update
  (it took gradient steps on them): about 100x in the measured runs. An update made before this round's batches
  (a replay) moved its fresh rows by decay alone: 1x. A ratio under ``ponw.replay_min_ratio`` is a replay. It
  needs no forward pass, and it does not depend on how much of the previous round an honest update still
  carries in its optimizer's momentum (the weakness of the lead below at small H).
* **Lead** (below), on every other range: the loss the update removes on its own batches against its stream's
  neighbours.

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

import torch


def fresh_rows(delta_rows: torch.Tensor, theta0_rows: torch.Tensor, seen: set[int], now: set[int]) -> float:
    """The median relative move (``|delta_row| / |theta0_row|``) of the rows of the tokens in ``now`` and not in
    ``seen`` (fresh this round), over the same of the rows of the tokens in neither (never seen by the holder);
    NaN when either set is empty. ``delta_rows``, ``theta0_rows``: the embedding's (vocab, d_model) views."""
    vocab = delta_rows.shape[0]
    fresh = sorted(t for t in now - seen if 0 <= t < vocab)
    never = sorted(set(range(vocab)) - now - seen)
    if not fresh or not never:
        return float("nan")
    rel = delta_rows.double().norm(dim=1) / theta0_rows.double().norm(dim=1).clamp_min(1e-30)
    moved, decayed = float(rel[fresh].median()), float(rel[never].median())
    return moved / decayed if decayed > 0 else (math.inf if moved > 0 else float("nan"))


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
