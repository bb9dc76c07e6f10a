"""What a holder keeps of its round's first inner step, so that another holder of its range can redo it.

At the first inner step of a round every holder of a range holds the same weights, theta0 (each keeps it,
neuroray/swarm/outer_state.py). So any other holder of the range can re-execute that step's microbatches
from the same inputs and must get the same outputs (fp32: the same code gives near-exact results). The
hop rechecks (neuroray/training/hop_audit.py) rest on that; this module is the holders' half:

* :class:`HopRecord`, armed when the holder (re)starts from theta0 and disarmed by its next inner step (a Driver's
  with its data position then, the one its proof commits): for each microbatch, what the holder RECEIVED in full (the activation in, or the Driver's token ids; the
  gradient from the next range, or the last range's labels and loss scale) and a digest of what it SENT
  (activation out, gradient back; the last range's loss). A sender keeps only the digest, its receiver the
  tensor: the check compares the receiver's copy against the sender's digest to tell a forged record
  (the receiver's) from a false output (the sender's).
* :func:`reexecute`: forward and backward of one microbatch at theta0, as the holder's own ``forward`` /
  ``forward_backward`` / ``backward`` compute them, on the module with theta0 substituted for its
  parameters (``torch.func.functional_call``): the holder's weights, gradients, AdamW state, pending
  graphs and counters are not touched.

The record is what crossed the actor boundary (the payloads the holder's methods took and returned), so
a holder that tampers inside its compute is recorded as it sent. Only the first step is kept: a bounded
cost (one step's inputs, the size of the activation stash) and the one step every peer can redo. A
holder cannot know which of its microbatches will be checked: the checker draws after the step.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from neuroray.digest import tensor_digest
from neuroray.swarm.shm_transport import ShmHop
from neuroray.swarm.shm_transport import read as shm_read
from neuroray.swarm.transport import WireTensor, from_wire, to_device


def _copy(payload) -> torch.Tensor | None:
    """A CPU copy of a hop payload (a WireTensor, a shared-memory hop this holder sent, or a tensor handed over in
    process)."""
    if payload is None:
        return None
    if isinstance(payload, ShmHop):  # read back from the sender's own ring: its slot is not reused before the next send
        t = shm_read(payload)
    else:
        t = from_wire(payload, "a holder", "the record") if isinstance(payload, WireTensor) else payload
    return t.detach().to("cpu").clone()


def payload_digest(payload) -> str | None:
    return None if payload is None else tensor_digest(_copy(payload))


class HopRecord:
    """One holder's record of its round's first inner step, keyed by microbatch id."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.armed = False
        self.received: dict[int, dict] = {}  # mb -> {"x": tensor, "g": tensor, "labels": tensor, "scale": float}
        self.sent: dict[int, dict] = {}  # mb -> {"fwd": digest, "bwd": digest, "loss": float}
        self.position: int | None = None  # a Driver's stream position when the step started (its proof's too)

    def arm(self, position: int | None = None) -> None:
        """The holder is at theta0 and its next inner step is checkable: record it (and drop what was kept).
        ``position``: a Driver's data position now, the one its round's proof commits."""
        self.armed = self.enabled
        self.received, self.sent, self.position = {}, {}, position

    def disarm(self) -> None:
        self.armed = False

    def forward(self, mb: int, x, out) -> None:
        if self.armed and out is not None:
            self.received.setdefault(mb, {})["x"] = _copy(x)
            self.sent.setdefault(mb, {})["fwd"] = payload_digest(out)

    def last(self, mb: int, x, labels, scale: float, loss, grad) -> None:
        if self.armed and loss is not None:
            self.received.setdefault(mb, {}).update(x=_copy(x), labels=_copy(labels), scale=float(scale))
            self.sent.setdefault(mb, {}).update(loss=float(loss), bwd=payload_digest(grad))

    def backward(self, mb: int, grad, out) -> None:
        if self.armed:
            self.received.setdefault(mb, {})["g"] = _copy(grad)
            self.sent.setdefault(mb, {})["bwd"] = payload_digest(out)

    def take(self) -> dict:
        """The record (once): ``{"received": ..., "sent": ..., "position": ...}``."""
        record = {"received": self.received, "sent": self.sent, "position": self.position}
        self.received, self.sent = {}, {}
        return record


def reexecute(compute, theta0: torch.Tensor, x: torch.Tensor, grad: torch.Tensor | None = None,
              labels: torch.Tensor | None = None, scale: float = 1.0) -> dict:
    """One microbatch through ``compute``'s range at the flat ``theta0``, as a training step computes it:
    ``{"fwd": the activation it would send on (None on the last range), "bwd": the gradient it would send
    back (None on a Driver, or without ``grad``), "loss": the last range's loss, "seconds": the time taken}``.
    ``grad``: the gradient of the range's output (middle ranges); ``labels`` and ``scale``: the last range's."""
    t0 = time.perf_counter()
    module, device, amp = compute.module, compute.device, compute.amp
    params = compute.params_at(theta0)
    x = to_device(x, device)
    inp = None
    if not module.has_embedding:
        x = x.float() if amp is not None else x  # bf16 on the wire, as in a training forward
        inp = x = x.detach().requires_grad_(True)
    cast = nullcontext() if amp is None else torch.autocast(device.type, dtype=amp)
    out = {"fwd": None, "bwd": None, "loss": None}
    with torch.enable_grad():
        with cast:
            y = torch.func.functional_call(module, params, (x,))
            loss = module.loss(y, labels.to(device)) if module.has_head else None
        if loss is not None:
            out["loss"] = float(loss.detach())
            target, seed = loss.float() * scale, None
        else:
            out["fwd"] = compute._activation_out(y).cpu()
            target, seed = y, None if grad is None else to_device(grad, device).to(y.dtype)
        if inp is not None and (loss is not None or seed is not None):
            out["bwd"] = torch.autograd.grad(target, inp, seed)[0].detach().float().cpu()
    out["seconds"] = time.perf_counter() - t0
    return out
