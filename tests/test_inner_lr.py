"""The inner learning-rate schedule (diloco.lr_schedule): values against the formula, config errors, and
a holder stepping with the rate it is given."""

import math

import pytest
import torch

from neuroray.config import DilocoConfig
from neuroray.configure import load_config
from neuroray.diloco.lr import inner_lr_at
from neuroray.errors import ConfigError
from tests.test_diloco_comm import _holder


def test_constant_is_the_inner_lr_after_warmup():
    assert [inner_lr_at(s, 100, 0.01) for s in (0, 50, 99)] == [0.01] * 3
    assert [inner_lr_at(s, 100, 0.01, warmup_steps=4) for s in range(5)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01])


def test_cosine_warms_up_then_decays_to_the_floor_at_the_last_step():
    lrs = [inner_lr_at(s, 110, 1.0, "cosine", warmup_steps=10, min_lr_ratio=0.1) for s in range(110)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rises after the warmup
    mid = 10 + 99 / 2  # half-way through the decay: half-way between peak and floor
    assert inner_lr_at(int(mid), 110, 1.0, "cosine", 10, 0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 99)))
    with pytest.raises(ValueError, match="lr schedule 'linear'"):
        inner_lr_at(0, 10, 1.0, "linear")


@pytest.mark.parametrize("overrides, message", [
    (["diloco.lr_schedule=step"], "lr_schedule=step is unknown; choose constant or cosine"),
    (["diloco.warmup_steps=-1"], "warmup_steps=-1 must be in"),
    (["diloco.warmup_steps=1000", "rounds=2", "diloco.inner_steps=10"], r"rounds x inner_steps = 20\); lower it"),
    (["diloco.min_lr_ratio=1.5"], "min_lr_ratio=1.5 must be in"),
])
def test_config_rejects_bad_schedules(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


def test_holder_steps_with_the_rate_it_is_given(tmp_path):
    """Two identical holders, one told lr 0: it must not move, the other must (AdamW's first step has
    size about lr per weight)."""
    dl = DilocoConfig(weight_decay=0.0)
    moved, still = _holder(tmp_path, 0, dl), _holder(tmp_path, 1, dl)
    before = moved.flat_params()
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for h, lr in ((moved, 0.01), (still, 0.0)):
        h.forward_backward(0, x, torch.roll(x, -1, 1), 1.0)
        h.step(lr=lr)
    assert torch.equal(still.flat_params(), before)
    assert (moved.flat_params() - before).abs().max() == pytest.approx(0.01, rel=0.01)
