"""The DiLoCo outer optimizer: SGD with (Nesterov) momentum applied to theta0.

The pseudo-gradient is ``delta = theta0 - theta`` (what a replica learned in H inner steps). The
update starts from **theta0**, the weights every holder of the range had at the start of the round,
never from the post-inner weights. The arithmetic matches ``torch.optim.SGD(momentum=m,
nesterov=True, dampening=0)`` with ``delta`` as the gradient:

    buf   = delta                      (first round)
    buf   = m * buf + delta            (later rounds)
    step  = delta + m * buf            (Nesterov)   or   buf   (classic momentum)
    theta0 <- theta0 - lr * step
"""

from __future__ import annotations

import torch


class OuterOptimizer:
    def __init__(self, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True):
        if momentum < 0:
            raise ValueError(f"outer momentum {momentum} must be >= 0")
        # momentum 0 is plain SGD whatever nesterov says (diloco.outer_momentum=0 leaves nesterov at its default)
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.buf: torch.Tensor | None = None

    def step(self, theta0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Return the new theta0 (a new tensor) for the aggregated pseudo-gradient ``delta``."""
        assert theta0.shape == delta.shape, (theta0.shape, delta.shape)
        direction = delta
        if self.momentum > 0:
            self.buf = delta.clone() if self.buf is None else self.buf.mul(self.momentum).add_(delta)
            direction = delta + self.momentum * self.buf if self.nesterov else self.buf
        return theta0 - self.lr * direction

    def state_dict(self) -> dict:
        return {"buf": None if self.buf is None else self.buf.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.buf = None if state.get("buf") is None else state["buf"].clone()
