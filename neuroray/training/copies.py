"""Naming the copier when two holders of a range sent one pseudo-gradient (neuroray/ponw/copies.py).

The outer step finds the groups of copies (``OuterReport.copies``) and counts each group once. Here,
after the step and only for those groups (nothing runs in an honest round), the coordinator decides who
wrote the update: for every claimant it rebuilds the batches that claimant trained on this round and
measures, at the round's theta0 (every range's, as the coordinator kept it), the loss the shared delta
removes from them. The author is the claimant whose own batches it improves most, by a relative margin
(:func:`neuroray.ponw.copies.author_of`); every other member of the group is left out of the round's
credit: its receipt says ``aggregated=False`` and the ledger pays it 0. When no claimant wins by the
margin, nobody in the group is paid for the round (the ledger cannot tell who did the work; the
aggregate still counts the update once). Claimants assigned the very same batches (two Drivers whose node
ids map to one shard start from one theta0 on one stream) compute the same update honestly: they count as
one claimant, and when all of a group are, nobody is named and all are paid. The log names each copier;
``neuroray_copies_total`` counts them.

Which batches a claimant trained on is the coordinator's own record, never the claimant's word:

* fixed routing: replica r's Driver reads microbatches ``step * n .. step * n + n - 1`` of its own stream
  (its node id's shard ring) in inner step ``step``; every range of replica r trains on them;
* swarm routing: the router saw which holder of each range ran each microbatch forward (it keeps the
  graph for the backward), and every Driver reads microbatch ``mb`` of one shared ring.

In float32 on the driver's CPU, forward only, on at most :data:`MAX_BATCHES` microbatches per claimant.
Not attributed (the fallback above applies): streaming and overlapped runs (the round's theta0 is not one
the coordinator held whole), a range whose round-start theta0 is not at hand, a run without a data plan.
"""

from __future__ import annotations

import time

import ray
import torch

from neuroray.ponw.copies import author_of, scored_slice

MAX_BATCHES = 40  # microbatches per claimant (H=20 x 2 microbatches: the measured setup's whole round)


def own_gains(pipe, theta0: list[torch.Tensor], s: int, delta: torch.Tensor,
              batches: dict[object, list[tuple[torch.Tensor, torch.Tensor]]]) -> dict[object, float]:
    """{claimant: mean loss at theta0 less mean loss with range ``s`` moved to ``theta0_s - delta``, over
    that claimant's batches}. ``pipe``: a :class:`~neuroray.training.reputation.StagePipeline`. On the range
    with the embedding only the embedding's part of ``delta`` moves (neuroray/ponw/copies.py says why)."""
    module = pipe.stages[s]
    cut = scored_slice(list(module.parameters()), module.has_embedding,
                       module.embed.weight if module.has_embedding else None)
    moved = delta.float().clone()
    if cut is not None:
        keep = torch.zeros_like(moved)
        keep[cut[0]:cut[1]] = moved[cut[0]:cut[1]]
        moved = keep
    for x, flat in enumerate(theta0):
        pipe.load(x, flat)

    def mean_loss(items) -> float:
        total = 0.0
        for inputs, labels in items:
            out, _ = pipe.run(inputs)
            total += pipe.loss(out, labels)
        return total / len(items)

    base = {c: mean_loss(items) for c, items in batches.items() if items}
    pipe.load(s, theta0[s].float() - moved)
    gains = {c: base[c] - mean_loss(items) for c, items in batches.items() if items}
    pipe.load(s, theta0[s])
    return gains


def same_batches(batches: dict[object, list[tuple[torch.Tensor, torch.Tensor]]]) -> list[list]:
    """The claimants grouped by identical batch lists, in their order."""
    classes: list[list] = []
    for c, items in batches.items():
        for cls in classes:
            theirs = batches[cls[0]]
            if len(theirs) == len(items) and all(torch.equal(x, y) and torch.equal(a, b)
                                                  for (x, a), (y, b) in zip(theirs, items)):
                cls.append(c)
                break
        else:
            classes.append([c])
    return classes


