"""The scaling law (memory -> architecture), parameter counts, memory units and per-holder accounting."""

import math

import pytest
import torch
from torch import nn

from neuroray.config import DataConfig, ModelConfig, TrainConfig
from neuroray.config_checks import validate
from neuroray.model.layers import Block, RMSNorm
from neuroray.model.stage import StageModule
from neuroray.planner import scaling
from neuroray.planner.memory import (
    BYTES_PER_PARAM,
    Batch,
    MemoryUnitError,
    activation_bytes_per_token_layer,
    activation_elems_per_token_layer,
    format_bytes,
    full_layer_bytes_per_token,
    head_bytes_per_token,
    head_elems_per_token,
    holder_memory,
    matmul_params_per_layer,
    parse_memory,
)

GB, TB = 10**9, 10**12
# The seed's Dynamic Architecture table (seed/how-it-works.md): memory -> (layers, width, params as stated)
SEED = {40 * GB: (16, 1024, "350M"), 300 * GB: (24, 2048, "2.7B"), 800 * GB: (32, 3072, "9.2B"),
        4 * TB: (48, 5120, "47B"), 8 * TB: (64, 7168, "123B")}
ROWS = [2 * GB, 40 * GB, 300 * GB, 800 * GB, 4 * TB, 8 * TB]
VOCAB = DataConfig().vocab_size


def _human(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _exact_params(cfg: ModelConfig, vocab: int) -> int:
    """Count the real modules' parameters, built on the meta device (no memory even at 123B)."""
    with torch.device("meta"):
        layer = sum(p.numel() for p in Block(cfg).parameters())
        ends = nn.Embedding(vocab, cfg.d_model), RMSNorm(cfg.d_model), nn.Linear(cfg.d_model, vocab, bias=False)
    return cfg.n_layers * layer + sum(p.numel() for m in ends for p in m.parameters())


def test_seed_table_beside_ours():
    lines = [
        f"scaling law: width = 1024 (M/40GB)^0.375 -> nearest multiple of 512, depth = 16 (M/40GB)^0.25 -> "
        f"nearest multiple of 8; {scaling.PARAM_FORMULA}, V = {VOCAB}",
        f"{'memory':>7} | {'seed arch':>10} {'seed P':>6} | {'raw L x d':>13} {'ours':>10} {'width':>6} | "
        f"{'P (ours)':>8} {'layers only':>11} {'12 L d^2':>8}",
    ]
    for m in ROWS:
        cfg = scaling.architecture_for_memory(m)
        pc = scaling.param_count(cfg, VOCAB)
        assert pc.total == _exact_params(cfg, VOCAB)  # the formula is the code's real count
        seed = SEED.get(m)
        seed_arch = f"{seed[0]} x {seed[1]}" if seed else "-"
        diff = f"{cfg.d_model / seed[1] - 1:+.0%}" if seed else "-"
        lines.append(
            f"{format_bytes(m):>7} | {seed_arch:>10} {seed[2] if seed else '-':>6} | "
            f"{scaling.raw_depth(m):5.1f} x {scaling.raw_width(m):5.0f} {cfg.n_layers:>3} x {cfg.d_model:<4} "
            f"{diff:>6} | {_human(pc.total):>8} {_human(pc.layers):>11} {_human(12 * cfg.n_layers * cfg.d_model ** 2):>8}"
        )
        if seed:
            assert cfg.n_layers == seed[0], f"depth at {format_bytes(m)}"
            assert abs(cfg.d_model / seed[1] - 1) <= 0.15, f"width at {format_bytes(m)}"
    print("\n" + "\n".join(lines))


def test_parameters_grow_linearly_with_memory():
    """Unrounded: depth * width^2 ~ M exactly; rounded: within the rounding's reach of linear."""
    ref = scaling.raw_depth(40 * GB) * scaling.raw_width(40 * GB) ** 2 / (40 * GB)
    for m in (1 * GB, 17 * GB, 300 * GB, 8 * TB, 100 * TB):
        assert math.isclose(scaling.raw_depth(m) * scaling.raw_width(m) ** 2 / m, ref, rel_tol=1e-12)
    assert math.isclose(math.log(scaling.raw_width(4 * TB) / scaling.raw_width(40 * GB))
                        / math.log(scaling.raw_depth(4 * TB) / scaling.raw_depth(40 * GB)), 0.6 / 0.4)


def test_every_architecture_is_valid_and_can_grow_into_the_next():
    previous = None
    for i in range(60):
        m = 10 ** (8 + i / 10)  # 100 MB .. 80 TB, log-spaced
        cfg = scaling.architecture_for_memory(m)
        validate(TrainConfig(model=cfg))  # the project's own checks: heads divide, RoPE head size even, ...
        assert cfg.d_model // cfg.n_heads == scaling.HEAD_DIM and cfg.n_heads == scaling.KV_GROUP * cfg.n_kv_heads
        assert cfg.n_layers % 8 == 0 and cfg.ffn_hidden % 64 == 0 and cfg.ffn_hidden >= 8 * cfg.d_model / 3
        assert cfg.d_model % 512 == 0 or cfg.d_model == 256
        if previous is not None:  # more memory never needs a shrink: every upgrade is function-preserving
            assert scaling.growth_blockers(previous, cfg) == []
        previous = cfg


def test_parse_memory_units():
    assert parse_memory("8GB") == 8 * 10**9
    assert parse_memory("8GiB") == 8 * 2**30
    assert parse_memory("1.5TB") == 1_500_000_000_000
    assert parse_memory("512 mib") == 512 * 2**20
    assert parse_memory("400MB") == 4 * 10**8


@pytest.mark.parametrize("bad, says", [("8", "has no unit; write it with one, e.g. 8GB"), ("8GiBs", "unknown unit 'GiBs'"),
                                       ("GB", "not a size"), ("0GB", "more than zero"), ("-1GB", "not a size"),
                                       ("8 G B", "not a size")])
def test_parse_memory_rejects_wrong_units(bad, says):
    with pytest.raises(MemoryUnitError, match=says):
        parse_memory(bad)


def test_bytes_per_parameter_are_itemised():
    cfg = ModelConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=1)
    batch = Batch(microbatch_size=2, seq_len=16, num_microbatches=3)
    mem = holder_memory(cfg, 300, 2, has_embedding=True, has_head=False, batch=batch, overhead=1000)
    pc = scaling.param_count(cfg, 300)
    assert mem.params == 2 * pc.per_layer + pc.embedding
    # a small range: the snapshot's copies fit in the heap training and the outer step freed, so only
    # safetensors' file buffer and its copy (2 x 16 B) count (tests/test_memory_allocator.py)
    assert (mem.weights, mem.grads, mem.adam, mem.diloco, mem.snapshot) == (
        4 * mem.params, 4 * mem.params, 8 * mem.params, 4 * mem.params, 32 * mem.params)
    assert BYTES_PER_PARAM == 20
    a = activation_elems_per_token_layer(cfg)
    assert mem.activations == 4 * batch.tokens * 3 * (2 * a + cfg.d_model)
    # backward works on one layer at a time and sends one gradient; AdamW's 8 B / param is larger here
    assert mem.working == max(4 * batch.tokens * (a + cfg.d_model), 8 * mem.params - mem.activations)
    assert mem.outer == 12 * mem.params
    last = holder_memory(cfg, 300, 2, has_embedding=False, has_head=True, batch=batch, overhead=1000)
    assert last.activations == 4 * batch.tokens * (2 * a + cfg.d_model)
    assert last.working >= 4 * batch.tokens * (a + cfg.d_model + head_elems_per_token(cfg, 300))
    assert mem.total == (mem.weights + mem.grads + mem.adam + mem.diloco + mem.activations + mem.working
                         + mem.outer + mem.snapshot + 1000)
    quiet = holder_memory(cfg, 300, 2, has_embedding=True, has_head=False, batch=batch, overhead=1000, snapshots=False)
    assert quiet.snapshot == 0 and mem.total - quiet.total == 32 * mem.params


