"""Simulated Byzantine holders, for measuring how the aggregators hold up (``attack=<name>``).

This module simulates them in the reduce task (``attack.where=reduce``); with ``attack.where=holder`` the
chosen holders cheat inside their own processes instead (:data:`HOLDER_SIDE`,
neuroray/swarm/attacks_in_holder.py), and the reduce task simulates nothing (:func:`reduce_side`).

In every layer range the first ``b = floor(fraction * n + 1/2)`` of the n holders are Byzantine.
Each trains honestly (so it knows its own true pseudo-gradient ``x_i``) and then sends the attack's
vector instead. The attackers are omniscient: they also know every true pseudo-gradient of the range,
whose per-coordinate mean and (sample) standard deviation are ``mu`` and ``sigma``. The attacks:

``none``       nothing is replaced.
``sign_flip``  ``-x_i``.
``scaled``     ``scale * x_i`` (1e6 by default).
``gaussian``   fresh ``N(0, std^2)`` noise per coordinate.
``alie``       "A Little Is Enough" (Baruch et al., 2019): ``mu - z * sigma`` from every attacker. With
               ``z: null`` the paper's ``z_max = Phi^-1((n - s) / n)``, ``s = floor(n/2 + 1) - b`` (the
               probability is kept inside [1/(2n), 1 - 1/(2n)] so z stays finite).
``ipm``        inner-product manipulation (Xie et al., 2020): ``-epsilon * mu`` from every attacker.
``mimic``      every attacker sends a copy of one honest holder's pseudo-gradient: the honest one
               farthest from ``mu`` (the most atypical, which over-weights its data; Karimireddy et
               al., 2022 pick the direction of largest variance, the farthest point is a cheap proxy).
``zero``       free-rider: all zeros (claims the work, contributes nothing).
``stale``      replay: the holder's own true pseudo-gradient of the previous round (zeros on the first
               round: there is nothing to replay yet).
``nan``        all NaN; screening must reject it.

Everything is deterministic given ``seed`` (the Gaussian noise is the only randomness).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import torch

from neuroray.config import AttackConfig

ATTACKS = ("none", "sign_flip", "scaled", "gaussian", "alie", "ipm", "mimic", "zero", "stale", "nan")
# attack.where=holder: the attacks a holder runs inside its own process (neuroray/swarm/attacks_in_holder.py).
# The omniscient ones (gaussian, alie, ipm, mimic, nan) need every holder's vector and stay in the reduce task.
HOLDER_SIDE = ("none", "sign_flip", "scaled", "zero", "stale", "replay", "tamper_activations", "tamper_gradients",
               "lazy_zero", "lazy_stale", "copy", "wrong_data", "slow_walk", "slow_walk_hidden", "lie_loss",
               "inflate_batches")
WHERE = ("reduce", "holder")


def attack_problem(cfg: AttackConfig, replicas: int | None = None) -> str | None:
    """What is wrong with an attack config (with ``replicas`` holders per range, when known), or None."""
    if cfg.where not in WHERE:
        return f"attack.where={cfg.where!r} is unknown; choose one of {list(WHERE)}"
    if cfg.where == "reduce" and cfg.name not in ATTACKS:
        if cfg.name in HOLDER_SIDE:
            return f"attack={cfg.name} runs inside holders only; add attack.where=holder"
        return f"attack={cfg.name!r} is unknown; choose one of {list(ATTACKS)}"
    if cfg.where == "holder" and cfg.name not in HOLDER_SIDE:
        if cfg.name in ATTACKS:
            return f"attack={cfg.name} is simulated in the reduce task only; use attack.where=reduce"
        return f"attack={cfg.name!r} is unknown; choose one of {list(HOLDER_SIDE)}"
    if cfg.name == "copy" and replicas is not None and byzantine_count(cfg, replicas) >= replicas:
        return f"attack=copy with attack.fraction={cfg.fraction} leaves no honest holder to copy; lower it"
    if cfg.where == "holder" and cfg.name in ("slow_walk", "slow_walk_hidden") and cfg.scale < 1:
        return f"attack={cfg.name} stretches compute by attack.scale={cfg.scale}; it must be >= 1"
    if not 0.0 <= cfg.fraction <= 1.0:
        return f"attack.fraction={cfg.fraction} must be in [0, 1]"
    if cfg.std < 0:
        return f"attack.std={cfg.std} must be >= 0"
    if not (math.isfinite(cfg.scale) and math.isfinite(cfg.epsilon) and (cfg.z is None or math.isfinite(cfg.z))):
        return "attack.scale, attack.epsilon and attack.z must be finite"
    return None


def reduce_side(cfg: AttackConfig) -> AttackConfig:
    """The attack the reduce task simulates: none when the holders themselves attack (attack.where=holder)."""
    return cfg if cfg.where == "reduce" else AttackConfig()


def byzantine_count(cfg: AttackConfig, n: int) -> int:
    """How many of n holders are Byzantine: ``floor(fraction * n + 1/2)`` (0 for ``attack=none``)."""
    if cfg.name == "none":
        return 0
    return min(n, int(math.floor(cfg.fraction * n + 0.5)))


def alie_z(n: int, b: int) -> float:
    """The paper's ``z_max = Phi^-1((n - s) / n)`` with ``s = floor(n/2 + 1) - b`` supporters needed."""
    s = math.floor(n / 2 + 1) - b
    p = min(max((n - s) / n, 0.5 / n), 1 - 0.5 / n)
    return NormalDist().inv_cdf(p)


