"""Numeric kernels of the robust aggregators (:mod:`neuroray.diloco.aggregate`): no rule logic here.

- chunked passes over the parameter dimension: the float64 Gram matrix of the inputs centred on their
  mean (:func:`centred_gram`), and weighted sums ``sum_j a_j v_j`` formed in float64
  (:func:`combine`); extra memory is O(n * chunk);
- Batcher's merge-exchange sorting network over whole rows (:func:`merge_exchange_pairs`,
  :func:`sort_rows`), which the coordinate-wise rules use instead of ``torch.sort`` across a short
  dimension;
- geometry on coefficient vectors against the Gram matrix (:func:`augment`, :func:`sq_norms`,
  :func:`sq_dists`), so that every distance after the one pass costs O(n^2), not O(n * d);
- a canonical, sender-independent order of the inputs (:func:`canonical_order`) for bucketing.

Centring before the inner products is what keeps the distances of near-identical inputs exact:
``torch.cdist`` on the raw float32 rows switches to ``|x|^2 + |y|^2 - 2xy`` above 25 rows and loses
them to cancellation.
"""

from __future__ import annotations

import functools

import torch

# Above this many rows a comparator network has more comparators (n log^2 n / 4) than it is worth.
NETWORK_MAX_ROWS = 64


# ----- chunked passes over the parameter dimension ----------------------------------------------
def chunks(numel: int, chunk: int):
    """``(lo, hi)`` bounds of consecutive slices of at most ``chunk`` elements covering ``range(numel)``."""
    for lo in range(0, numel, chunk):
        yield lo, min(numel, lo + chunk)


def centred_gram(vectors: list[torch.Tensor], n_rows: int, chunk: int) -> torch.Tensor:
    """Gram matrix (float64, (k+1) x (k+1)) of ``[v_1 - c, ..., v_k - c, c]``, c = mean of the first n_rows.

    Any vector ``sum_j a_j v_j`` is ``sum_j a_j (v_j - c) + (sum_j a_j) c``: its "augmented" coefficients
    ``[a, sum(a)]`` against this Gram matrix give its norm, and differences of them give distances,
    without the cancellation that raw (uncentred) inner products suffer on near-identical inputs.
    """
    k, numel = len(vectors), vectors[0].numel()
    buf = torch.empty(k + 1, min(chunk, numel), dtype=torch.float64)
    gram = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    for lo, hi in chunks(numel, chunk):
        b = buf[:, : hi - lo]
        torch.stack([v[lo:hi] for v in vectors], out=b[:k])  # one op (fewer thread barriers than k copies)
        torch.mean(b[:n_rows], 0, out=b[k])
        b[:k].sub_(b[k])
        gram.addmm_(b, b.T)
    return gram


def weight_groups(alpha: torch.Tensor) -> list[tuple[float, list[int]]]:
    """Non-zero coefficients as ``(weight, [indices with that weight])``, by ascending weight."""
    groups: dict[float, list[int]] = {}
    for j, a in enumerate(alpha.tolist()):
        if a != 0.0:
            groups.setdefault(a, []).append(j)
    return sorted(groups.items())


