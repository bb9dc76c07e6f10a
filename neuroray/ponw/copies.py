"""Copied pseudo-gradients: finding them among a range's contributions, and telling the author from the copier.

A holder that sends another holder's pseudo-gradient of its range as its own (``attack=copy``) commits to
what it sends, so its proof, digests and norm all check out, and a robust rule sees one more honest-looking
vote for the same direction. Two things give it away.

**Detection** (:func:`copy_groups`, in the outer step, on the decoded deltas, so compressed payloads compare
like dense ones). Honest replicas start from the same theta0 but train on different data: their deltas of
a range point in clearly different directions. Two deltas are one update when their cosine is at least
:data:`COPY_COSINE` and neither is more than :data:`COPY_NORM_RATIO` times longer than the other. An exact
copy has cosine 1; so, nearly, does one re-compressed with another holder's int8 error feedback, and one read
from its victim an inner step early (the copier's fetch can overtake the victim's last step: cosine 0.98 or
more, norms within 1.33x, measured at H=4 and H=20). ``benchmarks/copy_check.py`` measured the largest honest pairwise cosine at 0.64 (H=4) and 0.55 (H=20)
under fixed routing; under swarm routing honest holders of a range reached 0.914 in 100 rounds
(docs/benchmarks.md, "Copied pseudo-gradients"). The norm bound keeps two parallel deltas of very different
lengths (a scaled update is the robust rule's business) apart. A zero or non-finite delta is left to the
free-rider rule and to screening: two free riders are not each other's copies.

**Attribution** (:func:`author_of`), as Templar's Gauntlet scores an update on the contributor's assigned
data: the shared delta is applied to the range at theta0 and the loss it removes is measured on the
batches each claimant trained on this round. The author's own batches improve more: its delta took
gradient steps on exactly those. The gain is a difference of losses, and its size varies with the
batches, so the margin is relative: the best claimant must beat the next by :data:`ATTRIBUTION_MARGIN` of
the larger gain, or nobody is named the author. On the range that holds the embedding only the embedding
rows are moved (:func:`scored_slice`): the embedding's update is sparse in the tokens the author's batches
contain, which is what separates; the transformer blocks' part mostly carries what every replica learns
(moving the whole range, about 2 % of honest pairs came out the wrong way round).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# two deltas of a range at least this parallel are one update. Honest pairs: <= 0.64 under fixed routing
# (benchmarks/copy_check.py), <= 0.914 under swarm routing, where every holder of a range trains on microbatches
# of one shared ring (100 honest rounds of benchmarks/verification.py; 0.9 named 5 and 11 of 600 holder-rounds
# there); a copy read an inner step early: >= 0.98
COPY_COSINE = 0.95
COPY_NORM_RATIO = 2.0  # ... unless one is more than this x longer than the other
ATTRIBUTION_MARGIN = 0.1  # the author's gain must beat the next claimant's by this share of the larger gain


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / max(|a|, |b|)``: 0 for a copy, about 1.4 for two orthogonal deltas of one norm."""
    scale = max(float(a.double().norm()), float(b.double().norm()))
    return float((a.double() - b.double()).norm()) / scale if scale > 0 else 0.0


def copy_groups(deltas: Sequence, min_cosine: float = COPY_COSINE,
                norm_ratio: float = COPY_NORM_RATIO) -> list[list[int]]:
    """Groups (sorted, each of 2 or more indices) of ``deltas`` that are the same update: equal, or with a
    cosine of at least ``min_cosine`` and norms within ``norm_ratio`` of each other (linked transitively).
    Non-tensors, non-finite and zero deltas are in no group."""
    ok = {}
    for i, d in enumerate(deltas):
        if isinstance(d, torch.Tensor) and d.dim() == 1 and bool(torch.isfinite(d).all()):
            n = float(d.double().norm())
            if n > 0:
                ok[i] = (d, n)
    parent = {i: i for i in ok}

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    keys = sorted(ok)
    for x, i in enumerate(keys):
        for j in keys[x + 1:]:
            (a, na), (b, nb) = ok[i], ok[j]
            if a.numel() != b.numel():
                continue
            if torch.equal(a, b) or (max(na, nb) <= norm_ratio * min(na, nb)
                                     and float(torch.dot(a.double(), b.double())) / (na * nb) >= min_cosine):
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in keys:
        groups.setdefault(root(i), []).append(i)
    return sorted(g for g in groups.values() if len(g) > 1)


def author_of(gains: dict, margin: float = ATTRIBUTION_MARGIN) -> tuple[object | None, float]:
    """(the claimant whose own batches the shared delta improves most, its relative margin over the next),
    or (None, margin) when that margin is under ``margin`` (or a gain is not finite): nobody can be named.

    ``gains``: claimant -> loss at theta0 less loss with the delta applied, on that claimant's batches."""
    if len(gains) < 2 or not all(math.isfinite(g) for g in gains.values()):
        return None, float("nan")
    ranked = sorted(gains.items(), key=lambda kv: -kv[1])
    (best, g1), (_, g2) = ranked[0], ranked[1]
    scale = max(abs(g1), abs(g2))
    rel = (g1 - g2) / scale if scale > 0 else 0.0
    return (best if rel >= margin else None), rel


def scored_slice(parameters: Sequence[torch.nn.Parameter], has_embedding: bool, embedding: torch.nn.Parameter | None
                 ) -> tuple[int, int] | None:
    """The flat slice of a range's delta that attribution moves: the embedding's rows on the range that
    has it (its parameters come first, see StageModule), else None: the whole range."""
    if not has_embedding or embedding is None:
        return None
    lo = 0
    for p in parameters:
        if p is embedding:
            return lo, lo + p.numel()
        lo += p.numel()
    return None
