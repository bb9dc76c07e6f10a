"""KV cache: incremental decoding equals a full forward pass at every step, on 1, 2 and 3 stages.

The reference at step t is a fresh full forward over ``ids[:t + 1]`` (no cache, positions 0..t), the
training computation. A cache that restarted RoPE at position 0 on each chunk (DESIGN.md section 5)
fails these tests, and ``test_positions_from_zero_would_be_caught`` shows that it would.
"""

from __future__ import annotations

import pytest
import torch

from neuroray.config import ModelConfig
from neuroray.model import StageModule, build_monolith, build_stage, split_layers
from neuroray.model.kv_cache import CacheMissError, KVCache, LayerKV, SessionKV

V = 97
TOL = dict(rtol=0, atol=1e-5)
# n_kv_heads < n_heads exercises grouped-query attention with the cache; 5 layers split unevenly.
CFG = ModelConfig(d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, max_seq_len=40)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matmuls: a second OpenMP thread only adds sync cost, and on a busy 2-core box it can stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(seed))


def stages_of(n_stages: int) -> list[StageModule]:
    ranges = split_layers(CFG.n_layers, n_stages)
    return [build_stage(CFG, V, i, ranges, seed=7).eval() for i in range(n_stages)]


@pytest.fixture(scope="module")
def mono() -> StageModule:
    return build_monolith(CFG, V, seed=7).eval()


@torch.no_grad()
def pipeline_cached(stages, caches, x, lengths, last_only=False):
    """Chain stages the way the holders do: each stage continues its own cache."""
    h = x
    for stage, c in zip(stages, caches):
        h = stage.forward_cached(h, c, lengths, last_only=last_only and stage.has_head)
    return h


@pytest.mark.parametrize("n_stages", [1, 2, 3])
@pytest.mark.parametrize("prompt_len", [1, 2, 7, 16])
def test_incremental_equals_full_forward_every_step(mono, n_stages, prompt_len):
    stages = stages_of(n_stages)
    total = prompt_len + 12
    ids = ids_of(total, seed=prompt_len)
    caches = [[s.new_cache()] for s in stages]
    with torch.no_grad():
        logits = pipeline_cached(stages, caches, ids[:, :prompt_len], [prompt_len])
        torch.testing.assert_close(logits, mono(ids[:, :prompt_len]), **TOL)  # prefill: every position
        for t in range(prompt_len, total):  # then one token per step, at position t
            step = pipeline_cached(stages, caches, ids[:, t : t + 1], [1])
            full = mono(ids[:, : t + 1])[:, -1]
            torch.testing.assert_close(step[:, -1], full, **TOL, msg=f"step at position {t}")
            assert all(c[0].length == t + 1 for c in caches)


@pytest.mark.parametrize("n_stages", [1, 3])
def test_chunked_prefill_attends_to_the_cached_prefix(mono, n_stages):
    """Chunks longer than one token after a prefix need the explicit mask (is_causal would hide the prefix)."""
    stages = stages_of(n_stages)
    ids = ids_of(30, seed=3)
    full = mono(ids).detach()
    caches = [[s.new_cache()] for s in stages]
    pos = 0
    for n in (5, 3, 1, 8, 2, 11):
        out = pipeline_cached(stages, caches, ids[:, pos : pos + n], [n])
        torch.testing.assert_close(out, full[:, pos : pos + n], **TOL, msg=f"chunk at {pos}..{pos + n - 1}")
        pos += n


def test_packed_sessions_equal_each_alone(mono):
    """Several sessions of different lengths in one packed batch, each at its own position."""
    prompts = [ids_of(n, seed=10 + n) for n in (3, 9, 1, 5)]
    caches = [mono.new_cache() for _ in prompts]
    with torch.no_grad():
        x = torch.cat(prompts, dim=1)
        last = mono.forward_cached(x, caches, [p.shape[1] for p in prompts], last_only=True)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(last[i], mono(p)[0, -1], **TOL)
        nxt = [ids_of(1, seed=20 + i) for i in range(len(prompts))]
        last = mono.forward_cached(torch.cat(nxt, dim=1), caches, [1] * len(prompts), last_only=True)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(last[i], mono(torch.cat([p, nxt[i]], dim=1))[0, -1], **TOL)


