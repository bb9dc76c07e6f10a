"""precision=bf16 on the CPU against float32: the loss curve of a 3-holder pipeline tracks float32's, the
weights, AdamW state and theta0 stay float32, activations cross holders as bf16 and gradients as float32;
auto is float32 on the CPU (bit-identical); fp16 is refused on the CPU."""

import pytest
import torch

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.configure import load_config
from neuroray.errors import ConfigError
from neuroray.swarm.holder import HolderSpec, StageHolder

CFG = ModelConfig(d_model=32, n_layers=3, n_heads=2, n_kv_heads=2, max_seq_len=16)
RANGES = [(0, 1), (1, 2), (2, 3)]
TOLERANCE = 0.03  # mean relative loss gap, bf16 vs float32, over the 20 steps (docs/precision.md)


def _pipeline(tmp_path, precision):
    return [StageHolder(HolderSpec(replica=0, stage=s, ranges=RANGES, model=CFG, vocab_size=64,
                                   diloco=DilocoConfig(inner_lr=1e-2), seed=0, precision=precision,
                                   key_path=str(tmp_path / f"{precision}-{s}.pem"))) for s in range(3)]


def _run(holders, steps=20):
    """Inner steps of 2 microbatches through driver -> worker -> validator; the losses and what crossed."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (4, 12), generator=g) for _ in range(4)]  # a few, revisited: loss falls
    losses, crossed = [], {}
    d, w, v = holders
    for step in range(steps):
        total = 0.0
        for m in range(2):
            mb, x = 2 * step + m, batches[(2 * step + m) % len(batches)]
            a0 = d.forward(mb, x)
            a1 = w.forward(mb, a0)
            loss, g1 = v.forward_backward(mb, a1, torch.roll(x, -1, 1), 0.5)
            g0 = w.backward(mb, g1)
            assert d.backward(mb, g0) is None
            total += loss / 2
            crossed = {"act": (a0.dtype, a1.dtype), "grad": (g1.dtype, g0.dtype)}
        for h in holders:
            h.step()
        losses.append(total)
    return losses, crossed


def test_bf16_tracks_fp32_on_cpu(tmp_path):
    fp32, crossed32 = _run(_pipeline(tmp_path, "fp32"))
    bf16_holders = _pipeline(tmp_path, "bf16")
    bf16, crossed16 = _run(bf16_holders)
    assert fp32[-1] < 0.9 * fp32[0]  # the run learns, so the curves are compared while moving
    gaps = [abs(b - f) / f for b, f in zip(bf16, fp32)]
    mean_gap = sum(gaps) / len(gaps)
    print(f"bf16 vs fp32: mean relative loss gap {mean_gap:.4%}, max {max(gaps):.4%}")
    assert mean_gap < TOLERANCE, (mean_gap, fp32, bf16)
    assert bf16 != fp32  # bf16 really ran under autocast
    # hops cross as numpy buffers (neuroray/swarm/transport.py) naming their torch dtype; bf16 as its int16 bits
    assert crossed32 == {"act": ("float32",) * 2, "grad": ("float32",) * 2}
    assert crossed16 == {"act": ("bfloat16",) * 2, "grad": ("float32",) * 2}  # half the activation bytes
    for h in bf16_holders:  # master weights, AdamW state, theta0 and the pseudo-gradient stay float32
        assert {p.dtype for p in h.compute.module.parameters()} == {torch.float32}
        assert {t.dtype for st in h.compute.optimizer.state.values() for t in st.values() if t.dim()} == {torch.float32}
        assert h.theta0.dtype == torch.float32 and h.pseudo_gradient()["fp32"].dtype == torch.float32


def test_auto_is_fp32_on_cpu_bit_identical(tmp_path):
    auto = _pipeline(tmp_path, "auto")
    assert all(h.compute.amp is None for h in auto)
    assert _run(auto, steps=3) == _run(_pipeline(tmp_path, "fp32"), steps=3)


def test_fp16_is_refused_on_cpu_and_bad_values_by_config(tmp_path):
    with pytest.raises(ConfigError, match="^precision=fp16 needs a CUDA device; on the CPU use bf16 or fp32$"):
        _pipeline(tmp_path, "fp16")
    assert load_config(["precision=bf16"]).precision == "bf16"
    assert load_config([]).precision == "auto"
    with pytest.raises(ConfigError, match="precision=fp8 is unknown; choose auto, fp32, bf16, fp16"):
        load_config(["precision=fp8"])
