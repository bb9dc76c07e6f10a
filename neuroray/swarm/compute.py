"""Pipeline compute of one layer range: its module on a device, its inner AdamW, and the microbatches in flight.

:class:`RangeCompute` is the part of a stage holder that runs forward and backward passes and inner
steps; the holder (neuroray/swarm/holder.py) adds DiLoCo state, proofs and lifecycle around it.
Inference holders (neuroray/inference/holder.py) share :class:`RangeRole` and :func:`open_device`.

Backward crosses holders: every non-first range returns the gradient of its *input* activation,
which the previous range feeds into ``out.backward(grad)``. The result equals the monolithic
model's gradient (tests/test_pipeline_ray.py checks it parameter by parameter).

Precision (``precision``, docs/precision.md): fp32 runs exactly as without it. bf16 and fp16 run each
range's forward (and the loss) under ``torch.autocast``; the parameters, their gradients, AdamW's state,
theta0, pseudo-gradients and snapshots stay float32 (master weights). On the wire: bf16 activations
cross holders as bf16 (half the hop bytes) and are upcast to float32 on arrival; fp16 activations cross
as float32 (fp16's range is not guaranteed for a residual stream); gradients always cross as float32,
unscaled. ``swarm.hop_compression`` compresses both directions (:meth:`RangeCompute._send` and
:meth:`RangeCompute._receive`, neuroray/swarm/hop_codec.py). fp16 keeps one dynamic loss scale per
holder (a ``GradScaler``): each holder scales the gradient it backpropagates and unscales both its
parameters' gradients and the gradient it sends, so no scale crosses holders and none has to agree with
another; a holder whose gradients overflow skips its inner step and halves its scale. fp16 needs CUDA
(refused on the CPU).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from neuroray.config import PRECISIONS, DilocoConfig, ModelConfig
from neuroray.errors import ConfigError, HopPayloadError
from neuroray.model import StageModule, build_stage
from neuroray.swarm.claims import Claims
from neuroray.swarm.direct_transport import direct_or_none, outgoing
from neuroray.swarm.hop_codec import HopCodec, wire_bytes
from neuroray.swarm.hop_guard import HopGuard
from neuroray.swarm.scalar_read import ScalarRead
from neuroray.swarm.shm_transport import ShmHop, ShmReader, ShmRings
from neuroray.swarm.transport import WireTensor, from_wire, to_device, to_wire

from neuroray.swarm.spec import HolderSpec

log = logging.getLogger(__name__)


def open_device(torch_threads: int, use_gpu: bool) -> torch.device:
    """Set this process's torch threads and pick its device: CUDA if asked for and present, else the CPU."""
    torch.set_num_threads(torch_threads)
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``precision`` runs at on ``device``; None: plain float32 (no autocast).

    auto: bf16 on CUDA, fp32 on the CPU (so CPU runs stay bit-identical to float32). fp16 on the CPU
    is refused: its loss scaling is only worth its cost where fp16 kernels are fast, and CPU autocast has none."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision} is unknown; choose {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision=fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def enable_tf32(precision: str, device: torch.device) -> None:
    """TF32 matmuls on CUDA (Ampere and later: float32 matmuls on tensor cores, 10-bit mantissa), except
    under an explicit precision=fp32, which asks for full float32 arithmetic."""
    if device.type == "cuda" and torch.cuda.is_available() and precision != "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")


