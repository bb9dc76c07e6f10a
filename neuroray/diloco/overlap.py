"""Overlapping the outer step with the next inner steps (``diloco.overlap``; docs/diloco.md, DESIGN.md 7).

At a round's end every holder hands its pseudo-gradient ``delta = theta0 - theta`` to the outer step and goes
on training at once; the outer step's reduce and broadcast run meanwhile, and the aggregated update *lands*
``diloco.overlap_steps`` inner steps later. What the holder trained from until then is its ``base``:

* ``delayed`` (Streaming DiLoCo, arXiv 2501.18512): ``base`` is the holder's own weights at the round's end;
* ``eager`` (arXiv 2502.12996): ``base`` is a local guess of the new theta0, the outer optimizer applied
  to a stand-in for the aggregate made with the holder's own fresh delta (:func:`eager_guess`); the holder
  restarts from it at once.

When the aggregate's theta0 arrives the holder keeps what it learned since: ``theta0_new + (theta - base)``
(:func:`land`), so every inner step counts exactly once and theta0 is always the last aggregated state.
The functions here are the arithmetic; the holder's side is neuroray/swarm/outer_state.py, the driver's
neuroray/training/overlap.py.
"""

from __future__ import annotations

import torch

MODES = ("none", "delayed", "eager")

# eager's stand-in is one holder's own delta; these rules keep whole contributions picked by comparing all
# replicas at once, so no single holder's delta estimates what they return
_SELECTING_RULES = ("krum", "multi_krum")


def overlap_problem(mode: str, steps: int, inner_steps: int, fragments: int, routing: str, aggregator: str,
                    model_name: str) -> str | None:
    """Why ``diloco.overlap=mode`` cannot run with the rest of the config (one line), or None."""
    if mode not in MODES:
        return f"diloco.overlap={mode} is unknown; choose none, delayed or eager"
    if mode == "none":
        return None
    if not 1 <= steps < inner_steps:
        return (f"diloco.overlap_steps={steps} must be in [1, diloco.inner_steps={inner_steps}): the outer step "
                "must land before the next round ends")
    if fragments != 1:
        return (f"diloco.overlap={mode} with diloco.streaming_fragments={fragments} is not supported: "
                "use one or the other (streaming already spreads the sync over the round)")
    if routing != "fixed":
        return (f"diloco.overlap={mode} needs swarm.routing=fixed (the routed outer step waits for its quorum "
                "and broadcasts behind each holder's next step)")
    if model_name == "auto":
        return (f"diloco.overlap={mode} cannot be combined with model=auto: live growth needs no outer step "
                "in flight between rounds; use a fixed model or diloco.overlap=none")
    if mode == "eager" and aggregator in _SELECTING_RULES:
        return (f"diloco.overlap=eager with aggregator={aggregator}: the rule keeps contributions it picks by "
                "comparing all replicas at once, so a holder's own delta is no stand-in for it; "
                "use diloco.overlap=delayed or another rule")
    return None


def eager_guess(theta0: torch.Tensor, delta: torch.Tensor, previous: torch.Tensor | None, replicas: int,
                buf: torch.Tensor | None, lr: float, momentum: float, nesterov: bool) -> torch.Tensor:
    """The outer optimizer's step on ``theta0`` (neuroray/diloco/outer.py) with the eager stand-in for the
    aggregate, from ``buf``, the holder's estimate of the outer momentum.

    The stand-in is arXiv 2502.12996's: this holder's fresh ``delta`` with its share ``1/M`` of the mean, the
    other ``M - 1`` shares taken from the ``previous`` round's aggregate (the freshest the holder has; on the
    first round, the holder's own delta alone)."""
    from neuroray.diloco.outer import OuterOptimizer

    stand_in = delta if previous is None else delta / replicas + previous * ((replicas - 1) / replicas)
    opt = OuterOptimizer(lr, momentum, nesterov)
    opt.buf = None if buf is None else buf.clone()
    return opt.step(theta0, stand_in)


def recover_step(buf: torch.Tensor | None, theta0_old: torch.Tensor, theta0_new: torch.Tensor, lr: float,
                 momentum: float, nesterov: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(aggregate, momentum after)`` of the outer step that moved ``theta0_old`` to ``theta0_new``, recovered
    from the step itself, so an eager holder needs no extra bytes for its stand-in and its momentum.

    With ``s = (old - new) / lr``: Nesterov ``s = g + m * buf'`` and ``buf' = m * buf + g``, so
    ``g = (s - m^2 buf) / (1 + m)``; classic momentum ``s = buf' = m * buf + g``; no momentum ``g = s``.
    A step that left theta0 unchanged (refused) returns ``(None, buf)``. Exact up to float rounding under
    ``compression=none``; under compression it is the step the holders applied (what the broadcast carried)."""
    if lr == 0:
        return None, buf
    step = (theta0_old - theta0_new) / lr
    if not step.any():
        return None, buf
    if momentum <= 0:
        return step, None
    prev = torch.zeros_like(step) if buf is None else buf
    g = (step - momentum * momentum * prev) / (1 + momentum) if nesterov else step - momentum * prev
    return g, momentum * prev + g


def land(theta0_new: torch.Tensor, weights: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The weights once the aggregate lands: the new theta0 plus what was learned since ``base``."""
    return theta0_new + (weights - base)
