"""Stragglers: a holder that walks through its round far slower than the other holders of its range earns nothing.

Under fixed routing every replica waits for its slowest holder, and a blocking outer step waits for the
slowest replica, so one holder that stretches its compute (a "slow walker", or hardware far below its
peers') sets the whole swarm's pace while the ledger would pay it per microbatch like the others. The rule
compares each holder's pace in the round (the median seconds of its compute calls) with the median pace of the
OTHER holders of the same range (they do the same work on the same layers; leaving the holder out keeps a 2-holder range meaningful)
and names it when it is more than ``ponw.straggler_factor`` times slower, ``ponw.straggler_rounds`` rounds in a
row. A named holder's receipt carries reward factor 0: its proof is accepted, its pseudo-gradient still
aggregated, and it is paid nothing. The rounds of the streak before it is named are not paid either: a holder
slow in a round but not named yet is paid into escrow (neuroray/ponw/escrow.py), forfeited if a later round
names it and released once a round finds it at pace again (or at the run's end).

Where the pace comes from (the executor's ``paces``): always the coordinator's own clock, which a holder cannot
bend by under-reporting a clock of its own.

* the router (``swarm.routing=router``) times every hop it sends a holder itself. Routing already sends a slow
  holder fewer microbatches; the rule adds that what it does serve at that pace is not paid;
* fixed routing: the driver stamps every call it submits when its result appears
  (neuroray/training/call_clock.py). A call's service time runs from the latest of its submission, its holder's
  previous call's result and its inputs' appearance to its own result, so a replica idling until its next step
  is submitted, or a holder waiting on a slow neighbour's activation, is not charged for it; each call is paired
  with the same call on the range's other holders and the pace is the median of its ratios to them, which cancels
  the load that shared cores put on every holder at once.

The router's factor (2.5) comes from honest runs of benchmarks/verification.py on this project's 2-CPU machine
under heavy load: medians per call reached 2.6x in single rounds and 2.4x in two rounds in a row. Fixed routing's
(1.5) from the paired clock: honest holders at most 1.34x two rounds in a row in 1,200 holder-rounds, a 3x
walker at least 1.64x in each of its first two rounds (docs/ponw.md, Stragglers).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Hashable

Slot = tuple[int, Hashable]  # (range, holder)

# ponw.straggler_factor=null: by the clock that times the calls. The router's hop times spread honest holders
# further than fixed routing's paired calls (neuroray/training/call_clock.py), where honest holders reached at most
# 1.34x two rounds in a row in 1,200 holder-rounds and a 3x walker at least 1.64x in each of its first two rounds
# on this project's shared 2-CPU machine (docs/ponw.md, Stragglers).
FACTOR_BY_ROUTING = {"router": 2.5, "fixed": 1.5}


def straggler_factor(factor: float | None, routing: str) -> float:
    """``ponw.straggler_factor`` as it applies under ``swarm.routing``: the value set, or the routing's default."""
    return FACTOR_BY_ROUTING[routing] if factor is None else factor


def stragglers(seconds: dict[Slot, float], factor: float) -> dict[Slot, float]:
    """``{(range, holder): how many times slower}`` for the holders whose pace (seconds per call) exceeds
    ``factor`` x the median of the other holders of their range. ``seconds`` is keyed ``(range, holder)``;
    a range with one holder, a non-positive factor, or a holder without a positive finite pace names no one."""
    if factor <= 0:
        return {}
    by_range: dict[int, dict] = defaultdict(dict)
    for (s, who), sec in seconds.items():
        if sec is not None and sec > 0 and sec != float("inf"):
            by_range[s][who] = sec
    named = {}
    for s, pace in by_range.items():
        for who, sec in pace.items():
            others = [v for k, v in pace.items() if k != who]
            if not others:
                continue
            ratio = sec / statistics.median(others)
            if ratio > factor:
                named[s, who] = ratio
    return named


class StragglerWatch:
    """Names the holders :func:`stragglers` finds slow in ``rounds`` consecutive rounds (keyed by slot)."""

    def __init__(self, factor: float, rounds: int):
        self.factor, self.rounds = factor, rounds
        self.streak: dict[Slot, int] = {}
        self.suspects: dict[Slot, float] = {}

    def observe(self, paces: dict[Slot, float]) -> dict[Slot, float]:
        """One round's paces; ``{slot: ratio}`` of the holders named this round. :attr:`suspects` then holds
        ``{slot: ratio}`` of those slow this round but not (yet) named: their pay waits in escrow
        (neuroray/ponw/escrow.py) until a later round names them or finds them at pace."""
        slow = stragglers(paces, self.factor)
        self.streak = {slot: self.streak.get(slot, 0) + 1 for slot in slow}
        self.suspects = {slot: ratio for slot, ratio in slow.items() if self.streak[slot] < self.rounds}
        return {slot: ratio for slot, ratio in slow.items() if self.streak[slot] >= self.rounds}