class CopyCheck:
    """The trainer's attribution of copied pseudo-gradients, round by round."""

    def __init__(self, trainer, log=print):
        self.trainer, self.log = trainer, log
        c = trainer.cfg
        self.attributing = c.diloco.streaming_fragments == 1 and c.diloco.overlap == "none"
        self.pipe = None
        self.stats = {"groups": 0, "copiers": 0, "undecided": 0, "seconds": 0.0}

    def capture(self, result) -> list[dict]:
        """Before the reputation clears them: what attribution needs of every range whose step found copies."""
        outer = self.trainer.outer
        cases = []
        for rep in result.reports:
            if not getattr(rep, "copies", None):
                continue
            rd = outer.reduced.get(rep.range_index)
            ranges = len(self.trainer.swarm.ranges)
            theta0 = [outer.reduced[x].theta0 for x in range(ranges)] if all(
                x in outer.reduced for x in range(ranges)) else None
            for group in rep.copies:
                who = [rd.who[i] for i in group] if rd is not None else list(group)
                delta = rd.deltas[group[0]] if rd is not None else None
                cases.append({"s": rep.range_index, "who": who, "delta": delta, "theta0": theta0})
        return cases

    def settle(self, cases: list[dict], result, step: int | None) -> None:
        """Name the copiers of every captured group; they (or, undecided, the whole group) go into
        ``result.unused``, so their receipts say ``aggregated=False``."""
        t = self.trainer
        for case in cases:
            s, who = case["s"], case["who"]
            t0 = time.perf_counter()
            classes, gains, author, rel = [who], {}, None, float("nan")
            try:
                classes, gains = self._measure(case, step)
                if gains:
                    author, rel = author_of(gains)
            except Exception as exc:  # noqa: BLE001 - no attribution is no evidence for anyone
                self.log(f"copies: range {s}: attribution failed ({type(exc).__name__}: {exc})")
            self.stats["seconds"] += time.perf_counter() - t0
            self.stats["groups"] += 1
            rounds = t.outer.rounds
            if case.get("same"):
                self.log(f"outer round {rounds}: range {s}: replicas {who} were assigned the same batches and sent "
                         f"one pseudo-gradient: counted once, each paid")
                continue
            authors = next((c for c in classes if author in c), [])
            copiers = [r for r in who if r not in authors]
            result.unused |= {(s, r) for r in copiers}
            shown = ", ".join(f"r{r} {gains[r]:+.4f}" for r in who if r in gains) or "not measured"
            if author is None:
                self.stats["undecided"] += 1
                self.log(f"outer round {rounds}: range {s}: replicas {who} sent one pseudo-gradient; no author by "
                         f"the margin (loss removed on each one's batches: {shown}; margin {rel:+.2f}): none is paid")
            else:
                self.stats["copiers"] += len(copiers)
                self.log(f"outer round {rounds}: range {s}: replica(s) {copiers} copied replica {author}'s "
                         f"pseudo-gradient (loss removed on each one's batches: {shown}; margin {rel:+.2f}): paid 0")
            if t.metrics is not None:
                t.metrics.copied(len(copiers), "copied" if author is not None else "undecided")

    # ----- the measurement ----------------------------------------------------------------------
    def _measure(self, case: dict, step: int | None) -> tuple[list[list[int]], dict]:
        """(the claimants grouped by identical batches, the loss the update removes on each group's batches,
        keyed by its first claimant). Claimants assigned the same batches (two Drivers whose node ids map to
        one shard) compute the same update honestly: they are one claimant here, and when all are one, the
        case is marked ``same`` and nobody is named."""
        t = self.trainer
        who = case["who"]
        if step is None or t.swarm.data is None:
            return [who], {}
        from neuroray.diloco.sync import decode_payloads

        s = case["s"]
        batches = {r: self.batches(s, r, step) for r in who}
        classes = same_batches(batches)
        if len(classes) == 1:
            case["same"] = bool(batches[who[0]])
            return classes, {}
        # overlap, streaming: the holders did not train from the theta0 the gains would be measured at
        if not self.attributing or case["theta0"] is None or case["delta"] is None:
            return classes, {}
        timeout = t.cfg.cluster.step_timeout_s
        theta0 = [x.float() for x in ray.get(case["theta0"], timeout=timeout)]
        decoded, bad = decode_payloads(t.cfg.diloco, theta0[s].numel(), [ray.get(case["delta"], timeout=timeout)])
        if bad or decoded[0] is None:
            return classes, {}
        return classes, own_gains(self.pipeline(), theta0, s, decoded[0], {c[0]: batches[c[0]] for c in classes})

    def pipeline(self):
        """The stage modules that scores run on (built once per model shape; the replay check shares them)."""
        from neuroray.training.reputation import StagePipeline

        sw = self.trainer.swarm
        key = (sw.model, sw.vocab_size, tuple(sw.ranges))
        if self.pipe is None or self.pipe.key != key:
            self.pipe = StagePipeline(sw.model, sw.vocab_size, list(sw.ranges), self.trainer.cfg.seed)
        return self.pipe

    def batches(self, s: int, r: int, step: int, shift: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The microbatches replica (router: holder) ``r``'s holder of range ``s`` trained on in the round ending
        at ``step``. ``shift=-1``: those of its round before (none before the first); ``shift=1``: the
        microbatches it would read in the next round at that pace, which nobody has trained on yet."""
        t = self.trainer
        d = t.cfg.data
        first = step + 1 - t.sync_every
        if t.cfg.swarm.routing == "router":
            ex = getattr(t.executor, "trained_before" if shift < 0 else "trained", None) or {}
            later = t.sync_every * d.num_microbatches * len(t.swarm.replicas) if shift > 0 else 0
            positions = [p + later for p in ex.get((s, r), [])]
            node, ring_start = "", 0
        else:
            n = d.num_microbatches
            first += shift * t.sync_every
            positions = list(range(max(first, 0) * n, (step + 1 + shift * t.sync_every) * n))
            node, ring_start = t.swarm.infos[r * len(t.swarm.ranges)]["node_id"], None
        return [batch_at(t, node, p, ring_start) for p in positions[-MAX_BATCHES:]]


def batch_at(trainer, node: str, position: int, ring_start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The microbatch at ``position`` of ``node``'s shard ring (router: the shared ring, ``ring_start=0``), read by
    the coordinator itself from the run's current manifest, as the Driver's stream reads it."""
    from neuroray.genesis import Manifest, TokenStream

    d, data = trainer.cfg.data, trainer.swarm.data
    stream = TokenStream(data.root, Manifest.from_json(data.manifest), node, d.seq_len, d.microbatch_size,
                         prefetch=False, _start=ring_start)
    stream.seek(position)
    return stream.next_microbatch()
