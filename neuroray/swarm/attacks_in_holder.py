"""Holders that really misbehave: attacks that run inside a stage holder's own process, with its own keys.

Only tests, benchmarks and ``attack.where=holder`` install these classes (``run(cfg, holder_cls=...)``);
the production :class:`~neuroray.swarm.holder.StageHolder` has no hook for them. :func:`misbehaving` makes a
holder class whose chosen slots cheat; :func:`holder_attack_class` makes the one ``attack.where=holder``
runs (the first ``attack.fraction`` of the replicas, every stage, as the reduce-task attacks choose).

What a cheating holder can touch is what crosses its process boundary (docs/ponw.md, "Holders that
misbehave"):

* its accounting: a Driver that commits losses it did not compute (``lie_loss``), proofs that claim more
  microbatches than it did (``inflate_batches``);
* its pseudo-gradient, which it commits to in its proof: scaled, sign-flipped, zero, replayed from the
  previous round (``stale_delta``), or copied from another holder of its range (``copy``);
* the hops it sends: activations forward (``tamper_activations``) or gradients back (``tamper_gradients``),
  scaled and/or noised; or it skips the compute and sends zeros or the previous microbatch's output
  (``lazy_zero``, ``lazy_stale``), still counting the microbatches as done;
* its data: a Driver that trains on another part of the shard ring than it was assigned (``wrong_data``),
  while its stream's position (what its proofs commit) advances as if it had not;
* its speed: every compute call stretched (``slow_walk``, :class:`~neuroray.swarm.faults.SlowedClock`), and
  hidden from its own busy clock (``slow_walk_hidden``: the clock records only the real compute).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from neuroray.config import AttackConfig
from neuroray.diloco.attacks import byzantine_count
from neuroray.swarm.compute import RangeCompute
from neuroray.swarm.faults import FaultyStageHolder
from neuroray.swarm.holder import HolderSpec
from neuroray.swarm.proving import RoundProving

HOLDER_ATTACKS = {
    "lie_loss": "Driver: commits its round's losses x value (losses it did not compute)",
    "inflate_batches": "its proofs claim value more microbatches than it did",
    "scale_delta": "sends value x its pseudo-gradient",
    "sign_flip": "sends minus its pseudo-gradient",
    "zero_delta": "sends a zero pseudo-gradient (a free rider)",
    "stale_delta": "replays its previous round's pseudo-gradient (zeros on the first round)",
    "copy": "sends replica value's pseudo-gradient of its range as its own (read from that holder's named actor)",
    "tamper_activations": "the activation it forwards becomes value x it + std x its RMS x N(0, 1)",
    "tamper_gradients": "the gradient it sends back becomes value x it + std x its RMS x N(0, 1)",
    "lazy_zero": "skips forward and backward: sends zeros (the last range: loss ln V), counts the microbatch",
    "lazy_stale": "skips forward and backward: resends its previous microbatch's output, counts the microbatch",
    "wrong_data": "Driver: trains on the shard ring value shards further on (another node's data)",
    "slow_walk": "every compute call takes value x as long",
    "slow_walk_hidden": "every compute call takes value x as long; its own busy clock records only the real compute",
}
# attack.name (where=holder, neuroray/diloco/attacks.py HOLDER_SIDE) -> the holder attack it runs
FROM_CONFIG = {"sign_flip": "sign_flip", "scaled": "scale_delta", "zero": "zero_delta", "stale": "stale_delta",
               "replay": "stale_delta", "copy": "copy", "tamper_activations": "tamper_activations",
               "tamper_gradients": "tamper_gradients", "lazy_zero": "lazy_zero", "lazy_stale": "lazy_stale",
               "wrong_data": "wrong_data", "slow_walk": "slow_walk", "slow_walk_hidden": "slow_walk_hidden",
               "lie_loss": "lie_loss",
               "inflate_batches": "inflate_batches"}


@dataclass(frozen=True)
class HolderAttack:
    """One slot's attack: what, its size (``value``), the first round it cheats in, the noise of a tamper."""

    name: str = "none"
    value: float = 0.0
    from_round: int = 1
    std: float = 0.0


