"""Function-preserving growth: logits equal before and after each growth, and training carries on."""

import dataclasses

import pytest
import torch

from neuroray.config import ModelConfig
from neuroray.model import build_monolith, build_stage, merge_state_dicts, split_layers
from neuroray.model.growth import (
    depth_layout,
    flat_to_state,
    grow_module,
    grow_optimizer_state,
    grow_stages,
    grow_state_dict,
    new_ranges_for,
    state_to_flat,
)
from neuroray.planner import scaling

V = 61


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: one intra-op thread. Two threads on a shared 2-core box spin against each other (20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# head size 16 and 4 query heads per KV head throughout, as the scaling law keeps them
OLD = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, max_seq_len=48)
GROWTHS = {
    "depth": dataclasses.replace(OLD, n_layers=5),
    "width x2 (c = sqrt(2))": dataclasses.replace(OLD, d_model=128, n_heads=8, n_kv_heads=2),
    "width x3 (c = sqrt(3))": dataclasses.replace(OLD, d_model=192, n_heads=12, n_kv_heads=3),
    "ffn only": dataclasses.replace(OLD, ffn_hidden=320),
    "depth + width + ffn": dataclasses.replace(OLD, d_model=192, n_heads=12, n_kv_heads=3, n_layers=4, ffn_hidden=640),
}


def _trained_like(cfg=OLD, seed=1):
    """A monolith whose norm gains are not all 1 (as after training), so the 1/c compensation is exercised."""
    model = build_monolith(cfg, V, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _tokens(n=3, t=40, seed=0):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(GROWTHS))
