"""The stage holder: one layer range of the model, its inner optimizer and its DiLoCo state.

A holder is a plain class so it can be tested in-process; :func:`holder_actor` wraps it as a Ray
actor. Roles follow the seed: the **Driver** holds the first range and the embedding and reads its
own data shard, **Workers** hold middle ranges, the **Validator** holds the last range, the final
norm, the LM head and computes the loss.

Backward crosses holders: every non-first holder returns the gradient of its *input* activation,
which the previous holder feeds into ``out.backward(grad)``. The result equals the monolithic
model's gradient (tests/test_pipeline_ray.py checks it parameter by parameter).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, replace

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.diloco.compress import ErrorFeedback, decode, digest
from neuroray.model import build_stage
from neuroray.ponw.identity import Identity
from neuroray.swarm.claims import Claims

log = logging.getLogger(__name__)


@dataclass
class HolderSpec:
    """Everything a holder needs, as plain values (no Hydra objects cross into actors)."""

    replica: int
    stage: int
    ranges: list[tuple[int, int]]
    model: ModelConfig
    vocab_size: int
    diloco: DilocoConfig
    seed: int
    key_path: str
    torch_threads: int = 1
    use_gpu: bool = False
    # Driver only: where its Genesis shards live
    data_root: str | None = None
    manifest: dict | None = None
    seq_len: int = 0
    microbatch_size: int = 0
    # Snapshots: where this holder's slot lives, how many to keep, and which step a resumed job restores
    snapshot_root: str | None = None
    snapshot_keep: int = 5
    resume_step: int | None = None
    # Proofs of Neural Work: tokens in one microbatch (0 disables proofs)
    tokens_per_batch: int = 0
    # Swarm routing: every Driver reads one shared ring from this shard, so microbatch m is the same data
    # whichever Driver the router sends it to (None: this node's own shard, as in fixed routing)
    data_start: int | None = None

    @property
    def slot(self) -> str:
        return f"r{self.replica}-s{self.stage}"

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == len(self.ranges) - 1

    @property
    def role(self) -> str:
        return "driver" if self.is_first else "validator" if self.is_last else "worker"


def _busy(method):
    """Count the wall time spent in a compute method, for the holder's utilisation."""

    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            if self._slowdown > 1:  # simulated slower hardware (benchmarks): the extra time is busy time too
                time.sleep((self._slowdown - 1) * (time.perf_counter() - t0))
            self._busy_s += time.perf_counter() - t0

    return timed