class InflatedProving(RoundProving):
    """Signs proofs that claim ``extra`` more microbatches per round than the holder did."""

    def __init__(self, extra: int):
        super().__init__()
        self.extra = extra

    def finish_round(self, outer_round: int, theta0: torch.Tensor, microbatches_done: int, name: str) -> None:
        super().finish_round(outer_round, theta0, microbatches_done + self.extra, name)


class CheatingCompute(RangeCompute):
    """The range's compute with the hop and data attacks. A holder's compute object becomes one in place
    (:meth:`install`): the holder's other parts keep their reference to it, and StageHolder needs no hook."""

    attack: HolderAttack
    cheating: object  # () -> bool: is the attack on in the round in flight

    @classmethod
    def install(cls, compute: RangeCompute, attack: HolderAttack, cheating) -> CheatingCompute:
        compute.__class__ = cls
        compute.attack, compute.cheating = attack, cheating
        compute._last = {}  # lazy_stale: direction -> the last tensor really computed and sent
        compute._noise = torch.Generator().manual_seed(1_000_003 * compute.spec.seed + compute.spec.replica)
        compute._other = None  # wrong_data: the stream it really reads
        if attack.name == "wrong_data":
            if compute.stream is None:
                raise ValueError(f"{compute.name}: wrong_data needs a Driver with a data stream")
            if len(compute.stream.ring) < 2:
                raise ValueError(f"{compute.name}: wrong_data needs at least 2 training shards to read another one")
        return compute

    def _on(self, *names: str) -> bool:
        return self.attack.name in names and self.cheating()

    # ----- hops -------------------------------------------------------------------------------
    def _send(self, t: torch.Tensor | None, direction: str):
        if t is not None and self._on({"fwd": "tamper_activations", "bwd": "tamper_gradients"}[direction]):
            t = self._tamper(t)
        if t is not None and self.attack.name == "lazy_stale":  # fakes bypass this method: t was computed
            self._last[direction] = t.detach().clone()
        return super()._send(t, direction)

    def _tamper(self, t: torch.Tensor) -> torch.Tensor:
        a = self.attack
        out = t.float() * a.value
        if a.std > 0:
            rms = t.float().pow(2).mean().sqrt()
            out = out + a.std * rms * torch.randn(t.shape, generator=self._noise).to(t.device)
        return out.to(t.dtype)

    def _fake(self, direction: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """What a lazy holder sends instead of computing; None: lazy_stale has nothing of this shape yet."""
        if self.attack.name == "lazy_zero":
            return torch.zeros(shape, dtype=dtype, device=self.device)
        last = self._last.get(direction)
        return last if last is not None and tuple(last.shape) == tuple(shape) else None

    def _act_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.amp == torch.bfloat16 else torch.float32

    def forward(self, mb_id: int, x, attempt: int = 0):
        if not self._on("lazy_zero", "lazy_stale"):
            return super().forward(mb_id, x, attempt)
        x_in = self._receive_input(x)
        fake = self._fake("fwd", (*x_in.shape[:2], self.spec.model.d_model), self._act_dtype())
        if fake is None:  # nothing to resend yet: compute this one
            return super().forward(mb_id, x, attempt)
        if not self.claims.claim(mb_id, "f", attempt):
            return None
        return super()._send(fake, "fwd")

    def forward_backward(self, mb_id: int, x, labels, scale: float, attempt: int = 0):
        if self._on("lazy_zero", "lazy_stale"):
            x_in = self._receive_input(x)
            shape = None if x_in is None or self.module.has_embedding else tuple(x_in.shape)
            fake = None if shape is None else self._fake("bwd", shape, torch.float32)
            loss = math.log(self.spec.vocab_size) if self.attack.name == "lazy_zero" else self._last.get("loss")
            if loss is not None and (shape is None or fake is not None):
                if not self.claims.claim(mb_id, "b", attempt):
                    return None, None
                self._count_microbatch()
                return loss, super()._send(fake, "bwd")
        # honest, or lazy_stale with nothing to resend yet
        loss, g = super().forward_backward(mb_id, x, labels, scale, attempt)
        if loss is not None:
            self._last["loss"] = loss
        return loss, g

    def backward(self, mb_id: int, grad, attempt: int = 0):
        if not self._on("lazy_zero", "lazy_stale"):
            return super().backward(mb_id, grad, attempt)
        return self._lazy_backward(mb_id, grad, attempt,
                                   lambda: super(CheatingCompute, self).backward(mb_id, grad, attempt))

    def recompute_backward(self, mb_id: int, x, grad, attempt: int = 0):
        if not self._on("lazy_zero", "lazy_stale"):
            return super().recompute_backward(mb_id, x, grad, attempt)
        return self._lazy_backward(mb_id, grad, attempt,
                                   lambda: super(CheatingCompute, self).recompute_backward(mb_id, x, grad, attempt))

    def _lazy_backward(self, mb_id: int, grad, attempt: int, honest):
        g = self._receive(grad, "bwd", mb_id)
        fake = None if self.module.has_embedding else self._fake("bwd", tuple(g.shape), torch.float32)
        if not self.module.has_embedding and fake is None:
            if mb_id in self.pending:  # its forward ran: compute this one, so there is something to resend
                return honest()
            fake = torch.zeros(g.shape, device=self.device)
        if not self.claims.claim(mb_id, "b", attempt):
            return None, False
        self.pending.pop(mb_id, None)
        self._count_microbatch()
        return super()._send(fake, "bwd"), True

    # ----- data (Driver) ----------------------------------------------------------------------
    def _other_stream(self):
        if self._other is None:
            from neuroray.genesis import TokenStream

            s = self.stream
            self._other = TokenStream(s.root, s.manifest, s.node_id, s.seq_len, s.microbatch_size,
                                      _start=s.start_index + max(int(self.attack.value), 1))
        return self._other

    def next_batch(self):
        if not self._on("wrong_data"):
            return super().next_batch()
        position = self.stream.position
        super().next_batch()  # its own stream advances as if it had read it: that is what its proofs commit
        other = self._other_stream()
        other.seek(position)
        return other.next_microbatch()

    def batch_at(self, position: int):
        if not self._on("wrong_data"):
            return super().batch_at(position)
        super().batch_at(position)
        with self.lock:
            other = self._other_stream()
            other.seek(position)
            return other.next_microbatch()


class MisbehavingHolder(FaultyStageHolder):
    """A holder whose slot (``r<replica>-s<stage>``) in ``ATTACKS``, or whose replica in ``REPLICAS``, cheats
    from the attack's ``from_round`` on (:class:`HolderAttack`, :data:`HOLDER_ATTACKS`). Other holders are
    honest. Make one with :func:`misbehaving` or :func:`holder_attack_class`."""

    ATTACKS: dict[str, HolderAttack] = {}
    REPLICAS: dict[int, HolderAttack] = {}

    def __init__(self, spec: HolderSpec):
        super().__init__(spec)
        self.attack = self.ATTACKS.get(spec.slot) or self.REPLICAS.get(spec.replica) or HolderAttack()
        self._previous: torch.Tensor | None = None
        self._peer_weights = None  # copy: a ref (in process: a tensor) of the copied holder's weights
        self.peer = None  # copy: that holder (found by its actor name on first use; tests set it in process)
        CheatingCompute.install(self.compute, self.attack, self._cheating)
        if self.attack.name == "inflate_batches":
            inflated = InflatedProving(int(self.attack.value))
            inflated.__dict__.update({k: v for k, v in self.proving.__dict__.items() if k != "extra"})
            self.proving = inflated
        self._pace()

    def _cheating(self) -> bool:
        # called while round outer_rounds + 1 is in flight (its outer step has not loaded theta0 yet)
        return self.attack.name != "none" and self.outer.outer_rounds + 1 >= self.attack.from_round

    def _pace(self) -> None:
        if self.attack.name in ("slow_walk", "slow_walk_hidden"):
            self.clock.factor = self.attack.value if self._cheating() else 1.0
            self.clock.hidden = self.attack.name == "slow_walk_hidden"

    def step(self, mean: bool = False, after=None, lr: float | None = None) -> float:
        self._pace()
        norm = super().step(mean, after, lr)
        if self.attack.name == "copy" and self._cheating():
            # ask for the peer's weights now, behind its own step of this inner step and before its
            # pseudo_gradient: waiting for them at the outer step could queue behind its next theta0
            self._peer_weights = self._fetch_peer()
        return norm

    def _fetch_peer(self):
        if self.peer is None:
            import ray

            me = ray.get_runtime_context().get_actor_name()
            if not me or not me.endswith(self.spec.slot):
                raise RuntimeError(f"{self.name}: copy needs named holder actors (run() names them)")
            self.peer = ray.get_actor(f"{me[: -len(self.spec.slot)]}r{int(self.attack.value)}-s{self.spec.stage}")
        remote = getattr(self.peer.flat_params, "remote", None)
        return remote() if remote is not None else self.peer.flat_params()

    def set_theta0_losses(self, losses: list[float], data_position: int | None = None) -> None:
        if self.attack.name == "lie_loss" and self._cheating():
            losses = [x * self.attack.value for x in losses]
        super().set_theta0_losses(losses, data_position)

    def pseudo_gradient(self, after=None, fragment: int | None = None) -> dict[str, torch.Tensor]:
        delta, lo = self.outer.delta(fragment)
        true = delta.clone()
        if self._cheating():
            name = self.attack.name
            if name == "scale_delta":
                delta = delta * self.attack.value
            elif name == "sign_flip":
                delta = -delta
            elif name == "zero_delta":
                delta = torch.zeros_like(delta)
            elif name == "stale_delta":
                delta = self._previous if self._previous is not None else torch.zeros_like(delta)
            elif name == "copy" and self._peer_weights is not None:
                peer = self._peer_weights
                if not isinstance(peer, torch.Tensor):
                    import ray

                    peer = ray.get(peer)
                delta = (self.outer.theta0 - peer)[lo:lo + delta.numel()].clone()
        self._previous = true
        self.proving.note_pseudo_gradient(delta)  # it commits to what it sends: its digest matches the receipt
        return self.outer.compress(delta, lo)


def _attack(spec: tuple | HolderAttack) -> HolderAttack:
    if isinstance(spec, HolderAttack):
        a = spec
    else:
        name, value, *rest = spec
        a = HolderAttack(name, float(value), int(rest[0]) if rest else 1, float(rest[1]) if len(rest) > 1 else 0.0)
    if a.name not in HOLDER_ATTACKS:
        raise ValueError(f"holder attack {a.name!r} is unknown; choose one of {sorted(HOLDER_ATTACKS)}")
    return a


def misbehaving(attacks: dict[str, tuple | HolderAttack],
                replicas: dict[int, tuple | HolderAttack] | None = None) -> type:
    """A :class:`MisbehavingHolder` class for ``run(cfg, holder_cls=...)``: ``{"r1-s0": ("lie_loss", 0.5)}``,
    optionally with a third item, the first round it cheats in (default 1), and a fourth, a tamper's noise.
    ``replicas``: the same, for every stage of those replicas."""
    return type("MisbehavingHolder", (MisbehavingHolder,), {
        "ATTACKS": {slot: _attack(a) for slot, a in attacks.items()},
        "REPLICAS": {int(r): _attack(a) for r, a in (replicas or {}).items()}})


def holder_attack_class(attack: AttackConfig, replicas: int) -> type | None:
    """``attack.where=holder``: the holder class in which the first ``attack.fraction`` of the replicas run
    ``attack.name`` in every stage; None when nothing attacks (or the reduce task simulates it)."""
    b = byzantine_count(attack, replicas)
    if attack.where != "holder" or b == 0:
        return None
    name = FROM_CONFIG[attack.name]
    value = {"copy": b, "wrong_data": 1, "sign_flip": 1, "zero_delta": 0, "stale_delta": 0, "lazy_zero": 0,
             "lazy_stale": 0}.get(name, attack.scale)
    std = attack.std if name.startswith("tamper_") else 0.0
    return misbehaving({}, {r: HolderAttack(name, float(value), 1, std) for r in range(b)})
