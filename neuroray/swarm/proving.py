"""A stage holder's Proofs of Neural Work: one signed training proof per outer round (neuroray/ponw).

The holder opens a round when it starts from new weights, commits the pseudo-gradient it hands to the
outer step, and closes the round when its theta0 arrives; the proof is signed when the trainer takes it
(once) for the ledger. Without ``tokens_per_batch`` a holder proves nothing and every call here is a no-op.

Every commitment is hashed on the holder's digest thread (:class:`neuroray.digest.DigestThread`), once per
tensor: the theta0 a round ends at is the theta0 the next one starts from and the base the next outer update
names, so a round hashes theta0 once and its delta once, beside the compute, and signing waits for them.
"""

from __future__ import annotations

import logging

import torch

from neuroray.digest import DigestThread

log = logging.getLogger(__name__)


class RoundProving:
    """The holder's :class:`~neuroray.ponw.service.RoundProver` (or None), its last proof and theta0 losses."""

    def __init__(self, digests: DigestThread | None = None):
        self.digests = digests or DigestThread()
        self.prover = None
        self.proof: bytes | None = None
        self._unsigned = None  # the closed round's signing, done by take()
        self.theta0_losses: list[float] = []
        self.held: tuple | None = None  # diloco.overlap: the round sent and not landed (see hold)

    def start(self, holder, tokens_per_batch: int) -> None:
        """A prover for ``holder``'s identity and range as they are now (after a growth: the new range)."""
        from neuroray.ponw.service import RoundProver

        self.prover = RoundProver.for_holder(holder, tokens_per_batch)

    @property
    def enabled(self) -> bool:
        return self.prover is not None

    def start_round(self, weights: torch.Tensor, microbatches_done: int, stream) -> None:
        """The round starts from ``weights``; the Driver's ``stream`` says where its data starts."""
        position = stream.position if stream is not None else 0
        shard = getattr(stream, "shard_id", None) if stream is not None else None
        self.prover.start_round(self.digests.of(weights), microbatches_done, position, shard)

    def note_pseudo_gradient(self, delta: torch.Tensor) -> None:
        if self.prover is not None:
            self.prover.note_pseudo_gradient(self.digests.of(delta))

    def finish_round(self, outer_round: int, theta0: torch.Tensor, microbatches_done: int, name: str) -> None:
        """Close the round that ended at ``theta0``; :meth:`take` signs its proof (when its hashes are done)."""
        prover, losses, after = self.prover, list(self.theta0_losses), self.digests.of(theta0)
        closed, prover._start = (prover._start, prover._delta), None

        def sign() -> bytes | None:
            current = (prover._start, prover._delta)
            prover._start, prover._delta = closed
            try:
                return prover.finish_round(outer_round, after, microbatches_done, theta0_losses=losses)
            except RuntimeError as exc:  # restarted mid-round: this round's start was lost with the process
                log.warning("%s: no proof for round %d (%s)", name, outer_round, exc)
                return None
            finally:
                prover._start, prover._delta = current

        self.proof, self._unsigned = None, sign

    def hold(self, microbatches_done: int) -> None:
        """diloco.overlap: the round ends here (its pseudo-gradient noted) but its theta0 lands later; keep
        its start and delta aside, so the next round can start now and :meth:`finish_held` signs this one."""
        if self.prover is not None:
            self.held = (self.prover._start, self.prover._delta, microbatches_done)

    def finish_held(self, outer_round: int, theta0: torch.Tensor, name: str) -> bool:
        """Sign the held round at the ``theta0`` that landed, with the microbatches done by its end; False
        when there is none (restored or rejoined since: its start was lost)."""
        if self.prover is None or self.held is None:
            return False
        current = (self.prover._start, self.prover._delta)
        (self.prover._start, self.prover._delta, done), self.held = self.held, None
        try:
            self.finish_round(outer_round, theta0, done, name)
        finally:
            self.prover._start, self.prover._delta = current
        return True

    def set_theta0_losses(self, losses: list[float], data_position: int | None, stream) -> None:
        """Driver: the losses the proof commits to; under swarm routing, where their data starts in the ring."""
        self.theta0_losses = list(losses)
        if data_position is not None and self.prover is not None and stream is not None:
            stream.seek(data_position)
            self.prover.set_data_start(data_position, stream.shard_id)

    def take(self) -> bytes | None:
        if self._unsigned is not None:
            self.proof, self._unsigned = self._unsigned(), None
        proof, self.proof = self.proof, None
        return proof

    def registration(self):
        return None if self.prover is None else self.prover.registration()
