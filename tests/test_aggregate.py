"""Robust aggregators: hand-worked examples, order independence, identical inputs, chunking, numerics,
input hygiene, configuration checks, and a cross-check against ByzFL where the definitions agree."""

import importlib.util
import itertools
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from neuroray.config import AggregatorConfig
from neuroray.configure import load_config
from neuroray.diloco.aggregate import AGGREGATORS, AggregationRefused, aggregate, config_problem, min_inputs
from neuroray.diloco.numerics import augment, centred_gram, merge_exchange_pairs, sq_dists
from neuroray.errors import ConfigError

RULES = sorted(AGGREGATORS)
PRE_STEPS = [{}, {"clip": 2.0}, {"nnm": True}, {"bucket": 2}, {"clip": 1.5, "nnm": True, "bucket": 2}]


def vecs(*values):
    """1-D points embedded as 2-D vectors (p, -2p): distances scale with |p| as on the line."""
    return [torch.tensor([float(v), -2.0 * float(v)]) for v in values]


def agg(name, rows, **kw):
    return aggregate(AggregatorConfig(name=name, **kw), rows, rows[0].numel())


# ----- hand-worked examples ------------------------------------------------------------------------
def test_mean_and_median_by_hand():
    assert agg("mean", [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]).value.tolist() == [2.0, 4.0]
    rows = [torch.tensor([1.0, 5.0]), torch.tensor([5.0, 1.0]), torch.tensor([2.0, 2.0])]
    assert agg("median", rows, f=1).value.tolist() == [2.0, 2.0]
    # even n: the average of the two middle values (1, 2, 4, 10 -> 3)
    assert agg("median", [torch.tensor([v]) for v in (10.0, 1.0, 4.0, 2.0)]).value.tolist() == [3.0]


def test_trimmed_mean_trims_even_with_few_inputs():
    # f=1 of 5: drop 1 and 100, average 2, 3, 4 -> 3 (a previous implementation trimmed nothing below 10 inputs)
    rows = [torch.tensor([v, -v]) for v in (100.0, 2.0, 1.0, 4.0, 3.0)]
    assert agg("trimmed_mean", rows, f=1).value.tolist() == [3.0, -3.0]
    # f=2 of 5 leaves the median
    assert agg("trimmed_mean", rows, f=2).value.tolist() == [3.0, -3.0]
    rows = [torch.tensor([v]) for v in (-50.0, 1.0, 2.0, 6.0, 7.0, 90.0)]
    assert agg("trimmed_mean", rows, f=1).value.tolist() == [4.0]


def test_krum_and_multi_krum_by_hand():
    # points 0, 1, 2, 10, 11 on a line (x5 for the embedding's squared length), f=1: n-f-2 = 2 nearest others.
    # scores: 0 -> 1+4=5, 1 -> 1+1=2, 2 -> 1+4=5, 10 -> 1+64=65, 11 -> 1+81=82.
    rows = vecs(10, 0, 11, 2, 1)
    res = agg("krum", rows, f=1)
    assert res.value.tolist() == [1.0, -2.0]
    assert res.weights == {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0}
    # Multi-Krum, m = n - f = 4 best: 1, 0, 2, 10 -> 13/4
    assert agg("multi_krum", rows, f=1).value.tolist() == [3.25, -6.5]
    assert agg("multi_krum", rows, f=1, m=3).value.tolist() == [1.0, -2.0]


def test_geometric_median_by_hand():
    # on a line the geometric median of an odd number of points is their median
    got = agg("geometric_median", vecs(0, 1, 2, 3, 100), f=1).value
    torch.testing.assert_close(got, torch.tensor([2.0, -4.0]), rtol=0, atol=1e-4)
    # four corners of a square plus its centre: the centre
    rows = [torch.tensor(p) for p in ([0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0], [2.0, 2.0])]
    torch.testing.assert_close(agg("geometric_median", rows).value, torch.tensor([2.0, 2.0]), rtol=0, atol=1e-5)


def test_centered_clip_by_hand():
    # centre 0 (the previous aggregate), inputs 1, 2, 3, 100: median distance 2.5, tau = 1 x 2.5.
    # one iteration: clip to 1, 2, 2.5, 2.5 -> v1 = 0 + 8/4 = 2.0
    rows, prev = vecs(1, 2, 3, 100), torch.zeros(2)
    cfg = AggregatorConfig(name="centered_clip", f=1, tau=1.0, iterations=1)
    torch.testing.assert_close(aggregate(cfg, rows, 2, previous=prev).value, torch.tensor([2.0, -4.0]))
    # second iteration from 2: differences -1, 0, 1, 98 -> clipped to 2.5: mean 2.5/4 -> 2.625
    cfg = AggregatorConfig(name="centered_clip", f=1, tau=1.0, iterations=2)
    torch.testing.assert_close(aggregate(cfg, rows, 2, previous=prev).value, torch.tensor([2.625, -5.25]))
    # an unusable previous aggregate (wrong shape) falls back to the geometric median as the centre
    res = aggregate(cfg, rows, 2, previous=torch.zeros(3))
    assert torch.isfinite(res.value).all() and 1.5 < res.value[0] < 3.5


