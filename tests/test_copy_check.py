"""A holder checks a peer's copy of its range against the theta0 the coordinator vouches for (issue 21)."""

import pytest
import torch

from neuroray.swarm.copy_check import CopyRejected, check_copy
from tests.test_diloco import _holder


def _copy(theta0=None, weight=None, moment=None):
    theta0 = torch.arange(6, dtype=torch.float32) if theta0 is None else theta0
    return {"model.w": theta0.clone() if weight is None else weight, "theta0": theta0,
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(6) if moment is None else moment}}},
            "architecture": {"d_model": 8}}


def test_a_copy_at_a_vouched_theta0_is_taken():
    t = torch.arange(6, dtype=torch.float32)
    check_copy(_copy(), [t])
    check_copy(_copy(), [t + 1, t])  # under overlap: the round in flight's theta0 is vouched for too
    check_copy(_copy(), [t], weights=t.clone())


def test_a_copy_off_theta0_or_not_finite_is_refused():
    t = torch.arange(6, dtype=torch.float32)
    with pytest.raises(CopyRejected, match="theta0"):
        check_copy(_copy(theta0=t * 2), [t])
    with pytest.raises(CopyRejected, match="non-finite values in optimizer.state.0.exp_avg"):
        check_copy(_copy(moment=torch.tensor([float("nan")] * 6)), [t])
    with pytest.raises(CopyRejected, match="non-finite values in model.w"):
        check_copy(_copy(weight=torch.full((6,), float("inf"))), [t])
    with pytest.raises(CopyRejected, match="weights are not at its theta0"):
        check_copy(_copy(), [t], weights=t + 0.5)


def test_a_joining_holder_refuses_a_poisoned_copy_and_keeps_its_state(tmp_path):
    peer, fresh = _holder(tmp_path, 0, [(0, 2)], replica=0), _holder(tmp_path, 0, [(0, 2)], replica=1)
    theta0 = peer.flat_params()
    before = fresh.flat_params().clone()
    poisoned = peer.export_range(optimizer=True)
    poisoned["theta0"] = poisoned["theta0"] * 1.01
    with pytest.raises(CopyRejected, match="not the range's theta0"):
        fresh.join(poisoned, 3, [theta0])
    assert torch.equal(fresh.flat_params(), before)  # refused before anything was loaded
    moved = peer.export_range(optimizer=True)
    name = next(k for k in moved if k.startswith("model.") and moved[k].is_floating_point())
    moved[name] = moved[name] + 0.1  # weights off theta0 between rounds, theta0 itself intact
    with pytest.raises(CopyRejected, match="weights are not at its theta0"):
        fresh.join(moved, 3, [theta0])
    fresh.join(peer.export_range(optimizer=True), 3, [theta0])  # the honest copy
    assert torch.equal(fresh.flat_params(), theta0) and fresh.outer.outer_rounds == 3