def test_logits_equal_after_growth(name):
    model, x = _trained_like(), _tokens()
    with torch.no_grad():
        before = model(x)
        after = grow_module(model, GROWTHS[name], seed=5)(x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_logits_equal_along_the_scaling_law():
    """The law's own family (head size 64, 4 query heads per KV head): 8 x 256 -> 8 x 512, small vocabulary."""
    base = ModelConfig(max_seq_len=32)
    a, b = scaling.shape(8, 256, base), scaling.shape(8, 512, base)
    assert not scaling.growth_blockers(a, b)
    model, x = _trained_like(a), _tokens(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(grow_module(model, b, seed=1)(x), model(x), rtol=0, atol=1e-5)


def test_successive_growths():
    """Each growth preserves the function of the one before: depth, then width, then depth and width."""
    steps = [GROWTHS["depth"], dataclasses.replace(GROWTHS["depth"], d_model=128, n_heads=8, n_kv_heads=2),
             dataclasses.replace(GROWTHS["depth"], d_model=192, n_heads=12, n_kv_heads=3, n_layers=7)]
    model, x = _trained_like(), _tokens()
    with torch.no_grad():
        ref = model(x)
        for cfg in steps:
            model = grow_module(model, cfg, seed=len(cfg.__repr__()))
            torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)


def test_pipeline_growth_matches_monolith_and_repartitions():
    new = GROWTHS["depth + width + ffn"]
    model, x = _trained_like(), _tokens()
    old_ranges = split_layers(OLD.n_layers, 2)
    stages = [build_stage(OLD, V, s, old_ranges).state_dict().keys() for s in range(len(old_ranges))]
    stages = [{k: model.state_dict()[k] for k in keys} for keys in stages]
    for ranges in (new_ranges_for(old_ranges, OLD.n_layers, new.n_layers), split_layers(new.n_layers, 3)):
        grown = grow_stages(stages, OLD, new, ranges, seed=5)
        assert merge_state_dicts(grown).keys() == build_monolith(new, V).state_dict().keys()
        h = x
        with torch.no_grad():
            for s, sd in enumerate(grown):
                stage = build_stage(new, V, s, ranges)
                stage.load_state_dict(sd)
                h = stage(h)
            torch.testing.assert_close(h, model(x), rtol=0, atol=1e-5)
    # the same weights as growing the monolith
    mono = grow_state_dict(model.state_dict(), OLD, new, seed=5)
    grown = merge_state_dicts(grow_stages(stages, OLD, new, split_layers(new.n_layers, 3), seed=5))
    for k in mono:
        assert torch.equal(mono[k], grown[k]), k


def test_growth_is_deterministic_and_linear_for_diloco_state():
    """Every holder of a range grows identically, and differences grow by the same linear map:
    grow(theta0) - grow(theta) == grow_delta(theta0 - theta), so pseudo-gradients and momentum carry over."""
    new = GROWTHS["depth + width + ffn"]
    theta0 = _trained_like().state_dict()
    theta = {k: v + 0.01 * torch.randn_like(v) for k, v in theta0.items()}
    a, b = grow_state_dict(theta0, OLD, new, seed=9), grow_state_dict(theta0, OLD, new, seed=9)
    assert all(torch.equal(a[k], b[k]) for k in a)
    g0, g1 = a, grow_state_dict(theta, OLD, new, seed=9)
    delta = grow_state_dict({k: theta0[k] - theta[k] for k in theta0}, OLD, new, kind="delta")
    for k in delta:
        torch.testing.assert_close(g0[k] - g1[k], delta[k], rtol=0, atol=1e-6, msg=k)
    # flat vectors (the layout OuterSync keeps theta0 and momentum in) round-trip through state dicts
    small, big = build_monolith(OLD, V), build_monolith(new, V)
    flat = torch.cat([theta0[n].reshape(-1) - theta[n].reshape(-1) for n, _ in small.named_parameters()])
    grown = state_to_flat(grow_state_dict(flat_to_state(flat, small), OLD, new, kind="delta"), big)
    assert torch.equal(grown, state_to_flat(delta, big))


def test_new_parameters_get_gradients():
    """Zero writers with random readers: nothing new is stuck at a zero-gradient saddle."""
    new = GROWTHS["depth + width + ffn"]
    grown = grow_module(_trained_like(), new, seed=5)
    x = _tokens()
    grown.loss(grown(x[:, :-1]), x[:, 1:]).backward()
    d = OLD.d_model
    new_layer = depth_layout(OLD.n_layers, new.n_layers).index(None)
    checks = {
        "embed.weight (new columns)": grown.embed.weight.grad[:, d:],
        "layers.0.attn.wo.weight (new rows)": grown.layers["0"].attn.wo.weight.grad[d:],
        "layers.0.mlp.w2.weight (new rows)": grown.layers["0"].mlp.w2.weight.grad[d:],
        "layers.0.attn.wo.weight (new heads)": grown.layers["0"].attn.wo.weight.grad[:, OLD.d_model:],
        f"layers.{new_layer}.attn.wo.weight (new layer)": grown.layers[str(new_layer)].attn.wo.weight.grad,
        f"layers.{new_layer}.mlp.w2.weight (new layer)": grown.layers[str(new_layer)].mlp.w2.weight.grad,
    }
    for name, grad in checks.items():
        assert grad.abs().sum() > 0, name


_SUCCESSORS = torch.randint(0, V, (V, 3), generator=torch.Generator().manual_seed(7))


def _markov_batch(g, n=16, t=32):
    """A small learnable language: each token is followed by one of 3 fixed successors (entropy ln 3)."""
    seq = [torch.randint(0, V, (n,), generator=g)]
    for _ in range(t):
        seq.append(_SUCCESSORS[seq[-1], torch.randint(0, 3, (n,), generator=g)])
    s = torch.stack(seq, 1)
    return s[:, :-1], s[:, 1:]


def _train(model, opt, g, steps, held_out):
    """``steps`` AdamW steps on fresh batches; the held-out loss after each one."""
    losses = []
    for _ in range(steps):
        x, y = _markov_batch(g)
        loss = model.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            losses.append(model.loss(model(held_out[0]), held_out[1]).item())
    return losses


def test_training_continues_without_a_loss_jump():
    """Train, grow (width, heads, FFN and depth), carry AdamW over with grow_optimizer_state, train on
    the same batches as the un-grown model: the held-out loss follows the un-grown model's, no jump."""
    torch.manual_seed(0)
    new = GROWTHS["depth + width + ffn"]
    held_out = _markov_batch(torch.Generator().manual_seed(99), n=64)
    model = build_monolith(OLD, V, seed=1)

    def adamw(m):
        return torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)

    opt, g = adamw(model), torch.Generator().manual_seed(0)
    start = _train(model, opt, g, 60, held_out)
    with torch.no_grad():
        at_growth = model.loss(model(held_out[0]), held_out[1]).item()
        grown = grow_module(model, new, seed=2)
        assert abs(grown.loss(grown(held_out[0]), held_out[1]).item() - at_growth) < 1e-5
    assert at_growth < start[0] - 1.0  # the small model has learned something worth keeping
    opt2 = adamw(grown)
    opt2.load_state_dict(grow_optimizer_state(opt.state_dict(), [n for n, _ in model.named_parameters()],
                                              [n for n, _ in grown.named_parameters()], OLD, new))
    batches = g.get_state()
    fresh = grow_module(model, new, seed=2)
    after = _train(grown, opt2, g, 12, held_out)
    g.set_state(batches)
    jumped = _train(fresh, adamw(fresh), g, 12, held_out)  # the same growth with a fresh AdamW
    g.set_state(batches)
    unchanged = _train(model, opt, g, 12, held_out)  # the small model, not grown
    excess = [a - u for a, u in zip(after, unchanged)]
    assert max(excess) < 0.02, (at_growth, after, unchanged)
    # The check has teeth: a fresh AdamW takes a sign-sized step on every weight at once and the loss
    # jumps, which is why grow_optimizer_state exists.
    assert max(j - u for j, u in zip(jumped, unchanged)) > 0.05, (jumped, unchanged)