def test_pre_steps_by_hand():
    # norm clip at 1x the median norm: norms |p| * sqrt(5) for p = 1, 2, 3, 100; median 2.5 -> 1, 2, 2.5, 2.5
    rows = vecs(1, 2, 3, 100)
    torch.testing.assert_close(agg("mean", rows, clip=1.0).value, torch.tensor([2.0, -4.0]))
    # NNM with f=1 over 0, 1, 10: each becomes the mean of its 2 nearest (itself included): 0.5, 0.5, 5.5
    rows = vecs(0, 1, 10)
    torch.testing.assert_close(agg("mean", rows, f=1, nnm=True).value, torch.tensor([6.5 / 3, -13.0 / 3]))
    assert agg("median", rows, f=1, nnm=True).value.tolist() == [0.5, -1.0]
    # bucketing: one bucket of everything is the mean; buckets of 2 of 4 inputs keep the mean
    rows = vecs(1, 2, 4, 9)
    assert agg("median", rows, bucket=4).value.tolist() == [4.0, -8.0]
    assert agg("mean", rows, bucket=2).value.tolist() == [4.0, -8.0]


# ----- properties of every rule --------------------------------------------------------------------
def _cfg(name, pre, **kw):
    f = 1 if pre.get("bucket") else 2
    return AggregatorConfig(name=name, f=f, **pre, **kw)


@pytest.mark.parametrize("pre", PRE_STEPS, ids=lambda p: "+".join(p) or "plain")
@pytest.mark.parametrize("name", RULES)
def test_order_independent_identical_inputs_and_chunking(name, pre):
    g = torch.Generator().manual_seed(1)
    n, d = 11, 301
    rows = [torch.randn(d, generator=g) * (1 + i) for i in range(n)]
    cfg = _cfg(name, pre)
    ref = aggregate(cfg, rows, d, seed=5).value
    for _ in range(3):  # the input order does not matter (bucketing's shuffle included)
        perm = torch.randperm(n, generator=g).tolist()
        assert torch.equal(aggregate(cfg, [rows[i] for i in perm], d, seed=5).value, ref)
    for chunk in (1, 7, 64):  # chunked == one-shot (default chunk >= d here)
        chunked = AggregatorConfig(**{**cfg.__dict__, "chunk": chunk})
        assert torch.equal(aggregate(chunked, rows, d, seed=5).value, ref), chunk
    # n identical inputs return exactly that input (centered clipping also with a previous aggregate)
    assert torch.equal(aggregate(cfg, [rows[3]] * n, d, previous=rows[0]).value, rows[3])
    assert torch.equal(aggregate(cfg, [rows[3]] * n, d).value, rows[3])


def test_sorting_network_sorts():
    for n in range(1, 70):
        x = torch.randn(n, 33)
        r = list(x.unbind(0))
        for i, j in merge_exchange_pairs(n):
            r[i], r[j] = torch.minimum(r[i], r[j]), torch.maximum(r[i], r[j])
        assert torch.equal(torch.stack(r), x.sort(0).values), n
    # the exhaustive 0-1 principle for small n: a network that sorts all 0/1 inputs sorts everything
    for n in range(2, 11):
        for bits in itertools.product((0.0, 1.0), repeat=n):
            r = list(bits)
            for i, j in merge_exchange_pairs(n):
                r[i], r[j] = min(r[i], r[j]), max(r[i], r[j])
            assert r == sorted(bits)


def test_coordinatewise_rules_on_many_inputs_match_torch():
    # 70 rows is above the network's limit (torch.sort per chunk) and 40 below: both paths agree with torch
    for n in (40, 70):
        x = torch.randn(n, 257)
        rows = list(x.unbind(0))
        med = agg("median", rows, f=3).value
        torch.testing.assert_close(med, x.quantile(0.5, dim=0), rtol=0, atol=1e-6)
        s = x.double().sort(0).values
        torch.testing.assert_close(agg("trimmed_mean", rows, f=5).value, s[5:n - 5].mean(0).float(), rtol=0, atol=1e-6)


