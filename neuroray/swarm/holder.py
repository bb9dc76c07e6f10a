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
import time
from dataclasses import dataclass

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.diloco.compress import ErrorFeedback, decode, digest
from neuroray.model import build_stage
from neuroray.ponw.identity import Identity

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
            self._busy_s += time.perf_counter() - t0

    return timed


class StageHolder:
    def __init__(self, spec: HolderSpec):
        self._busy_s, self._window_start = 0.0, time.perf_counter()
        self.spec = spec
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
            self.stream = TokenStream(spec.data_root, manifest, self.node_id, spec.seq_len, spec.microbatch_size)
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
        self.prover.start_round(self.theta0, self.microbatches_done, position, shard)

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
    def forward(self, mb_id: int, x: torch.Tensor) -> torch.Tensor:
        """Run this range forward, keep the graph for :meth:`backward`, return the activation."""
        inp, out = self._run(mb_id, x)
        self._pending[mb_id] = (inp, out)
        return out.detach().cpu()

    @_busy
    def forward_backward(self, mb_id: int, x: torch.Tensor, labels: torch.Tensor, scale: float):
        """Last stage: forward, loss, backward. Returns (loss, gradient of the input activation)."""
        inp, logits = self._run(mb_id, x)
        loss = self.module.loss(logits, labels.to(self.device))
        (loss * scale).backward()
        self._step_microbatches += 1
        return float(loss.detach()), None if inp is None else inp.grad.detach().cpu()

    @_busy
    def backward(self, mb_id: int, grad: torch.Tensor) -> torch.Tensor | None:
        """Backpropagate the gradient of this range's output; return the gradient of its input."""
        inp, out = self._pending.pop(mb_id)
        out.backward(grad.to(self.device))
        self._step_microbatches += 1
        return None if inp is None else inp.grad.detach().cpu()

    @_busy
    def step(self) -> float:
        """One inner AdamW step on the accumulated gradients; returns the pre-clip gradient norm."""
        assert not self._pending, f"{self.name}: step with {len(self._pending)} microbatches still in flight"
        clip = self.spec.diloco.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip if clip > 0 else float("inf"))
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

    def pseudo_gradient(self) -> dict[str, torch.Tensor]:
        """``theta0 - theta`` (what this holder learned since it last loaded theta0), compressed with error
        feedback as ``diloco.compression`` says: the payload is what crosses to the outer step."""
        delta = (self.theta0 - parameters_to_vector(self.module.parameters()).detach()).cpu()
        if self.prover is not None:
            self.prover.note_pseudo_gradient(delta)
        # A redone outer step (a peer died mid-round) asks again in the same round: start from the
        # residual the round began with, or the first attempt's quantization error would count twice.
        if self._feedback_round is not None and self._feedback_round[0] == self.outer_rounds:
            self.feedback.residual = self._feedback_round[1]
        self._feedback_round = (self.outer_rounds, self.feedback.residual)
        return self.feedback.compress(delta)

    def apply_update(self, update: dict, theta0_box: list) -> bool:
        """Restart from ``theta0 - decode(update)`` (the compressed outer update, see compress.encode_update).
        If this holder's theta0 is not the one the update applies to, fetch the dense theta0 from
        ``theta0_box[0]`` (an object ref, boxed so Ray ships it only on demand; in-process, the tensor).
        Returns True when it had to."""
        old = self.theta0.cpu()
        if update["base"] == digest(old):
            self.load_theta0(old - decode(update["payload"]))
            return False
        log.warning("%s: theta0 differs from the outer step's; fetching the dense theta0", self.name)
        dense = theta0_box[0]
        if not isinstance(dense, torch.Tensor):
            import ray

            dense = ray.get(dense)
        self.load_theta0(dense)
        return True

    def load_theta0(self, theta0: torch.Tensor) -> None:
        """Restart this range from the outer step's new theta0 (identical on every holder of the range)."""
        self.theta0 = theta0.to(self.device).clone()
        with torch.no_grad():
            vector_to_parameters(self.theta0.clone(), self.module.parameters())
        self.outer_rounds += 1
        if self.prover is not None:
            try:
                self._proof = self.prover.finish_round(self.outer_rounds, self.theta0, self.microbatches_done,
                                                       theta0_losses=self._theta0_losses)
            except RuntimeError as exc:  # restarted mid-round: this round's start was lost with the process
                log.warning("%s: no proof for round %d (%s)", self.name, self.outer_rounds, exc)
                self._proof = None
            self._start_proof_round()

    def set_theta0_losses(self, losses: list[float]) -> None:
        """Driver: the losses of this round's first inner step (at theta0), which its proof commits to."""
        self._theta0_losses = list(losses)

    def take_proof(self) -> bytes | None:
        """The signed proof of the last finished round (once), for the ledger."""
        proof, self._proof = self._proof, None
        return proof

    def ponw_registration(self):
        return None if self.prover is None else self.prover.registration()

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
                "counters": self.counters(), "stream": None if self.stream is None else self.stream.state()}
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
        self._step_microbatches = 0
        self.optimizer.zero_grad(set_to_none=True)

    def export_range(self) -> dict[str, torch.Tensor]:
        """Weights and theta0 of this range, for a restarted peer that has no snapshot of its own."""
        return {**{f"model.{k}": v.detach().cpu() for k, v in self.module.state_dict().items()},
                "theta0": self.theta0.detach().cpu()}

    def import_range(self, tensors: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.theta0 = tensors["theta0"].to(self.device).clone()
        self._pending.clear()

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

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

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
                 max_restarts: int = 0):
    """Start a :class:`StageHolder` as a Ray actor with the resources the config asks for."""
    import ray

    cls = ray.remote(StageHolder)
    opts = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_concurrency": 1, "max_restarts": max_restarts}
    if scheduling_strategy is not None:
        opts["scheduling_strategy"] = scheduling_strategy
    if name:
        opts["name"] = name
    return cls.options(**opts).remote(spec)
