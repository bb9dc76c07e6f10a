"""Robust reducers that turn the pseudo-gradients of one layer range into one.

Every contribution is a flat float32 vector ``x_i = theta0 - theta_i`` from holder ``i`` of the range.
Inputs are screened before any math (:func:`screen`): a non-finite, wrong-shape or wrong-dtype
contribution is rejected and reported, never averaged. ``f`` is the number of faulty (Byzantine)
holders a rule must tolerate. A correct holder never fails screening, so the r rejected ones count
against f: with r > f the step is refused; otherwise the rule runs on the n accepted contributions
with f - r, and the step is refused when n is below the rule's requirement for f - r. The rules
(``aggregator=<name>``; n is the number of contributions the rule receives):

``mean``              ``(1/n) sum_i x_i``. Tolerates no Byzantine input. Needs n >= 1.
``median``            coordinate-wise median; for even n the average of the two middle values.
                      Needs n >= 2f+1.
``trimmed_mean``      per coordinate, drop the f largest and the f smallest values and average the
                      remaining n-2f. Needs n >= 2f+1.
``krum``              score(i) = sum of the squared distances from x_i to its n-f-2 nearest other
                      inputs; return the x_i with the lowest score. Needs n >= 2f+3.
``multi_krum``        the average of the m best-scored inputs under Krum's score (m = n-f unless
                      ``aggregator.m`` says otherwise, and never more than n-f). Needs n >= 2f+3.
``geometric_median``  argmin_z sum_i ||z - x_i||, by smoothed Weiszfeld from the mean:
                      ``z <- sum_i b_i x_i / sum_i b_i`` with ``b_i = 1 / max(nu, ||x_i - z||)``.
                      Scale-free: the smoothing ``nu`` and the stopping rule (a step shorter than
                      ``gm_tol`` times it) are relative to ``s = median_i ||x_i - mean||``.
                      Needs n >= 2f+1.
``centered_clip``     ``v <- v + (1/n) sum_i (x_i - v) min(1, tau_abs / ||x_i - v||)``, ``iterations``
                      times, from v = the previous round's aggregate (the geometric median on the
                      first round). ``tau_abs = tau * median_i ||x_i - v_0||``; tau >= 1 so that
                      identical inputs come back unchanged. Needs n >= 2f+1.

Pre-steps, applied in this order before any rule:

``clip``     norm clip: ``x_i <- x_i * min(1, k * median_j ||x_j|| / ||x_i||)`` with ``k = aggregator.clip``.
``nnm``      nearest-neighbour mixing: ``x_i <- mean of the n-f inputs nearest to x_i`` (itself included).
``bucket``   bucketing: shuffle the inputs (seeded, from a canonical order), average consecutive
             groups of ``aggregator.bucket``; the rule then sees ceil(n/bucket) inputs, so n must
             satisfy ``ceil(n/bucket) >= `` the rule's requirement.

Reputation weights (``weights=``, one per contribution, e.g. each holder's reputation,
neuroray/ponw/reputation.py): the rules that return a weighted sum weigh each input by it. ``mean`` becomes
``sum_i w_i x_i / sum_i w_i``; ``multi_krum`` the weighted mean of the inputs it selects;
``geometric_median`` the weighted geometric median (Weiszfeld with ``b_i = w_i / max(nu, ||x_i - z||)``);
``centered_clip`` weighs each clipped difference by ``w_i / sum_j w_j``. With ``bucket`` a bucket weighs the
mean of its members' weights. ``krum`` (one pick), ``median`` and ``trimmed_mean`` (order statistics per
coordinate) take no weights: their robustness does not come from averaging. Equal weights, or none,
take the unweighted path exactly (bit for bit), so reputation changes nothing until holders differ.

Numerics. Everything geometric (distances, norms, Krum scores, Weiszfeld, clipping) works on one
float64 Gram matrix of the inputs centred on their mean, computed in one pass over the parameter
dimension in chunks; afterwards each pre-step and rule is an (n x n) computation on coefficient
vectors, and the result is ``sum_i a_i x_i``, formed in float64 chunk by chunk. Centring keeps the
distances of near-identical inputs exact (``torch.cdist`` on the raw rows loses them). Coordinate-
wise rules sort each chunk with a Batcher merge-exchange network of ``torch.minimum``/``maximum``
on whole rows, which is far faster than ``torch.sort`` across a short dimension. Extra memory is
O(n * chunk) either way. These numeric kernels live in :mod:`neuroray.diloco.numerics`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from neuroray.config import AggregatorConfig
from neuroray.diloco.numerics import (
    NETWORK_MAX_ROWS, accumulate, augment, canonical_order, centred_gram, chunks, combine, median_of,
    merge_exchange_pairs, pruned, sort_rows, sq_dists, sq_norms, weight_groups,
)


class AggregationRefused(RuntimeError):
    """Too few acceptable contributions: theta0 must be left unchanged."""


@dataclass
class Rejection:
    index: int  # position of the contribution, i.e. which holder sent it
    reason: str


@dataclass
class AggregateResult:
    value: torch.Tensor
    accepted: list[int]
    rejected: list[Rejection] = field(default_factory=list)
    # Rules whose result is a weighted sum of the (pre-processed) inputs report each accepted holder's
    # weight (0.0: its contribution was not used, e.g. not chosen by Krum). None for coordinate-wise rules.
    weights: dict[int, float] | None = None


@dataclass(frozen=True)
class Rule:
    name: str
    coordinatewise: bool
    min_inputs: Callable[[int], int]  # f -> smallest n for which the rule tolerates f Byzantine inputs
    requirement: str  # the same, for error messages


AGGREGATORS: dict[str, Rule] = {r.name: r for r in (
    Rule("mean", False, lambda f: 1, "n >= 1"),
    Rule("median", True, lambda f: 2 * f + 1, "n >= 2f+1"),
    Rule("trimmed_mean", True, lambda f: 2 * f + 1, "n >= 2f+1"),
    Rule("krum", False, lambda f: 2 * f + 3, "n >= 2f+3"),
    Rule("multi_krum", False, lambda f: 2 * f + 3, "n >= 2f+3"),
    Rule("geometric_median", False, lambda f: 2 * f + 1, "n >= 2f+1"),
    Rule("centered_clip", False, lambda f: 2 * f + 1, "n >= 2f+1"),
)}


# ----- configuration checks ---------------------------------------------------------------------
def min_inputs(cfg: AggregatorConfig) -> int:
    """Fewest screened contributions with which ``cfg`` (rule + pre-steps) still tolerates ``cfg.f``."""
    need = AGGREGATORS[cfg.name].min_inputs(cfg.f)
    if cfg.bucket > 1:  # f bad inputs spoil at most f buckets: ceil(n / bucket) must meet the rule's need
        need = cfg.bucket * (need - 1) + 1
    if cfg.nnm:  # a neighbourhood of n-f inputs must hold an honest majority
        need = max(need, 2 * cfg.f + 1)
    return max(need, 1)


def config_problem(cfg: AggregatorConfig, n: int | None = None) -> str | None:
    """What is wrong with ``cfg`` (for ``n`` contributions per range, if given), or None."""
    if cfg.name not in AGGREGATORS:
        return f"aggregator={cfg.name!r} is unknown; choose one of {sorted(AGGREGATORS)}"
    checks = [
        (cfg.f >= 0, f"aggregator.f={cfg.f} must be >= 0"),
        (cfg.m >= 0, f"aggregator.m={cfg.m} must be >= 0 (0: n - f)"),
        (cfg.tau >= 1, f"aggregator.tau={cfg.tau} must be >= 1 (a multiple of the median distance to the centre)"),
        (cfg.iterations >= 1, f"aggregator.iterations={cfg.iterations} must be >= 1"),
        (cfg.gm_max_iter >= 1, f"aggregator.gm_max_iter={cfg.gm_max_iter} must be >= 1"),
        (cfg.gm_tol > 0, f"aggregator.gm_tol={cfg.gm_tol} must be > 0"),
        (cfg.gm_smoothing > 0, f"aggregator.gm_smoothing={cfg.gm_smoothing} must be > 0"),
        (cfg.clip == 0 or cfg.clip >= 1, f"aggregator.clip={cfg.clip} must be 0 (off) or >= 1 (a multiple of the median norm)"),
        (cfg.bucket >= 0, f"aggregator.bucket={cfg.bucket} must be >= 0 (0 or 1: off)"),
        (cfg.chunk >= 1, f"aggregator.chunk={cfg.chunk} must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            return message
    if n is not None:
        need = min_inputs(cfg)
        if n < need:
            rule = AGGREGATORS[cfg.name].requirement
            extra = (f" after bucketing by {cfg.bucket}" if cfg.bucket > 1 else "") + (" with nnm" if cfg.nnm else "")
            return (f"aggregator={cfg.name} with aggregator.f={cfg.f} needs at least {need} holders per range "
                    f"({rule}{extra}), but a range has {n} (diloco.replicas): raise diloco.replicas or lower aggregator.f")
        if cfg.name == "multi_krum" and cfg.m > n - cfg.f:
            return f"aggregator.m={cfg.m} exceeds n - f = {n - cfg.f}: Multi-Krum averages at most n - f inputs"
    return None


# ----- screening --------------------------------------------------------------------------------
def screen(contributions: Sequence[torch.Tensor], numel: int, dtype=torch.float32) -> tuple[list[int], list[Rejection]]:
    """Split contributions into accepted indices and rejections (cheap checks, no math on values)."""
    accepted, rejected = [], []
    for i, c in enumerate(contributions):
        if not isinstance(c, torch.Tensor):
            rejected.append(Rejection(i, f"not a tensor ({type(c).__name__})"))
        elif c.dtype != dtype:
            rejected.append(Rejection(i, f"dtype {c.dtype}, expected {dtype}"))
        elif c.dim() != 1 or c.numel() != numel:
            rejected.append(Rejection(i, f"shape {tuple(c.shape)}, expected ({numel},)"))
        elif not _all_finite(c):
            rejected.append(Rejection(i, "contains NaN or Inf"))
        else:
            accepted.append(i)
    return accepted, rejected


def _all_finite(c: torch.Tensor) -> bool:
    """Any NaN or Inf makes the sum non-finite; a finite sum proves there is none. Only a float32 sum
    that overflows needs the element-wise check (a float64 sum of float32 values cannot overflow)."""
    return math.isfinite(float(c.sum())) or math.isfinite(float(c.sum(dtype=torch.float64)))


# ----- coordinate-wise rules (sorting networks over whole rows: numerics.py) ---------------------
def _coordinatewise(cfg: AggregatorConfig, vectors: list[torch.Tensor], mix: torch.Tensor | None) -> torch.Tensor:
    """Median or trimmed mean of the rows ``mix @ vectors`` (or of the vectors themselves), chunk by chunk."""
    numel, chunk = vectors[0].numel(), min(cfg.chunk, vectors[0].numel())
    q = len(vectors) if mix is None else mix.shape[0]
    if cfg.name == "median":
        wanted = ((q - 1) // 2, q // 2)
    else:
        wanted = tuple(range(cfg.f, q - cfg.f))
    pairs = pruned(merge_exchange_pairs(q), wanted) if q <= NETWORK_MAX_ROWS else None
    dtype = torch.float32 if mix is None else torch.float64
    mix_groups = None if mix is None else [weight_groups(row) for row in mix]
    buf = torch.empty(q + 1, chunk, dtype=dtype)  # q rows and a spare
    acc = torch.empty(chunk, dtype=torch.float64)
    out = torch.empty(numel, dtype=torch.float32)
    for lo, hi in chunks(numel, chunk):
        m = hi - lo
        block, spare = buf[:q, :m], buf[q, :m]
        if mix is None:
            torch.stack([v[lo:hi] for v in vectors], out=block)
        else:
            parts = [v[lo:hi] for v in vectors]
            for g, row in zip(mix_groups, block):
                accumulate(g, parts, row, spare)
        rows = list(block.unbind(0))
        if pairs is None:
            srt = list(block.sort(dim=0).values.unbind(0))
        else:
            srt, _ = sort_rows(rows, spare, pairs)
        o = out[lo:hi]
        if cfg.name == "median":
            a, b = srt[wanted[0]], srt[wanted[1]]
            if wanted[0] == wanted[1]:
                o.copy_(a)
            else:  # a/2 + b/2: the halves are exact, one rounding, no overflow near the float32 limit
                torch.mul(a, 0.5, out=o)
                o.add_(b, alpha=0.5)
        else:  # sorted order, so the sum does not depend on the input order
            s = acc[:m].copy_(srt[wanted[0]])
            for t in wanted[1:]:
                s.add_(srt[t])
            o.copy_(s.div_(len(wanted)))
    return out


# ----- vector rules, on coefficient vectors against the centred Gram matrix ------------------------
def _krum_scores(d: torch.Tensor, f: int) -> torch.Tensor:
    q = d.shape[0]
    others = d + torch.diag(torch.full((q,), math.inf, dtype=d.dtype))  # exclude each row's distance to itself
    return others.sort(dim=1).values[:, : q - f - 2].sum(1)


def _weiszfeld(gram: torch.Tensor, aug: torch.Tensor, cfg: AggregatorConfig,
               rw: torch.Tensor | None = None) -> torch.Tensor:
    """Smoothed Weiszfeld in coefficient space; returns the weights w (sum 1) with z = sum_i w_i y_i.
    ``rw``: the inputs' own weights (the weighted geometric median), None: all equal."""
    q = aug.shape[0]
    w = torch.full((q,), 1.0 / q, dtype=torch.float64) if rw is None else rw / rw.sum()
    dist = sq_norms(gram, aug - w @ aug).sqrt()
    scale = median_of(dist) or float(dist.max())
    if scale == 0.0:  # all inputs identical: the mean is the answer
        return w
    nu = cfg.gm_smoothing * scale
    for _ in range(cfg.gm_max_iter):
        beta = 1.0 / dist.clamp_min(nu) if rw is None else rw / dist.clamp_min(nu)
        new = beta / beta.sum()
        moved = float(sq_norms(gram, (new - w) @ aug).sqrt())
        w = new
        dist = sq_norms(gram, aug - w @ aug).sqrt()
        if moved <= cfg.gm_tol * scale:
            break
    return w


