"""A range's DiLoCo state on its holder: theta0, the pseudo-gradient with error feedback, and outer updates.

theta0 is the weight vector every holder of the range agrees on after an outer step; between outer
steps the holder's own weights drift from it by inner steps, and ``theta0 - theta`` is what it sends
(docs/diloco.md). With streaming (neuroray/diloco/streaming.py) each fragment syncs on its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from neuroray.diloco.compress import ErrorFeedback, PayloadError, decode
from neuroray.diloco.union import apply_union, check_union
from neuroray.digest import DigestThread
from neuroray.swarm.compute import RangeCompute

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """A round sent to the outer step and not landed yet: what the holder trained from since (``base``) and
    the delta it sent (a redone outer step resends exactly it)."""

    outer_round: int  # the round it lands as (outer_rounds + 1 when sent)
    base: torch.Tensor  # on the device: the weights at the round's end (delayed) or the eager guess
    delta: torch.Tensor  # on the CPU: theta0 - theta at the round's end, as sent


class OuterState:
    """theta0, the outer round count and the error feedback of the range that ``compute`` trains."""

    def __init__(self, compute: RangeCompute):
        self.compute = compute
        self.theta0 = parameters_to_vector(compute.module.parameters()).detach().clone()
        # hashes theta0 and deltas off the compute thread, each once (the proof and update bases share them)
        self.digests = DigestThread(f"digest-{compute.name}")
        d = compute.spec.diloco
        # What compression dropped from this holder's pseudo-gradients, sent in later rounds (docs/diloco.md);
        # the run's density, or sparse payloads carry another k per chunk than the outer step checks for
        self.feedback = ErrorFeedback(d.compression, d.compression_block, d.sparse_density,
                                      d.sparse_feedback_decay if d.compression == "sparse" else 1.0)
        self.feedback_round: tuple[int, torch.Tensor | None] | None = None  # (outer round, residual before it)
        self.outer_rounds = 0
        # diloco.overlap: the round whose outer step is in flight (neuroray/diloco/overlap.py), else None
        self.pending: Pending | None = None
        self.outer_buf: torch.Tensor | None = None  # eager: this holder's estimate of the outer momentum
        self.outer_grad: torch.Tensor | None = None  # eager: the last aggregate, recovered from its step

    def fragment_slices(self) -> list[tuple[int, int]]:
        """Streaming: each fragment's ``(lo, hi)`` in this range's flat vector."""
        from neuroray.diloco.streaming import fragment_slices

        spec = self.compute.spec
        params = [(n, p.numel()) for n, p in self.compute.module.named_parameters()]
        return fragment_slices(params, spec.ranges[spec.stage], spec.diloco.streaming_fragments)

    def delta(self, fragment: int | None = None) -> tuple[torch.Tensor, int]:
        """``theta0 - theta`` on the CPU, or only ``fragment``'s slice of it, and where that slice starts.
        With a round in flight (overlap), the delta that round sent: a redone outer step must get it again."""
        if self.pending is not None and fragment is None:
            return self.pending.delta.clone(), 0
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

        ``theta0 - decode(update)`` when this theta0 is the one the update applies to (a union update: the
        step rebuilt from its payloads, once every one of them passes its check); else the dense
        theta0 from ``theta0_box[0]`` (an object ref, boxed so Ray ships it only on demand; in-process,
        the tensor), and ``fetched`` is True. ``part``: the fragment slice a streaming update changes."""
        old = self.theta0.cpu()
        if update["base"] != self.digests.digest(self.theta0):
            log.warning("%s: theta0 differs from the outer step's; fetching the dense theta0", self.compute.name)
        elif "union" in update:  # diloco.sparse_broadcast=union: rebuild the step from the accepted payloads
            part = update.get("slice")
            lo, hi = part or (0, old.numel())
            d = self.compute.spec.diloco
            try:
                check_union(update, d.compression_block, hi - lo, d.sparse_density)
            except PayloadError as exc:  # never decoded, never applied: the outer step's theta0 instead
                log.warning("%s: refused the outer update (%s); fetching the dense theta0", self.compute.name, exc)
            else:
                new = old.clone()
                new[lo:hi] = apply_union(old[lo:hi], update)  # the outer step's own function, bit for bit
                return new, part, False
        else:
            part = update.get("slice")
            if part is None:
                return old - decode(update["payload"]), None, False
            new = old.clone()
            new[part[0]:part[1]] -= decode(update["payload"])  # the task's float32 subtraction, bit for bit
            return new, part, False
        dense = theta0_box[0]
        if not isinstance(dense, torch.Tensor):
            import ray

            dense = ray.get(dense)
        return dense, None, True

    def restart_at(self, theta0: torch.Tensor, part: tuple[int, int] | None = None) -> None:
        """Take ``theta0`` and restart the weights from it; ``part``: only that slice of the weights."""
        self.theta0 = theta0.to(self.compute.device).clone()
        self.pending = None  # a restart drops any local progress, the round in flight's base with it
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

    # ----- diloco.overlap (neuroray/diloco/overlap.py) ------------------------------------------
    def send(self, delta: torch.Tensor) -> torch.Tensor:
        """The round ends with ``delta`` sent: keep it and the base the next inner steps train from (eager:
        restart at once from the local guess). Returns the base."""
        from neuroray.diloco.overlap import eager_guess

        d, weights = self.compute.spec.diloco, self.compute.flat_params()
        if d.overlap == "eager":
            weights = eager_guess(self.theta0.cpu(), delta, self.outer_grad, d.replicas, self.outer_buf, d.outer_lr,
                                  d.outer_momentum, d.nesterov)
            self.compute.load_flat(weights.to(self.compute.device))
        self.pending = Pending(self.outer_rounds + 1, weights.to(self.compute.device).clone(), delta.clone())
        return weights

    def land(self, theta0: torch.Tensor) -> None:
        """The aggregate's ``theta0`` arrived: take it, keeping what was learned since the base (none without
        a round in flight: the weights restart at theta0, as a blocking outer step does)."""
        from neuroray.diloco.overlap import land, recover_step

        d, dev = self.compute.spec.diloco, self.compute.device
        weights = parameters_to_vector(self.compute.module.parameters()).detach()
        base = weights if self.pending is None else self.pending.base
        if d.overlap == "eager":
            grad, self.outer_buf = recover_step(self.outer_buf, self.theta0.cpu(), theta0.cpu(), d.outer_lr,
                                                d.outer_momentum, d.nesterov)
            self.outer_grad = self.outer_grad if grad is None else grad
        self.theta0 = theta0.to(dev).clone()
        self.compute.load_flat(land(self.theta0, weights, base))
        self.pending = None

    def overlap_snapshot(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The round in flight and eager's momentum and last aggregate, for a snapshot (a restore lands it exactly)."""
        tensors = {f"overlap.{k}": v.detach().cpu().clone() for k, v in
                   (("momentum", self.outer_buf), ("aggregate", self.outer_grad)) if v is not None}
        if self.pending is None:
            return tensors, {}
        tensors |= {"overlap.base": self.pending.base.detach().cpu().clone(), "overlap.delta": self.pending.delta.clone()}
        return tensors, {"overlap_round": self.pending.outer_round}

    def overlap_restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.outer_buf = tensors["overlap.momentum"].clone() if "overlap.momentum" in tensors else None
        self.outer_grad = tensors["overlap.aggregate"].clone() if "overlap.aggregate" in tensors else None
        self.pending = None
        if meta.get("overlap_round") is not None:
            self.pending = Pending(meta["overlap_round"], tensors["overlap.base"].to(self.compute.device).clone(),
                                   tensors["overlap.delta"].clone())