def make_inner_optimizer(module: torch.nn.Module, diloco: DilocoConfig) -> torch.optim.AdamW:
    """The inner optimizer every range trains with (a fresh one after a rebuild must match the first).

    Fused (one kernel for all parameters) on CUDA; on the CPU torch's default, so CPU runs stay
    bit-identical."""
    fused = {"fused": True} if next(module.parameters()).is_cuda else {}
    return torch.optim.AdamW(module.parameters(), lr=diloco.inner_lr, weight_decay=diloco.weight_decay,
                             betas=(0.9, 0.95), **fused)


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
        self.amp = autocast_dtype(spec.precision, device)  # None: float32, no autocast
        enable_tf32(spec.precision, device)
        # fp16 only: this holder's own dynamic loss scale (see the module docstring)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.module: StageModule
        self.optimizer: torch.optim.AdamW
        self._build()
        self.pending: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.inner_steps = 0
        self.microbatches_done = 0
        self.step_microbatches = 0
        self.hop = HopCodec(spec.hop_compression, spec.hop_block, spec.hop_ratio)
        self.guard = self._make_guard()
        # swarm.hop_transport=shm: this holder's outgoing rings (made when the driver says which peers share its
        # node) and its mappings of the rings it receives from (neuroray/swarm/shm_transport.py)
        self.rings, self.reader = ShmRings(), ShmReader()
        # hops this holder sent and received: counts, encoded bytes, and the float32 bytes they stand for
        self.hop_counts = dict.fromkeys(("fwd_sent", "fwd_bytes", "fwd_fp32_bytes", "bwd_sent", "bwd_bytes",
                                         "bwd_fp32_bytes", "received", "received_bytes"), 0)

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
        self.guard = self._make_guard()  # a grown model's hops have a new width and new norms

    def _make_guard(self) -> HopGuard:
        """The checks of what this holder receives (neuroray/swarm/hop_guard.py): the shape of a microbatch's
        hidden states, and the dtype the transport promised: bf16 activations under bf16 on uncompressed hops
        (:meth:`_activation_out`), float32 for everything else (compressed hops decode to float32)."""
        s = self.spec
        act = torch.bfloat16 if self.amp == torch.bfloat16 and s.hop_compression == "none" else torch.float32
        out = 0 if self.module.has_head else s.model.d_model  # logits (no pipeline sends the last range a gradient)
        shapes = {"fwd": (s.microbatch_size, s.seq_len, s.model.d_model), "bwd": (s.microbatch_size, s.seq_len, out)}
        return HopGuard(s.label, s.stage, shapes, {"fwd": act, "bwd": torch.float32}, s.hop_check_history, s.hop_check_warmup,
                        s.hop_check_factor, enabled=s.hop_check)

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

    # ----- hops: what crosses to the next and previous holder ---------------------------------
    def _send(self, t: torch.Tensor | None, direction: str):
        """The payload for an activation (``fwd``) or input gradient (``bwd``) leaving this holder, counted.
        ``t`` may be on the device: the codec brings it to the host (neuroray/swarm/transport.py). Under a
        direct transport it is the tensor itself (neuroray/swarm/direct_transport.py), which the receiver's
        :meth:`_receive` takes as it comes."""
        if t is None:
            return None
        direct = direct_or_none(self.spec.hop_transport)  # the tensor itself: Ray sends it over the holders' group
        # shm: a slot of this edge's ring, else (no ring, none free, too big) the object store
        payload = self.rings.put(t, direction, self.name) if self.spec.hop_transport == "shm" else None
        if payload is None:
            payload = self.hop.encode(t, self.name) if direct is None else outgoing(t, direct)
        with self.lock:
            c = self.hop_counts
            c[f"{direction}_sent"] += 1
            c[f"{direction}_bytes"] += payload.nbytes if isinstance(payload, ShmHop) else wire_bytes(payload)
            c[f"{direction}_fp32_bytes"] += t.numel() * 4
        return payload

    def arrive(self, payload, direction: str, mb: int | None = None):
        """A hop in shared memory as the tensor it names (a view of the slot, released with its last view), so the
        holder's methods and its hop record hold the bytes while they use them; any other payload as it is. A
        handle that cannot be read (its ring not on this node, its slot no longer holding it) is rejected like a
        malformed payload (check ``payload``)."""
        if not isinstance(payload, ShmHop):
            return payload
        try:
            return self.reader.take(payload, self.name)
        except HopPayloadError as exc:
            self.guard.reject(direction, "payload", f"{exc.reason} (the payload says {exc.sender} sent it)", mb)

    def _receive(self, payload, direction: str, mb: int | None = None) -> torch.Tensor:
        """Decode and check a hop payload from another holder (``fwd``: an activation, ``bwd``: the gradient of
        this range's output) before anything is computed with it; on this holder's device. A malformed payload
        or a tensor that fails a check raises HopRejected (neuroray/swarm/hop_guard.py): the caller names the
        sender."""
        payload = self.arrive(payload, direction, mb)
        try:
            x = self.hop.decode(payload, self.name)
        except HopPayloadError as exc:
            self.guard.reject(direction, "payload", f"{exc.reason} (the payload says {exc.sender} sent it)", mb)
        with self.lock:
            self.hop_counts["received"] += 1
            self.hop_counts["received_bytes"] += wire_bytes(payload)
        x = to_device(x, self.device)
        self.guard.check(x, direction, mb)
        return x

    def _receive_input(self, x, mb: int | None = None):
        """The range's input: token ids on a Driver (never compressed), else an activation payload."""
        return x if x is None or self.module.has_embedding else self._receive(x, "fwd", mb)

    # ----- forward and backward ---------------------------------------------------------------
    def _run(self, mb_id: int, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        x = x.to(self.device)
        if self.module.has_embedding:
            inp = None  # token ids: nothing upstream to send a gradient to
        else:
            if self.amp is not None:  # bf16 on the wire; the residual stream inside a range stays float32
                x = x.float()
            inp = x.detach().requires_grad_(True)
            x = inp
        if mb_id in self.pending:
            raise RuntimeError(f"{self.name}: microbatch {mb_id} is already in flight")
        if self.amp is None:
            return inp, self.module(x)
        with torch.autocast(self.device.type, dtype=self.amp):
            return inp, self.module(x)

    def _activation_out(self, out: torch.Tensor) -> torch.Tensor:
        """The activation as it crosses to the next holder, still on the device: bf16 under bf16 (half the
        bytes), else float32."""
        out = out.detach()
        return out.to(torch.bfloat16) if self.amp == torch.bfloat16 else out.float()

    def _backprop(self, out: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """``out.backward(grad)``, scaled by this holder's loss scale under fp16."""
        if self.scaler is not None:
            out = self.scaler.scale(out)
        out.backward(grad)

    def _grad_in(self, inp: torch.Tensor | None) -> torch.Tensor | None:
        """The input's gradient to send upstream: float32 and unscaled (no loss scale crosses holders)."""
        if inp is None:
            return None
        g = inp.grad.detach()
        if self.scaler is not None:
            g = g / self.scaler.get_scale()
        return g.float()

    def forward(self, mb_id: int, x: torch.Tensor, attempt: int = 0) -> torch.Tensor | None:
        """Run forward and keep the graph for :meth:`backward`; None if the call was revoked."""
        x = self._receive_input(x, mb_id)  # a rejected input is refused before the call claims anything
        if not self.claims.claim(mb_id, "f", attempt):
            return None
        inp, out = self._run(mb_id, x)
        # revoked while running (a hedge elsewhere won): keep no graph
        self.claims.keep(mb_id, lambda: self.pending.__setitem__(mb_id, (inp, out)))
        return self._send(out.detach() if self.amp is None else self._activation_out(out), "fwd")

    def forward_backward(self, mb_id: int, x: torch.Tensor | None, labels: torch.Tensor | None, scale: float,
                         attempt: int = 0):
        x = self._receive_input(x, mb_id)
        if not self.claims.claim(mb_id, "b", attempt):
            return None, None
        if x is None:
            x, labels = self.batch_at(mb_id)
        inp, logits = self._run(mb_id, x)
        if self.amp is None:
            loss = self.module.loss(logits, labels.to(self.device))
            read = ScalarRead(loss)  # read once the backward is queued (neuroray/swarm/scalar_read.py)
            (loss * scale).backward()
            self._count_microbatch()
            return read.value(), self._send(None if inp is None else inp.grad.detach(), "bwd")
        with torch.autocast(self.device.type, dtype=self.amp):
            loss = self.module.loss(logits, labels.to(self.device))
        read = ScalarRead(loss)
        self._backprop(loss.float() * scale)
        self._count_microbatch()
        return read.value(), self._send(self._grad_in(inp), "bwd")

    def backward(self, mb_id: int, grad: torch.Tensor, attempt: int = 0) -> tuple[torch.Tensor | None, bool]:
        """``(gradient of the input, ran)``; ran is False when the call was revoked."""
        grad = self._receive(grad, "bwd", mb_id)
        if not self.claims.claim(mb_id, "b", attempt):
            return None, False
        inp, out = self.pending.pop(mb_id)
        return self._backward_from(inp, out, grad), True

    def recompute_backward(self, mb_id: int, x: torch.Tensor | None, grad: torch.Tensor, attempt: int = 0):
        x, grad = self._receive_input(x, mb_id), self._receive(grad, "bwd", mb_id)
        if not self.claims.claim(mb_id, "b", attempt):
            return None, False
        if x is None:
            x, _ = self.batch_at(mb_id)
        self.pending.pop(mb_id, None)  # a graph this holder kept for the microbatch is recomputed here
        inp, out = self._run(mb_id, x)
        return self._backward_from(inp, out, grad), True

    def _backward_from(self, inp: torch.Tensor | None, out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
        """Backpropagate ``grad`` through the range's output; the gradient of its input (None on a Driver)."""
        if self.amp is None:
            out.backward(grad.to(self.device))
            self._count_microbatch()
            return self._send(None if inp is None else inp.grad.detach(), "bwd")
        self._backprop(out, grad.to(self.device, out.dtype))
        self._count_microbatch()
        return self._send(self._grad_in(inp), "bwd")

    def evaluate(self, x: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor | None = None):
        """Forward only at the flat ``weights`` (theta0), the module's own left untouched: no graph, no
        gradient, no optimizer state, no work counted. The activation for the next range, or on the last
        range with ``labels``, the mean loss (held-out evaluation, neuroray/training/evaluation.py)."""
        params = self.params_at(weights)
        if isinstance(x, WireTensor):  # an activation from the previous range (token ids on a Driver)
            x = from_wire(x, "the previous range", self.name)
        x = to_device(x, self.device)
        if not self.module.has_embedding:  # held-out batches may be shaped otherwise: width, dtype, finiteness
            self.guard.check(x, "fwd", band=False)
        if not self.module.has_embedding and self.amp is not None:
            x = x.float()  # bf16 on the wire, as in a training forward
        cast = nullcontext() if self.amp is None else torch.autocast(self.device.type, dtype=self.amp)
        with torch.no_grad(), cast:
            out = torch.func.functional_call(self.module, params, (x,))
            if labels is None:
                return to_wire(self._activation_out(out))
            return float(self.module.loss(out, labels.to(self.device)))

    def params_at(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """The module's parameters as views of the flat ``weights`` on the device, by name (for
        ``torch.func.functional_call``: the module's own parameters stay as they are)."""
        params, at, weights = {}, 0, weights.to(self.device)
        for name, p in self.module.named_parameters():  # the order parameters_to_vector flattens in
            params[name] = weights[at:at + p.numel()].view_as(p)
            at += p.numel()
        return params

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
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        norm = ScalarRead(torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip if clip > 0 else float("inf")))
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when this holder's gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.inner_steps += 1
        # counted only once the step is applied, so aborted microbatches are never claimed as work
        self.microbatches_done += self.step_microbatches
        self.step_microbatches = 0
        return norm.value()  # read with the optimizer step already queued

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
