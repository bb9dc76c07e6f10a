"""The contract between the training loop and its step executor, and what both of them share.

The :class:`~neuroray.training.trainer.Trainer` runs rounds, snapshots, proofs and recovery the same way
for every swarm. How one inner step runs, how the outer step gathers the pseudo-gradients and how many
microbatches each holder was seen to do belong to the executor it is given (``training/run.py`` picks it from ``swarm.routing``):
:class:`~neuroray.training.fixed.FixedPipelines` (``swarm.routing=fixed``) or
:class:`~neuroray.training.routed.RoutedSwarm` (``swarm.routing=router``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import ray



@dataclass
class RoundResult:
    """One finished outer step, as the loop books it: metrics, logs and the ledger's receipts."""

    reports: list  # per range, OuterSync's report: rejected holders, refusals
    comm: dict  # bytes counted (OuterSync.measure); the loop adds the proofs' control bytes
    unused: set[tuple[int, int]]  # (range, replica) whose pseudo-gradient the step did not use: late, rejected, weight 0
    batches: dict[tuple[int, int], int]  # (range, replica) -> microbatches the executor saw that holder do this round
    # (range, replica) -> (digest, norm) of the pseudo-gradient the outer step received from it (the receipts'
    # observation; absent where nothing was compared: streaming fragments, compressed or malformed payloads)
    observed: dict[tuple[int, int], tuple[str, float] | None] = field(default_factory=dict)
    # hop rechecks (neuroray/training/hop_audit.py): the holders blamed this round, and microbatches re-executed
    hop_findings: list = field(default_factory=list)
    hop_checks: int = 0
    # (range, replica) left out with a replica-mate proven faulty (a rejected hop, a failed recheck), or, under swarm
    # routing, a Driver whose routes crossed a proven-faulty holder and whose update the rule set aside: they did
    # their work on what it sent, so their receipts excuse them (credited, no pseudo-gradient compared) and no spot check
    excused: set[tuple[int, int]] = field(default_factory=set)
    # replica -> its Driver's data position when the round's first step started, as the coordinator saw it in the
    # hop rechecks' record (before the proof); the receipt carries it, and a proof naming another is refused
    data_positions: dict[int, int] = field(default_factory=dict)
    # swarm routing: (0, Driver) whose committed first-step losses went through a holder the hop rechecks proved
    # faulty this round (neuroray/training/hop_routes.py): not a check of its own work, so no spot check this round
    spot_excused: set[tuple[int, int]] = field(default_factory=set)
    # diloco.overlap: the inner step the landed round ended after (the loop books it steps later, when it lands)
    end_step: int | None = None


class StepExecutor(ABC):
    """How the inner steps and the outer step of one swarm are carried out.

    The Trainer calls, in this order per step: :meth:`submit` (step s), :meth:`collect` (step s-1 or s, one at
    a time, in order), at a round's end :meth:`outer_step`, after every step :meth:`take_landed`, and before
    snapshots :meth:`settle`. Where :meth:`presends`, a round's end may instead be :meth:`presend` (step s),
    :meth:`submit` (s+1), :meth:`collect` (s), then :meth:`outer_step` (s).
    """

    trainer = None  # the loop whose cfg, swarm, outer state, log, metrics, lr schedule and recovery it uses

    def attach(self, trainer) -> None:
        self.trainer = trainer

    @abstractmethod
    def submit(self, step: int) -> None:
        """Start inner step ``step`` (0-based) where the executor can run ahead of the loop."""

    @abstractmethod
    def collect(self, step: int) -> float:
        """Finish inner step ``step`` and return its mean loss."""

    @abstractmethod
    def outer_step(self, step: int) -> RoundResult:
        """Run the outer step after inner step ``step``: gather pseudo-gradients, reduce, load the new theta0."""

    def take_landed(self) -> RoundResult | None:
        """The outer round that landed since the last call, once (``diloco.overlap``; None: none did)."""
        return None

    def presends(self) -> bool:
        """Whether :meth:`presend` can end a round before its last step is collected (``diloco.overlap``)."""
        return False

    def presend(self, step: int) -> None:
        """Ask for the pseudo-gradients of the round ending after inner step ``step``, queued behind that step on
        every holder, so that the loop can submit the next step before it collects this one; the
        :meth:`outer_step` of ``step`` then reduces what was asked here."""
        assert False, f"{type(self).__name__}.presends() is False: the loop never asks it to end a round early"

    def recovered(self, replica: int) -> None:
        """``replica``'s holders are back after :meth:`Trainer.recover` (fixed routing: a new group for direct hops)."""

    def close(self) -> None:
        """Release what the executor holds beside the holders (fixed routing: the direct hops' groups)."""

    def take_proof(self, holder):
        """The ref of ``holder``'s signed proof of the round just finished."""
        return holder.take_proof.remote()

    def paces(self, result: RoundResult) -> dict[tuple[int, int], float]:
        """``(range, replica) -> seconds per compute call`` of each holder in the round just booked, for the
        straggler rule (neuroray/ponw/stragglers.py), from the coordinator's own clock: never from what a holder
        reports of itself, which a slow walker would under-report. Here: none (no one is named)."""
        return {}

    def settle(self) -> None:
        """Return once every live holder has applied its last inner step (before snapshots)."""

    def finish(self) -> None:
        """After the last step: leave every holder on the run's final weights."""

    def routing_summary(self) -> dict | None:
        """What routing did over the run (None: the replicas' holders were fixed)."""
        return None

    def barred(self) -> list[str]:
        """Node ids of the holders barred from routing (swarm routing; fixed routing bars no one), for snapshots."""
        return []

    def bar_again(self, node_ids: list[str]) -> None:
        """After a resume: bar the holders a snapshot says were barred (fixed routing: nothing to bar)."""


def value_or_none(ref):
    """A finished ref's value, or None when its holder died meanwhile (metrics must not stop training)."""
    try:
        return ray.get(ref, timeout=0)
    except Exception:
        return None


def hop_rejection(refs: list):
    """The first :class:`~neuroray.swarm.hop_guard.HopRejected` among these finished refs' failures (a call that
    waited on a rejected hop fails with the same cause), or None."""
    from neuroray.swarm.hop_guard import HopRejected
    from neuroray.swarm.ray_errors import unwrap_ray_error

    for ref in refs:
        try:
            ray.get(ref, timeout=0)
        except Exception as exc:  # noqa: BLE001 - only a rejection is looked for
            cause = unwrap_ray_error(exc)
            if isinstance(cause, HopRejected):
                return cause
    return None


def members(replicas: int, benched: set[int]) -> list[int]:
    """The replicas whose pseudo-gradients a fixed-routing outer step is given, in order."""
    return [r for r in range(replicas) if r not in benched]


def by_replica(reports: list, members: list[list[int]], left_out: set[tuple[int, int]] = frozenset()):
    """``(unused, observed)`` of a round, keyed by ``(range, replica)``, from outer-step reports whose holder
    indices index ``members[range]`` (the replicas whose pseudo-gradients the range's step was given). Holders in
    ``left_out`` (late, or excluded for a rejected hop) were not used either."""
    unused = {(rep.range_index, members[rep.range_index][i]) for rep in reports for i in rep.not_aggregated}
    observed = {(rep.range_index, members[rep.range_index][i]): obs
                for rep in reports for i, obs in enumerate(rep.observations)}
    return unused | set(left_out), observed


