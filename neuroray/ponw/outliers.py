"""Naming the holders whose pseudo-gradient a robust rule had to neutralise, so they earn nothing for it.

Coordinate-wise rules (median, trimmed mean: ``aggregator=robust``) drop values per coordinate, never a
whole holder, so a poisoned delta (scaled, sign-flipped) is neutralised without anyone being named,
and its holder would be credited like an honest one. After the rule has run, its robust aggregate is a
reference the poisoner could not move much: a delta far longer than the range's median, or pointing
away from that aggregate, is named here. The outer step lists it among the round's rejections, the
coordinator's receipt then says ``aggregated=False`` and the ledger credits it nothing.

At most ``f`` holders are named per range (the number the rule was told to tolerate), the most extreme
first, and none under ``f=0``: a run that declares no Byzantine holders (``aggregator=mean``) names no
one. Naming changes no weight: the aggregate is already computed. The thresholds below are measured
against honest DiLoCo deltas in ``benchmarks/verification.py`` (0 honest holders named).
"""

from __future__ import annotations

import statistics
from typing import Sequence

import torch

NORM_RATIO = 4.0  # a delta longer than this x the median norm of the range's accepted deltas
MIN_COSINE = 0.0  # a delta whose cosine with the robust aggregate is below this points away from it
# ... when the accepted deltas are only two distinct ones (a pair of identical deltas and one more): the aggregate is
# then the pair's delta itself, and an honest delta trained on other data can point slightly away from it (-0.06
# measured in a 100-round honest run); a sign-flipped one points away by as much as it agreed before the flip
PAIR_MIN_COSINE = -0.25


def suspects(contributions: Sequence[torch.Tensor], accepted: Sequence[int], aggregate: torch.Tensor, f: int,
             norm_ratio: float = NORM_RATIO, min_cosine: float = MIN_COSINE,
             copies: Sequence[Sequence[int]] = ()) -> list[tuple[int, str]]:
    """``(holder index, reason)`` of at most ``f`` accepted contributions that look poisoned, worst first.

    ``contributions``: every holder's (screened) delta, indexed by holder; ``accepted``: the indices the
    rule used; ``aggregate``: the rule's result. Needs 3 accepted deltas (with 2, neither can be told
    from the other). ``copies``: groups of identical deltas (neuroray/ponw/copies.py). With fewer than 3
    *distinct* accepted deltas (two of three identical: two honest Drivers assigned one shard), a
    coordinate-wise rule's aggregate is that pair's delta, and the direction test takes
    :data:`PAIR_MIN_COSINE` instead of ``min_cosine``."""
    if f <= 0 or len(accepted) < 3:
        return []
    repeated = {i for group in copies for i in group[1:]}
    if len([i for i in accepted if i not in repeated]) < 3:
        min_cosine = min(min_cosine, PAIR_MIN_COSINE)
    norms = {i: float(contributions[i].norm()) for i in accepted}
    median = statistics.median(norms.values())
    ref = float(aggregate.norm())
    scored = []
    for i in accepted:
        n = norms[i]
        ratio = n / median if median > 0 else (float("inf") if n > 0 else 1.0)
        if ratio > norm_ratio:
            scored.append((ratio / norm_ratio + 1.0, i, f"suspected poison: norm {ratio:.3g}x the range's median"))
            continue
        if n > 0 and ref > 0:
            cosine = float(torch.dot(contributions[i], aggregate.to(contributions[i].dtype))) / (n * ref)
            if cosine < min_cosine:
                scored.append((1.0 + min_cosine - cosine, i,
                               f"suspected poison: points away from the robust aggregate (cosine {cosine:+.2f})"))
    scored.sort(key=lambda s: -s[0])
    return sorted((i, why) for _, i, why in scored[:f])