def _usable(x, numel: int) -> bool:
    return (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.dim() == 1 and x.numel() == numel
            and bool(torch.isfinite(x).all()))


def _mean_std(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    stack = torch.stack(xs).to(torch.float64)
    std = stack.std(0) if len(xs) > 1 else torch.zeros_like(stack[0])
    return stack.mean(0), std


def simulate(cfg: AttackConfig, deltas: Sequence, numel: int, *, replay: Sequence | None = None,
             seed: int = 0) -> tuple[list, list]:
    """Replace the Byzantine holders' pseudo-gradients by the attack's vectors.

    ``deltas``: the true pseudo-gradient of every holder of the range, in holder order. ``replay``:
    what :func:`simulate` returned as its second value last round (``stale`` needs it). Returns
    ``(contributions, replay_next)``: what the aggregator receives, and the Byzantine holders' true
    pseudo-gradients to carry into the next round (empty unless the attack is ``stale``).
    """
    out = list(deltas)
    b = byzantine_count(cfg, len(out))
    if b == 0:
        return out, []
    true = [x for x in out if _usable(x, numel)]
    honest = [x for x in out[b:] if _usable(x, numel)]
    name = cfg.name
    if name in ("alie", "ipm", "mimic") and not true:
        fake = [torch.zeros(numel) for _ in range(b)]  # nothing to be omniscient about
    elif name == "sign_flip":
        fake = [-x if _usable(x, numel) else x for x in out[:b]]
    elif name == "scaled":
        fake = [x * cfg.scale if _usable(x, numel) else x for x in out[:b]]
    elif name == "gaussian":
        g = torch.Generator().manual_seed(seed)
        fake = [torch.randn(numel, generator=g) * cfg.std for _ in range(b)]
    elif name == "alie":
        mu, sigma = _mean_std(true)
        z = alie_z(len(out), b) if cfg.z is None else cfg.z
        fake = [(mu - z * sigma).float()] * b
    elif name == "ipm":
        mu, _ = _mean_std(true)
        fake = [(-cfg.epsilon * mu).float()] * b
    elif name == "mimic":
        mu, _ = _mean_std(true)
        pool = honest or true
        dist = torch.stack([(x.to(torch.float64) - mu).norm() for x in pool])
        fake = [pool[int(dist.argmax())].clone()] * b
    elif name == "zero":
        fake = [torch.zeros(numel) for _ in range(b)]
    elif name == "stale":
        old = list(replay or [])
        fake = [old[i] if i < len(old) and _usable(old[i], numel) else torch.zeros(numel) for i in range(b)]
    else:
        assert name == "nan", name
        fake = [torch.full((numel,), math.nan) for _ in range(b)]
    replay_next = [x for x in out[:b]] if name == "stale" else []
    out[:b] = fake
    return out, replay_next
