"""Fault injection for tests and benchmarks: stage holders that hang, slow down or crash.

Production runs start :class:`~neuroray.swarm.holder.StageHolder`; a test or benchmark that needs a
stuck, slow or crashing holder starts :class:`FaultyStageHolder` instead (``holder_cls=`` of
:func:`neuroray.swarm.holder.holder_actor`, :class:`neuroray.swarm.swarm.Swarm` and
:func:`neuroray.train.run`). It behaves exactly like a StageHolder until a fault is injected.

Holders that cheat (lie, tamper, skip work, copy, read the wrong data) build on it in
neuroray/swarm/attacks_in_holder.py.
"""

from __future__ import annotations

import os
import time

from neuroray.config import ModelConfig
from neuroray.swarm.compute import BusyClock
from neuroray.swarm.holder import HolderSpec, StageHolder


class SlowedClock(BusyClock):
    """A busy clock that stretches every compute call to ``factor`` x its time, as slower hardware would.
    ``hidden``: as a slow walker that lies about it would, the clock records only the call's real compute."""

    def __init__(self):
        super().__init__()
        self.factor = 1.0
        self.hidden = False

    def stop(self, t0: float) -> None:
        if self.factor > 1 and self.hidden:  # stretched, but the clock is stopped before the stretch
            spent = time.perf_counter() - t0
            super().stop(t0)
            time.sleep((self.factor - 1) * spent)
            return
        if self.factor > 1:  # the extra time is busy time too
            time.sleep((self.factor - 1) * (time.perf_counter() - t0))
        super().stop(t0)


class FaultyStageHolder(StageHolder):
    """A :class:`StageHolder` with fault injection: :meth:`hang`, :meth:`slow_down`, :meth:`fail_at`."""

    CRASH_POINTS = ("grow", "flush_snapshots")  # the methods fail_at can crash in

    def __init__(self, spec: HolderSpec):
        super().__init__(spec)
        self.clock = SlowedClock()
        self._fail_at: str | None = None

    def hang(self, seconds: float) -> None:
        """Block the compute thread, as a stuck holder would."""
        time.sleep(seconds)

    def slow_down(self, factor: float) -> None:
        """Every compute call takes ``factor`` x as long from now on."""
        self.clock.factor = float(factor)

    def fail_at(self, method: str) -> None:
        """The process exits at the start of the next call to ``method`` (:data:`CRASH_POINTS`), as a crash there would;
        Ray restarts it on the spec it was created with (``max_restarts``)."""
        if method not in self.CRASH_POINTS:
            raise ValueError(f"fail_at({method!r}): a crash can be injected at {', '.join(self.CRASH_POINTS)}")
        self._fail_at = method

    def grow(self, model: ModelConfig, ranges: list[tuple[int, int]], seed: int) -> dict:
        if self._fail_at == "grow":
            os._exit(1)
        return super().grow(model, ranges, seed)

    def flush_snapshots(self) -> None:
        if self._fail_at == "flush_snapshots":
            os._exit(1)
        super().flush_snapshots()
