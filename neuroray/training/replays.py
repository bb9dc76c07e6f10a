"""Refusing replayed pseudo-gradients before the outer step (the rules: neuroray/ponw/replays.py).

Before each range's rule runs (``OuterSync.vet``, called by ``OuterSync.reduce`` under both routings), the
coordinator scores every pseudo-gradient the step was given against the batches its holder trained on this
round (which batches is the coordinator's own record: :meth:`~neuroray.training.copies.CopyCheck.batches`), at the
round's theta0 of every range. On the range that holds the embedding: how much the rows of the tokens new in those
batches moved against never-seen rows (:func:`~neuroray.ponw.replays.fresh_rows`; the holder's history of tokens
is kept here, round by round). On every other range: the loss it removes on those batches against its stream's
neighbours, with the copy check's :func:`~neuroray.training.copies.own_gains`. A replay is refused: its
pseudo-gradient goes to the rule as rejected (one of its ``f``), so it is left out of the aggregate, named in the
round's rejections, and its receipt says ``aggregated=False`` (paid 0). The log gives every holder's score each
round, so the honest margin can be read off any run.

Not checked (every update passes): streaming and overlapped runs (as the copy check), a run without a data
plan, a payload that cannot be decoded here. Cost: a few norms per holder on the embedding's range; elsewhere,
forwards of the whole model over the holder's own and its neighbours' batches, twice (at theta0 and moved), in
float32 on the driver's CPU, on the outer step's critical path (docs/benchmarks.md measures it).
"""

from __future__ import annotations

import math
import time

import ray
import torch

from neuroray.ponw.copies import scored_slice
from neuroray.ponw.replays import fresh_rows, lead, own_lead, replayed
from neuroray.training.copies import own_gains


class ReplayCheck:
    """The trainer's vetting of each range's pseudo-gradients against replays, round by round."""

    def __init__(self, trainer, copies, log=print):
        self.trainer, self.copies, self.log = trainer, copies, log
        c = trainer.cfg
        self.min_lead, self.min_ratio = c.ponw.replay_min_lead, c.ponw.replay_min_ratio
        self.seen: dict[tuple[int, int], set[int]] = {}  # (range, holder) -> the input tokens of every batch it trained on
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
            self.log(f"replay check: outer round {rnd}: range {s}: " + ", ".join(shown) + f" ({spent:.3f}s)")
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
        module = pipe.stages[s]
        cut = scored_slice(list(module.parameters()), module.has_embedding,
                           module.embed.weight if module.has_embedding else None)
        now = {r: self._rebuilt(s, r, 0) for r in who}
        refused, shown = {}, []
        rnd = t.outer.rounds + 1
        for i, (r, delta) in enumerate(zip(who, decoded)):
            if i in bad or delta is None or not bool(torch.isfinite(delta).all()) or not bool(delta.any()):
                continue  # screening and the free-rider rule have these
            if cut is not None:
                verdict = self._fresh_rows(s, r, delta, theta0[s], cut, now[r])
            elif self.min_lead > -2:  # the lead cannot go under -2: at -2 it would refuse nothing, so it is not run
                verdict = self._lead(s, r, delta, theta0, pipe, now[r])
            else:
                verdict = None
            if verdict is None:
                continue
            x, said, reason = verdict
            self.stats["scored"] += 1
            self.leads.append((rnd, s, r, x))
            shown.append(f"r{r} {said}")
            if reason:
                self.stats["refused"] += 1
                refused[i] = reason
        if cut is not None:  # what each holder has now seen, refused or not (its history is its batches, not its word)
            for r in who:
                self.seen.setdefault((s, r), set()).update(_tokens(now[r]))
        return refused, shown

    def _fresh_rows(self, s: int, r: int, delta: torch.Tensor, theta0_s: torch.Tensor, cut: tuple[int, int],
                    now: list) -> tuple[float, str, str] | None:
        """The embedding range: (ratio, shown, reason to refuse or "") by :func:`fresh_rows`; None: no verdict."""
        if not now:
            return None
        lo, hi = cut
        vocab = self.copies.pipeline().stages[s].embed.weight.shape[0]
        x = fresh_rows(delta[lo:hi].view(vocab, -1), theta0_s[lo:hi].view(vocab, -1), self.seen.get((s, r), set()),
                       _tokens(now))
        if not math.isfinite(x) and x != math.inf:
            return None
        reason = "" if x >= self.min_ratio else (
            f"replayed pseudo-gradient: the embedding rows of the tokens new in its batches of this round moved "
            f"{x:.2f}x as much as those of tokens it never saw (weight decay alone), under "
            f"ponw.replay_min_ratio={self.min_ratio:g}: it was made before this round's batches")
        return x, f"fresh rows x{x:.2f}", reason

    def _lead(self, s: int, r: int, delta: torch.Tensor, theta0: list, pipe, now: list
              ) -> tuple[float, str, str] | None:
        """Any other range: (lead, shown, reason to refuse or "") by :func:`own_lead`; None: no verdict."""
        sets = {"now": now, "before": self._rebuilt(s, r, -1), "next": self._rebuilt(s, r, 1)}
        sets = {k: v for k, v in sets.items() if v}
        if "now" not in sets or len(sets) < 2:
            return None
        gains = own_gains(pipe, theta0, s, delta, sets)
        x = own_lead(gains)
        shown = f"lead {x:+.3f} [" + " ".join(f"{k} {lead(gains['now'], g):+.3f}" for k, g in gains.items()
                                              if k != "now") + "]"
        reason = "" if not replayed(gains, self.min_lead) else (
            "replayed pseudo-gradient: the loss it removes (its own batches of this round and its neighbours: "
            + ", ".join(f"{k} {g:+.4f}" for k, g in gains.items())
            + f") gives it a lead of {x:+.3f} on its own, under ponw.replay_min_lead={self.min_lead:g}")
        return x, shown, reason

    def _rebuilt(self, s: int, r: int, shift: int) -> list:
        """Holder ``r``'s batches (``shift``: rounds from this one), rebuilt once per round: under fixed routing
        every range of a replica trained on the same ones."""
        key = (r, shift) if self.trainer.cfg.swarm.routing != "router" else (s, r, shift)
        if key not in self._batches:
            self._batches[key] = self.copies.batches(s, r, self.step, shift)
        return self._batches[key]


def _tokens(batches: list) -> set[int]:
    """The input token ids of these (inputs, labels) microbatches: the embedding rows they reach."""
    out: set[int] = set()
    for x, _ in batches:
        out.update(torch.unique(x).tolist())
    return out
