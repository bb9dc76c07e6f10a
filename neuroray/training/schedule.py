"""Microbatch schedule of one inner step across one pipeline replica (``swarm.schedule``, docs/schedule.md).

The driver only *submits* work; it never waits between hops. Ray runs the tasks that one caller
submits to an actor in submission order, and passes each activation/gradient as an object ref, so the
order in which the driver submits each holder's calls *is* that holder's schedule:

- ``gpipe`` (default): every holder runs all its forwards, then all its backwards. A non-last holder
  keeps the graphs of all ``m`` microbatches until their backwards arrive. Measured faster than 1F1B on
  CPU (docs/schedule.md): a holder always has queued work while gradients cross Ray.
- ``1f1b``: holder ``s`` of ``S`` runs ``S-1-s`` forwards to fill the pipeline, then alternates one
  forward and one backward, then drains the rest of the backwards. It keeps at most ``S - s`` graphs.
  Same bubble as GPipe, (S-1)/(m+S-1), and the same gradients: each microbatch's backward is the same
  computation, and a holder's gradients accumulate in microbatch order under both schedules.

The last holder fuses forward, loss and backward (``forward_backward``), so it has no order to choose.
A holder's ``step`` is submitted after its backwards, so it always sees the whole accumulated gradient,
and the next inner step may be submitted before this one finishes.

``transport`` (``swarm.hop_transport`` gloo or nccl, neuroray/swarm/direct_transport.py): every call whose
return value is a hop to another holder is submitted with ``tensor_transport``, so the tensor goes straight
from holder to holder. Ray Direct Transport takes one return value: the last holder's call is then
``forward_backward_direct`` (the gradient), followed on the same holder by ``take_loss`` (the loss).
"""

from __future__ import annotations

from dataclasses import dataclass

FORWARD, BACKWARD, FORWARD_BACKWARD, STEP = "F", "B", "FB", "step"


@dataclass
class StepRefs:
    losses: list  # one ref per microbatch: the Validator's unscaled loss
    steps: list  # one ref per holder: the inner optimizer's gradient norm
    tails: list  # the Driver's backward returns (None): kept so a failure in them is read, not leaked


def stage_orders(schedule: str, stages: int, microbatches: int) -> list[list[tuple[str, int]]]:
    """Per holder, its calls of one inner step in the order it runs them: ``(kind, microbatch)``."""
    if schedule not in ("gpipe", "1f1b"):
        raise ValueError(f"unknown schedule {schedule!r}")
    m, orders = microbatches, []
    for s in range(stages - 1):
        if schedule == "gpipe":
            orders.append([(FORWARD, j) for j in range(m)] + [(BACKWARD, j) for j in range(m)])
            continue
        warmup = min(stages - 1 - s, m)
        ops = [(FORWARD, j) for j in range(warmup)]
        for j in range(m - warmup):
            ops += [(FORWARD, warmup + j), (BACKWARD, j)]
        orders.append(ops + [(BACKWARD, j) for j in range(m - warmup, m)])
    orders.append([(FORWARD_BACKWARD, j) for j in range(m)])
    return orders


def peak_kept(order: list[tuple[str, int]]) -> int:
    """The most microbatch graphs a holder running ``order`` keeps at once (forwards awaiting their backward)."""
    kept = peak = 0
    for kind, _ in order:
        kept += {FORWARD: 1, BACKWARD: -1}.get(kind, 0)
        peak = max(peak, kept)
    return peak