def _centered_clip(gram: torch.Tensor, aug: torch.Tensor, centre: torch.Tensor, cfg: AggregatorConfig,
                   rw: torch.Tensor | None = None) -> torch.Tensor:
    """Centered clipping from the augmented coefficients ``centre``; returns augmented coefficients.
    ``rw``: the inputs' own weights (each clipped difference weighs ``rw_i / sum rw``), None: 1/q each."""
    q = aug.shape[0]
    v = centre
    tau = cfg.tau * median_of(sq_norms(gram, aug - v).sqrt())
    for _ in range(cfg.iterations):
        dist = sq_norms(gram, aug - v).sqrt()
        keep = torch.where(dist > tau, tau / dist.clamp_min(1e-300), torch.ones_like(dist))
        if rw is not None:
            share = keep * (rw / rw.sum())
            v = v * (1.0 - float(share.sum())) + share @ aug
            continue
        # v + (1/q) sum_i keep_i (y_i - v), grouped so that keep == 1 everywhere leaves no v at all
        v = v * (1.0 - float(keep.sum()) / q) + (keep / q) @ aug
    return v


# ----- pre-steps ----------------------------------------------------------------------------------
def _pre_steps(cfg: AggregatorConfig, gram: torch.Tensor, mix: torch.Tensor, seed: int,
               rw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply clip -> nnm -> bucketing to the mixing matrix ``mix`` (rows: inputs as combinations of vectors).
    ``rw``: each row's weight (or None), returned for the rows that come out (a bucket: its members' mean)."""
    if cfg.clip:
        norms = sq_norms(gram, augment(mix)).sqrt()
        limit = cfg.clip * median_of(norms)
        scale = torch.where(norms > limit, limit / norms.clamp_min(1e-300), torch.ones_like(norms))
        mix = mix * scale[:, None]
    if cfg.nnm:
        q = mix.shape[0]
        order = sq_dists(gram, augment(mix)).argsort(dim=1, stable=True)[:, : q - cfg.f]
        mix = mix[order].mean(1)
    if cfg.bucket > 1:
        q = mix.shape[0]
        perm = torch.randperm(q, generator=torch.Generator().manual_seed(seed))
        mix = torch.stack([mix[perm[i:i + cfg.bucket]].mean(0) for i in range(0, q, cfg.bucket)])
        if rw is not None:
            rw = torch.stack([rw[perm[i:i + cfg.bucket]].mean() for i in range(0, q, cfg.bucket)])
    return mix, rw


# ----- the entry point ----------------------------------------------------------------------------
def aggregate(rule: str | AggregatorConfig, contributions: Sequence[torch.Tensor], numel: int, *,
              previous: torch.Tensor | None = None, seed: int = 0,
              weights: Sequence[float] | None = None) -> AggregateResult:
    """Screen the contributions, then reduce the accepted ones with ``rule`` (a name or a full config).

    ``previous``: the last aggregate of this range (centered clipping's centre; ignored by other rules
    and when unusable). ``seed``: bucketing's shuffle. ``weights``: one per contribution (>= 0; reputation),
    used by the weighted-sum rules (see the module docstring); None or all equal: unweighted. Raises :class:`AggregationRefused` when more than
    ``f`` contributions fail screening or too few pass for the rule to tolerate the rest, and
    ``ValueError`` for a bad rule.
    """
    cfg = rule if isinstance(rule, AggregatorConfig) else AggregatorConfig(name=rule)
    problem = config_problem(cfg)
    if problem:
        raise ValueError(problem)
    accepted, rejected = screen(contributions, numel)
    why = "; ".join(f"#{r.index}: {r.reason}" for r in rejected) or "no contributions"
    # A correct holder never fails screening, so every rejected one is one of the (at most f) faulty
    # holders: more rejections than f break the rule's assumption, and the accepted ones hold at most
    # f - r faulty contributions, which is what the rule then has to tolerate.
    if len(rejected) > cfg.f:
        raise AggregationRefused(f"{len(rejected)} contributions failed screening, more than the f={cfg.f} faulty "
                                 f"holders {cfg.name} is set to tolerate ({why})")
    cfg = dataclasses.replace(cfg, f=cfg.f - len(rejected))
    need = min_inputs(cfg)
    if len(accepted) < need:
        raise AggregationRefused(f"{len(accepted)} acceptable contributions, {cfg.name} with f={cfg.f} needs "
                                 f"{need} ({why})")
    if cfg.bucket > 1:  # bucketing shuffles: start from an order the senders cannot influence
        accepted = [accepted[i] for i in canonical_order([contributions[i] for i in accepted], cfg.chunk)]
    rows = [contributions[i] for i in accepted]
    n = len(rows)
    rw = _row_weights(weights, accepted)
    centre = previous if cfg.name == "centered_clip" and not screen([previous], numel)[1] else None
    vectors = rows + ([centre] if centre is not None else [])
    k = len(vectors)
    pre = bool(cfg.clip or cfg.nnm or cfg.bucket > 1)
    geometric = pre or cfg.name in ("krum", "multi_krum", "geometric_median", "centered_clip")
    gram = centred_gram(vectors, n, cfg.chunk) if geometric else None
    mix = torch.eye(n, k, dtype=torch.float64)  # inputs as combinations of the vectors
    if pre:
        mix, rw = _pre_steps(cfg, gram, mix, seed, rw)
    if AGGREGATORS[cfg.name].coordinatewise:
        value = _coordinatewise(cfg, vectors[:n], mix[:, :n] if pre else None)
        return AggregateResult(value, sorted(accepted), rejected)
    alpha = _linear_rule(cfg, gram, mix, centre is not None, rw)
    value = combine(vectors, alpha, cfg.chunk)
    weights = dict(sorted(zip(accepted, alpha[:n].tolist())))
    return AggregateResult(value, sorted(accepted), rejected, weights)


def _row_weights(weights: Sequence[float] | None, accepted: list[int]) -> torch.Tensor | None:
    """The accepted contributions' weights, float64; None when there are none, they are all equal (the
    unweighted path, bit-identical) or they sum to 0 (no information to weigh by)."""
    if weights is None:
        return None
    rw = torch.tensor([float(weights[i]) for i in accepted], dtype=torch.float64)
    if not bool(torch.isfinite(rw).all()) or bool((rw < 0).any()):
        raise ValueError(f"aggregation weights must be finite and >= 0, got {rw.tolist()}")
    if float(rw.sum()) <= 0 or bool((rw == rw[0]).all()):
        return None
    return rw


def _weighted_mean(mix: torch.Tensor, rw: torch.Tensor) -> torch.Tensor:
    """``sum_i rw_i mix_i / sum_i rw_i``; the plain mean when the selected rows weigh nothing at all."""
    total = float(rw.sum())
    return mix.mean(0) if total <= 0 else (rw / total) @ mix


def _linear_rule(cfg: AggregatorConfig, gram: torch.Tensor | None, mix: torch.Tensor, has_centre: bool,
                 rw: torch.Tensor | None = None) -> torch.Tensor:
    """Coefficients over the vectors (inputs, then the centre if any) of a rule that returns a weighted sum.
    ``rw``: each row's weight (reputation), None: all equal."""
    q, k = mix.shape
    if cfg.name == "mean":
        return mix.mean(0) if rw is None else _weighted_mean(mix, rw)
    aug = augment(mix)
    if cfg.name in ("krum", "multi_krum"):
        scores = _krum_scores(sq_dists(gram, aug), cfg.f)
        best = scores.argsort(stable=True)
        if cfg.name == "krum":
            return mix[best[0]]
        m = min(cfg.m or q - cfg.f, q - cfg.f)
        return mix[best[:m]].mean(0) if rw is None else _weighted_mean(mix[best[:m]], rw[best[:m]])
    if cfg.name == "geometric_median":
        return _weiszfeld(gram, aug, cfg, rw) @ mix
    assert cfg.name == "centered_clip", cfg.name
    if has_centre:
        centre = torch.zeros(k + 1, dtype=torch.float64)
        centre[k - 1] = centre[k] = 1.0  # the previous aggregate, the last vector
    else:
        centre = _weiszfeld(gram, aug, cfg, rw) @ aug
    return _centered_clip(gram, aug, centre, cfg, rw)[:k]
