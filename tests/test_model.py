"""Model: shapes, causality, split-independent init, and pipeline-chained stages == the monolith."""

from __future__ import annotations

import pytest
import torch

from neuroray.config import ModelConfig
from neuroray.model import (
    StageModule,
    apply_rope,
    build_monolith,
    build_stage,
    count_parameters,
    ffn_hidden_size,
    merge_state_dicts,
    rope_cache,
    split_layers,
)

V = 97  # odd vocabulary, so no shape coincides with d_model by accident
B, T = 2, 12


@pytest.fixture
def cfg() -> ModelConfig:
    # n_kv_heads < n_heads exercises grouped-query attention.
    return ModelConfig(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=16)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def build_split(cfg: ModelConfig, n_stages: int, seed: int = 0) -> list[StageModule]:
    ranges = split_layers(cfg.n_layers, n_stages)
    return [build_stage(cfg, V, i, ranges, seed=seed) for i in range(n_stages)]


def test_ffn_hidden_size():
    assert ffn_hidden_size(ModelConfig(d_model=128)) == 384  # 341.3 -> next multiple of 64
    assert ffn_hidden_size(ModelConfig(d_model=96)) == 256
    assert ffn_hidden_size(ModelConfig(d_model=96, ffn_hidden=100)) == 100


def test_stage_shapes_and_attributes(cfg):
    first, mid, last = build_split(cfg, 3)
    assert [(s.layer_start, s.layer_end) for s in (first, mid, last)] == [(0, 2), (2, 3), (3, 4)]
    assert (first.has_embedding, first.has_head) == (True, False)
    assert (mid.has_embedding, mid.has_head) == (False, False)
    assert (last.has_embedding, last.has_head) == (False, True)
    assert not hasattr(mid, "embed") and not hasattr(mid, "lm_head")
    h = first(tokens())
    assert h.shape == (B, T, cfg.d_model) and h.dtype == torch.float32
    h = mid(h)
    assert h.shape == (B, T, cfg.d_model)
    logits = last(h)
    assert logits.shape == (B, T, V)
    assert StageModule.loss(logits, tokens(1)).shape == ()
    assert sum(count_parameters(s) for s in (first, mid, last)) == count_parameters(build_monolith(cfg, V))


def test_state_dict_keys_are_global_and_rope_is_not_persisted(cfg):
    _, last = build_split(cfg, 2)
    keys = set(last.state_dict())
    assert "layers.3.attn.wq.weight" in keys and "layers.0.attn.wq.weight" not in keys
    assert {"norm.weight", "lm_head.weight"} <= keys
    assert not any("rope" in k for k in keys)


def test_causality(cfg):
    model = build_monolith(cfg, V).eval()
    x = tokens()
    t = 7
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % V
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_init_does_not_touch_global_rng(cfg):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_monolith(cfg, V)
    assert torch.equal(torch.rand(3), expected)


def test_seed_changes_init(cfg):
    a, b = build_monolith(cfg, V, seed=0), build_monolith(cfg, V, seed=1)
    assert not torch.equal(a.layers["0"].attn.wq.weight, b.layers["0"].attn.wq.weight)
    assert torch.equal(a.layers["0"].attn.wq.weight, build_monolith(cfg, V, seed=0).layers["0"].attn.wq.weight)


def test_residual_projections_are_scaled(cfg):
    model = build_monolith(cfg, V)  # 32x32 = 1024 samples: std estimate within ~2%, and init is seeded
    wq_std = model.layers["0"].attn.wq.weight.std().item()
    wo_std = model.layers["0"].attn.wo.weight.std().item()
    assert wq_std == pytest.approx(cfg.init_std, rel=0.1)
    assert wo_std == pytest.approx(cfg.init_std / (2 * cfg.n_layers) ** 0.5, rel=0.1)
    assert torch.equal(model.norm.weight, torch.ones(cfg.d_model))