def submit_microbatches(pipeline: list, num_microbatches: int, first_mb_id: int = 0,
                        schedule: str = "gpipe", transport: str | None = None, record=None) -> tuple[list, list]:
    """Submit every microbatch's forward and backward of one inner step in ``schedule``'s per-holder order;
    return ``(losses, tails)`` refs (see :class:`StepRefs`). ``transport``: gloo or nccl for direct hops.
    ``record(stage, ref, inputs, kind)``: told of every call just submitted, in each holder's order, with the
    refs it was passed and its kind (F, B, FB, step; None: not compute) (the coordinator's clock of the calls,
    neuroray/training/call_clock.py)."""
    assert pipeline, "a pipeline needs at least one holder"
    note = record or (lambda stage, ref, inputs, kind: None)
    direct = {"tensor_transport": transport} if transport and len(pipeline) > 1 else None
    orders = stage_orders(schedule, len(pipeline), num_microbatches)
    scale = 1.0 / num_microbatches
    acts: dict[tuple[int, int], object] = {}  # (stage, microbatch) -> the activation it sent on
    grads: dict[tuple[int, int], object] = {}  # (stage, microbatch) -> the input gradient it sent back
    labels, losses, tails = {}, [None] * num_microbatches, [None] * num_microbatches
    at = [0] * len(pipeline)

    def ready(s: int, kind: str, j: int) -> bool:  # its input's ref exists: the producer was submitted
        if kind == BACKWARD:
            return (s + 1, j) in grads
        return s == 0 or (s - 1, j) in acts

    # Submit in any order that respects data flow (a ref must exist before it is passed on): each holder
    # in turn submits its calls until one needs an input not yet submitted. Per holder, the order is its own.
    while any(at[s] < len(orders[s]) for s in range(len(pipeline))):
        moved = False
        for s, holder in enumerate(pipeline):
            while at[s] < len(orders[s]) and ready(s, *orders[s][at[s]]):
                kind, j = orders[s][at[s]]
                at[s], moved, mb = at[s] + 1, True, first_mb_id + j
                if s == 0 and kind != BACKWARD:  # the Driver reads the microbatch just before its forward
                    x, labels[j] = holder.next_batch.options(num_returns=2).remote()
                    note(s, x, (), None)  # a read, not compute: chained, not timed
                else:
                    x = acts.get((s - 1, j))
                if kind == FORWARD:
                    call = holder.forward if direct is None else holder.forward.options(**direct)
                    acts[s, j] = call.remote(mb, x)
                    note(s, acts[s, j], (x,), FORWARD)
                elif kind == FORWARD_BACKWARD and direct is not None:
                    grads[s, j] = holder.forward_backward_direct.options(**direct).remote(mb, x, labels[j], scale)
                    losses[j] = holder.take_loss.remote(mb)
                    note(s, grads[s, j], (x, labels[j]), FORWARD_BACKWARD)
                    note(s, losses[j], (), None)
                elif kind == FORWARD_BACKWARD:
                    losses[j], grads[s, j] = holder.forward_backward.options(num_returns=2).remote(
                        mb, x, labels[j], scale)
                    note(s, grads[s, j], (x, labels[j]), FORWARD_BACKWARD)
                else:  # the Driver's gradient goes nowhere (None): through the object store, read as a tail
                    call = holder.backward if direct is None or s == 0 else holder.backward.options(**direct)
                    grads[s, j] = call.remote(mb, grads[s + 1, j])
                    note(s, grads[s, j], (grads[s + 1, j],), BACKWARD)
                if s == 0 and kind != FORWARD:
                    tails[j] = grads[s, j]
        assert moved, f"schedule {schedule} deadlocks"  # stage_orders never does: every order is data-flow safe
    return losses, tails


def submit_inner_step(pipeline: list, num_microbatches: int, first_mb_id: int = 0, lr: float | None = None,
                      schedule: str = "gpipe", transport: str | None = None, record=None) -> StepRefs:
    """Submit forward, backward and the optimizer step (at inner learning rate ``lr``; None: the holders'
    own) of one inner step; return the refs. ``record``: as in :func:`submit_microbatches`."""
    losses, tails = submit_microbatches(pipeline, num_microbatches, first_mb_id, schedule, transport, record)
    steps = [holder.step.remote(lr=lr) for holder in pipeline]
    if record is not None:
        for s, ref in enumerate(steps):
            record(s, ref, (), STEP)
    return StepRefs(losses, steps, tails)
