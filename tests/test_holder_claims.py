"""A holder applies a microbatch's gradient at most once, and a revoked call never runs (no Ray)."""

import torch

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.swarm.holder import HolderSpec, StageHolder
from neuroray.swarm.transport import as_tensor

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16)


def _holder(tmp_path, stage: int) -> StageHolder:
    return StageHolder(HolderSpec(replica=0, stage=stage, ranges=[(0, 1), (1, 2)], model=CFG, vocab_size=64,
                                  diloco=DilocoConfig(inner_lr=1e-2), seed=0, key_path=str(tmp_path / f"k{stage}.pem")))


def _grads(h: StageHolder) -> dict:
    return {k: v.clone() for k, v in h.grads().items()}


def test_a_backward_is_applied_once_even_if_sent_twice(tmp_path):
    h = _holder(tmp_path, 0)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    out = as_tensor(h.forward(7, x))
    g = torch.randn_like(out)
    assert h.backward(7, g) is None  # the Driver has no upstream gradient to return
    once = _grads(h)
    assert h.backward(7, g, status=True) == (None, False)  # a second copy is refused, not applied
    assert all(torch.equal(once[k], v) for k, v in _grads(h).items())
    assert h._step_microbatches == 1


def test_revoked_calls_never_run_and_a_started_backward_cannot_be_revoked(tmp_path):
    h = _holder(tmp_path, 1)
    x = torch.randn(2, 8, 32)
    labels = torch.randint(0, 64, (2, 8))
    assert h.revoke([3], "b") == [True]  # not started: taken back
    assert h.forward_backward(3, x, labels, 1.0) == (None, None)
    assert h.grads() == {} and h._step_microbatches == 0
    loss, grad_in = h.forward_backward(4, x, labels, 1.0)
    assert grad_in.shape == x.shape and loss > 0
    assert h.revoke([4], "b") == [False]  # already applied here: the router must keep this result
    # a forward revoked after it ran keeps no graph; one revoked before never runs
    h.forward(5, x)
    assert 5 in h._pending and h.revoke([5], "f") == [False] and 5 not in h._pending
    assert h.revoke([6], "f") == [True] and h.forward(6, x) is None and 6 not in h._pending


def test_a_start_probe_takes_back_only_calls_that_have_not_started(tmp_path):
    """The router's take-back of an overdue call (keep_started): a started forward keeps its graph."""
    h = _holder(tmp_path, 1)
    x = torch.randn(2, 8, 32)
    out = as_tensor(h.forward(5, x))
    assert h.revoke([5], "f", keep_started=True) == [False] and 5 in h._pending
    assert h.backward(5, torch.randn_like(out)) is not None  # the graph is still there and applies
    assert h.revoke([6, 7], "f", keep_started=True) == [True, True]
    assert h.forward(6, x) is None and 6 not in h._pending
    assert h.revoke([8], "b", keep_started=True) == [True]
    assert h.forward_backward(8, x, torch.randint(0, 64, (2, 8)), 1.0) == (None, None)


def test_a_later_attempt_may_run_where_an_earlier_one_was_taken_back_but_nothing_runs_twice(tmp_path):
    """The router may send a hop back to a holder it took it from (no other holder of the range could take
    it): only the attempts a take-back names are refused, and once one ran every other is."""
    h = _holder(tmp_path, 1)
    x, labels = torch.randn(2, 8, 32), torch.randint(0, 64, (2, 8))
    assert h.revoke([9], "b", keep_started=True, attempts=[3]) == [True]
    assert h.forward_backward(9, x, labels, 1.0, attempt=3) == (None, None)  # the taken-back call itself
    assert h.revoke([9], "b", keep_started=True, attempts=[2]) == [False]  # an older attempt: already refused
    loss, _ = h.forward_backward(9, x, labels, 1.0, attempt=5)
    assert loss > 0 and h._step_microbatches == 1
    assert h.forward_backward(9, x, labels, 1.0, attempt=6) == (None, None)  # applied once here, never twice
    assert h.revoke([9], "b", attempts=[6]) == [False] and h._step_microbatches == 1


def test_mean_step_averages_over_the_microbatches_this_holder_got(tmp_path):
    a, b = _holder(tmp_path, 1), _holder(tmp_path, 1)
    x = torch.randn(2, 8, 32)
    labels = torch.randint(0, 64, (2, 8))
    for mb in range(3):  # three unscaled microbatches, averaged at the step ...
        a.forward_backward(mb, x, labels, 1.0)
    b.forward_backward(0, x, labels, 1.0)  # ... equal one microbatch with the same data
    a_grads = {k: v / 3 for k, v in a.grads().items()}
    assert all(torch.allclose(a_grads[k], v, rtol=1e-5, atol=1e-7) for k, v in b.grads().items())
    a.step(mean=True)
    b.step(mean=True)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.module.parameters(), b.module.parameters()))
    idle = _holder(tmp_path, 1)
    before = idle.flat_params().clone()
    assert idle.step(mean=True) == 0.0 and torch.equal(idle.flat_params(), before)  # no work: no step
