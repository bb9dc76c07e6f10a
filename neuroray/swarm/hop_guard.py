"""Checks at every hop: what a stage holder receives is checked before anything is computed with it (docs/hops.md).

Every activation a holder receives (the previous range's output) and every gradient (of its own output, from
the next range) is checked, after the hop codec decoded it (neuroray/swarm/hop_codec.py), for

* **shape**: ``[microbatch_size, seq_len, d_model]``, from the holder's spec (a dimension the spec leaves 0 is
  not checked: in-process callers that build a bare spec);
* **dtype**: what the hop transport promised: bf16 activations under bf16 with uncompressed hops, float32
  otherwise (compressed payloads decode to float32, gradients always cross as float32);
* **finiteness**: no NaN or Inf (one norm over the tensor finds both: it is finite only if every value is);
* **a norm band**: per direction, the median of the L2 norms of the last ``swarm.hop_check_history`` hops this
  holder accepted; once ``swarm.hop_check_warmup`` hops are in it, a norm more than ``swarm.hop_check_factor``
  times above or below that median is rejected. Honest training moves norms slowly (learning-rate warm-up, the
  loss falling): the measured spread of honest runs is in docs/hops.md, and the default factor leaves a wide
  margin above it. Only accepted norms enter the history, so a rejected tensor never widens the band.

A violation raises :class:`HopRejected`, naming the receiver, the direction, the check and the number. The
receiver does not know who sent the tensor (under swarm routing any holder of the neighbouring range may
have): the caller that passed it on does (neuroray/training/fixed.py, neuroray/swarm/router.py), and it
attributes the rejection to that holder. The band lives in the holder process only: a restarted holder learns
it again from its next ``warmup`` hops (it is not in snapshots).
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque

import torch

DIRECTIONS = ("fwd", "bwd")  # an activation from the previous range; the gradient of this range's output


class HopRejected(Exception):
    """A received activation or gradient failed a check; it was not used. Not a user error: the coordinator
    attributes it to the holder that sent the tensor and carries on without that holder's work."""

    def __init__(self, receiver: str, stage: int, direction: str, check: str, detail: str, mb: int | None = None):
        self.receiver, self.stage, self.direction = receiver, stage, direction
        self.check, self.detail, self.mb = check, detail, mb
        what = "activation" if direction == "fwd" else "gradient"
        at = "" if mb is None else f" of microbatch {mb}"
        super().__init__(f"{receiver} rejected the {what}{at}: {check}: {detail}")

    def __reduce__(self):  # crosses Ray as the holder's exception: rebuilt from its fields, not from its message
        return HopRejected, (self.receiver, self.stage, self.direction, self.check, self.detail, self.mb)

    @property
    def sender_stage(self) -> int:
        """The range whose holder produced the tensor: the previous one for an activation, the next for a gradient."""
        return self.stage - 1 if self.direction == "fwd" else self.stage + 1


class NormBand:
    """The recent L2 norms of one direction's accepted hops, and the band they allow."""

    def __init__(self, history: int, warmup: int, factor: float):
        self.norms: deque[float] = deque(maxlen=history)
        self.warmup, self.factor = warmup, factor

    def violation(self, norm: float) -> str | None:
        """Why ``norm`` is outside the band (None: inside, or the band is still warming up)."""
        if len(self.norms) < self.warmup:
            return None
        median = statistics.median(self.norms)
        lo, hi = median / self.factor, median * self.factor
        if lo <= norm <= hi:
            return None
        return f"norm {norm:.4g} outside [{lo:.4g}, {hi:.4g}] (median {median:.4g} of the last {len(self.norms)} hops " \
               f"x/÷ swarm.hop_check_factor={self.factor:g})"

    def add(self, norm: float) -> None:
        self.norms.append(norm)


class HopGuard:
    """One holder's checks of what it receives, and its norm band per direction (thread-safe: a routed holder
    runs failover calls beside its compute thread)."""

    def __init__(self, receiver: str, stage: int, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype],
                 history: int = 64, warmup: int = 16, factor: float = 100.0, enabled: bool = True):
        """``shapes`` and ``dtypes``: per direction, what a hop must be (a 0 in a shape: any size)."""
        self.receiver, self.stage, self.shapes, self.dtypes, self.enabled = receiver, stage, shapes, dtypes, enabled
        self.bands = {d: NormBand(history, warmup, factor) for d in DIRECTIONS}
        self.rejected = dict.fromkeys(("shape", "dtype", "finite", "norm", "payload"), 0)  # by check, since start
        self._lock = threading.Lock()

    def check(self, x: torch.Tensor, direction: str, mb: int | None = None, band: bool = True) -> None:
        """Raise :class:`HopRejected` unless ``x`` is what a ``direction`` hop to this holder must be. ``band``:
        also check the microbatch's shape and dtype and check (and learn) the norm band. Held-out evaluation
        passes False: its batches may be shaped otherwise, its activations always cross uncompressed, and it
        runs at theta0 (other norms); the width and finiteness are checked."""
        if not self.enabled:
            return
        want = tuple(self.shapes[direction])
        if not band:  # held-out batches: the width only
            want = (0,) * (len(want) - 1) + want[-1:]
        shape = tuple(x.shape)
        if len(shape) != len(want) or any(w and s != w for s, w in zip(shape, want)):
            self.reject(direction, "shape", f"{list(shape)}, expected {[w or '*' for w in want]}", mb)
        if band and x.dtype != self.dtypes[direction]:
            self.reject(direction, "dtype", f"{x.dtype}, expected {self.dtypes[direction]}", mb)
        norm = float(torch.linalg.vector_norm(x, dtype=torch.float32))
        if not math.isfinite(norm):
            nan = bool(torch.isnan(x).any())
            self.reject(direction, "finite", f"contains {'NaN' if nan else 'Inf'} (norm {norm})", mb)
        if not band:
            return
        if norm == 0.0:  # checked without the band: one learned from a neighbour that always sent zeros allows them
            self.reject(direction, "norm", "all zeros (no honest holder sends an empty activation or gradient)", mb)
        with self._lock:
            why = self.bands[direction].violation(norm)
            if why is None:
                self.bands[direction].add(norm)
        if why is not None:
            self.reject(direction, "norm", why, mb)

    def reject(self, direction: str, check: str, detail: str, mb: int | None = None):
        with self._lock:
            self.rejected[check] += 1
        raise HopRejected(self.receiver, self.stage, direction, check, detail, mb)