def test_positions_from_zero_would_be_caught(mono):
    """The section-5 bug (RoPE from 0 for every chunk) changes the logits far beyond the tolerance."""
    ids = ids_of(12, seed=4)
    with torch.no_grad():
        right = mono(ids)[0, -1]
        # What a buggy cache computes for the last token: its query/key rotated as position 0.
        cache = mono.new_cache()
        mono.forward_cached(ids[:, :11], [cache], [11])
        for kv in cache.layers.values():
            kv.length = 0  # positions would restart at 0 ...
        wrong = mono(ids[:, 11:])[0, -1]  # ... which is the model seeing the last token alone at position 0
    assert (right - wrong).abs().max() > 100 * TOL["atol"]


def test_training_path_unchanged(mono):
    """No cache: the full-sequence forward is the same computation it always was (bit for bit)."""
    ids = ids_of(20, seed=5)
    with torch.no_grad():
        a = mono(ids)
        b = mono.forward_cached(ids, [mono.new_cache()], [20])  # a fresh prefill runs the same is_causal kernel
    assert torch.equal(a, b)


def test_overflow_is_refused_before_the_cache_changes(mono):
    cache = mono.new_cache()
    with torch.no_grad():
        mono.forward_cached(ids_of(38), [cache], [38])
        with pytest.raises(ValueError, match="max_seq_len=40"):
            mono.forward_cached(ids_of(3), [cache], [3])
    assert cache.length == 38


def test_bad_packing_is_refused(mono):
    with pytest.raises(ValueError, match="does not match"):
        mono.forward_cached(ids_of(4), [mono.new_cache()], [3])
    with pytest.raises(ValueError, match="cannot serve"):
        stages = stages_of(2)
        stages[1].forward_cached(torch.zeros(1, 2, CFG.d_model), [stages[0].new_cache()], [2])


def test_layer_kv_grows_by_doubling():
    kv = LayerKV()
    k = torch.randn(1, 2, 1, 4)
    for i in range(40):
        k_all, _ = kv.append(k + i, k - i)
        assert k_all.shape[2] == i + 1
    assert kv.k.shape[2] == 64  # 16 -> 32 -> 64, not one copy per token
    assert torch.equal(kv.k[0, 0, 39], (k + 39)[0, 0, 0])


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_kv_cache_sessions_truncate_miss_expire():
    clock = Clock()
    cache = KVCache([0, 1], ttl_s=10, clock=clock, name="h")
    a, b = cache.acquire([("a", 0), ("b", 0)])
    for c, n in ((a, 5), (b, 3)):
        for kv in c.layers.values():
            kv.append(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2))
    assert (a.length, b.length) == (5, 3) and cache.nbytes > 0
    # A retried step at an earlier position truncates (idempotent); a later one is a miss, and changes nothing.
    (a2,) = cache.acquire([("a", 4)])
    assert a2 is a and a.length == 4
    with pytest.raises(CacheMissError, match="b, zz") as err:
        cache.acquire([("a", 4), ("b", 7), ("zz", 1)])
    assert err.value.sessions == ["b", "zz"] and b.length == 3
    with pytest.raises(ValueError, match="same session twice"):
        cache.acquire([("a", 4), ("a", 4)])
    # Expiry frees idle sessions only.
    clock.t = 8
    cache.acquire([("b", 3)])
    clock.t = 12
    assert cache.expire() == ["a"] and "a" not in cache and "b" in cache
    clock.t = 30
    assert cache.expire() == ["b"] and cache.nbytes == 0 and len(cache) == 0 and cache.expired == 2
    assert cache.close("b") is False


def test_kv_cache_lru_bound():
    cache = KVCache([0], max_sessions=2)
    cache.acquire([("a", 0)])
    cache.acquire([("b", 0)])
    cache.acquire([("a", 0)])  # a is now the most recently used
    cache.acquire([("c", 0)])
    assert list(cache.sessions) == ["a", "c"]
    cache.acquire([("x", 0), ("y", 0), ("z", 0)])  # a batch larger than the bound is kept whole
    assert {"x", "y", "z"} <= set(cache.sessions)


def test_session_kv_length_is_the_next_position():
    s = SessionKV(range(2, 4))
    assert s.length == 0 and s.nbytes == 0
    for kv in s.layers.values():
        kv.append(torch.zeros(1, 1, 6, 2), torch.zeros(1, 1, 6, 2))
    assert s.length == 6
    s.truncate(2)
    assert s.length == 2
