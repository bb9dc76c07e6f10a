"""Pipeline compute of one layer range: its module on a device, its inner AdamW, and the microbatches in flight.

:class:`RangeCompute` is the part of a stage holder that runs forward and backward passes and inner
steps; the holder (neuroray/swarm/holder.py) adds DiLoCo state, proofs and lifecycle around it.
Inference holders (neuroray/inference/holder.py) share :class:`RangeRole` and :func:`open_device`.

Backward crosses holders: every non-first range returns the gradient of its *input* activation,
which the previous range feeds into ``out.backward(grad)``. The result equals the monolithic
model's gradient (tests/test_pipeline_ray.py checks it parameter by parameter).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.model import StageModule, build_stage
from neuroray.swarm.claims import Claims

from neuroray.swarm.spec import HolderSpec

log = logging.getLogger(__name__)


def open_device(torch_threads: int, use_gpu: bool) -> torch.device:
    """Set this process's torch threads and pick its device: CUDA if asked for and present, else the CPU."""
    torch.set_num_threads(torch_threads)
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def make_inner_optimizer(module: torch.nn.Module, diloco: DilocoConfig) -> torch.optim.AdamW:
    """The inner optimizer every range trains with (a fresh one after a rebuild must match the first)."""
    return torch.optim.AdamW(module.parameters(), lr=diloco.inner_lr, weight_decay=diloco.weight_decay,
                             betas=(0.9, 0.95))


class BusyClock:
    """Wall time spent in compute calls, for the holder's utilisation (busy time / wall time)."""

    def __init__(self):
        self.busy_s, self.window_start = 0.0, time.perf_counter()

    def start(self) -> float:
        return time.perf_counter()

    def stop(self, t0: float) -> None:
        self.busy_s += time.perf_counter() - t0

    def take(self) -> float:
        """Busy fraction since the previous call (at most 1); starts a new window."""
        now = time.perf_counter()
        busy, wall = self.busy_s, max(now - self.window_start, 1e-9)
        self.busy_s, self.window_start = 0.0, now
        return min(busy / wall, 1.0)