@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_split_independent_init(cfg, n_stages):
    mono = build_monolith(cfg, V, seed=5).state_dict()
    stages = build_split(cfg, n_stages, seed=5)
    for stage in stages:
        for key, value in stage.state_dict().items():
            assert torch.equal(value, mono[key]), key
    merged = merge_state_dicts([s.state_dict() for s in stages])
    assert merged.keys() == mono.keys()
    assert all(torch.equal(merged[k], mono[k]) for k in mono)


def test_merge_state_dicts_rejects_overlap(cfg):
    sd = build_split(cfg, 2)[0].state_dict()
    with pytest.raises(ValueError, match="overlap"):
        merge_state_dicts([sd, sd])


@pytest.mark.parametrize("n_stages", [2, 3])
def test_chained_stages_match_monolith(cfg, n_stages):
    x, targets = tokens(0), tokens(1)

    mono = build_monolith(cfg, V, seed=3)
    mono_logits = mono(x)
    StageModule.loss(mono_logits, targets).backward()
    mono_grads = {name: p.grad for name, p in mono.named_parameters()}

    # Forward as the pipeline does: each stage gets a detached copy of what the previous one sent.
    stages = build_split(cfg, n_stages, seed=3)
    inputs, outputs, received = [], [], x
    for i, stage in enumerate(stages):
        inp = received if i == 0 else received.detach().requires_grad_(True)
        out = stage(inp)
        inputs.append(inp)
        outputs.append(out)
        received = out
    logits = outputs[-1]
    torch.testing.assert_close(logits, mono_logits, rtol=1e-5, atol=1e-6)

    # Backward stage by stage, last to first, handing inp.grad to the previous stage.
    loss = StageModule.loss(logits, targets)
    loss.backward()
    for i in range(n_stages - 2, -1, -1):
        outputs[i].backward(inputs[i + 1].grad)

    seen = set()
    for stage in stages:
        for name, p in stage.named_parameters():
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, mono_grads[name], rtol=1e-5, atol=1e-7, msg=name)
            seen.add(name)
    assert seen == mono_grads.keys()


def test_rope_offset_matches_full_sequence():
    head_dim, max_len = 8, 16
    cos, sin = rope_cache(head_dim, max_len)
    x = torch.randn(2, 3, 10, head_dim)  # [B, H, T, hd]
    full = apply_rope(x, cos, sin)
    for p in (0, 4, 9):
        one = apply_rope(x[:, :, p : p + 1], cos, sin, start_pos=p)
        torch.testing.assert_close(one, full[:, :, p : p + 1])
    # Position 0 is the identity rotation, and rotations preserve norms.
    torch.testing.assert_close(full[:, :, 0], x[:, :, 0])
    torch.testing.assert_close(full.norm(dim=-1), x.norm(dim=-1))


def test_start_pos_past_max_seq_len_raises(cfg):
    model = build_monolith(cfg, V)
    x = tokens()  # T = 12, max_seq_len = 16
    model(x[:, :4], start_pos=12)  # positions 12..15 fit exactly
    with pytest.raises(ValueError, match="max_seq_len"):
        model(x[:, :4], start_pos=13)


@pytest.mark.parametrize("n_layers", [1, 2, 5, 7, 12])
def test_split_layers_covers_each_layer_once(n_layers):
    for n_stages in range(1, n_layers + 1):
        ranges = split_layers(n_layers, n_stages)
        assert len(ranges) == n_stages
        layers = [i for start, end in ranges for i in range(start, end)]
        assert layers == list(range(n_layers))
        sizes = [end - start for start, end in ranges]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # the extra layers go to the earlier stages


def test_split_layers_errors():
    with pytest.raises(ValueError, match="at least one layer"):
        split_layers(3, 4)
    with pytest.raises(ValueError):
        split_layers(3, 0)
    with pytest.raises(ValueError):
        split_layers(0, 1)
