"""model.activation_checkpointing: the same gradients as without it (fp32 and bf16 autocast), only block inputs
kept between forward and backward (what the planner counts), and the flag reaching the holders from the config
through every backward path (the fixed pipeline's backward and the router's recompute_backward)."""

from dataclasses import replace

import pytest
import torch

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.configure import load_config
from neuroray.model import StageModule
from neuroray.planner.memory import Batch, activation_bytes_per_token_layer, holder_memory
from neuroray.swarm.holder import HolderSpec, StageHolder

CFG = ModelConfig(d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32)
CKPT = replace(CFG, activation_checkpointing=True)
V = 96


def _grads(cfg, first, last, x, amp=None):
    """Parameter gradients (and the input's, for a non-first stage) of one forward + backward."""
    module = StageModule(cfg, V, 0, 3, has_embedding=first, has_head=last, seed=3)
    inp = x if first else x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        out = module(inp)
        loss = module.loss(out, torch.roll(x, -1, 1)) if last else (out.float() ** 2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    if not first:
        grads["input"] = inp.grad
    return grads


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("first, last", [(True, True), (False, False)], ids=["monolith", "middle"])
def test_checkpointing_gives_the_same_gradients(first, last, amp):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (2, 24), generator=g) if first else torch.randn(2, 24, CFG.d_model, generator=g)
    plain, recomputed = _grads(CFG, first, last, x, amp), _grads(CKPT, first, last, x, amp)
    assert plain.keys() == recomputed.keys()
    for name in plain:  # the recomputation repeats the forward op for op: tight even under bf16
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)


def _saved_bytes(module, x):
    """Bytes autograd saves for backward in one forward (parameters and buffers excluded)."""
    own = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def test_checkpointing_keeps_only_block_inputs_as_the_planner_counts():
    b, t = 2, 24
    x = torch.randn(b, t, CFG.d_model, requires_grad=True)
    plain = _saved_bytes(StageModule(CFG, V, 0, 3, has_embedding=False, has_head=False), x)
    kept = _saved_bytes(StageModule(CKPT, V, 0, 3, has_embedding=False, has_head=False), x)
    assert kept == 3 * b * t * CFG.d_model * 4  # each block's float32 input, nothing else
    assert activation_bytes_per_token_layer(CKPT, "fp32") * 3 * b * t == kept
    assert activation_bytes_per_token_layer(CFG, "fp32") * 3 * b * t == plain
    # the planner's holder: in-flight activations fall from a full layer's to one input per layer
    batch = Batch(b, t, 2)
    on = holder_memory(CKPT, V, 3, has_embedding=False, has_head=False, batch=batch, overhead=0)
    off = holder_memory(CFG, V, 3, has_embedding=False, has_head=False, batch=batch, overhead=0)
    assert on.activations < off.activations / 4 and on.params == off.params


def _pipeline(tmp_path, model, precision="fp32"):
    ranges = [(0, 2), (2, 3)]
    return [StageHolder(HolderSpec(replica=0, stage=s, ranges=ranges, model=model, vocab_size=V,
                                   diloco=DilocoConfig(inner_lr=1e-2), seed=0, precision=precision,
                                   key_path=str(tmp_path / f"h{s}.pem"))) for s in range(2)]


def _pipeline_grads(holders, recompute: bool):
    """One microbatch through driver -> validator and back: the fixed pipeline's backward, or the router's
    recompute_backward (the Driver rebuilds its graph from the input); every holder's gradients."""
    d, v = holders
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    act = d.forward(0, x)
    loss, grad = v.forward_backward(0, act, torch.roll(x, -1, 1), 1.0)
    if recompute:
        d.recompute_backward(0, x, grad)
    else:
        d.backward(0, grad)
    return loss, {**d.grads(), **v.grads()}


@pytest.mark.parametrize("recompute", [False, True], ids=["backward", "recompute_backward"])
def test_flag_reaches_the_holders_and_their_gradients_match(tmp_path, recompute):
    cfg = load_config(["model.activation_checkpointing=true"])
    assert cfg.model.activation_checkpointing and not load_config([]).model.activation_checkpointing
    model = replace(cfg.model, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32)
    on = _pipeline(tmp_path, model)
    assert all(h.compute.module.cfg.activation_checkpointing for h in on)
    loss_on, grads_on = _pipeline_grads(on, recompute)
    loss_off, grads_off = _pipeline_grads(_pipeline(tmp_path, replace(model, activation_checkpointing=False)),
                                          recompute)
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) == len(list(on[0].compute.module.parameters())) + \
        len(list(on[1].compute.module.parameters()))
    for name in grads_on:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-6, atol=1e-7, msg=name)


def test_a_snapshot_without_the_flag_restores_into_a_holder_with_it(tmp_path):
    """The flag is how this run trains, not part of the shapes a snapshot records: restoring one taken without
    it (or before the flag existed) keeps the restoring holder's choice and its module."""
    model = replace(CFG, activation_checkpointing=True)
    off = _pipeline(tmp_path, replace(model, activation_checkpointing=False))[0]
    on = _pipeline(tmp_path, model)[0]
    module = on.compute.module
    on.restore(off.capture(0))
    assert on.compute.module is module and on.compute.module.cfg.activation_checkpointing


def test_a_model_trained_with_checkpointing_exports_as_without():
    from neuroray.model.hf import model_config_to_hf

    assert model_config_to_hf(CKPT, V) == model_config_to_hf(CFG, V)