class RangeCompute:
    """One layer range's module, inner AdamW, data stream (Driver) and the graphs of microbatches in flight.

    ``claims`` makes every routed call run at most once here, and a revoked one never (neuroray/swarm/claims.py).
    """

    def __init__(self, spec: HolderSpec, device: torch.device, stream=None):
        self.spec, self.device, self.stream = spec, device, stream
        self.claims = Claims()  # swarm routing: a gradient is applied once per range, never twice here
        # a routed holder's failover thread runs calls beside its compute thread: guard what both touch
        self.lock = threading.Lock()
        self.module: StageModule
        self.optimizer: torch.optim.AdamW
        self._build()
        self.pending: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.inner_steps = 0
        self.microbatches_done = 0
        self.step_microbatches = 0

    @property
    def name(self) -> str:
        return self.spec.label

    def _build(self) -> None:
        s = self.spec
        self.module = build_stage(s.model, s.vocab_size, s.stage, s.ranges, seed=s.seed).to(self.device)
        self.optimizer = make_inner_optimizer(self.module, s.diloco)

    def rebuild(self, model: ModelConfig, ranges: list[tuple[int, int]]) -> None:
        """A fresh module and AdamW for ``model`` split into ``ranges`` (values are loaded by the caller)."""
        self.spec = replace(self.spec, model=model, ranges=[tuple(r) for r in ranges])
        self._build()

    # ----- data (Driver) ----------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stream is None:
            raise RuntimeError(f"{self.name} has no data stream: only the Driver (stage 0) reads shards")
        return self.stream.next_microbatch()

    def batch_at(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stream is None:
            raise RuntimeError(f"{self.name} has no data stream: only the Driver (stage 0) reads shards")
        with self.lock:
            self.stream.seek(position)
            return self.stream.next_microbatch()

    # ----- forward and backward ---------------------------------------------------------------
    def _run(self, mb_id: int, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        x = x.to(self.device)
        if self.module.has_embedding:
            inp = None  # token ids: nothing upstream to send a gradient to
        else:
            inp = x.detach().requires_grad_(True)
            x = inp
        if mb_id in self.pending:
            raise RuntimeError(f"{self.name}: microbatch {mb_id} is already in flight")
        return inp, self.module(x)

    def forward(self, mb_id: int, x: torch.Tensor, attempt: int = 0) -> torch.Tensor | None:
        """Run forward and keep the graph for :meth:`backward`; None if the call was revoked."""
        if not self.claims.claim(mb_id, "f", attempt):
            return None
        inp, out = self._run(mb_id, x)
        # revoked while running (a hedge elsewhere won): keep no graph
        self.claims.keep(mb_id, lambda: self.pending.__setitem__(mb_id, (inp, out)))
        return out.detach().cpu()

    def forward_first(self, mb_id: int, attempt: int = 0):
        x, labels = self.batch_at(mb_id)
        out = self.forward(mb_id, x, attempt)
        return (None, None) if out is None else (out, labels)

    def forward_backward(self, mb_id: int, x: torch.Tensor | None, labels: torch.Tensor | None, scale: float,
                         attempt: int = 0):
        if not self.claims.claim(mb_id, "b", attempt):
            return None, None
        if x is None:
            x, labels = self.batch_at(mb_id)
        inp, logits = self._run(mb_id, x)
        loss = self.module.loss(logits, labels.to(self.device))
        (loss * scale).backward()
        self._count_microbatch()
        return float(loss.detach()), None if inp is None else inp.grad.detach().cpu()

    def backward(self, mb_id: int, grad: torch.Tensor, attempt: int = 0) -> tuple[torch.Tensor | None, bool]:
        """``(gradient of the input, ran)``; ran is False when the call was revoked."""
        if not self.claims.claim(mb_id, "b", attempt):
            return None, False
        inp, out = self.pending.pop(mb_id)
        out.backward(grad.to(self.device))
        self._count_microbatch()
        return None if inp is None else inp.grad.detach().cpu(), True

    def recompute_backward(self, mb_id: int, x: torch.Tensor | None, grad: torch.Tensor, attempt: int = 0):
        if not self.claims.claim(mb_id, "b", attempt):
            return None, False
        if x is None:
            x, _ = self.batch_at(mb_id)
        self.pending.pop(mb_id, None)  # a graph this holder kept for the microbatch is recomputed here
        inp, out = self._run(mb_id, x)
        out.backward(grad.to(self.device))
        self._count_microbatch()
        return None if inp is None else inp.grad.detach().cpu(), True

    def _count_microbatch(self) -> None:
        with self.lock:
            self.step_microbatches += 1

    def revoke(self, mb_ids: list[int], kind: str, keep_started: bool = False,
               attempts: list[int] | None = None) -> list[bool]:
        return self.claims.revoke(mb_ids, kind, drop=lambda mb: self.pending.pop(mb, None), keep_started=keep_started,
                                  attempts=attempts)

    # ----- inner steps --------------------------------------------------------------------------
    def step(self, mean: bool = False, lr: float | None = None) -> float:
        """One inner AdamW step on the accumulated gradients; returns the pre-clip gradient norm."""
        if not mean:  # fixed routing runs calls in order, so no late copy of this step can still arrive
            self.claims.clear()
        if mean:
            if self.pending:  # graphs of calls revoked after they ran: nothing will backpropagate them
                log.warning("%s: dropping %d unfinished microbatches at the step", self.name, len(self.pending))
                self.pending.clear()
            if self.step_microbatches == 0:
                return 0.0
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.div_(self.step_microbatches)
        assert not self.pending, f"{self.name}: step with {len(self.pending)} microbatches still in flight"
        clip = self.spec.diloco.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip if clip > 0 else float("inf"))
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.inner_steps += 1
        # counted only once the step is applied, so aborted microbatches are never claimed as work
        self.microbatches_done += self.step_microbatches
        self.step_microbatches = 0
        return float(norm)

    def abort(self) -> None:
        """Drop half-done microbatches and their gradients."""
        self.pending.clear()
        self.claims.clear()
        self.step_microbatches = 0
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # ----- weights ------------------------------------------------------------------------------
    def flat_params(self) -> torch.Tensor:
        """The weights as one flat float32 vector on the CPU (the layout pseudo-gradients use)."""
        return parameters_to_vector(self.module.parameters()).detach().cpu()

    def load_flat(self, weights: torch.Tensor) -> None:
        """Set the weights from a flat vector (tied weights follow, as they share one parameter)."""
        with torch.no_grad():
            vector_to_parameters(weights, self.module.parameters())

    def weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the module's state dict."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().cpu().clone() for n, p in self.module.named_parameters() if p.grad is not None}

    def param_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, tuple(p.shape)) for n, p in self.module.named_parameters()]
