"""Microbatch schedule of one inner step across one pipeline replica.

The driver only *submits* work; it never waits between hops. Ray runs the tasks that one caller
submits to an actor in submission order, and passes each activation/gradient as an object ref, so:

- all forwards are submitted before all backwards (GPipe order): while the Validator computes the
  loss of microbatch m, the Driver already runs the forward of microbatch m+1;
- a holder's ``step`` is submitted after its backwards, so it always sees the whole accumulated
  gradient, and the next inner step may be submitted before this one finishes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepRefs:
    losses: list  # one ref per microbatch: the Validator's unscaled loss
    steps: list  # one ref per holder: the inner optimizer's gradient norm
    tails: list  # the Driver's backward returns (None): kept so a failure in them is read, not leaked


def submit_inner_step(pipeline: list, num_microbatches: int, first_mb_id: int = 0, lr: float | None = None) -> StepRefs:
    """Submit forward, backward and the optimizer step (at inner learning rate ``lr``; None: the holders'
    own) of one inner step; return the refs."""
    assert pipeline, "a pipeline needs at least one holder"
    first, last, middle = pipeline[0], pipeline[-1], pipeline[1:-1]
    scale = 1.0 / num_microbatches
    losses, pending_grads = [], []
    for m in range(num_microbatches):
        mb = first_mb_id + m
        x, labels = first.next_batch.options(num_returns=2).remote()
        if len(pipeline) > 1:
            x = first.forward.remote(mb, x)
            for holder in middle:
                x = holder.forward.remote(mb, x)
        loss, grad = last.forward_backward.options(num_returns=2).remote(mb, x, labels, scale)
        losses.append(loss)
        pending_grads.append(grad)
    tails = []
    for m, grad in enumerate(pending_grads):
        mb = first_mb_id + m
        for holder in reversed(pipeline[:-1]):
            grad = holder.backward.remote(mb, grad)
        tails.append(grad)
    steps = [holder.step.remote(lr=lr) for holder in pipeline]
    return StepRefs(losses, steps, tails)
