"""Reading a device scalar (a microbatch's loss, a step's gradient norm) without draining the GPU.

``float(t)`` on a CUDA tensor waits for *every* kernel queued on the stream, so a holder that reads its
loss after queueing the backward (or its gradient norm after queueing the optimizer step) leaves the GPU
idle until the CPU has launched the next call's kernels. A :class:`ScalarRead` is started as soon as the
value exists: the scalar is copied into pinned host memory with a non-blocking copy and a CUDA event is
recorded after it. The holder then queues the rest of its work and only then reads the value, which
waits for that event alone: the queued backward or optimizer step keeps the GPU busy meanwhile. On the CPU
there is nothing to overlap and the value is read at once.
"""

from __future__ import annotations

import torch


class ScalarRead:
    """A device scalar's value, read later: start it where the value is computed, :meth:`value` after the
    work that follows has been queued."""

    def __init__(self, t: torch.Tensor):
        t = t.detach()
        if t.device.type != "cuda":
            self._value, self._host, self._done = float(t), None, None
            return
        self._value = None
        self._host = torch.empty((), dtype=t.dtype, pin_memory=True)
        self._host.copy_(t, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record(torch.cuda.current_stream(t.device))

    def value(self) -> float:
        if self._value is None:
            self._done.synchronize()  # the copy's event only: work queued after it keeps running
            self._value = float(self._host)
        return self._value