class StageHolder:
    def __init__(self, spec: HolderSpec):
        self._busy_s, self._window_start, self._slowdown = 0.0, time.perf_counter(), 1.0
        self.spec = spec
        self.claims = Claims()  # swarm routing: a gradient is applied once per range, never twice here
        # a routed holder's failover thread runs calls beside its compute thread: guard what both touch
        self._shared = threading.Lock()
        torch.set_num_threads(spec.torch_threads)
        self.device = torch.device("cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu")
        if spec.use_gpu and self.device.type == "cpu":
            log.warning("%s: GPUs were requested but CUDA is not available here; running on CPU", self.name)
        self.identity = Identity.load_or_create(spec.key_path)
        self.module = build_stage(spec.model, spec.vocab_size, spec.stage, spec.ranges, seed=spec.seed).to(self.device)
        d = spec.diloco
        self.optimizer = torch.optim.AdamW(
            self.module.parameters(), lr=d.inner_lr, weight_decay=d.weight_decay, betas=(0.9, 0.95)
        )
        self.theta0 = parameters_to_vector(self.module.parameters()).detach().clone()
        # What compression dropped from this holder's pseudo-gradients, sent in later rounds (docs/diloco.md)
        self.feedback = ErrorFeedback(d.compression, d.compression_block)
        self._feedback_round: tuple[int, torch.Tensor | None] | None = None  # (outer round, residual before it)
        self._pending: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.inner_steps = 0
        self.outer_rounds = 0
        self.microbatches_done = 0
        self._step_microbatches = 0
        self.stream = None
        if spec.is_first and spec.data_root is not None:
            from neuroray.genesis import Manifest, TokenStream

            manifest = Manifest.from_json(spec.manifest)
            self.stream = TokenStream(spec.data_root, manifest, self.node_id, spec.seq_len, spec.microbatch_size,
                                      _start=spec.data_start)
        self.snapshots = None
        self.restored_step: int | None = None
        if spec.snapshot_root:
            from neuroray.snapshot import SnapshotStore

            self.snapshots = SnapshotStore(spec.snapshot_root, spec.slot, keep=spec.snapshot_keep)
            self._restore_on_start()
        self.prover, self._proof, self._theta0_losses = None, None, []
        if spec.tokens_per_batch > 0:
            from neuroray.ponw.service import RoundProver

            self.prover = RoundProver.for_holder(self, spec.tokens_per_batch)
            self._start_proof_round()

    def _start_proof_round(self) -> None:
        position = self.stream.position if self.stream is not None else 0
        shard = getattr(self.stream, "shard_id", None) if self.stream is not None else None
        # The proof commits the weights the round starts from, at which the Driver's committed losses are
        # computed: theta0, except with streaming, where only the fragment just synced is at theta0.
        start = self.theta0 if self.spec.diloco.streaming_fragments == 1 else self.flat_params()
        self.prover.start_round(start, self.microbatches_done, position, shard)

    def _restore_on_start(self) -> None:
        """A Ray restart restores the newest good snapshot; a resumed job restores the step it was told."""
        if _was_reconstructed():
            snap = self.snapshots.latest()
        elif self.spec.resume_step is not None:
            snap = self.snapshots.latest(at_most=self.spec.resume_step)
            if snap is None or snap.step != self.spec.resume_step:
                raise RuntimeError(f"{self.name}: no good snapshot at step {self.spec.resume_step} in {self.snapshots.dir}")
        else:
            return
        if snap is not None:
            self.restore(snap)
            log.warning("%s: restored snapshot of step %d", self.name, snap.step)

    # ----- identity -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        lo, hi = self.spec.ranges[self.spec.stage]
        return f"{self.spec.role}[r{self.spec.replica} L{lo}-{hi - 1}]"

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def __repr__(self) -> str:  # Ray prefixes this actor's log lines with it
        return self.name

    def info(self) -> dict:
        lo, hi = self.spec.ranges[self.spec.stage]
        return {
            "name": self.name, "node_id": self.node_id, "role": self.spec.role, "replica": self.spec.replica,
            "stage": self.spec.stage, "layers": (lo, hi), "has_embedding": self.module.has_embedding,
            "has_head": self.module.has_head, "device": str(self.device), "numel": self.theta0.numel(),
            "gpu_ids": _ray_gpu_ids(),
        }

    # ----- pipeline -------------------------------------------------------------------------
    @_busy
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Driver only: the next (inputs, labels) microbatch from this node's own shards."""
        if self.stream is None:
            raise RuntimeError(f"{self.name} has no data stream: only the Driver (stage 0) reads shards")
        return self.stream.next_microbatch()

    def _run(self, mb_id: int, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        x = x.to(self.device)
        if self.module.has_embedding:
            inp = None  # token ids: nothing upstream to send a gradient to
        else:
            inp = x.detach().requires_grad_(True)
            x = inp
        if mb_id in self._pending:
            raise RuntimeError(f"{self.name}: microbatch {mb_id} is already in flight")
        return inp, self.module(x)

    @_busy
    def forward(self, mb_id: int, x: torch.Tensor, after=None, status: bool = False, attempt: int = 0):
        """Run this range forward, keep the graph for :meth:`backward`, return the activation.

        Swarm routing passes ``after``, an object ref that orders this call after the holder's previous
        inner step (Ray resolves it first), and ``status``: return ``(activation, ran)`` so the router
        learns the outcome from a tiny object without pulling the activation. None: the call was revoked.
        ``attempt`` identifies the routed call for :class:`Claims`.
        """
        out = self._forward(mb_id, x, attempt)
        return (out, out is not None) if status else out

    def _forward(self, mb_id: int, x: torch.Tensor, attempt: int = 0) -> torch.Tensor | None:
        if not self.claims.claim(mb_id, "f", attempt):
            return None
        inp, out = self._run(mb_id, x)
        # revoked while running (a hedge elsewhere won): keep no graph
        self.claims.keep(mb_id, lambda: self._pending.__setitem__(mb_id, (inp, out)))
        return out.detach().cpu()

    @_busy
    def forward_first(self, mb_id: int, after=None, attempt: int = 0):
        """Driver under swarm routing: read microbatch ``mb_id`` of the shared ring and run it forward.

        Returns (activation, labels); the labels travel to the Validator as their own object.
        """
        x, labels = self._batch_at(mb_id)
        out = self._forward(mb_id, x, attempt)
        return (None, None) if out is None else (out, labels)

    @_busy
    def forward_backward(self, mb_id: int, x: torch.Tensor | None, labels: torch.Tensor | None, scale: float,
                         after=None, attempt: int = 0):
        """Last stage: forward, loss, backward. Returns (loss, gradient of the input activation).

        With ``x`` None (one-stage swarm routing) the holder reads microbatch ``mb_id`` itself.
        """
        if not self.claims.claim(mb_id, "b", attempt):
            return None, None
        if x is None:
            x, labels = self._batch_at(mb_id)
        inp, logits = self._run(mb_id, x)
        loss = self.module.loss(logits, labels.to(self.device))
        (loss * scale).backward()
        self._count_microbatch()
        return float(loss.detach()), None if inp is None else inp.grad.detach().cpu()

    @_busy
    def backward(self, mb_id: int, grad: torch.Tensor, status: bool = False, attempt: int = 0):
        """Backpropagate the gradient of this range's output; return the gradient of its input."""
        if not self.claims.claim(mb_id, "b", attempt):
            return (None, False) if status else None
        inp, out = self._pending.pop(mb_id)
        out.backward(grad.to(self.device))
        self._count_microbatch()
        g = None if inp is None else inp.grad.detach().cpu()
        return (g, True) if status else g

    @_busy
    def recompute_backward(self, mb_id: int, x: torch.Tensor | None, grad: torch.Tensor, after=None,
                           attempt: int = 0):
        """Failover of a backward whose holder died or hung: forward ``x`` (the range's input, still in the
        object store; None on a Driver, which re-reads microbatch ``mb_id``) and backpropagate ``grad``.
        Returns ``(gradient of the input, ran)``."""
        if not self.claims.claim(mb_id, "b", attempt):
            return None, False
        if x is None:
            x, _ = self._batch_at(mb_id)
        self._pending.pop(mb_id, None)  # a graph this holder kept for the microbatch is recomputed here
        inp, out = self._run(mb_id, x)
        out.backward(grad.to(self.device))
        self._count_microbatch()
        return None if inp is None else inp.grad.detach().cpu(), True

    def _count_microbatch(self) -> None:
        with self._shared:
            self._step_microbatches += 1

    def _batch_at(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stream is None:
            raise RuntimeError(f"{self.name} has no data stream: only the Driver (stage 0) reads shards")
        with self._shared:
            self.stream.seek(position)
            return self.stream.next_microbatch()

    # ----- swarm routing: claims, revocation, fault injection -------------------------------------
    def revoke(self, mb_ids: list[int], kind: str, keep_started: bool = False,
               attempts: list[int] | None = None) -> list[bool]:
        """Router (control thread): these calls were re-sent elsewhere; see :meth:`Claims.revoke`."""
        return self.claims.revoke(mb_ids, kind, drop=lambda mb: self._pending.pop(mb, None), keep_started=keep_started,
                                  attempts=attempts)

    def hang(self, seconds: float) -> None:
        """Fault injection (tests, benchmarks): block the compute thread, as a stuck holder would."""
        time.sleep(seconds)

    def slow_down(self, factor: float) -> None:
        """Fault injection (benchmarks): every compute call takes ``factor`` x as long from now on."""
        self._slowdown = float(factor)

    def fail_at(self, method: str) -> None:
        """Fault injection (tests): the process exits at the start of the next call to ``method`` ("grow"), as
        a crash there would; Ray restarts it on the spec it was created with (``max_restarts``)."""
        self._fail_at = method

    def rejoin(self, theta0: torch.Tensor, outer_rounds: int | None = None) -> dict:
        """A restarted holder rejoins the swarm at its range's current theta0 (its snapshot may be older);
        ``outer_rounds``: and at the swarm's round count, so its next proof names the round the ledger expects."""
        self.abort_step()
        self.theta0 = theta0.to(self.device).clone()
        with torch.no_grad():
            vector_to_parameters(self.theta0.clone(), self.module.parameters())
        self.claims.clear()
        if outer_rounds is not None:
            self.outer_rounds = outer_rounds
        return self.counters()

    @_busy
    def step(self, mean: bool = False, after=None, lr: float | None = None) -> float:
        """One inner AdamW step on the accumulated gradients; returns the pre-clip gradient norm.

        ``mean`` (swarm routing): the gradients were accumulated unscaled over however many microbatches
        the router sent here, so divide by that count; a holder that got none skips the step.
        ``lr``: this step's inner learning rate (the driver's schedule, neuroray/diloco/lr.py).
        """
        if not mean:  # fixed routing runs calls in order, so no late copy of this step can still arrive
            self.claims.clear()
        if mean:
            if self._pending:  # graphs of calls revoked after they ran: nothing will backpropagate them
                log.warning("%s: dropping %d unfinished microbatches at the step", self.name, len(self._pending))
                self._pending.clear()
            if self._step_microbatches == 0:
                return 0.0
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.div_(self._step_microbatches)
        assert not self._pending, f"{self.name}: step with {len(self._pending)} microbatches still in flight"
        clip = self.spec.diloco.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip if clip > 0 else float("inf"))
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.inner_steps += 1
        # counted only once the step is applied, so aborted microbatches are never claimed as work
        self.microbatches_done += self._step_microbatches
        self._step_microbatches = 0
        return float(norm)

    # ----- DiLoCo ---------------------------------------------------------------------------
    def flat_params(self) -> torch.Tensor:
        """This range's weights as one flat float32 vector (the layout pseudo-gradients use)."""
        return parameters_to_vector(self.module.parameters()).detach().cpu()

    def fragment_slices(self) -> list[tuple[int, int]]:
        """Streaming: each fragment's ``(lo, hi)`` in this range's flat vector (neuroray/diloco/streaming.py)."""
        from neuroray.diloco.streaming import fragment_slices

        params = [(n, p.numel()) for n, p in self.module.named_parameters()]
        return fragment_slices(params, self.spec.ranges[self.spec.stage], self.spec.diloco.streaming_fragments)

    def pseudo_gradient(self, after=None, fragment: int | None = None) -> dict[str, torch.Tensor]:
        """``theta0 - theta`` (what this holder learned since it last loaded theta0), compressed with error
        feedback as ``diloco.compression`` says: the payload is what crosses to the outer step.

        ``after`` (swarm routing): a ref of this holder's last inner step, so the delta includes it.
        ``fragment`` (streaming): only that fragment's slice, against the theta0 it last synced."""
        delta = (self.theta0 - parameters_to_vector(self.module.parameters()).detach()).cpu()
        lo = 0
        if fragment is not None:
            lo, hi = self.fragment_slices()[fragment]
            delta = delta[lo:hi].clone()  # a view would pickle its whole storage: the full range would cross
        if self.prover is not None:
            self.prover.note_pseudo_gradient(delta)
        # A redone outer step (a peer died mid-round) asks again in the same round: start from the
        # residual the round began with, or the first attempt's quantization error would count twice.
        if self._feedback_round is not None and self._feedback_round[0] == self.outer_rounds:
            self.feedback.residual = self._feedback_round[1]
        self._feedback_round = (self.outer_rounds, self.feedback.residual)
        return self.feedback.compress(delta, lo, self.theta0.numel())

    def apply_update(self, update: dict, theta0_box: list, after=None) -> bool:
        """Restart from ``theta0 - decode(update)`` (the compressed outer update, see compress.encode_update).
        If this holder's theta0 is not the one the update applies to, fetch the dense theta0 from
        ``theta0_box[0]`` (an object ref, boxed so Ray ships it only on demand; in-process, the tensor).
        Returns True when it had to. Streaming: the update holds one fragment's slice (``update["slice"]``);
        only that slice of theta0 and of the weights changes, and a fallback restarts the whole range."""
        old = self.theta0.cpu()
        if update["base"] == digest(old):
            part = update.get("slice")
            if part is None:
                self.load_theta0(old - decode(update["payload"]))
            else:
                new = old.clone()
                new[part[0]:part[1]] -= decode(update["payload"])  # the task's float32 subtraction, bit for bit
                self.load_theta0(new, part=part)
            return False
        log.warning("%s: theta0 differs from the outer step's; fetching the dense theta0", self.name)
        dense = theta0_box[0]
        if not isinstance(dense, torch.Tensor):
            import ray

            dense = ray.get(dense)
        self.load_theta0(dense)
        return True

    def load_theta0(self, theta0: torch.Tensor, after=None, part: tuple[int, int] | None = None) -> None:
        """Restart this range from the outer step's new theta0 (identical on every holder of the range).

        ``part`` (streaming): only that fragment restarts from theta0; the other fragments keep training
        from where they are, towards their own next outer step."""
        self.theta0 = theta0.to(self.device).clone()
        weights = self.theta0.clone()
        if part is not None:
            weights = parameters_to_vector(self.module.parameters()).detach().clone()
            weights[part[0]:part[1]] = self.theta0[part[0]:part[1]]
        with torch.no_grad():
            vector_to_parameters(weights, self.module.parameters())
        self.outer_rounds += 1
        if self.prover is not None:
            try:
                self._proof = self.prover.finish_round(self.outer_rounds, self.theta0, self.microbatches_done,
                                                       theta0_losses=self._theta0_losses)
            except RuntimeError as exc:  # restarted mid-round: this round's start was lost with the process
                log.warning("%s: no proof for round %d (%s)", self.name, self.outer_rounds, exc)
                self._proof = None
            self._start_proof_round()

    def set_theta0_losses(self, losses: list[float], data_position: int | None = None) -> None:
        """Driver: the losses of this round's first inner step (at theta0), which its proof commits to.

        ``data_position`` (swarm routing): where these microbatches start in the shared ring; every holder
        of a range is at theta0 then, so the losses are this Driver's whichever holders carried them."""
        self._theta0_losses = list(losses)
        if data_position is not None and self.prover is not None and self.stream is not None:
            self.stream.seek(data_position)
            self.prover.set_data_start(data_position, self.stream.shard_id)

    def take_proof(self) -> bytes | None:
        """The signed proof of the last finished round (once), for the ledger."""
        proof, self._proof = self._proof, None
        return proof

    def ponw_registration(self):
        return None if self.prover is None else self.prover.registration()

    # ----- architecture upgrades (neuroray.planner.upgrade) -----------------------------------
    def param_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every parameter in flat-vector order: the layout of theta0 and momentum."""
        return [(n, tuple(p.shape)) for n, p in self.module.named_parameters()]

    def grow(self, model: ModelConfig, ranges: list[tuple[int, int]], seed: int) -> dict:
        """Migrate in place to the bigger ``model`` by function-preserving growth (neuroray.model.growth).

        Weights, theta0 and the AdamW moments grow together, so the range computes what it did and
        the inner optimizer carries on; ``ranges`` must keep each old layer in its old stage
        (neuroray.model.growth.new_ranges_for), since a holder only has its own layers to grow from.
        """
        from neuroray.model.growth import flat_to_state, grow_optimizer_state, grow_state_dict, state_to_flat

        if getattr(self, "_fail_at", None) == "grow":
            os._exit(1)
        assert not self._pending, f"{self.name}: grow with microbatches in flight"
        old, (lo, hi) = self.spec.model, ranges[self.spec.stage]
        old_names = [n for n, _ in self.module.named_parameters()]
        weights = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        theta0 = flat_to_state(self.theta0.detach().cpu(), self.module)
        opt = self.optimizer.state_dict()  # grown on the CPU; load_state_dict moves it to the weights' device
        opt["state"] = {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in st.items()}
                        for i, st in opt["state"].items()}
        self._rebuild(model, ranges)
        self.module.load_state_dict(grow_state_dict(weights, old, model, seed=seed, layers=range(lo, hi)))
        self.theta0 = state_to_flat(grow_state_dict(theta0, old, model, seed=seed, layers=range(lo, hi)),
                                    self.module).to(self.device)
        self.optimizer.load_state_dict(grow_optimizer_state(
            opt, old_names, [n for n, _ in self.module.named_parameters()], old, model, layers=range(lo, hi)))
        # the residual is laid out as the old range: drop it (at most one round's quantisation error is lost)
        self.feedback.residual, self._feedback_round = None, None
        self._renew_prover()
        return self.info()

    def _rebuild(self, model: ModelConfig, ranges: list[tuple[int, int]]) -> None:
        """A fresh module and AdamW for ``model`` split into ``ranges`` (values are loaded by the caller)."""
        self.spec = replace(self.spec, model=model, ranges=[tuple(r) for r in ranges])
        self.module = build_stage(model, self.spec.vocab_size, self.spec.stage, self.spec.ranges,
                                  seed=self.spec.seed).to(self.device)
        d = self.spec.diloco
        self.optimizer = torch.optim.AdamW(
            self.module.parameters(), lr=d.inner_lr, weight_decay=d.weight_decay, betas=(0.9, 0.95)
        )

    def _architecture(self) -> dict:
        return {"model": asdict(self.spec.model), "ranges": [list(r) for r in self.spec.ranges]}

    def _adopt(self, arch: dict | None) -> bool:
        """Rebuild for the architecture a snapshot or a peer recorded (True if it did): after an upgrade,
        a Ray restart begins on the spec the actor was created with, i.e. the old shapes."""
        if arch is None:  # recorded before upgrades existed: the spec's shapes
            return False
        model, ranges = ModelConfig(**arch["model"]), [tuple(r) for r in arch["ranges"]]
        if (model, ranges) == (self.spec.model, list(self.spec.ranges)):
            return False
        self._rebuild(model, ranges)
        return True

    def _renew_prover(self) -> None:
        """After the range changed shape: proofs from now on claim the new range and start at this theta0."""
        if getattr(self, "prover", None) is not None:  # absent while __init__ restores a snapshot
            from neuroray.ponw.service import RoundProver

            self.prover = RoundProver.for_holder(self, self.spec.tokens_per_batch)
            self._start_proof_round()

    # ----- snapshots ------------------------------------------------------------------------
    def capture(self, step: int):
        """Copy everything a restart needs (weights, AdamW, theta0, counters, RNG, data position)."""
        from neuroray.snapshot import Snapshot

        assert not self._pending, f"{self.name}: snapshot with microbatches in flight"
        tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        opt = self.optimizer.state_dict()
        for idx, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().clone()
        tensors["theta0"] = self.theta0.detach().cpu().clone()
        if self.feedback.residual is not None:
            tensors["feedback.residual"] = self.feedback.residual.clone()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {"slot": self.spec.slot, "node_id": self.node_id, "param_groups": opt["param_groups"],
                "counters": self.counters(), "stream": None if self.stream is None else self.stream.state(),
                "architecture": self._architecture()}
        return Snapshot(step, tensors, meta)

    def snapshot(self, step: int) -> int:
        """Capture now, write in the background: training does not wait for the store."""
        self.snapshots.write_async(self.capture(step))
        return step

    def state_digest(self) -> str:
        """SHA-256 of everything a snapshot holds (compare with ``tensors_digest`` of a stored one)."""
        from neuroray.snapshot import tensors_digest

        return tensors_digest(self.capture(-1).tensors)

    def flush_snapshots(self) -> None:
        self.snapshots.flush()

    def restore(self, snap) -> None:
        t = snap.tensors
        self._adopt(snap.meta.get("architecture"))
        self.module.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        state: dict[int, dict] = {}
        for key, value in t.items():
            if key.startswith("opt."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": snap.meta["param_groups"]})
        self.theta0 = t["theta0"].to(self.device).clone()
        self.feedback.residual = t["feedback.residual"].clone() if "feedback.residual" in t else None
        self._feedback_round = None
        torch.set_rng_state(t["rng.torch"])
        c = snap.meta["counters"]
        self.inner_steps, self.outer_rounds, self.microbatches_done = c["inner_steps"], c["outer_rounds"], c["microbatches"]
        if self.stream is not None and snap.meta.get("stream"):
            self.stream.seek(snap.meta["stream"]["position"])
        self._pending.clear()
        self.restored_step = snap.step

    def abort_step(self) -> None:
        """Drop half-done microbatches and their gradients (a peer died mid-step; the step is retried)."""
        self._pending.clear()
        self.claims.clear()
        self._step_microbatches = 0
        self.optimizer.zero_grad(set_to_none=True)

    def export_range(self, optimizer: bool = False) -> dict:
        """Weights and theta0 of this range, for a restarted peer that has no snapshot of its own; with the
        architecture, which a peer restarted on its original spec lacks after an upgrade. ``optimizer``:
        the AdamW state too, for a holder added mid-run (:meth:`join`)."""
        out = {**{f"model.{k}": v.detach().cpu() for k, v in self.module.state_dict().items()},
               "theta0": self.theta0.detach().cpu(),
               "architecture": self._architecture()}
        if optimizer:
            opt = self.optimizer.state_dict()
            opt["state"] = {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in st.items()}
                            for i, st in opt["state"].items()}
            out["optimizer"] = opt
        return out

    def import_range(self, tensors: dict) -> None:
        rebuilt = self._adopt(tensors.get("architecture"))
        self.module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.theta0 = tensors["theta0"].to(self.device).clone()
        self._pending.clear()
        if "optimizer" in tensors:  # load_state_dict moves the moments to the weights' device
            self.optimizer.load_state_dict(tensors["optimizer"])
        if rebuilt:
            self._renew_prover()

    def join(self, tensors: dict, outer_rounds: int) -> dict:
        """A holder added mid-run (neuroray.planner.upgrade) takes a peer's range (:meth:`export_range` with
        the optimizer) at theta0 between rounds, and the swarm's round count, so that its first proof names
        the round the ledger's receipt does and starts at the theta0 the range's outer step knows.

        The peer's AdamW moments come along: a fresh AdamW's first steps are sign-sized on every weight,
        and that pseudo-gradient would pull the range's next outer step off the curve."""
        self.import_range(tensors)
        self.outer_rounds = outer_rounds
        if self.prover is not None:
            self._start_proof_round()
        return self.counters()

    # ----- inspection -----------------------------------------------------------------------
    def utilisation(self) -> dict:
        """Busy time / wall time since the previous call, and microbatches in flight right now."""
        now = time.perf_counter()
        busy, wall = self._busy_s, max(now - self._window_start, 1e-9)
        self._busy_s, self._window_start = 0.0, now
        return {"name": self.name, "utilisation": min(busy / wall, 1.0), "in_flight": len(self._pending)}

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().cpu().clone() for n, p in self.module.named_parameters() if p.grad is not None}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self, at_theta0: bool = False) -> dict[str, torch.Tensor]:
        """This range's weights; ``at_theta0``: its theta0 instead, the model every holder of the range agrees on."""
        if not at_theta0:
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        params = list(self.module.parameters())
        with torch.no_grad():  # load theta0 in place and back, so tied weights follow as in load_theta0
            current = parameters_to_vector(params).detach().clone()
            vector_to_parameters(self.theta0.clone(), params)
            state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
            vector_to_parameters(current, params)
        return state

    def counters(self) -> dict:
        return {"inner_steps": self.inner_steps, "outer_rounds": self.outer_rounds,
                "microbatches": self.microbatches_done, "restored_step": self.restored_step}


