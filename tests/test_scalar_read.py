"""ScalarRead: a device scalar read after the work queued behind it (neuroray/swarm/scalar_read.py)."""

import pytest
import torch

from neuroray.swarm.scalar_read import ScalarRead

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_the_value_is_the_scalar_when_the_read_started(device):
    t = torch.tensor(2.5, device=device)
    read = ScalarRead(t)
    t.mul_(4)  # work queued after the read started must not change what it reads
    assert read.value() == 2.5
    assert read.value() == 2.5  # read once, kept


@pytest.mark.parametrize("device", DEVICES)
def test_a_loss_read_started_before_backward_equals_float_of_the_loss(device):
    w = torch.randn(8, 8, device=device, requires_grad=True)
    loss = (w @ w).square().mean()
    read = ScalarRead(loss)
    loss.backward()
    assert read.value() == float(loss.detach())
    assert w.grad is not None
