"""Layer ranges: each layer's cost, and the contiguous split into exactly S stages that minimises the
largest stage cost ``c = mem/sum(mem) + flops/sum(flops)`` by dynamic programming, subject to every
stage's holder memory fitting (step 3 of :func:`neuroray.planner.search.plan`)."""

from __future__ import annotations

import math

from neuroray.config import ModelConfig
from neuroray.planner import scaling
from neuroray.planner.memory import FLOAT_BYTES, BYTES_PER_PARAM, head_bytes_per_token, holder_memory, layer_bytes
from neuroray.planner.plan_types import PlanRequest


def memory_table(cfg: ModelConfig, req: PlanRequest) -> dict:
    """holder_memory(...).total for every (n_layers, first, last): the DP's O(1) memory lookups."""
    table = {}
    for n in range(1, cfg.n_layers + 1):
        for first in (False, True):
            for last in (False, True):
                table[n, first, last] = holder_memory(cfg, req.vocab_size, n, has_embedding=first, has_head=last,
                                                      batch=req.batch, overhead=req.holder_overhead,
                                                      snapshots=req.snapshots).total
    return table


def item_costs(cfg: ModelConfig, req: PlanRequest) -> list[float]:
    """Per-layer cost ``mem_i / sum(mem) + flops_i / sum(flops)``, embedding on layer 0, head on the last."""
    pc = scaling.param_count(cfg, req.vocab_size)
    tok, nmb = req.batch.tokens, req.batch.num_microbatches
    mem = [float(layer_bytes(cfg, req.batch))] * cfg.n_layers
    flops = [scaling.layer_flops_per_token(cfg, req.batch.seq_len)] * cfg.n_layers
    mem[0] += BYTES_PER_PARAM * pc.embedding + FLOAT_BYTES * tok * nmb * cfg.d_model
    mem[-1] += BYTES_PER_PARAM * pc.head + tok * head_bytes_per_token(cfg, req.vocab_size, req.batch.activation_bytes)
    flops[-1] += scaling.head_flops_per_token(cfg, req.vocab_size)
    sm, sf = sum(mem), sum(flops)
    return [m / sm + f / sf for m, f in zip(mem, flops)]


def partition_layers(costs: list[float], n_stages: int, fits=lambda start, end, first, last: True) -> list[tuple[int, int]] | None:
    """Exactly ``n_stages`` contiguous ranges of ``costs`` minimising the largest range cost.

    ``fits(start, end, is_first, is_last)`` vetoes ranges (memory). Dynamic programming over
    ``best[k][j]`` = smallest achievable max cost of splitting items ``[0, j)`` into k ranges;
    O(S * L^2). Returns None when no split satisfies ``fits``.
    """
    n = len(costs)
    if not 1 <= n_stages <= n:
        return None
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[-1] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        last = k == n_stages
        # range k covers [i, j); leave at least one item for each later range
        for j in range(k, n - (n_stages - k) + 1):
            if last and j != n:
                continue
            for i in range(k - 1, j):
                if best[k - 1][i] == inf or not fits(i, j, k == 1, last):
                    continue
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    if best[n_stages][n] == inf:
        return None
    ranges, j = [], n
    for k in range(n_stages, 0, -1):
        i = cut[k][j]
        ranges.append((i, j))
        j = i
    return ranges[::-1]


# ----- placement of replicas onto nodes -----------------------------------------------------------
