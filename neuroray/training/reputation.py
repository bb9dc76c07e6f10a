"""Held-out scores of every pseudo-gradient, and the reputation they build (``ponw.reputation``).

After each outer step the coordinator scores what every holder of every range sent, as Templar's Gauntlet
does: by the held-out loss its update removes. On one small batch of the eval shards, fixed for the run
(``ponw.reputation_batch`` sequences, the start of the eval split, which no training stream reads):

    score(s, r) = loss(theta0) - loss(theta0 with range s moved to theta0_s - outer_lr * delta_(s, r))

``delta_(s, r)`` is what the range's rule received from holder r (after the ``attack=`` simulation, so a
simulated Byzantine holder is scored on what it sent). Every other range stays at theta0. Scoring one range
at a time is what makes a score the holder's own: under fixed routing a replica's holders each get the
score of their own range's pseudo-gradient (a bad Worker does not drag its replica's Driver down with it),
and under swarm routing, where a range's contributions come from whichever quorum of holders answered, a
score is still one holder's. Forward only, in float32 on the driver's CPU, at the theta0 the coordinator
kept (like the spot checks, neuroray/training/audit.py): the stage modules are built once, the activations
at theta0 are kept at every stage cut, and a candidate of range s re-runs ranges s.. only. Cost per round:
one forward of the whole model plus one of ranges s.. for each pseudo-gradient of range s, on the small
batch (docs/benchmarks.md measures it against the round).

The scores go through :mod:`neuroray.ponw.reputation` (normalised per range, an EMA per node id). The
reputation weighs each pseudo-gradient in the next rounds' outer steps (``OuterSync.weights_of``) and scales
this round's rewards (the receipts' ``reward_bp``); the trainer's snapshots carry it, so ``resume=true``
restores it. Not scored: streaming runs (``diloco.streaming_fragments > 1``: a step sees one fragment of a
range), a dataset without eval shards; reputations then stay at the prior, equal for all, which changes
nothing.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import ray
import torch

from neuroray.ponw.reputation import ReputationBook, normalized


class StagePipeline:
    """The model's stage modules in float32 on the CPU, built once; any range's flat weights loaded in place."""

    def __init__(self, model, vocab_size: int, ranges: list[tuple[int, int]], seed: int):
        from neuroray.model import build_stage

        self.key = (model, vocab_size, tuple(ranges))
        self.stages = [build_stage(model, vocab_size, s, ranges, seed=seed).eval() for s in range(len(ranges))]

    def load(self, s: int, flat: torch.Tensor) -> None:
        from torch.nn.utils import vector_to_parameters

        params = list(self.stages[s].parameters())
        numel = sum(p.numel() for p in params)
        if numel != flat.numel():
            raise ValueError(f"range {s}: theta0 has {flat.numel()} values, the model's range has {numel}")
        with torch.no_grad():
            vector_to_parameters(flat.float(), params)

    @torch.no_grad()
    def run(self, x: torch.Tensor, first: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Ranges ``first``.. on ``x``; (the last output, every stage's input from ``first`` on)."""
        inputs = []
        for module in self.stages[first:]:
            inputs.append(x)
            x = module(x)
        return x, inputs

    @torch.no_grad()
    def loss(self, out: torch.Tensor, labels: torch.Tensor) -> float:
        return float(self.stages[-1].loss(out, labels))


def held_out_scores(pipe: StagePipeline, theta0: Sequence[torch.Tensor], candidates: dict, outer_lr: float,
                    inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict]:
    """(held-out loss at theta0, {key: score}) for ``candidates``: key -> (range s, delta or None). A score
    is the loss at theta0 less the loss with range s alone moved by ``-outer_lr * delta``; None (a payload
    the step could not use) scores NaN, which normalises to 0."""
    for s, flat in enumerate(theta0):
        pipe.load(s, flat)
    out, cuts = pipe.run(inputs)
    base = pipe.loss(out, labels)
    scores = {}
    for s in range(len(theta0)):
        mine = [(key, delta) for key, (rs, delta) in candidates.items() if rs == s]
        for key, delta in mine:
            if delta is None:
                scores[key] = float("nan")
                continue
            pipe.load(s, theta0[s].float() - outer_lr * delta.float())
            moved, _ = pipe.run(cuts[s], first=s)
            scores[key] = base - pipe.loss(moved, labels)
        if mine:
            pipe.load(s, theta0[s])
    return base, scores


def _usable(x, numel: int) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 1 and x.numel() == numel and bool(torch.isfinite(x).all())