# ----- numerics ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [10, 26, 64])
def test_distances_of_near_identical_inputs_match_float64(n):
    g = torch.Generator().manual_seed(n)
    d = 4096
    base = 100.0 + torch.randn(d, generator=g)
    rows = [base + 1e-3 * torch.randn(d, generator=g) for _ in range(n)]
    x = torch.stack(rows).double()
    ref = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    ours = sq_dists(centred_gram(rows, n, chunk=1000), augment(torch.eye(n, dtype=torch.float64)))
    off = ~torch.eye(n, dtype=torch.bool)
    rel = ((ours - ref).abs()[off] / ref[off]).max()
    assert rel < 1e-4, float(rel)
    if n > 25:  # what this replaces: torch.cdist switches to |x|^2 + |y|^2 - 2xy above 25 rows and loses it all
        naive = torch.cdist(torch.stack(rows), torch.stack(rows)).double() ** 2
        assert ((naive - ref).abs()[off] / ref[off]).max() > 1e-2


# ----- input hygiene -------------------------------------------------------------------------------------
def test_bad_contributions_are_rejected_and_named():
    good = [torch.tensor([1.0, 2.0]), torch.tensor([2.0, 3.0]), torch.tensor([3.0, 4.0])]
    bad = [torch.tensor([math.nan, 0.0]), torch.tensor([math.inf, 0.0]), torch.zeros(3),
           torch.zeros(2, dtype=torch.float64), "not a tensor", torch.zeros(1, 2)]
    rows = [good[0], *bad[:3], good[1], *bad[3:], good[2]]
    for name in RULES:
        res = aggregate(AggregatorConfig(name=name, f=6), rows, 2)  # the 6 rejected count against f
        assert res.accepted == [0, 4, 8]
        reasons = {r.index: r.reason for r in res.rejected}
        assert set(reasons) == {1, 2, 3, 5, 6, 7}
        assert "NaN or Inf" in reasons[1] and "NaN or Inf" in reasons[2] and "shape" in reasons[3]
        assert "dtype" in reasons[5] and "not a tensor" in reasons[6] and "shape" in reasons[7]
        assert torch.isfinite(res.value).all()
    assert aggregate(AggregatorConfig("mean", f=6), rows, 2).value.tolist() == [2.0, 3.0]
    # huge but finite (its float32 sum overflows) is not a NaN/Inf contribution
    huge = torch.full((2,), 3e38)
    assert aggregate("median", [huge, huge, huge], 2).value.tolist() == huge.tolist()


def test_refused_beyond_tolerance_or_with_too_few_inputs():
    rows = [torch.ones(4)] * 4 + [torch.full((4,), math.nan)] * 4
    # 4 rejected > f=2: more faulty holders than the rule is set to tolerate
    with pytest.raises(AggregationRefused, match=r"4 contributions failed screening.*f=2.*#4: contains NaN"):
        aggregate(AggregatorConfig(name="trimmed_mean", f=2), rows, 4)
    # rejected ones count against f: with f=4 all four are accounted for, the rest is averaged untrimmed
    assert aggregate(AggregatorConfig(name="trimmed_mean", f=4), rows, 4).value.tolist() == [1.0] * 4
    # 2 rejected of f=3 leaves f=1 among 4 accepted: Krum needs 2*1+3 = 5
    rows = [torch.ones(4)] * 4 + [torch.full((4,), math.nan)] * 2
    with pytest.raises(AggregationRefused, match=r"4 acceptable contributions, krum with f=1 needs 5"):
        aggregate(AggregatorConfig(name="krum", f=3), rows, 4)
    assert aggregate(AggregatorConfig(name="median", f=3), rows, 4).value.tolist() == [1.0] * 4
    with pytest.raises(AggregationRefused):
        aggregate("mean", [torch.full((4,), math.inf)], 4)


