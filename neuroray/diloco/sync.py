"""The outer step on Ray: one long-lived actor per layer range (a fresh task each round, with
``diloco.outer_step_in=task``), all ranges in parallel.

theta0, the outer momentum and the aggregation memory of every range live in Ray's object store,
owned by the training driver (:class:`OuterSync`). Each round, every holder of a range puts its
pseudo-gradient ``theta0 - theta`` in the object store; the range's step receives them as object refs,
lets the simulated Byzantine holders (``attack=...``) replace theirs, screens and aggregates them with
the configured rule, applies the outer optimizer to **theta0** and returns the new theta0 and
momentum. Every holder of the range then loads the new theta0, so all of them restart identical.

A refused step (too few acceptable contributions for the rule to tolerate ``aggregator.f``) returns
theta0 and the momentum unchanged; the report names every rejected holder and why.

With ``diloco.compression`` set, holders send compressed payloads (neuroray/diloco/compress.py); the step
checks and decodes each before anything else, so a malformed one is rejected and named like a NaN one.
It then broadcasts the compressed outer update instead of the dense theta0; with ``diloco.sparse_broadcast=union``
the accepted sparse payloads themselves, from which every holder rebuilds the step (neuroray/diloco/union.py).
:meth:`OuterSync.measure` counts the serialized bytes of everything that crossed (docs/diloco.md).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pickle
from dataclasses import dataclass, field

import ray
import torch

from neuroray.config import AggregatorConfig, AttackConfig, DilocoConfig
from neuroray.diloco.aggregate import AggregationRefused, aggregate, min_inputs, screen
from neuroray.diloco.attacks import byzantine_count, simulate
from neuroray.diloco.compress import PayloadError, check, decode, digest, encode, encode_update
from neuroray.diloco.outer import OuterOptimizer
from neuroray.diloco.union import RULES as UNION_RULES
from neuroray.diloco.union import apply_union, union_update
from neuroray.ponw.copies import copy_groups

log = logging.getLogger(__name__)


@dataclass
class OuterReport:
    range_index: int
    accepted: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (holder index, reason)
    refused: str = ""  # non-empty: the step was refused and theta0 left unchanged
    byzantine: list[int] = field(default_factory=list)  # holders the attack simulation replaced
    dropped: list[int] = field(default_factory=list)  # accepted holders the rule gave weight 0 (e.g. not Krum's pick)
    # Serialized sizes, measured by the task on what it received and what it sends back (see measure())
    payload_bytes: list[int] = field(default_factory=list)  # each holder's pseudo-gradient payload
    theta0_bytes: int = 0  # the dense new theta0
    update_bytes: int = 0  # the compressed outer update (0: compression=none, holders load the dense theta0)
    # What the coordinator observed, for PoNW receipts (neuroray.ponw.service.round_receipts); whole-range
    # steps only (streaming fragments see slices, not what a holder commits to):
    # per holder (delta digest, L2 norm), None for a malformed payload. The digest is "" under compression:
    # the holder commits to its raw delta, the step only sees the decoded payload (the norm still counts).
    observations: list[tuple[str, float] | None] = field(default_factory=list)
    theta0_before: str = ""  # digest of the theta0 the round started from
    theta0_after: str = ""  # digest of the theta0 the holders load (exactly, also under compression)
    # Holders that sent one update between them (neuroray/ponw/copies.py): each group counted once in the
    # aggregate (by its first member: the same values); the trainer names the author, the others earn 0
    copies: list[list[int]] = field(default_factory=list)

    @property
    def not_aggregated(self) -> list[int]:
        """Holders whose pseudo-gradient this step did not use: rejected by screening or given weight 0.

        Proof of Neural Work credits them nothing (``Receipt.aggregated=False``). A refused step uses
        nobody's, but only the rejected holders caused the refusal: the others did valid work and are
        not listed, so faulty holders cannot deny honest ones their credit by forcing refusals.
        """
        return sorted(set(self.dropped) | {i for i, _ in self.rejected})


@dataclass
class OuterMemory:
    """What a range's outer step carries from one round to the next besides theta0 and momentum."""

    previous: torch.Tensor | None = None  # last aggregate: centered clipping's centre
    replay: list = field(default_factory=list)  # stale-replay attack: the Byzantine holders' last true deltas
    residual: torch.Tensor | None = None  # what the compressed broadcast of the outer update dropped so far

    def to_snapshot(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and JSON meta to store beside the range's theta0 and momentum, so a resumed run's next
        outer step sees the same centre and replay buffer as the uninterrupted run's would."""
        tensors = {} if self.previous is None else {"memory.previous": self.previous}
        if self.residual is not None:
            tensors["memory.residual"] = self.residual
        for i, x in enumerate(self.replay):
            if isinstance(x, torch.Tensor):
                tensors[f"memory.replay.{i}"] = x
        return tensors, {"memory_replay": len(self.replay)}

    def part(self, lo: int, hi: int) -> OuterMemory:
        """The memory of one streaming fragment: every vector's slice ``[lo, hi)``."""
        cut = lambda x: x[lo:hi] if isinstance(x, torch.Tensor) else x  # noqa: E731
        return OuterMemory(cut(self.previous), [cut(x) for x in self.replay], cut(self.residual))

    def merged(self, part: OuterMemory, lo: int, hi: int, numel: int) -> OuterMemory:
        """This memory with slice ``[lo, hi)`` replaced by a fragment's ``part``, each vector kept full-size
        so snapshots look the same with or without streaming. Filling what no fragment has written yet:
        NaN for the centre (screening rejects it, so that fragment starts without a centre, as a whole range
        does) and zeros for residuals and replays (what None means to them)."""

        def put(full, piece, fill):
            if piece is None and full is None:
                return None
            out = torch.full((numel,), fill) if not isinstance(full, torch.Tensor) else full.clone()
            out[lo:hi] = fill if piece is None else piece
            return out

        replay = [put(self.replay[i] if i < len(self.replay) else None,
                      x if isinstance(x, torch.Tensor) else None, 0.0) for i, x in enumerate(part.replay)]
        return OuterMemory(put(self.previous, part.previous, float("nan")), replay,
                           put(self.residual, part.residual, 0.0))

    @classmethod
    def from_snapshot(cls, tensors: dict[str, torch.Tensor], meta: dict) -> OuterMemory:
        # A replay entry that was not a tensor comes back as None: the stale attack replays zeros for
        # either, so the next round is the same.
        replay = [tensors.get(f"memory.replay.{i}") for i in range(meta["memory_replay"])]
        return cls(tensors.get("memory.previous"), replay, tensors.get("memory.residual"))


def decode_payloads(diloco: DilocoConfig, numel: int, deltas) -> tuple[list, dict[int, str]]:
    """Holders' payloads -> float32 vectors; {index: reason} for the malformed ones (left as None, which
    screening rejects). Bare tensors pass as they are: in-process callers hand over plain vectors."""
    out, malformed = [], {}
    for i, d in enumerate(deltas):
        if isinstance(d, torch.Tensor):
            out.append(d)
            continue
        try:
            check(d, diloco.compression, diloco.compression_block, numel, diloco.sparse_density)
            out.append(decode(d))
        except PayloadError as exc:
            malformed[i] = f"malformed payload: {exc}"
            out.append(None)
    return out, malformed


class _Counter:
    """A file that only counts what is written to it."""

    def __init__(self):
        self.n = 0

    def write(self, data) -> int:
        self.n += len(data)
        return len(data)


class _SizingPickler(pickle.Pickler):
    """Pickles everything but tensors, which it counts from their sizes instead of serializing their data."""

    def __init__(self, sink):
        super().__init__(sink, protocol=5)
        self.tensors, self.tensor_bytes = 0, 0

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            self.tensors += 1
            self.tensor_bytes += obj.numel() * obj.element_size() + 3 * obj.dim()
            return int, ()  # a placeholder of a few bytes in the tensor's place; _framing() takes it back out
        return NotImplemented


def _skeleton(obj) -> tuple[int, int, int]:
    """(pickled bytes with every tensor replaced by a placeholder, tensors, their counted bytes)."""
    sink = _Counter()
    pickler = _SizingPickler(sink)
    pickler.dump(obj)
    return sink.n, pickler.tensors, pickler.tensor_bytes


@functools.cache
def _framing() -> tuple[int, int]:
    """What pickle adds per tensor beyond its data (torch's storage header, shape and strides: 393-418 bytes
    with torch 2.x) less the placeholder's bytes: ``(first tensor, every later one)``. Measured once on 1-D
    tensors, so a count is within ~20 bytes per tensor of len(pickle.dumps(obj, protocol=5))."""
    a, b = torch.zeros(1 << 16), torch.zeros(1 << 16)
    real_one, real_two = (len(pickle.dumps(x, protocol=5)) for x in ([a], [a, b]))
    (one, _, data), (two, _, _) = _skeleton([a]), _skeleton([a, b])
    return real_one - one - data, (real_two - real_one) - (two - one) - data


def wire_bytes(obj) -> int:
    """Serialized size of an object as it crosses a process boundary (pickle protocol 5, as Ray's serializer
    uses), counted from the sizes already known: each tensor's bytes plus pickle's framing of a tensor, and
    the pickled size of everything else (a few small fields). No tensor is serialized to count it, so counting
    costs the same for a 1 GB theta0 as for a 1 kB one (tests/test_hot_path_counts.py compares it with
    len(pickle) of real payloads)."""
    size, tensors, data = _skeleton(obj)
    if not tensors:
        return size
    first, later = _framing()
    return size + data + first + later * (tensors - 1)


def step_seed(seed: int, range_index: int, round_index: int) -> int:
    """A distinct, reproducible seed per (run seed, range, round) for bucketing and Gaussian noise."""
    return (seed * 1_000_003 + range_index * 10_007 + round_index) % (2**63)


def outer_step(aggregator: AggregatorConfig | str, diloco: DilocoConfig, range_index: int, theta0: torch.Tensor,
               momentum: torch.Tensor | None, *deltas, attack: AttackConfig | None = None,
               memory: OuterMemory | None = None, round_index: int = 0, seed: int = 0, observe: bool = False,
               weights: list[float] | None = None, refused: dict[int, str] | None = None,
               updates: list | None = None):
    """Simulate the attack, aggregate the range's pseudo-gradients and apply the outer optimizer to theta0.

    Returns ``(new_theta0, new_momentum, report)``, plus the next :class:`OuterMemory` as a fourth value
    when ``memory`` is passed (pass ``OuterMemory()`` on the first round). A refused step returns
    theta0 and momentum unchanged (the very objects passed in). ``observe``: fill the report's
    ``observations`` and ``theta0_before`` for PoNW receipts. ``weights``: one per holder (its reputation,
    neuroray/training/reputation.py), for the rules that weigh their inputs (neuroray/diloco/aggregate.py).
    ``refused``: {holder index: reason} of pseudo-gradients the coordinator's checks refused before the step
    (a replayed update, neuroray/training/replays.py): observed as sent, then left out before the rule with its
    ``f`` lowered by one each (:func:`_aggregate_once`); named among the rejections, it earns nothing.
    ``diloco.sparse_broadcast=union`` (:func:`unions`): the new theta0 is :func:`apply_union` of the payloads
    the rule used, with its weights and no momentum; that update (without its ``base``) is appended to
    ``updates`` when a list is passed, for the caller to send the holders.
    """
    cfg = aggregator if isinstance(aggregator, AggregatorConfig) else AggregatorConfig(name=aggregator)
    attack = attack or AttackConfig()
    mem = memory or OuterMemory()
    seeded = step_seed(seed, range_index, round_index)
    payloads = list(deltas)
    deltas, malformed = decode_payloads(diloco, theta0.numel(), deltas)
    contributions, replay = simulate(attack, deltas, theta0.numel(), replay=mem.replay, seed=seeded)
    union = unions(diloco)
    if union and cfg.name not in UNION_RULES:  # config_checks says so at start; in-process callers hear it here
        raise ValueError(f"aggregator={cfg.name} is not a weighted sum of the payloads; sparse_broadcast=union "
                         f"needs one of {UNION_RULES}")
    if union:
        payloads = _as_sent(diloco, theta0.numel(), payloads, deltas, contributions)
    for i, reason in (refused or {}).items():
        contributions[i] = None
        malformed[i] = reason
    report = OuterReport(range_index, byzantine=list(range(byzantine_count(attack, len(deltas)))))
    if observe:  # before the attack simulation: what each holder really sent
        from neuroray.ponw.service import observe_delta, tensor_digest

        # The digest is "" under compression: the holder commits to its raw delta, the step only sees the
        # decoded payload (so it is not hashed); the norm still counts
        hashed = diloco.compression == "none"
        seen = [None if d is None else observe_delta(d) if hashed else ("", float(d.detach().double().norm()))
                for d in deltas]
        # a non-finite delta has no norm to compare: screening rejects it, the receipt says aggregated=False
        report.observations = [o if o is not None and math.isfinite(o[1]) else None for o in seen]
        report.theta0_before = tensor_digest(theta0)
        report.copies = copy_groups(deltas)
    try:
        result = _aggregate_once(cfg, contributions, theta0.numel(), report.copies, previous=mem.previous,
                                 seed=seeded, weights=weights, left_out=frozenset(refused or {}))
    except AggregationRefused as exc:
        report.refused = str(exc)
        report.rejected = [(r.index, malformed.get(r.index, r.reason)) for r in screen(contributions, theta0.numel())[1]]
        if union and updates is not None:  # the holders keep theta0 exactly: nothing to apply
            updates.append(union_update([], [], [], diloco.outer_lr))
        out = (theta0, momentum, report)
        return out + (OuterMemory(mem.previous, replay, mem.residual),) if memory is not None else out
    report.accepted = result.accepted
    report.rejected = [(r.index, malformed.get(r.index, r.reason)) for r in result.rejected]
    report.rejected += sorted((i, reason) for i, reason in (refused or {}).items())
    report.dropped = sorted(i for i, w in (result.weights or {}).items() if w == 0.0)
    if observe:  # PoNW: name the holders whose delta the rule had to neutralise, so they earn nothing for it
        from neuroray.ponw.outliers import suspects

        named = suspects(contributions, result.accepted, result.value, cfg.f - len(report.rejected),
                         copies=report.copies)
        report.rejected += named
        report.accepted = [i for i in report.accepted if i not in {i for i, _ in named}]
    if union:  # the rule's weighted sum, rebuilt from the payloads it used: what every holder will compute
        used = sorted(result.weights)
        update = union_update([payloads[i] for i in used], used, [result.weights[i] for i in used], diloco.outer_lr)
        if updates is not None:
            updates.append(update)
        out = (apply_union(theta0, update), momentum, report)
    else:
        opt = OuterOptimizer(diloco.outer_lr, diloco.outer_momentum, diloco.nesterov)
        opt.buf = None if momentum is None else momentum.clone()
        new_theta0 = opt.step(theta0, result.value.to(theta0.dtype))
        out = (new_theta0, opt.buf, report)
    previous = result.value if cfg.name == "centered_clip" else None  # only centered clipping looks back
    return out + (OuterMemory(previous, replay, mem.residual),) if memory is not None else out


def unions(diloco: DilocoConfig) -> bool:
    """The holders get the accepted sparse payloads (neuroray/diloco/union.py), not a re-sparsified update."""
    return diloco.compression == "sparse" and diloco.sparse_broadcast == "union"


def _as_sent(diloco: DilocoConfig, numel: int, payloads: list, deltas: list, contributions: list) -> list:
    """Union: the payload behind every contribution the rule will see. A simulated Byzantine holder (or an
    in-process caller's bare vector) sends its vector sparse-encoded like any holder, and the rule sees that
    payload decoded, so what the holders rebuild is exactly what the rule weighed. A vector screening will
    reject (non-finite, wrong size) stays as it is and has no payload."""
    out = list(payloads)
    for i, (c, d) in enumerate(zip(contributions, deltas)):
        if c is None or (c is d and not isinstance(payloads[i], torch.Tensor)):
            continue
        if c.dim() == 1 and c.numel() == numel and bool(torch.isfinite(c).all()):
            out[i] = encode(c, "sparse", diloco.compression_block, diloco.sparse_density)
            contributions[i] = decode(out[i])
        else:
            out[i] = None
    return out


def _aggregate_once(cfg: AggregatorConfig, contributions: list, numel: int, copies: list[list[int]],
                    left_out: frozenset[int] = frozenset(), **kw):
    """``aggregate`` with every group of copies counted once: its first member stands for it (the group's
    values are one update, so which member stands in does not change the aggregate). The rule keeps its
    ``f``: a group is not always a copier and its victim (two honest Drivers assigned one shard send the
    same update too), and with ``f`` lowered for them a real Byzantine holder would go untrimmed. When the
    distinct updates are too few for the rule's ``f``, it sees every contribution, copies included (a copy
    then weighs twice; the copier earns nothing either way).

    ``left_out``: contributions the coordinator proved bad before the rule (a replayed update): not given to the
    rule at all, and each lowers its ``f`` by one (at least 0), as a holder proven faulty by a hop recheck is left
    out. Handed to the rule as rejections instead, they would count against ``f``: with the default mean (f=0) one
    caught replayer made its range refuse its step, every round it replayed."""
    if left_out:
        cfg = dataclasses.replace(cfg, f=max(cfg.f - len(left_out), 0))
    base = [i for i in range(len(contributions)) if i not in left_out]
    extra = {i for g in copies for i in g[1:]}
    keep = [i for i in base if i not in extra]
    if len(keep) < min_inputs(cfg):
        keep = base
    if len(keep) == len(contributions):
        return aggregate(cfg, contributions, numel, **kw)
    weights = kw.pop("weights", None)
    result = aggregate(cfg, [contributions[i] for i in keep], numel, **kw,
                       weights=None if weights is None else [weights[i] for i in keep])
    back = lambda i: keep[i]  # noqa: E731
    result.accepted = sorted(map(back, result.accepted))
    for r in result.rejected:
        r.index = back(r.index)
    if result.weights is not None:
        result.weights = {back(i): w for i, w in result.weights.items()}
    return result


def _streamed_step(aggregator, attack, diloco, range_index, round_index, seed, part, theta0, momentum, memory, deltas,
                   weights=None):
    """One streaming fragment's outer step: slice ``part`` of theta0, momentum and memory goes through
    :func:`outer_step`; the rest of the range is left as it is. The fragment's update always crosses as
    an update (fp32 when compression is none), since holders keep their own weights outside the slice."""
    lo, hi = part
    union = [] if unions(diloco) else None
    new_part, momentum_part, report, memory_part = outer_step(
        aggregator, diloco, range_index, theta0[lo:hi], None if momentum is None else momentum[lo:hi], *deltas,
        attack=attack, memory=memory.part(lo, hi), round_index=round_index, seed=seed, weights=weights, updates=union)
    if union is not None:  # the fragment's payloads; new_part is already what the holders rebuild from them
        update = {"base": digest(theta0), **union[0], "slice": tuple(part)}
    else:
        update, new_part, memory_part.residual = encode_update(
            theta0[lo:hi], new_part, diloco.compression, diloco.compression_block, memory_part.residual,
            base=theta0, part=part, density=diloco.sparse_density)
    new_theta0 = theta0.clone()
    new_theta0[lo:hi] = new_part
    if momentum_part is not None:  # zeros elsewhere: a fragment's first outer step sees buf = delta, as unstreamed
        momentum = torch.zeros_like(theta0) if momentum is None else momentum.clone()
        momentum[lo:hi] = momentum_part
    return new_theta0, momentum, report, memory.merged(memory_part, lo, hi, theta0.numel()), update


def run_outer_step(aggregator, attack, diloco, range_index, round_index, seed, theta0, momentum, memory_box, *deltas,
                   part=None, weights=None, refused=None):
    """One range's outer step as :class:`OuterSync` submits it, in whatever Ray process runs it (the range's
    :class:`OuterStepActor`, or a fresh :func:`outer_step_task`). Returns ``(theta0, momentum, report, memory,
    update)``; a pure function of its arguments, so a call Ray re-runs after a crash returns the same values."""
    # The memory comes boxed in a list so that Ray does not resolve it: if it cannot be had (the call
    # that produced it failed, or the object was lost), the rule simply starts its memory afresh instead
    # of failing this round too. The trainer rolls it back with theta0 when it redoes a failed round.
    memory = OuterMemory()
    if memory_box[0] is not None:
        try:
            memory = ray.get(memory_box[0])
        except Exception as exc:  # noqa: BLE001 - any failure of the producing call
            log.warning("range %d: outer-step memory lost (%s); starting it afresh", range_index, type(exc).__name__)
    update = None
    if part is not None:  # streaming: one fragment of the range, always sent as an update
        new_theta0, new_momentum, report, memory, update = _streamed_step(
            aggregator, attack, diloco, range_index, round_index, seed, part, theta0, momentum, memory, deltas, weights)
    else:
        union = [] if unions(diloco) else None
        new_theta0, new_momentum, report, memory = outer_step(
            aggregator, diloco, range_index, theta0, momentum, *deltas, attack=attack, memory=memory,
            round_index=round_index, seed=seed, observe=True, weights=weights, refused=refused, updates=union)
        if union is not None:  # the accepted payloads; new_theta0 is already what the holders rebuild from them
            update = {"base": report.theta0_before, **union[0]}
        elif diloco.compression != "none":
            # The holders get the compressed update; theta0 becomes exactly what they will compute from it.
            update, new_theta0, memory.residual = encode_update(theta0, new_theta0, diloco.compression,
                                                                diloco.compression_block, memory.residual,
                                                                density=diloco.sparse_density,
                                                                base_digest=report.theta0_before)
    if part is None:
        from neuroray.ponw.service import tensor_digest

        report.theta0_after = tensor_digest(new_theta0)
    if update is not None:
        report.update_bytes = wire_bytes(update)
    # Measured here, on the values themselves: the owner's object-store size of a task's return is
    # only filled in asynchronously, after the driver has already seen the round finish.
    report.payload_bytes = [wire_bytes(d) for d in deltas]
    report.theta0_bytes = wire_bytes(new_theta0)  # streaming: fetched only by a holder that falls back
    return new_theta0, new_momentum, report, memory, update


# num_cpus=0: the holders may occupy every CPU; an outer step must still be schedulable.
@ray.remote(num_cpus=0, num_returns=5)
def outer_step_task(*args, **kwargs):
    """diloco.outer_step_in=task: a fresh Ray task per range each round. Ray may start a new worker for it
    (importing torch: 1-2 s before the step can begin, docs/lab.md); kept to measure that difference."""
    return run_outer_step(*args, **kwargs)


class OuterStepActor:
    """diloco.outer_step_in=actor: one long-lived process per layer range (neuroray/diloco/outer_actors.py
    starts, places and replaces it) that runs every round's outer step of its range. It keeps no state of
    its own: the outer state stays in the object store, owned by :class:`OuterSync`, so the values are the
    task's, bit for bit."""

    @ray.method(num_returns=5)
    def step(self, *args, **kwargs):
        return run_outer_step(*args, **kwargs)


@dataclass
class ReducedInputs:
    """What one range's outer step was given (object refs): enough to replay what its rule saw."""

    theta0: object  # the theta0 the round started from
    memory: object  # the rule's memory before the step (the stale attack's replay), or None
    round_index: int
    who: list[int]  # the replica index of each pseudo-gradient
    deltas: list  # the holders' payload refs, in that order
    part: tuple[int, int] | None  # streaming: the fragment's slice


class OuterSync:
    """Driver-side owner of every range's theta0, momentum and aggregation memory (as object refs).

    ``theta0``, ``momentum``, ``memory`` and ``rounds`` are public: the trainer snapshots and rolls them back.
    """

    def __init__(self, holders_by_range: list[list], diloco: DilocoConfig, aggregator: AggregatorConfig | str,
                 attack: AttackConfig | None = None, seed: int = 0, node_id: str = "", name_prefix: str = ""):
        """``node_id``: the Ray node to run the outer-step actors on ("": the driver's; neuroray/diloco/outer_actors.py);
        ``name_prefix``: their actor names' (``<prefix>outer-s<range>``; "": unnamed)."""
        self.holders_by_range, self.diloco = holders_by_range, diloco
        self.aggregator = aggregator if isinstance(aggregator, AggregatorConfig) else AggregatorConfig(name=aggregator)
        self.attack, self.seed = attack or AttackConfig(), seed
        # Holders start from the same seeded init, so the first holder's weights are every holder's theta0.
        self.theta0 = [holders[0].flat_params.remote() for holders in holders_by_range]
        self.momentum: list = [None] * len(holders_by_range)
        self.memory: list = [None] * len(holders_by_range)
        self.rounds = 0
        self.fragments = diloco.streaming_fragments
        self.slices: list | None = None  # streaming: per range, each fragment's (lo, hi); None: ask the holders
        self._round: list[dict] = []  # per range of the round in flight: dense broadcast?, holders' load refs
        # Reputation (neuroray/training/reputation.py): weights_of(range, holder indices) -> one aggregation
        # weight per pseudo-gradient, or None; and what each range's last step reduced, to score it.
        self.weights_of = None
        self.reduced: dict[int, ReducedInputs] = {}
        self.keep_inputs = False  # keep ``reduced`` without reputation too (naming copiers: training/copies.py)
        # (range, replica indices, their pseudo-gradient refs, every range's round-start theta0 refs) -> {index:
        # reason} of the ones to refuse before the rule sees them (replayed updates: training/replays.py), or None
        self.vet = None
        self.round_theta0: list = list(self.theta0)  # every range's theta0 as the round in flight started
        # diloco.outer_step_in=actor: each range's steps run in one long-lived actor (None: a task each round)
        self.actors = None
        if diloco.outer_step_in == "actor":
            from neuroray.diloco.outer_actors import RangeActors

            self.actors = RangeActors(OuterStepActor, len(holders_by_range), node_id, name_prefix)

    def begin_round(self) -> None:
        """Start counting a new round's bytes (:meth:`submit` does it; swarm routing calls it itself)."""
        self._round = []
        self.round_theta0 = list(self.theta0)

    def fragment_slices(self) -> list[list[tuple[int, int]]]:
        """Per range, the flat-vector slice of every streaming fragment, as the range's holders cut it
        (asked once; an architecture upgrade resets ``slices``, since grown ranges are cut anew)."""
        if self.slices is None:
            self.slices = ray.get([holders[0].fragment_slices.remote() for holders in self.holders_by_range])
        return self.slices

    def submit(self, fragment: int | None = None, exclude: frozenset[int] = frozenset(),
               left_out: frozenset[tuple[int, int]] = frozenset()) -> tuple[list, list]:
        """Submit one outer step for every range (streaming: of fragment ``fragment`` of every range);
        returns (report refs, holder load refs). ``exclude``: replicas whose pseudo-gradients are asked for
        (their holders end the round as every other) but left out of the step because one of their holders sent a
        rejected hop (that holder is one of the ``f`` each rule tolerates, in every range: its hops poisoned the
        whole replica's work, so ``f`` is lowered by one per excluded replica); ``left_out``: the same for single
        holders, as ``(range, replica)``, proven faulty (a failed hop recheck): each one left out of a range is one
        of the ``f`` faulty holders its rule tolerates, so the rule runs with ``f`` less by as many (as screening
        does with the contributions it rejects). A report's holder indices index the replicas left in, in order."""
        reports, loads = [], []
        self.begin_round()
        streamed = fragment is not None and self.fragments > 1
        asked = {"fragment": fragment} if streamed else {}
        for s, holders in enumerate(self.holders_by_range):
            part = self.fragment_slices()[s][fragment] if streamed else None
            deltas = [h.pseudo_gradient.remote(**asked) for h in holders]
            kept = [r for r in range(len(deltas)) if r not in exclude and (s, r) not in left_out]
            # an excluded replica had a hop rejected: one proven-faulty holder whose hops reached every range of it
            faulty = len(set(exclude)) + sum(1 for r in range(len(deltas)) if (s, r) in left_out and r not in exclude)
            theta0, report, update = self.reduce(s, [deltas[r] for r in kept], part, who=kept, faulty_out=faulty)
            reports.append(report)
            loads += [self.broadcast(s, h, theta0, update) for h in holders]
        self.rounds += 1
        return reports, loads

    def reduce(self, s: int, deltas: list, part: tuple[int, int] | None = None, who: list[int] | None = None,
               faulty_out: int = 0):
        """Submit range ``s``'s outer step over these pseudo-gradient refs; returns (theta0, report, update) refs.
        ``part``: streaming, the fragment's slice of the range. ``who``: the replica index of each
        pseudo-gradient (default: 0, 1, ...). ``faulty_out``: faulty holders already left out (the rule's ``f``
        is lowered by as many).

        Swarm routing calls it with the quorum that answered in time (then bumps ``rounds`` itself)."""
        who = list(range(len(deltas))) if who is None else list(who)
        weights = None if self.weights_of is None else self.weights_of(s, who)
        if self.weights_of is not None or self.keep_inputs:  # kept for the scores until the next round replaces them
            self.reduced[s] = ReducedInputs(self.theta0[s], self.memory[s], self.rounds, who, list(deltas), part)
        rule = self.aggregator
        if faulty_out:
            rule = dataclasses.replace(rule, f=max(rule.f - faulty_out, 0))
        refused = (self.vet(s, who, list(deltas), self.round_theta0) if self.vet is not None and part is None
                   else None)
        step = outer_step_task if self.actors is None else self.actors.for_range(s).step
        theta0, momentum, report, memory, update = step.remote(
            rule, self.attack, self.diloco, s, self.rounds, self.seed,
            self.theta0[s], self.momentum[s], [self.memory[s]], *deltas, part=part, weights=weights,
            refused=refused or None)
        if self.actors is not None:
            self.actors.called(s, report)
        self.theta0[s], self.momentum[s], self.memory[s] = theta0, momentum, memory
        self._round.append({"dense": self._dense, "acks": []})
        return theta0, report, update

    def broadcast(self, s: int, holder, theta0, update, after=None, counted: bool = True,
                  landing: int | None = None):
        """Send range ``s``'s new theta0 to one holder: dense, or as the compressed update. Returns its ack.

        ``counted``: the ack's value goes to :meth:`measure` (swarm routing leaves out late holders).
        ``landing`` (diloco.overlap): the round it lands as; the holder keeps its progress since the round's end."""
        extra = {} if after is None else {"after": after}
        if landing is not None:
            ack = holder.land_outer.remote(landing, theta0 if self._dense else update, [theta0], **extra)
        elif self._dense:
            ack = holder.load_theta0.remote(theta0, **extra)
        else:
            ack = holder.apply_update.remote(update, [theta0], **extra)
        if counted:
            self._round[s]["acks"].append(ack)
        return ack

    def close(self) -> None:
        """Kill the ranges' outer-step actors (the outer state stays in the object store while referenced)."""
        if self.actors is not None:
            self.actors.close()

    @property
    def _dense(self) -> bool:
        """Holders get the dense theta0 (uncompressed, whole ranges); else the outer update."""
        return self.diloco.compression == "none" and self.fragments == 1

    def measure(self, report_values: list, load_values: list) -> dict:
        """Bytes that crossed in the round just finished (serialized sizes measured, never a formula).

        ``payload_bytes``: every holder's pseudo-gradient payload (holder -> outer step). ``broadcast_bytes``:
        what every holder fetched back (the dense theta0, or the compressed update plus the dense theta0
        for any holder that had to fall back). ``sync_bytes`` is their sum. ``control_bytes``: the outer
        reports and the holders' acknowledgements (the trainer adds the proofs). Pass the values of the
        report and load refs that :meth:`submit` returned.
        """
        assert len(report_values) == len(self._round), "measure() the round submit() made"
        out = {"round": self.rounds, "payload_bytes": 0, "broadcast_bytes": 0, "control_bytes": 0}
        values = iter(load_values)
        for r, report in zip(self._round, report_values):
            out["payload_bytes"] += sum(report.payload_bytes)
            for _ in r["acks"]:
                fell_back = next(values)  # apply_update: True when the holder fetched the dense theta0
                out["broadcast_bytes"] += report.update_bytes
                if r["dense"] or fell_back:
                    out["broadcast_bytes"] += report.theta0_bytes
                out["control_bytes"] += wire_bytes(fell_back)
            out["control_bytes"] += wire_bytes(report)
        out["sync_bytes"] = out["payload_bytes"] + out["broadcast_bytes"]
        return out
