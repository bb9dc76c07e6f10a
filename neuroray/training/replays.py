"""Refusing replayed pseudo-gradients before the outer step (the rule: neuroray/ponw/replays.py).

Before each range's rule runs (``OuterSync.vet``, called by ``OuterSync.reduce`` under both routings), the
coordinator scores every pseudo-gradient the step was given on the batches its holder trained on this round
and on control batches it did not (its previous round's; in the first round, its next round's), at the
round's theta0 of every range, with the copy check's machinery (:func:`~neuroray.training.copies.own_gains`:
on the embedding's range only the embedding rows move; :meth:`~neuroray.training.copies.CopyCheck.batches`:
which batches a holder trained on is the coordinator's own record). A holder whose update does not lead on
its own batches by ``ponw.replay_min_lead`` is refused: its pseudo-gradient goes to the rule as rejected (one
of its ``f``), so it is left out of the aggregate, named in the round's rejections, and its receipt says
``aggregated=False`` (paid 0). The log gives every holder's lead each round, so the honest margin can be read
off any run.

Not checked (every update passes): streaming and overlapped runs (as the copy check), a run without a data
plan, a range whose payload cannot be decoded here. Cost: per holder, forwards of the whole model over its
own and its control batches, twice (at theta0 and moved), in float32 on the driver's CPU, on the outer step's
critical path (docs/benchmarks.md measures it).
"""

from __future__ import annotations

import time

import ray
import torch

from neuroray.ponw.replays import lead, own_lead, replayed
from neuroray.training.copies import own_gains


class ReplayCheck:
    """The trainer's vetting of each range's pseudo-gradients against replays, round by round."""

    def __init__(self, trainer, copies, log=print):
        self.trainer, self.copies, self.log = trainer, copies, log
        c = trainer.cfg
        self.min_lead = c.ponw.replay_min_lead
        self.on = c.ponw.replay_check and c.diloco.streaming_fragments == 1 and c.diloco.overlap == "none"
        self.step: int | None = None
        self._theta0: list[torch.Tensor] | None = None
        self._batches: dict = {}
        self.stats = {"scored": 0, "refused": 0, "seconds": 0.0}
        self.leads: list[tuple[int, int, int, float]] = []  # (outer round, range, holder, lead) of every score
        if self.on:
            trainer.outer.vet = self.vet

    def round_ends(self, step: int) -> None:
        """The outer step after inner step ``step`` is next: its batches and theta0 are this round's."""
        self.step, self._theta0, self._batches = step, None, {}

    def vet(self, s: int, who: list[int], deltas: list, theta0_refs: list) -> dict[int, str]:
        """{index into ``deltas``: reason} of the pseudo-gradients of range ``s`` to refuse as replays."""
        t = self.trainer
        if self.step is None or t.swarm.data is None or not who:
            return {}
        t0 = time.perf_counter()
        refused, shown = {}, []
        try:
            refused, shown = self._score(s, who, deltas, theta0_refs)
        except Exception as exc:  # noqa: BLE001 - a check that cannot run is no evidence against anyone
            self.log(f"replay check: range {s}: not scored ({type(exc).__name__}: {exc})")
        spent = time.perf_counter() - t0
        self.stats["seconds"] += spent
        rnd = t.outer.rounds + 1
        if shown:
            self.log(f"replay check: outer round {rnd}: range {s}: lead on own batches "
                     + ", ".join(shown) + f" ({spent:.3f}s)")
        for i, reason in refused.items():
            self.log(f"outer round {rnd}: range {s}: holder {who[i]}: {reason}: left out of the outer step, paid 0")
        return refused

    def _score(self, s: int, who: list[int], deltas: list, theta0_refs: list) -> tuple[dict[int, str], list[str]]:
        from neuroray.diloco.sync import decode_payloads

        t = self.trainer
        timeout = t.cfg.cluster.step_timeout_s
        if self._theta0 is None:
            self._theta0 = [x.float() for x in ray.get(list(theta0_refs), timeout=timeout)]
        theta0 = self._theta0
        decoded, bad = decode_payloads(t.cfg.diloco, theta0[s].numel(), ray.get(deltas, timeout=timeout))
        pipe = self.copies.pipeline()
        refused, shown = {}, []
        rnd = t.outer.rounds + 1
        for i, (r, delta) in enumerate(zip(who, decoded)):
            if i in bad or delta is None or not bool(torch.isfinite(delta).all()) or not bool(delta.any()):
                continue  # screening and the free-rider rule have these
            sets = {"now": self._rebuilt(s, r, 0), "before": self._rebuilt(s, r, -1), "next": self._rebuilt(s, r, 1)}
            sets = {k: v for k, v in sets.items() if v}
            if "now" not in sets or len(sets) < 2:
                continue
            gains = own_gains(pipe, theta0, s, delta, sets)
            x = own_lead(gains)
            self.stats["scored"] += 1
            self.leads.append((rnd, s, r, x))
            shown.append(f"r{r} {x:+.3f} [" + " ".join(f"{k} {lead(gains['now'], g):+.3f}" for k, g in gains.items()
                                                        if k != "now") + "]")
            if replayed(gains, self.min_lead):
                self.stats["refused"] += 1
                said = ", ".join(f"{k} {g:+.4f}" for k, g in gains.items())
                refused[i] = (f"replayed pseudo-gradient: the loss it removes (its own batches of this round and its "
                              f"neighbours: {said}) gives it a lead of {x:+.3f} on its own, under "
                              f"ponw.replay_min_lead={self.min_lead:g}")
        return refused, shown

    def _rebuilt(self, s: int, r: int, shift: int) -> list:
        """Holder ``r``'s batches (``shift``: rounds from this one), rebuilt once per round: under fixed routing
        every range of a replica trained on the same ones."""
        key = (r, shift) if self.trainer.cfg.swarm.routing != "router" else (s, r, shift)
        if key not in self._batches:
            self._batches[key] = self.copies.batches(s, r, self.step, shift)
        return self._batches[key]

