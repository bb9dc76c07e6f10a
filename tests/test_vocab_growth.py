"""Vocabulary growth: embedding and LM head keep their rows, new rows train, AdamW follows the new tensors."""

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from neuroray.config import ModelConfig
from neuroray.model import build_monolith, build_stage, split_layers
from neuroray.model.vocab import grow_vocab, new_rows, regrow_flat

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
OLD, NEW = 50, 64
BETAS = (0.9, 0.95)


def _trained(steps: int = 3):
    model = build_monolith(CFG, OLD, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=BETAS, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randint(0, OLD, (2, 8), generator=g), torch.randint(0, OLD, (2, 8), generator=g)
        model.loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def test_growth_keeps_old_rows_and_adamw_state_and_one_step_trains_new_rows():
    model, opt = _trained()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    old_state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()
                 if n in ("embed.weight", "lm_head.weight")}
    x_old = torch.randint(0, OLD, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits_before = model(x_old)

    replaced = grow_vocab(model, NEW, opt, seed=1)

    assert set(replaced) == {"embed.weight", "lm_head.weight"} and model.vocab_size == NEW
    assert model.embed.num_embeddings == NEW and model.lm_head.out_features == NEW
    held = [p for group in opt.param_groups for p in group["params"]]
    for name, (old, new) in replaced.items():
        assert new.shape == (NEW, CFG.d_model) and any(p is new for p in held) and not any(p is old for p in held)
        assert old not in opt.state and new in opt.state
        torch.testing.assert_close(new[:OLD], before[name], rtol=0, atol=0)  # old rows bit for bit
        mean = before[name].mean(0)
        assert (new[OLD:] - mean).abs().max() < before[name].std(0).max()  # near the mean, not random
        assert not torch.equal(new[OLD], new[OLD + 1])  # noise tells new rows apart
        st = opt.state[new]
        assert torch.equal(st["step"], old_state[name]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key][:OLD], old_state[name][key]) and not st[key][OLD:].any()
    with torch.no_grad():  # old tokens' logits unchanged; the new ones are appended
        torch.testing.assert_close(model(x_old)[..., :OLD], logits_before, rtol=0, atol=0)

    # One step with new ids as inputs and targets: new rows move, old rows continue their AdamW state.
    x = torch.tensor([[OLD, OLD + 3, 7, NEW - 1, 2, 9, OLD + 1, 4]])
    y = torch.tensor([[OLD + 3, 7, NEW - 1, 2, 9, OLD + 1, 4, OLD]])
    model.loss(model(x), y).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    emb_new_before = model.embed.weight[OLD:].detach().clone()
    head_new_before = model.lm_head.weight[OLD:].detach().clone()
    opt.step()
    assert not torch.equal(model.embed.weight[[0, 3, 1]].detach(), emb_new_before[[0, 3, 1]])
    assert (model.lm_head.weight[OLD:].detach() != head_new_before).any(dim=1).all()
    b1, b2 = BETAS
    for name in ("embed.weight", "lm_head.weight"):
        p = dict(model.named_parameters())[name]
        st = opt.state[p]
        assert int(st["step"]) == int(old_state[name]["step"]) + 1
        g_old = grads[name][:OLD]
        torch.testing.assert_close(st["exp_avg"][:OLD], b1 * old_state[name]["exp_avg"] + (1 - b1) * g_old)
        torch.testing.assert_close(st["exp_avg_sq"][:OLD], b2 * old_state[name]["exp_avg_sq"] + (1 - b2) * g_old**2)
        torch.testing.assert_close(st["exp_avg"][OLD:], (1 - b1) * grads[name][OLD:])  # fresh from zero


def test_stages_grow_like_the_monolith_and_theta0_follows():
    ranges = split_layers(CFG.n_layers, 2)
    mono = build_monolith(CFG, OLD, seed=4)
    first, last = (build_stage(CFG, OLD, s, ranges, seed=4) for s in range(2))
    for m in (mono, first, last):
        grow_vocab(m, NEW, seed=4)
    torch.testing.assert_close(first.embed.weight, mono.embed.weight, rtol=0, atol=0)
    torch.testing.assert_close(last.lm_head.weight, mono.lm_head.weight, rtol=0, atol=0)
    assert not hasattr(first, "lm_head") and not hasattr(last, "embed")

    stage = build_stage(CFG, OLD, 0, ranges, seed=4)
    shapes = [p.shape for p in stage.parameters()]
    theta0 = parameters_to_vector(stage.parameters()).detach().clone()
    grow_vocab(stage, NEW, seed=4)
    grown = regrow_flat(theta0, shapes, stage, new_from_module=True)
    assert torch.equal(grown, parameters_to_vector(stage.parameters()).detach())
    momentum = regrow_flat(torch.ones_like(theta0), shapes, stage, new_from_module=False)
    assert momentum.numel() == grown.numel() and momentum.sum() == theta0.numel()


def test_growth_refuses_to_shrink_and_to_lose_the_optimizer():
    model, opt = _trained(1)
    with pytest.raises(ValueError, match="only grows"):
        grow_vocab(model, OLD - 1, opt)
    assert grow_vocab(model, OLD, opt) == {}
    other = torch.optim.AdamW(build_monolith(CFG, OLD).parameters())
    with pytest.raises(ValueError, match="does not hold"):
        grow_vocab(model, NEW, other)
    assert new_rows(torch.ones(1, 4), 2, 0, "x").shape == (2, 4)  # one old row: zero std, no NaN
