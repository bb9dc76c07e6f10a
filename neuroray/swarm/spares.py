"""Warm spare holders (``checkpoint.spares``): idle holders per layer range that take a crashed holder's slot over.

Without spares a crashed holder comes back through Ray's restart (``checkpoint.max_restarts``): a new process,
torch imported, the range built, the snapshot restored. Ray also reports the in-flight call's failure only about
when the restarted process is up, so the driver learns of the crash seconds late. With spares the swarm starts
``checkpoint.spares`` idle holders per range next to the holders (process up, module built:
:meth:`StageHolder._warm <neuroray.swarm.holder.StageHolder._warm>`) and creates the holders with no Ray restart,
so a crash surfaces in milliseconds; the recovery (neuroray/training/trainer.py ``_recover_once``) has a ready spare
of the range run the slot's own setup (:meth:`~neuroray.swarm.holder.StageHolder.become`) and puts it in the slot,
and a new spare of that range starts in the background. No spare ready: a fresh holder is started for the slot
from its newest snapshot (Ray will not restart the dead one). Either way a slot is brought back at most
``checkpoint.max_restarts`` times, as with Ray's restarts, so a holder that crashes every time cannot use up
spares forever.

This module is the bookkeeping; :class:`neuroray.swarm.swarm.Swarm` starts the actors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from neuroray.errors import PipelineError

READY, STARTING, FAILED = "ready", "starting", "failed"


@dataclass
class Spare:
    handle: Any  # the spare's actor handle
    name: str  # its Ray name, without the run's prefix: spare-s<range>-<k>
    ready: Any  # ref of its spare_ready() call: done once its start is
    strategy: Any  # where it was placed (a replica's bundle it took over, or None): the slot it takes keeps it


class SparePool:
    """Per layer range, the idle spares; per slot, how many times its holder was replaced."""

    def __init__(self, ranges: int, per_range: int, max_restarts: int):
        self.per_range, self.max_restarts = per_range, max_restarts
        self.idle: list[list[Spare]] = [[] for _ in range(ranges)]
        self.started = [0] * ranges  # spares ever started per range: the next one's number
        self.replaced: dict[tuple[int, int], int] = {}  # (replica, stage) -> replacements so far

    def name(self, stage: int) -> str:
        """The Ray name of the next spare of range ``stage`` (never reused: a dead actor's name may linger)."""
        k = self.started[stage]
        self.started[stage] += 1
        return f"spare-s{stage}-{k}"

    def add(self, stage: int, spare: Spare) -> None:
        self.idle[stage].append(spare)

    def take(self, stage: int, state: Callable[[Spare], str]) -> tuple[Spare | None, list[Spare]]:
        """The first idle spare of range ``stage`` that ``state`` calls READY, out of the pool (None if none is), and
        the spares it called FAILED (their start failed or they died idle), also out of the pool, for the caller to
        end. Spares still STARTING stay: a recovery does not wait for one."""
        failed, chosen = [], None
        for spare in list(self.idle[stage]):
            st = state(spare)
            if st == FAILED:
                failed.append(spare)
                self.idle[stage].remove(spare)
            elif st == READY and chosen is None:
                chosen = spare
                self.idle[stage].remove(spare)
        return chosen, failed

    def charge(self, replica: int, stage: int) -> int:
        """Count one more replacement of slot ``r<replica>-s<stage>``; PipelineError past ``max_restarts``."""
        n = self.replaced.get((replica, stage), 0) + 1
        if n > self.max_restarts:
            raise PipelineError(f"holder r{replica}-s{stage} crashed {n} times, more than checkpoint.max_restarts="
                                f"{self.max_restarts}; its snapshots are kept: rerun with resume=true (or raise "
                                "checkpoint.max_restarts if the crashes are the hosts', not the holder's)")
        self.replaced[replica, stage] = n
        return n

    def all(self) -> list[Spare]:
        return [sp for idle in self.idle for sp in idle]