def test_growth_blockers_and_layout():
    with pytest.raises(ValueError, match="head size changes"):
        grow_state_dict(_trained_like().state_dict(), OLD, dataclasses.replace(OLD, d_model=128))
    with pytest.raises(ValueError, match="n_layers shrinks"):
        grow_state_dict(_trained_like().state_dict(), OLD, dataclasses.replace(OLD, n_layers=1))
    with pytest.raises(ValueError, match="query heads per KV head"):
        grow_state_dict(_trained_like().state_dict(), OLD, dataclasses.replace(OLD, d_model=128, n_heads=8, n_kv_heads=8))
    assert depth_layout(16, 24) == [x for i in range(0, 16, 2) for x in (i, i + 1, None)]
    assert depth_layout(4, 5) == [0, 1, 2, 3, None]
    assert depth_layout(3, 3) == [0, 1, 2]
    assert new_ranges_for([(0, 1), (1, 2)], 2, 4) == [(0, 2), (2, 4)]


def test_each_holder_grows_its_own_optimizer_state():
    """Keeping the old split (new_ranges_for), every holder can grow its AdamW state alone, fully."""
    new = GROWTHS["depth + width + ffn"]
    old_ranges = split_layers(OLD.n_layers, 2)
    ranges = new_ranges_for(old_ranges, OLD.n_layers, new.n_layers)
    x = _tokens()
    for s in range(2):
        stage = build_stage(OLD, V, s, old_ranges)
        opt = torch.optim.AdamW(stage.parameters(), lr=1e-3)
        inp = x if s == 0 else torch.randn(3, 40, OLD.d_model)
        stage(inp).float().pow(2).mean().backward()
        opt.step()
        grown_stage = build_stage(new, V, s, ranges)
        state = grow_optimizer_state(opt.state_dict(), [n for n, _ in stage.named_parameters()],
                                     [n for n, _ in grown_stage.named_parameters()], OLD, new)
        fresh = torch.optim.AdamW(grown_stage.parameters(), lr=1e-3)
        fresh.load_state_dict(state)
        assert len(state["state"]) == len(list(grown_stage.parameters()))
        for p, st in zip(grown_stage.parameters(), (state["state"][i] for i in range(len(state["state"])))):
            assert st["exp_avg"].shape == p.shape and float(st["step"]) == 1