def test_requirements_and_config_errors():
    need = {r: min_inputs(AggregatorConfig(name=r, f=2)) for r in RULES}
    assert need == {"centered_clip": 5, "geometric_median": 5, "krum": 7, "mean": 1, "median": 5,
                    "multi_krum": 7, "trimmed_mean": 5}
    assert min_inputs(AggregatorConfig(name="median", f=2, bucket=2)) == 9  # ceil(9/2) = 5 buckets
    assert min_inputs(AggregatorConfig(name="mean", f=2, nnm=True)) == 5
    assert "needs at least 7" in config_problem(AggregatorConfig(name="krum", f=2), 6)
    assert config_problem(AggregatorConfig(name="krum", f=2), 7) is None
    assert "exceeds n - f" in config_problem(AggregatorConfig(name="multi_krum", f=1, m=5), 5)
    assert "unknown" in config_problem(AggregatorConfig(name="bogus"))
    with pytest.raises(ValueError, match="tau"):
        aggregate(AggregatorConfig(name="centered_clip", tau=0.5), [torch.ones(2)], 2)
    with pytest.raises(ConfigError, match=r"aggregator=krum with aggregator.f=2 needs at least 7.*diloco.replicas"):
        load_config(["aggregator=krum", "aggregator.f=2", "diloco.replicas=6"])
    cfg = load_config(["aggregator=trimmed_mean", "aggregator.f=2", "diloco.replicas=8", "attack=alie",
                       "attack.fraction=0.25"])
    assert (cfg.aggregator.name, cfg.aggregator.f, cfg.attack.name, cfg.attack.fraction) == ("trimmed_mean", 2, "alie", 0.25)
    robust = load_config(["aggregator=robust", "aggregator.f=2", "diloco.replicas=5"]).aggregator
    assert (robust.name, robust.f, robust.nnm) == ("trimmed_mean", 2, True)


# ----- cross-check against ByzFL -------------------------------------------------------------------
def _byzfl():
    """ByzFL's aggregators, loaded from their source files: ``byzfl/__init__`` imports torchvision,
    which this project does not install. Skips when ByzFL is absent."""
    spec = importlib.util.find_spec("byzfl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("byzfl is not installed (pip install --no-deps byzfl)")
    pytest.importorskip("scipy")  # byzfl/utils/misc.py imports scipy.spatial
    root = Path(spec.submodule_search_locations[0])
    saved = {k: v for k, v in sys.modules.items() if k == "byzfl" or k.startswith("byzfl.")}
    try:
        for pkg in ("byzfl", "byzfl.utils", "byzfl.aggregators"):
            module = types.ModuleType(pkg)
            module.__path__ = [str(root.joinpath(*pkg.split(".")[1:]))]
            sys.modules[pkg] = module
        loaded = {}
        for name, rel in (("byzfl.utils.torch_tools", "utils/torch_tools.py"), ("byzfl.utils.misc", "utils/misc.py"),
                          ("byzfl.aggregators.aggregators", "aggregators/aggregators.py"),
                          ("byzfl.aggregators.preaggregators", "aggregators/preaggregators.py")):
            s = importlib.util.spec_from_file_location(name, root / rel)
            module = importlib.util.module_from_spec(s)
            sys.modules[name] = module
            if name == "byzfl.utils.misc":
                sys.modules["byzfl.utils"].torch_tools = loaded["byzfl.utils.torch_tools"]
            s.loader.exec_module(module)
            loaded[name] = module
        return loaded["byzfl.aggregators.aggregators"], loaded["byzfl.aggregators.preaggregators"]
    finally:  # leave sys.modules as we found it
        for k in [k for k in sys.modules if k == "byzfl" or k.startswith("byzfl.")]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_byzfl_where_definitions_agree(seed):
    byz, pre = _byzfl()
    g = torch.Generator().manual_seed(seed)
    n, d, f = 12, 200, 2
    rows = [torch.randn(d, generator=g) * (1 + 3 * (i < f)) for i in range(n)]
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(agg("mean", rows).value, byz.Average()(rows), **close)
    torch.testing.assert_close(agg("median", rows, f=f).value, byz.Median()(rows), **close)  # quantile(0.5) == ours
    torch.testing.assert_close(agg("trimmed_mean", rows, f=f).value, byz.TrMean(f=f)(rows), **close)
    # ByzFL's Krum scores over the n-f-1 nearest neighbours (Blanchard et al. say n-f-2); ours with f is
    # theirs with f+1. Its Multi-Krum then averages n-(f+1) inputs, so ours needs m = n-f-1 to match.
    torch.testing.assert_close(agg("krum", rows, f=f).value, byz.Krum(f=f + 1)(rows), rtol=0, atol=0)
    torch.testing.assert_close(agg("multi_krum", rows, f=f, m=n - f - 1).value, byz.MultiKrum(f=f + 1)(rows), **close)
    # ByzFL's geometric median runs a fixed number of steps with an absolute smoothing; run it to convergence
    gm = byz.GeometricMedian(nu=1e-8, T=2000)(rows)
    ours = agg("geometric_median", rows, f=f, gm_tol=1e-12, gm_max_iter=2000, gm_smoothing=1e-12).value
    torch.testing.assert_close(ours, gm, rtol=1e-4, atol=1e-5)
    # NNM as a pre-step, then the mean: ByzFL's NNM mixes each input with its n-f nearest, as ours does
    torch.testing.assert_close(agg("mean", rows, f=f, nnm=True).value, byz.Average()(pre.NNM(f=f)(rows)), **close)
