"""A range's DiLoCo state on its holder: theta0, the pseudo-gradient with error feedback, and outer updates.

theta0 is the weight vector every holder of the range agrees on after an outer step; between outer
steps the holder's own weights drift from it by inner steps, and ``theta0 - theta`` is what it sends
(docs/diloco.md). With streaming (neuroray/diloco/streaming.py) each fragment syncs on its own.
"""

from __future__ import annotations

import logging

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from neuroray.diloco.compress import ErrorFeedback, decode, digest
from neuroray.swarm.compute import RangeCompute

log = logging.getLogger(__name__)


class OuterState:
    """theta0, the outer round count and the error feedback of the range that ``compute`` trains."""

    def __init__(self, compute: RangeCompute):
        self.compute = compute
        self.theta0 = parameters_to_vector(compute.module.parameters()).detach().clone()
        d = compute.spec.diloco
        # What compression dropped from this holder's pseudo-gradients, sent in later rounds (docs/diloco.md);
        # the run's density, or sparse payloads carry another k per chunk than the outer step checks for
        self.feedback = ErrorFeedback(d.compression, d.compression_block, d.sparse_density)
        self.feedback_round: tuple[int, torch.Tensor | None] | None = None  # (outer round, residual before it)
        self.outer_rounds = 0

    def fragment_slices(self) -> list[tuple[int, int]]:
        """Streaming: each fragment's ``(lo, hi)`` in this range's flat vector."""
        from neuroray.diloco.streaming import fragment_slices

        spec = self.compute.spec
        params = [(n, p.numel()) for n, p in self.compute.module.named_parameters()]
        return fragment_slices(params, spec.ranges[spec.stage], spec.diloco.streaming_fragments)

    def delta(self, fragment: int | None = None) -> tuple[torch.Tensor, int]:
        """``theta0 - theta`` on the CPU, or only ``fragment``'s slice of it, and where that slice starts."""
        delta = (self.theta0 - parameters_to_vector(self.compute.module.parameters()).detach()).cpu()
        lo = 0
        if fragment is not None:
            lo, hi = self.fragment_slices()[fragment]
            delta = delta[lo:hi].clone()  # a view would pickle its whole storage: the full range would cross
        return delta, lo

    def compress(self, delta: torch.Tensor, lo: int) -> dict[str, torch.Tensor]:
        """The payload of ``delta`` (starting at ``lo`` in the flat vector), with error feedback."""
        # A redone outer step (a peer died mid-round) asks again in the same round: start from the
        # residual the round began with, or the first attempt's quantization error would count twice.
        if self.feedback_round is not None and self.feedback_round[0] == self.outer_rounds:
            self.feedback.residual = self.feedback_round[1]
        self.feedback_round = (self.outer_rounds, self.feedback.residual)
        return self.feedback.compress(delta, lo, self.theta0.numel())

    def drop_residual(self) -> None:
        """Forget the error feedback (the range changed shape: the residual's layout is gone)."""
        self.feedback.residual, self.feedback_round = None, None

    def resolve_update(self, update: dict, theta0_box: list) -> tuple[torch.Tensor, tuple[int, int] | None, bool]:
        """The new theta0 an outer update leads to: ``(theta0, part, fetched)``.

        ``theta0 - decode(update)`` when this theta0 is the one the update applies to; else the dense
        theta0 from ``theta0_box[0]`` (an object ref, boxed so Ray ships it only on demand; in-process,
        the tensor), and ``fetched`` is True. ``part``: the fragment slice a streaming update changes."""
        old = self.theta0.cpu()
        if update["base"] == digest(old):
            part = update.get("slice")
            if part is None:
                return old - decode(update["payload"]), None, False
            new = old.clone()
            new[part[0]:part[1]] -= decode(update["payload"])  # the task's float32 subtraction, bit for bit
            return new, part, False
        log.warning("%s: theta0 differs from the outer step's; fetching the dense theta0", self.compute.name)
        dense = theta0_box[0]
        if not isinstance(dense, torch.Tensor):
            import ray

            dense = ray.get(dense)
        return dense, None, True

    def restart_at(self, theta0: torch.Tensor, part: tuple[int, int] | None = None) -> None:
        """Take ``theta0`` and restart the weights from it; ``part``: only that slice of the weights."""
        self.theta0 = theta0.to(self.compute.device).clone()
        weights = self.theta0.clone()
        if part is not None:
            weights = parameters_to_vector(self.compute.module.parameters()).detach().clone()
            weights[part[0]:part[1]] = self.theta0[part[0]:part[1]]
        self.compute.load_flat(weights)

    def weights_at_theta0(self) -> dict[str, torch.Tensor]:
        """The module's state dict at theta0, the weights left as they are."""
        params = list(self.compute.module.parameters())
        with torch.no_grad():  # load theta0 in place and back, so tied weights follow as in load_theta0
            current = parameters_to_vector(params).detach().clone()
            vector_to_parameters(self.theta0.clone(), params)
            state = self.compute.weights()
            vector_to_parameters(current, params)
        return state