def _saved_bytes(module, run, amp=None) -> int:
    """Bytes autograd saves for backward (parameters and buffers excluded), unique storages."""
    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in own:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", amp, enabled=amp is not None):
        run()
    return sum(seen.values())


@pytest.mark.parametrize("heads, kv", [(4, 1), (4, 2), (4, 4), (8, 2)])
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_formula_matches_what_autograd_saves(heads, kv, amp):
    cfg = ModelConfig(d_model=32 * heads, n_layers=2, n_heads=heads, n_kv_heads=kv, max_seq_len=64)
    b, t, vocab = 2, 48, 300
    act = 4 if amp is None else 2
    x = torch.randn(b, t, cfg.d_model, requires_grad=True)
    mid = StageModule(cfg, vocab, 0, 2, has_embedding=False, has_head=False)
    # under autocast each forward's graph also keeps a 16-bit copy of every matmul weight
    copies = 0 if amp is None else 2 * 2 * matmul_params_per_layer(cfg)
    per_layer = (_saved_bytes(mid, lambda: mid(x), amp) - copies) / (b * t * 2)
    assert per_layer == full_layer_bytes_per_token(cfg, act) == activation_bytes_per_token_layer(cfg, act)
    if amp is None:
        assert per_layer == 4 * activation_elems_per_token_layer(cfg)
    last = StageModule(cfg, vocab, 0, 2, has_embedding=False, has_head=True)
    y = torch.randint(0, vocab, (b, t))
    copies += 0 if amp is None else 2 * vocab * cfg.d_model
    saved = (_saved_bytes(last, lambda: last.loss(last(x), y), amp) - copies) / (b * t) - 2 * per_layer - 8  # labels
    # saved: the final norm and the log-softmax; the formula adds what the loss's backward holds at once (the
    # logits, the log-softmax's gradient and the logits' gradient: 12 B / V in fp32, 10 B / V in bf16)
    # (and one 4-byte scalar of the loss, not per token)
    assert saved == pytest.approx(head_bytes_per_token(cfg, vocab, act) - (12 if amp is None else 10) * vocab, abs=0.1)


def test_activations_follow_precision_and_state_stays_float32():
    """bf16/fp16 (and auto on GPUs) save most activations in 2 B, the residual stream and the norms' float32
    statistics in 4 B, plus each forward's 16-bit weight copies; weights, gradients, AdamW and theta0 stay
    20 B / param."""
    from neuroray.planner.memory import activation_bytes

    assert [activation_bytes(p, "cpu") for p in ("auto", "fp32", "bf16", "fp16")] == [4, 4, 2, 2]
    assert activation_bytes("auto", "gpu") == 2 and activation_bytes("auto", "auto") == 4
    cfg = ModelConfig(d_model=64, n_layers=4, n_heads=4, n_kv_heads=4)
    full = holder_memory(cfg, 300, 2, has_embedding=True, has_head=False, batch=Batch(64, 32, 2), overhead=0)
    half = holder_memory(cfg, 300, 2, has_embedding=True, has_head=False, batch=Batch(64, 32, 2, 2), overhead=0)
    assert full.activations / 2 < half.activations < full.activations
    assert half.activations == 2 * (64 * 32 * (2 * full_layer_bytes_per_token(cfg, 2) + 4 * 64)
                                    + 2 * 2 * matmul_params_per_layer(cfg))
    assert (half.weights, half.grads, half.adam, half.diloco) == (full.weights, full.grads, full.adam, full.diloco)