def accumulate(groups, parts: list[torch.Tensor], acc: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """``acc = sum_w w * sum_{j in group w} parts[j]`` in float64.

    Vectors with equal weights are summed first and scaled once: a float64 sum of a few float32 values
    is exact (unless their exponents span more than 29 bits), so means and Multi-Krum depend neither
    on the input order nor on the chunk size, even in the last float32 bit.
    """
    acc.zero_()
    for w, idx in groups:
        tmp.copy_(parts[idx[0]])
        for j in idx[1:]:
            tmp.add_(parts[j])
        acc.add_(tmp, alpha=w)
    return acc


def combine(vectors: list[torch.Tensor], alpha: torch.Tensor, chunk: int) -> torch.Tensor:
    """``sum_j alpha_j v_j`` as float32, accumulated in float64 one chunk at a time."""
    groups = weight_groups(alpha)
    if len(groups) == 1 and groups[0][0] == 1.0 and len(groups[0][1]) == 1:
        return vectors[groups[0][1][0]].clone()  # a chosen input comes back bit for bit
    numel = vectors[0].numel()
    out = torch.empty(numel, dtype=torch.float32)
    acc = torch.empty(min(chunk, numel), dtype=torch.float64)
    tmp = torch.empty_like(acc)
    for lo, hi in chunks(numel, chunk):
        m = hi - lo
        out[lo:hi].copy_(accumulate(groups, [v[lo:hi] for v in vectors], acc[:m], tmp[:m]))
    return out


# ----- sorting networks over whole rows (the coordinate-wise rules) -----------------------------
@functools.lru_cache(maxsize=None)
def merge_exchange_pairs(n: int) -> tuple[tuple[int, int], ...]:
    """Comparators ``(i, j), i < j`` of Batcher's merge-exchange sort of n items (Knuth 5.2.2, Algorithm M).

    Applying ``(x_i, x_j) <- (min, max)`` for every pair in order sorts any n values ascending.
    """
    pairs: list[tuple[int, int]] = []
    if n < 2:
        return ()
    t = (n - 1).bit_length()
    p = 1 << (t - 1)
    while p > 0:
        q, r, d = 1 << (t - 1), 0, p
        while d > 0:
            pairs.extend((i, i + d) for i in range(n - d) if i & p == r)
            d, q, r = q - p, q >> 1, p
        p >>= 1
    return tuple(pairs)


def pruned(pairs: tuple[tuple[int, int], ...], wanted: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The comparators that influence the sorted values at positions ``wanted`` (walked back to front)."""
    needed, keep = set(wanted), []
    for i, j in reversed(pairs):
        if i in needed or j in needed:
            keep.append((i, j))
            needed |= {i, j}
    return tuple(reversed(keep))


def sort_rows(rows: list[torch.Tensor], spare: torch.Tensor, pairs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sort the columns of ``rows`` (equal-length 1-D tensors) in place of the buffers; returns the
    buffers in ascending order and the buffer left over. Each comparator is two whole-row ops; the
    buffers are renamed rather than copied."""
    r = list(rows)
    for i, j in pairs:
        torch.minimum(r[i], r[j], out=spare)
        torch.maximum(r[i], r[j], out=r[j])
        r[i], spare = spare, r[i]
    return r, spare


# ----- geometry on coefficient vectors ----------------------------------------------------------
def augment(coef: torch.Tensor) -> torch.Tensor:
    """Coefficients ``a`` (last dimension) -> ``[a, sum(a)]``, the form :func:`centred_gram` measures."""
    return torch.cat([coef, coef.sum(-1, keepdim=True)], -1)


def sq_norms(gram: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
    """Squared norms of the vectors with augmented coefficient rows ``aug``."""
    return ((aug @ gram) * aug).sum(-1).clamp_min(0.0)


def sq_dists(gram: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
    """(q x q) squared distances; differences of coefficients first, so nothing large cancels."""
    diff = aug[:, None, :] - aug[None, :, :]
    d = sq_norms(gram, diff)
    d.fill_diagonal_(0.0)
    return d


def median_of(t: torch.Tensor) -> float:
    """Median of a 1-D tensor (the average of the two middle values for an even length)."""
    s = t.sort().values
    return float((s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2)


# ----- canonical order (bucketing) --------------------------------------------------------------
def _lex_compare(a: torch.Tensor, b: torch.Tensor, chunk: int) -> int:
    for lo, hi in chunks(a.numel(), chunk):
        diff = torch.ne(a[lo:hi], b[lo:hi]).nonzero()
        if diff.numel():
            j = lo + int(diff[0])
            return -1 if a[j] < b[j] else 1
    return 0


def canonical_order(rows: list[torch.Tensor], chunk: int) -> list[int]:
    """Positions of ``rows`` in lexicographic order of their values: the same whatever order they came in."""
    key = functools.cmp_to_key(lambda i, j: _lex_compare(rows[i], rows[j], chunk))
    return sorted(range(len(rows)), key=key)