class Reputation:
    """The trainer's reputation: scores each finished round, weighs the next ones, prices the receipts."""

    def __init__(self, trainer, log: Callable[[str], None] = print):
        cfg = trainer.cfg
        p = cfg.ponw
        self.trainer, self.log = trainer, log
        self.book = ReputationBook(p.reputation_decay, p.reputation_prior, p.reputation_floor)
        self.scoring = cfg.diloco.streaming_fragments == 1
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pipe: StagePipeline | None = None
        self.seconds: list[float] = []  # scoring time per scored round (its cost)
        self.last: dict = {}  # the last round's {node id: normalised score}
        trainer.outer.weights_of = self.weights_of
        if not self.scoring:
            log("reputation: not scored under streaming (a step sees one fragment of a range); "
                "every holder keeps the prior, which weighs all alike")

    # ----- what the reputation feeds ------------------------------------------------------------
    def node_of(self, s: int, r: int) -> str:
        """The node id of replica r's holder of range s (swarm.infos is replica-major)."""
        stages = len(self.trainer.swarm.ranges)
        return self.trainer.swarm.infos[r * stages + s]["node_id"]

    def weights_of(self, s: int, who: list[int]) -> list[float] | None:
        return self.book.weights([self.node_of(s, r) for r in who])

    def reward_bp(self, node_id: str) -> int:
        return self.book.reward_bp(node_id)

    # ----- scoring ------------------------------------------------------------------------------
    def _held_out(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fixed scoring batch (built once; None without eval shards)."""
        if self.batch is None:
            from neuroray.genesis import Manifest
            from neuroray.training.evaluation import held_out_batches

            t = self.trainer
            data = t.swarm.data
            batches = [] if data is None else held_out_batches(
                data.root, Manifest.from_json(data.manifest), t.cfg.data.seq_len, t.cfg.ponw.reputation_batch, 1)
            if not batches:
                self.scoring = False
                self.log("reputation: the dataset has no held-out shards (data.eval_shards=0): nothing to score "
                         "pseudo-gradients on; every holder keeps the prior")
                return None
            self.batch = batches[0]
        return self.batch

    def _pipeline(self) -> StagePipeline:
        sw = self.trainer.swarm
        key = (sw.model, sw.vocab_size, tuple(sw.ranges))
        if self.pipe is None or self.pipe.key != key:  # built once; again only after the model grew
            self.pipe = StagePipeline(sw.model, sw.vocab_size, list(sw.ranges), self.trainer.cfg.seed)
        return self.pipe

    def _candidates(self, timeout: float) -> tuple[list[torch.Tensor], dict]:
        """theta0 of every range and {(s, r): (s, what range s's rule received from replica r)}."""
        from neuroray.diloco.attacks import simulate
        from neuroray.diloco.sync import decode_payloads, step_seed

        outer, cfg = self.trainer.outer, self.trainer.cfg
        reduced = dict(outer.reduced)
        theta0 = ray.get([reduced[s].theta0 for s in sorted(reduced)], timeout=timeout)
        candidates = {}
        for s, flat in zip(sorted(reduced), theta0):
            rd = reduced[s]
            numel = flat.numel()
            payloads = []
            for ref in rd.deltas:  # a holder that died after the step has nothing to score
                try:
                    payloads.append(ray.get(ref, timeout=timeout))
                except Exception:  # noqa: BLE001
                    payloads.append(None)
            deltas, _ = decode_payloads(cfg.diloco, numel, payloads)
            memory = None
            if rd.memory is not None:
                try:
                    memory = ray.get(rd.memory, timeout=timeout)
                except Exception:  # noqa: BLE001 - lost memory: the step started afresh too
                    memory = None
            seen, _ = simulate(outer.attack, deltas, numel, replay=[] if memory is None else memory.replay,
                               seed=step_seed(outer.seed, s, rd.round_index))
            for r, x in zip(rd.who, seen):
                candidates[(s, r)] = (s, x.detach().float() if _usable(x, numel) else None)
        return theta0, candidates

    def score_round(self) -> None:
        """Score the round the outer step just finished and book the scores into the reputation."""
        outer = self.trainer.outer
        if not self.scoring or not outer.reduced or self._held_out() is None:
            outer.reduced.clear()
            return
        if len(outer.reduced) != len(self.trainer.swarm.ranges):  # a partial round: nothing comparable
            outer.reduced.clear()
            return
        t0 = time.perf_counter()
        theta0, candidates = self._candidates(self.trainer.cfg.cluster.step_timeout_s)
        outer.reduced.clear()
        inputs, labels = self.batch
        base, scores = held_out_scores(self._pipeline(), theta0, candidates, self.trainer.cfg.diloco.outer_lr,
                                       inputs, labels)
        booked = {}
        for s in range(len(theta0)):
            mine = {r: v for (rs, r), v in scores.items() if rs == s}
            booked.update({self.node_of(s, r): v for r, v in normalized(mine).items()})
        self.book.update(booked)
        self.last = booked
        seconds = time.perf_counter() - t0
        self.seconds.append(seconds)
        shown = ", ".join(f"r{r}s{s} {scores[(s, r)]:+.4f}" for s, r in sorted((s, r) for s, r in scores))
        reps = sorted(self.book.factor(self.node_of(s, r)) for s, r in scores)
        self.log(f"reputation: round {outer.rounds}: held-out loss {base:.4f}, loss removed {shown}; "
                 f"factors {reps[0]:.2f}..{reps[-1]:.2f} ({seconds:.3f}s)")