def _was_reconstructed() -> bool:
    """True inside an actor that Ray restarted after a crash (``max_restarts``)."""
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # not inside a Ray actor
        return False


def _ray_gpu_ids() -> list:
    """GPUs Ray assigned to this actor (empty outside Ray or without ``num_gpus``)."""
    try:
        import ray

        return list(ray.get_gpu_ids()) if ray.is_initialized() else []
    except Exception:  # not inside a Ray worker
        return []


def holder_actor(spec: HolderSpec, num_cpus: float, num_gpus: float, scheduling_strategy=None, name: str | None = None,
                 max_restarts: int = 0, routed: bool = False):
    """Start a :class:`StageHolder` as a Ray actor with the resources the config asks for.

    ``routed``: a "control" thread beside the compute thread answers the router (revoke, counters) even
    while a compute call hangs. Fixed routing keeps one thread, where Ray runs calls in submission order.
    """
    import ray

    # control: revokes, probes and proofs answer while the compute thread is busy or stuck. failover: a
    # call re-sent from a stuck or dead holder runs beside this holder's queued work instead of behind it.
    groups = {"control": 1, "failover": 1}
    cls = ray.remote(concurrency_groups=groups)(StageHolder) if routed else ray.remote(StageHolder)
    opts = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_concurrency": 1, "max_restarts": max_restarts}
    if scheduling_strategy is not None:
        opts["scheduling_strategy"] = scheduling_strategy
    if name:
        opts["name"] = name
    return cls.options(**opts).remote(spec)
