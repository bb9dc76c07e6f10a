"""Fault injection for tests and benchmarks: stage holders that hang, slow down, crash, or cheat.

Production runs start :class:`~neuroray.swarm.holder.StageHolder`; a test or benchmark that needs a
stuck, slow or crashing holder starts :class:`FaultyStageHolder` instead (``holder_cls=`` of
:func:`neuroray.swarm.holder.holder_actor`, :class:`neuroray.swarm.swarm.Swarm` and
:func:`neuroray.train.run`). It behaves exactly like a StageHolder until a fault is injected.

:func:`misbehaving` makes a holder class whose chosen slots cheat from inside their own process, with
their own keys (docs/ponw.md, "Holders that misbehave"): a Driver that commits losses it did not
compute, a holder whose proofs claim more batches than it did, and holders that send a poisoned
(scaled, sign-flipped, zero or replayed) pseudo-gradient and commit to it in their proofs.
"""

from __future__ import annotations

import os
import time

import torch

from neuroray.config import ModelConfig
from neuroray.swarm.compute import BusyClock
from neuroray.swarm.holder import HolderSpec, StageHolder
from neuroray.swarm.proving import RoundProving


class SlowedClock(BusyClock):
    """A busy clock that stretches every compute call to ``factor`` x its time, as slower hardware would."""

    def __init__(self):
        super().__init__()
        self.factor = 1.0

    def stop(self, t0: float) -> None:
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


# ----- holders that cheat ---------------------------------------------------------------------------
HOLDER_ATTACKS = {
    "lie_loss": "Driver: commits its round's losses x value (losses it did not compute)",
    "inflate_batches": "its proofs claim value more microbatches than it did",
    "scale_delta": "sends value x its pseudo-gradient",
    "sign_flip": "sends minus its pseudo-gradient",
    "zero_delta": "sends a zero pseudo-gradient (a free rider)",
    "stale_delta": "replays its previous round's pseudo-gradient (zeros on the first round)",
}


class InflatedProving(RoundProving):
    """Signs proofs that claim ``extra`` more microbatches per round than the holder did."""

    def __init__(self, extra: int):
        super().__init__()
        self.extra = extra

    def finish_round(self, outer_round: int, theta0: torch.Tensor, microbatches_done: int, name: str) -> None:
        super().finish_round(outer_round, theta0, microbatches_done + self.extra, name)


class MisbehavingHolder(FaultyStageHolder):
    """A holder whose slot (``r<replica>-s<stage>``) in ``ATTACKS`` cheats from round ``from_round`` on:
    ``ATTACKS = {slot: (attack, value, from_round)}`` (:data:`HOLDER_ATTACKS`). Other slots are honest.
    Make one with :func:`misbehaving`."""

    ATTACKS: dict[str, tuple[str, float, int]] = {}

    def __init__(self, spec: HolderSpec):
        super().__init__(spec)
        self.attack, self.value, self.from_round = self.ATTACKS.get(spec.slot, ("none", 0.0, 1))
        self._previous: torch.Tensor | None = None
        if self.attack == "inflate_batches":
            inflated = InflatedProving(int(self.value))
            inflated.__dict__.update({k: v for k, v in self.proving.__dict__.items() if k != "extra"})
            self.proving = inflated

    def _cheating(self) -> bool:
        # called while round outer_rounds + 1 is in flight (its outer step has not loaded theta0 yet)
        return self.outer.outer_rounds + 1 >= self.from_round

    def set_theta0_losses(self, losses: list[float], data_position: int | None = None) -> None:
        if self.attack == "lie_loss" and self._cheating():
            losses = [x * self.value for x in losses]
        super().set_theta0_losses(losses, data_position)

    def pseudo_gradient(self, after=None, fragment: int | None = None) -> dict[str, torch.Tensor]:
        delta, lo = self.outer.delta(fragment)
        true = delta.clone()
        if self._cheating():
            if self.attack == "scale_delta":
                delta = delta * self.value
            elif self.attack == "sign_flip":
                delta = -delta
            elif self.attack == "zero_delta":
                delta = torch.zeros_like(delta)
            elif self.attack == "stale_delta":
                delta = self._previous if self._previous is not None else torch.zeros_like(delta)
        self._previous = true
        self.proving.note_pseudo_gradient(delta)  # it commits to what it sends: its digest matches the receipt
        return self.outer.compress(delta, lo)


def misbehaving(attacks: dict[str, tuple]) -> type:
    """A :class:`MisbehavingHolder` class for ``run(cfg, holder_cls=...)``: ``{"r1-s0": ("lie_loss", 0.5)}``,
    optionally with a third item, the first round it cheats in (default 1)."""
    table = {}
    for slot, spec in attacks.items():
        attack, value, *start = spec
        if attack not in HOLDER_ATTACKS:
            raise ValueError(f"holder attack {attack!r} is unknown; choose one of {sorted(HOLDER_ATTACKS)}")
        table[slot] = (attack, float(value), int(start[0]) if start else 1)
    return type("MisbehavingHolder", (MisbehavingHolder,), {"ATTACKS": table})
