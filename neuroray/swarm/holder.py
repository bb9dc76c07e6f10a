"""The stage holder: the Ray actor that holds one layer range of the model and everything it trains with.

A holder is a plain class so it can be tested in-process; :func:`holder_actor` wraps it as a Ray
actor. Its methods are the actor surface the trainers, the router, the swarm and the upgrader call;
each delegates to one of the parts it composes:

* :class:`~neuroray.swarm.compute.RangeCompute` - the range's module, inner AdamW, data stream and
  microbatches in flight (forward, backward, inner steps);
* :class:`~neuroray.swarm.outer_state.OuterState` - DiLoCo: theta0, pseudo-gradients with error
  feedback, outer updates;
* :class:`~neuroray.swarm.proving.RoundProving` - one signed Proof of Neural Work per outer round;
* :class:`~neuroray.swarm.lifecycle.RangeLifecycle` - snapshots, restore, growth and peer copies.

Roles follow the seed (:class:`~neuroray.swarm.compute.RangeRole`): the **Driver** holds the first
range and the embedding and reads its own data shard, **Workers** hold middle ranges, the
**Validator** holds the last range, the final norm, the LM head and computes the loss.
Fault injection for tests and benchmarks lives in a subclass (neuroray/swarm/faults.py).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace

import torch

from neuroray.config import ModelConfig
from neuroray.ponw.identity import Identity
from neuroray.swarm.compute import BusyClock, RangeCompute, open_device
from neuroray.swarm.hop_record import HopRecord, reexecute
from neuroray.swarm.lifecycle import RangeLifecycle, load_init_from
from neuroray.swarm.outer_state import OuterState
from neuroray.swarm.proving import RoundProving
from neuroray.swarm.spec import HolderSpec

log = logging.getLogger(__name__)


def _busy(method):
    """Count the wall time spent in a compute method, for the holder's utilisation."""

    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        t0 = self.clock.start()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.clock.stop(t0)

    return timed


class StageHolder:
    """One layer range's holder: the actor surface, composed of compute, outer state, proving and lifecycle."""

    def __init__(self, spec: HolderSpec):
        self.clock = BusyClock()
        self.peak_kept = 0  # most microbatch graphs kept at once since the last utilisation() (swarm.schedule)
        if spec.spare:
            self._warm(spec)
        else:
            self._setup(spec)

    def _setup(self, spec: HolderSpec) -> None:
        """Everything a holder of ``spec``'s slot is: run at start, or by :meth:`become` in a spare's process."""
        self.is_spare = False
        device = open_device(spec.torch_threads, spec.use_gpu)
        if spec.use_gpu and device.type == "cpu":
            log.warning("%s: GPUs were requested but CUDA is not available here; running on CPU", spec.label)
        self.identity = Identity.load_or_create(spec.key_path)
        stream = None
        if spec.is_first and spec.data_root is not None:
            from neuroray.genesis import Manifest, TokenStream

            stream = TokenStream(spec.data_root, Manifest.from_json(spec.manifest), self.identity.node_id,
                                 spec.seq_len, spec.microbatch_size, _start=spec.data_start)
        self.compute = RangeCompute(spec, device, stream)
        if spec.init_from:  # before OuterState takes theta0, so theta0 is the imported weights (a restore overrides)
            load_init_from(self.compute)
        self.outer = OuterState(self.compute)
        self.proving = RoundProving(self.outer.digests)
        self.lifecycle = RangeLifecycle(self.compute, self.outer, self.node_id)
        self.lifecycle.restore_on_start()
        # with hop rechecks: this round's first inner step, kept for a peer to redo
        self.hops = HopRecord(spec.hop_record)
        # direct hops (swarm.hop_transport=gloo|nccl): the loss of each forward_backward_direct, until take_loss
        self.direct_losses: dict[int, float | BaseException] = {}
        self._arm_hops()
        # proofs start after a restore: the first round must commit the weights the holder restarted from
        if spec.tokens_per_batch > 0:
            self.proving.start(self, spec.tokens_per_batch)
            self._start_proof_round()

    # ----- warm spares (checkpoint.spares, neuroray/swarm/spares.py) ------------------------------
    def _warm(self, spec: HolderSpec) -> None:
        """An idle spare of ``spec``'s range: the process, torch and the device are up and the range's module was built
        once (imports, allocator, kernels), so taking a slot over costs only :meth:`become`. No key, no data, no slot."""
        self.is_spare = True
        self.compute = RangeCompute(spec, open_device(spec.torch_threads, spec.use_gpu), None)

    def spare_ready(self) -> str:
        """Answers once the spare's start is done (the swarm waits on it); its range's label."""
        assert self.is_spare, "spare_ready() on a holder in service"
        return self.compute.name

    def become(self, spec: HolderSpec) -> dict:
        """This spare takes over the slot of ``spec`` (its crashed holder's spec): the holder's own setup runs here,
        in the process already up, and ends as a Ray-restarted holder of the slot would: the slot's key file, its
        data stream (a Driver), its snapshot store, its newest good snapshot restored, proofs started afresh.
        Returns :meth:`info`."""
        assert self.is_spare, f"{self.compute.name} is in service already: become() is for a spare"
        self.compute = None  # the warm module goes before the slot's is built (a GPU holds one range's weights)
        self._setup(replace(spec, spare=False, restore_latest=True))
        return self.info()

    # ----- identity -------------------------------------------------------------------------
    @property
    def spec(self) -> HolderSpec:
        """The holder's spec; its model and ranges follow growth (the compute part rebuilds from it)."""
        return self.compute.spec

    @property
    def name(self) -> str:
        return self.spec.label

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def device(self) -> torch.device:
        return self.compute.device

    def __repr__(self) -> str:  # Ray prefixes this actor's log lines with it
        return self.name

    def info(self) -> dict:
        lo, hi = self.spec.ranges[self.spec.stage]
        module = self.compute.module
        return {
            "name": self.name, "node_id": self.node_id, "role": self.spec.role, "replica": self.spec.replica,
            "stage": self.spec.stage, "layers": (lo, hi), "has_embedding": module.has_embedding,
            "has_head": module.has_head, "device": str(self.device), "numel": self.outer.theta0.numel(),
            "gpu_ids": _ray_gpu_ids(), "autocast": None if self.compute.amp is None else str(self.compute.amp),
            "actor": _ray_actor_name(),  # a former spare keeps its own Ray name (names cannot be changed)
        }

    # ----- inspection of the parts (in-process tests read these) ---------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.compute.module

    @property
    def theta0(self) -> torch.Tensor:
        return self.outer.theta0

    @property
    def feedback(self):
        return self.outer.feedback

    @property
    def outer_rounds(self) -> int:
        return self.outer.outer_rounds

    @property
    def snapshots(self):
        """The slot's :class:`~neuroray.snapshot.SnapshotStore` (None without ``snapshot_root``)."""
        return self.lifecycle.snapshots

    @property
    def restored_step(self) -> int | None:
        return self.lifecycle.restored_step

    @property
    def _pending(self) -> dict:
        return self.compute.pending

    @property
    def _step_microbatches(self) -> int:
        return self.compute.step_microbatches

    # ----- pipeline -------------------------------------------------------------------------
    @_busy
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Driver only: the next (inputs, labels) microbatch from this node's own shards."""
        return self.compute.next_batch()

    @_busy
    def forward(self, mb_id: int, x: torch.Tensor, after=None, status: bool = False, attempt: int = 0):
        """Run this range forward, keep the graph for :meth:`backward`, return the activation.

        Swarm routing passes ``after``, an object ref that orders this call after the holder's previous
        inner step (Ray resolves it first), and ``status``: return ``(activation, ran)`` so the router
        learns the outcome from a tiny object without pulling the activation. None: the call was revoked.
        ``attempt`` identifies the routed call for :class:`~neuroray.swarm.claims.Claims`.
        """
        x = self.compute.arrive(x, "fwd", mb_id)  # shm: the slot's view, held until this microbatch's backward
        out = self.compute.forward(mb_id, x, attempt)
        self.hops.forward(mb_id, x, out)
        self.peak_kept = max(self.peak_kept, len(self.compute.pending))  # the activation stash's high-water mark
        return (out, out is not None) if status else out

    @_busy
    def forward_first(self, mb_id: int, after=None, attempt: int = 0):
        """Driver under swarm routing: read microbatch ``mb_id`` of the shared ring and run it forward.

        Returns (activation, labels); the labels travel to the Validator as their own object.
        """
        x, labels = self.compute.batch_at(mb_id)
        out = self.compute.forward(mb_id, x, attempt)
        self.hops.forward(mb_id, x, out)  # the token ids it read: the hop rechecks' data check compares them
        return (None, None) if out is None else (out, labels)

    @_busy
    def forward_backward(self, mb_id: int, x: torch.Tensor | None, labels: torch.Tensor | None, scale: float,
                         after=None, attempt: int = 0):
        """Last stage: forward, loss, backward. Returns (loss, gradient of the input activation).

        With ``x`` None (one-stage swarm routing) the holder reads microbatch ``mb_id`` itself.
        """
        x = self.compute.arrive(x, "fwd", mb_id)
        loss, g = self.compute.forward_backward(mb_id, x, labels, scale, attempt)
        self.hops.last(mb_id, x, labels, scale, loss, g)
        return loss, g

    def forward_backward_direct(self, mb_id: int, x, labels: torch.Tensor | None, scale: float):
        """:meth:`forward_backward` for a direct hop (swarm.hop_transport=gloo|nccl): Ray Direct Transport takes
        one return value, so this returns the gradient alone and keeps the loss for :meth:`take_loss`, which
        the driver calls next on this holder. A failure is kept too: the loss's ref then carries it, as the
        object-store path's loss ref does (a rejected hop is read from there)."""
        try:
            loss, g = self.forward_backward(mb_id, x, labels, scale)
        except BaseException as exc:
            self.direct_losses[mb_id] = exc
            raise
        self.direct_losses[mb_id] = loss
        return g

    def take_loss(self, mb_id: int) -> float | None:
        """The loss :meth:`forward_backward_direct` kept for ``mb_id`` (once); re-raises what it failed with."""
        value = self.direct_losses.pop(mb_id, None)
        if value is None:  # the call never ran: an input it waited on failed (that failure is read elsewhere)
            raise RuntimeError(f"{self.compute.name}: no loss for microbatch {mb_id} (its forward_backward did not run)")
        if isinstance(value, BaseException):
            raise value
        return value

    @_busy
    def backward(self, mb_id: int, grad: torch.Tensor, status: bool = False, attempt: int = 0):
        """Backpropagate the gradient of this range's output; return the gradient of its input."""
        grad = self.compute.arrive(grad, "bwd", mb_id)  # shm: the slot is released once backward consumed it
        g, ran = self.compute.backward(mb_id, grad, attempt)
        if ran:
            self.hops.backward(mb_id, grad, g)
        return (g, ran) if status else g

    @_busy
    def recompute_backward(self, mb_id: int, x: torch.Tensor | None, grad: torch.Tensor, after=None,
                           attempt: int = 0):
        """Failover of a backward whose holder died or hung: forward ``x`` (the range's input, still in the
        object store; None on a Driver, which re-reads microbatch ``mb_id``) and backpropagate ``grad``.
        Returns ``(gradient of the input, ran)``."""
        return self.compute.recompute_backward(mb_id, x, grad, attempt)

    @_busy
    def step(self, mean: bool = False, after=None, lr: float | None = None) -> float:
        """One inner AdamW step on the accumulated gradients; returns the pre-clip gradient norm.

        ``mean`` (swarm routing): the gradients were accumulated unscaled over however many microbatches
        the router sent here, so divide by that count; a holder that got none skips the step.
        ``lr``: this step's inner learning rate (the driver's schedule, neuroray/diloco/lr.py).
        """
        self.hops.disarm()  # the weights leave theta0: later steps are not what a peer can redo
        return self.compute.step(mean, lr)

    @_busy
    def evaluate(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        """Held-out evaluation at this range's theta0, forward only (nothing a training step or a proof
        reads is touched): the activation to pass on, or on the last range with ``labels``, the mean loss."""
        return self.compute.evaluate(x, self.outer.theta0, labels)

    # ----- shared-memory hops (swarm.hop_transport=shm, neuroray/swarm/shm_transport.py) ---------------
    def ray_node(self) -> str:
        """The Ray node this holder runs on: the driver gives an edge a ring only where both ends share one."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def open_hop_rings(self, run: str, directions: list[str], slots: int) -> list[str]:
        """(Re)make this holder's outgoing rings, one per direction in ``directions`` (``fwd``, ``bwd``), of
        ``slots`` slots each the size of one float32 activation; the ring names. Every other edge, and this
        holder until the driver calls this, sends through the object store."""
        if self._slot_bytes() == 0:  # a spec without a microbatch shape: no size to reserve
            directions = []
        return self.compute.rings.open(run, self.spec.replica, self.spec.stage, directions, slots, self._slot_bytes())

    def _slot_bytes(self) -> int:
        s = self.spec
        return s.microbatch_size * s.seq_len * s.model.d_model * 4

    def close_hop_rings(self) -> None:
        """Unlink this holder's rings (shutdown)."""
        self.compute.rings.close()

    def hop_rings(self) -> dict:
        """Per direction: the ring's name, hops sent through it, fallbacks to the object store, slots in use."""
        return self.compute.rings.stats()

    # ----- hop rechecks (neuroray/training/hop_audit.py) ----------------------------------------
    def _arm_hops(self) -> None:
        """At a round's start (at theta0): record its first inner step; under swarm routing with hop rechecks, keep the
        inner optimizer's state too, for a redo of the round (:meth:`rejoin` with ``redo``)."""
        stream = self.compute.stream
        self.hops.arm(None if stream is None else stream.position)
        self._round_start_optimizer = _optimizer_copy(self.compute.optimizer) if self.spec.round_redo else None

    def take_hop_record(self) -> dict:
        """What this holder received and sent in its round's first inner step (:class:`HopRecord`), once."""
        return self.hops.take()

    @_busy
    def reexecute(self, x: torch.Tensor, grad: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                  scale: float = 1.0) -> dict:
        """Redo a peer's microbatch of this range at this holder's theta0 (the round's, the peer's weights
        then) from the peer's inputs; this holder's training state is left as it is (:func:`reexecute`)."""
        return reexecute(self.compute, self.outer.theta0, x, grad, labels, scale)

    # ----- swarm routing: claims, revocation, rejoining ---------------------------------------
    def revoke(self, mb_ids: list[int], kind: str, keep_started: bool = False,
               attempts: list[int] | None = None) -> list[bool]:
        """Router (control thread): these calls were re-sent elsewhere; see :meth:`Claims.revoke`."""
        return self.compute.revoke(mb_ids, kind, keep_started, attempts)

    def rejoin(self, theta0: torch.Tensor, outer_rounds: int | None = None, redo: bool = False) -> dict:
        """A restarted holder rejoins the swarm at its range's current theta0 (its snapshot may be older);
        ``outer_rounds``: and at the swarm's round count, so its next proof names the round the ledger expects.
        ``redo``: the round is run again without a holder proven faulty (neuroray/training/routed.py): the inner
        optimizer goes back to its state at the round's start too (kept with ``HolderSpec.round_redo``)."""
        self.abort_step()
        self.outer.restart_at(theta0)
        if redo and self._round_start_optimizer is not None:
            self.compute.optimizer.load_state_dict(self._round_start_optimizer)  # _arm_hops below keeps a new copy
        self.compute.claims.clear()
        self._arm_hops()
        if outer_rounds is not None:
            self.outer.outer_rounds = outer_rounds
        if self.proving.enabled:  # this round's proof starts at the theta0 rejoined, not the snapshot's
            self._start_proof_round()
        return self.counters()

    def align_data(self, inner_steps: int, microbatches_per_step: int) -> dict:
        """After a restart: continue at the swarm's inner step ``inner_steps`` (a Driver's data position follows)."""
        self.lifecycle.align(inner_steps, microbatches_per_step)
        return self.counters()

    def abort_step(self) -> None:
        """Drop half-done microbatches and their gradients (a peer died mid-step; the step is retried)."""
        self.compute.abort()
        self.direct_losses.clear()

    # ----- DiLoCo ---------------------------------------------------------------------------
    def flat_params(self) -> torch.Tensor:
        """This range's weights as one flat float32 vector (the layout pseudo-gradients use)."""
        return self.compute.flat_params()

    def fragment_slices(self) -> list[tuple[int, int]]:
        """Streaming: each fragment's ``(lo, hi)`` in this range's flat vector (neuroray/diloco/streaming.py)."""
        return self.outer.fragment_slices()

    def pseudo_gradient(self, after=None, fragment: int | None = None) -> dict[str, torch.Tensor]:
        """``theta0 - theta`` (what this holder learned since it last loaded theta0), compressed with error
        feedback as ``diloco.compression`` says: the payload is what crosses to the outer step.

        ``after`` (swarm routing): a ref of this holder's last inner step, so the delta includes it.
        ``fragment`` (streaming): only that fragment's slice, against the theta0 it last synced."""
        delta, lo = self.outer.delta(fragment)
        self.proving.note_pseudo_gradient(delta)
        return self.outer.compress(delta, lo)

    def apply_update(self, update: dict, theta0_box: list, after=None) -> bool:
        """Restart from ``theta0 - decode(update)`` (the compressed outer update, see compress.encode_update).
        If this holder's theta0 is not the one the update applies to, fetch the dense theta0 from
        ``theta0_box[0]`` (an object ref, boxed so Ray ships it only on demand; in-process, the tensor).
        Returns True when it had to. Streaming: the update holds one fragment's slice (``update["slice"]``);
        only that slice of theta0 and of the weights changes, and a fallback restarts the whole range."""
        theta0, part, fetched = self.outer.resolve_update(update, theta0_box)
        self.load_theta0(theta0, part=part)
        return fetched

    def load_theta0(self, theta0: torch.Tensor, after=None, part: tuple[int, int] | None = None) -> None:
        """Restart this range from the outer step's new theta0 (identical on every holder of the range).

        ``part`` (streaming): only that fragment restarts from theta0; the other fragments keep training
        from where they are, towards their own next outer step."""
        self.outer.restart_at(theta0, part)
        self.outer.outer_rounds += 1
        self._arm_hops()
        if self.proving.enabled:
            self.proving.finish_round(self.outer.outer_rounds, self.outer.theta0, self.compute.microbatches_done,
                                      self.name)
            self._start_proof_round()

    # ----- diloco.overlap (neuroray/diloco/overlap.py) ------------------------------------------
    def send_pseudo_gradient(self) -> dict[str, torch.Tensor]:
        """End the round without waiting for its outer step: the payload of ``theta0 - theta`` (as
        :meth:`pseudo_gradient`), and the next inner steps train on from the base (delayed: these weights;
        eager: the local guess). The round's proof is signed when its theta0 lands (:meth:`land_outer`);
        the next round's starts now, at the weights its first inner step runs from."""
        delta, lo = self.outer.delta()
        self.proving.note_pseudo_gradient(delta)
        payload = self.outer.compress(delta, lo)
        base = self.outer.send(delta)
        if self.proving.enabled:
            self.proving.hold(self.compute.microbatches_done)
            self.proving.start_round(base, self.compute.microbatches_done, self.compute.stream)
        return payload

    def land_outer(self, outer_round: int, new, theta0_box: list, after=None) -> bool:
        """Round ``outer_round``'s outer step landed: ``new`` is its dense theta0 or its compressed update
        (:meth:`apply_update`). The weights become theta0 plus what was learned since the round's end.
        A holder already at that round (rejoined meanwhile) ignores it. Returns True when it fetched the
        dense theta0 (as :meth:`apply_update`)."""
        if self.outer.outer_rounds >= outer_round:
            return False
        fetched = False
        if isinstance(new, torch.Tensor):
            theta0 = new
        else:
            theta0, _, fetched = self.outer.resolve_update(new, theta0_box)
        self.outer.land(theta0)
        self.outer.outer_rounds += 1
        if self.proving.enabled and not self.proving.finish_held(self.outer.outer_rounds, self.outer.theta0, self.name):
            self.proving.finish_round(self.outer.outer_rounds, self.outer.theta0, self.compute.microbatches_done,
                                      self.name)  # nothing was held (a redone step, a restored holder)
            self._start_proof_round()
        return fetched

    # ----- proofs ---------------------------------------------------------------------------
    def _start_proof_round(self) -> None:
        # The proof commits the weights the round starts from, at which the Driver's committed losses are
        # computed: theta0, except with streaming, where only the fragment just synced is at theta0.
        start = self.outer.theta0 if self.spec.diloco.streaming_fragments == 1 else self.flat_params()
        self.proving.start_round(start, self.compute.microbatches_done, self.compute.stream)

    def _renew_prover(self) -> None:
        """After the range changed shape: proofs from now on claim the new range and start at this theta0."""
        if self.proving.enabled:
            self.proving.start(self, self.spec.tokens_per_batch)
            self._start_proof_round()

    def set_theta0_losses(self, losses: list[float], data_position: int | None = None) -> None:
        """Driver: the losses of this round's first inner step (at theta0), which its proof commits to.

        ``data_position`` (swarm routing): where these microbatches start in the shared ring; every holder
        of a range is at theta0 then, so the losses are this Driver's whichever holders carried them."""
        self.proving.set_theta0_losses(losses, data_position, self.compute.stream)

    def take_proof(self) -> bytes | None:
        """The signed proof of the last finished round (once), for the ledger."""
        return self.proving.take()

    def ponw_registration(self):
        return self.proving.registration()

    # ----- architecture upgrades (neuroray.planner.upgrade) -----------------------------------
    def param_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every parameter in flat-vector order: the layout of theta0 and momentum."""
        return self.compute.param_layout()

    def grow(self, model: ModelConfig, ranges: list[tuple[int, int]], seed: int) -> dict:
        """Migrate in place to the bigger ``model`` by function-preserving growth (neuroray.model.growth).

        Weights, theta0 and the AdamW moments grow together, so the range computes what it did and
        the inner optimizer carries on; ``ranges`` must keep each old layer in its old stage
        (neuroray.model.growth.new_ranges_for), since a holder only has its own layers to grow from.
        """
        self.lifecycle.grow(model, ranges, seed)
        self._renew_prover()
        self.compute.rings.reopen(self._slot_bytes())  # shm: the wider hops would no longer fit a slot
        return self.info()

    def grow_vocab(self, vocab_size: int, seed: int, manifest: str | dict | None = None) -> dict:
        """Grow to ``vocab_size`` tokens between rounds (the dataset was extended with a grown tokenizer):
        embedding or LM head, AdamW state, theta0 and the outer buffers, by seeded rows every holder of the
        range draws alike (neuroray/swarm/vocab_growth.py); a Driver reads ``manifest``'s shards from now on.
        The round's proof restarts at the grown theta0 (the one the outer step now holds)."""
        from neuroray.swarm.vocab_growth import grow_range_vocab

        grow_range_vocab(self.compute, self.outer, vocab_size, seed, manifest)
        if self.proving.enabled:
            self._start_proof_round()
        return self.info()

    # ----- snapshots and peer copies --------------------------------------------------------------
    def capture(self, step: int):
        """Copy everything a restart needs (weights, AdamW, theta0, counters, RNG, data position)."""
        return self.lifecycle.capture(step)

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
        self.lifecycle.restore(snap)

    def export_range(self, optimizer: bool = False) -> dict:
        """Weights and theta0 of this range, for a restarted peer that has no snapshot of its own; with the
        architecture, which a peer restarted on its original spec lacks after an upgrade. ``optimizer``:
        the AdamW state too, for a holder added mid-run (:meth:`join`)."""
        return self.lifecycle.export_range(optimizer)

    def import_range(self, tensors: dict, theta0_box: list | None = None, at_theta0: bool = False) -> None:
        """Load a peer's copy. ``theta0_box``: refs of the theta0 vectors the coordinator vouches for (boxed so Ray
        ships them here only now); the copy must match one (neuroray/swarm/copy_check.py, ``CopyRejected``)."""
        accepted = None
        if theta0_box is not None:  # object refs from the coordinator; in-process, the tensors
            import ray

            accepted = [t if isinstance(t, torch.Tensor) else ray.get(t) for t in theta0_box if t is not None]
        if self.lifecycle.import_range(tensors, accepted, at_theta0):
            self._renew_prover()

    def join(self, tensors: dict, outer_rounds: int, theta0_box: list | None = None) -> dict:
        """A holder added mid-run (neuroray.planner.upgrade) takes a peer's range (:meth:`export_range` with
        the optimizer) at theta0 between rounds, and the swarm's round count, so that its first proof names
        the round the ledger's receipt does and starts at the theta0 the range's outer step knows.

        The peer's AdamW moments come along: a fresh AdamW's first steps are sign-sized on every weight,
        and that pseudo-gradient would pull the range's next outer step off the curve."""
        self.import_range(tensors, theta0_box, at_theta0=self.spec.diloco.overlap == "none"
                          and self.spec.diloco.streaming_fragments == 1)
        self.outer.outer_rounds = outer_rounds
        self._arm_hops()
        if self.proving.enabled:
            self._start_proof_round()
        return self.counters()

    # ----- inspection -----------------------------------------------------------------------
    def utilisation(self) -> dict:
        """Busy time / wall time since the previous call, microbatches in flight right now, the most microbatch
        graphs kept at once since the previous call (``peak_in_flight``), and the bytes of every hop this holder
        has sent (activations forward, gradients back) since it started."""
        in_flight, c = len(self.compute.pending), self.compute.hop_counts
        peak, self.peak_kept = max(self.peak_kept, in_flight), in_flight
        return {"name": self.name, "utilisation": self.clock.take(), "in_flight": in_flight, "peak_in_flight": peak,
                "hop_bytes": c["fwd_bytes"] + c["bwd_bytes"]}

    def hop_bytes(self) -> dict:
        """The hops this holder sent and received: counts, encoded bytes, and the float32 bytes they stand for."""
        return {"name": self.name, "stage": self.spec.stage, "replica": self.spec.replica, **self.compute.hop_counts}

    def grads(self) -> dict[str, torch.Tensor]:
        return self.compute.grads()

    def zero_grad(self) -> None:
        self.compute.zero_grad()

    def state_dict(self, at_theta0: bool = False) -> dict[str, torch.Tensor]:
        """This range's weights; ``at_theta0``: its theta0 instead, the model every holder of the range agrees on."""
        return self.outer.weights_at_theta0() if at_theta0 else self.compute.weights()

    def counters(self) -> dict:
        return self.lifecycle.counters()


def _optimizer_copy(optimizer: torch.optim.Optimizer) -> dict:
    """A copy of the optimizer's state dict, its moments cloned to the CPU (the live ones are updated in place)."""
    opt = optimizer.state_dict()
    opt["state"] = {i: {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in st.items()}
                    for i, st in opt["state"].items()}
    return opt


def _ray_gpu_ids() -> list:
    """GPUs Ray assigned to this actor (empty outside Ray or without ``num_gpus``)."""
    try:
        import ray

        return list(ray.get_gpu_ids()) if ray.is_initialized() else []
    except Exception:  # not inside a Ray worker
        return []


def _ray_actor_name() -> str | None:
    """This actor's Ray name (None outside Ray or unnamed)."""
    try:
        import ray

        return ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None
    except Exception:  # not inside a Ray worker
        return None


def holder_actor(spec: HolderSpec, num_cpus: float, num_gpus: float, scheduling_strategy=None, name: str | None = None,
                 max_restarts: int = 0, routed: bool = False, holder_cls: type = StageHolder,
                 inline_max_bytes: int = 0):
    """Start a ``holder_cls`` (a :class:`StageHolder`) as a Ray actor with the resources the config asks for.

    ``routed``: a "control" thread beside the compute thread answers the router (revoke, counters) even
    while a compute call hangs. Fixed routing keeps one thread, where Ray runs calls in submission order.
    ``holder_cls``: tests and benchmarks pass :class:`neuroray.swarm.faults.FaultyStageHolder`.
    ``inline_max_bytes`` (``swarm.hop_inline_max_bytes``; 0: Ray's limit): results above it stay in the holder's
    node's object store instead of being inlined into the driver, so a hop goes from node to node.
    """
    from neuroray.swarm.direct_transport import direct_or_none

    import ray

    # control: revokes, probes and proofs answer while the compute thread is busy or stuck. failover: a
    # call re-sent from a stuck or dead holder runs beside this holder's queued work instead of behind it.
    groups = {"control": 1, "failover": 1}
    # a direct hop transport (spec.hop_transport gloo|nccl) needs Ray's tensor transport on the actor; Ray then
    # adds its own one-thread groups for the sends and receives, beside this holder's compute thread
    direct = {"enable_tensor_transport": True} if direct_or_none(spec.hop_transport) else {}
    if routed:
        cls = ray.remote(concurrency_groups=groups, **direct)(holder_cls)
    else:
        cls = ray.remote(**direct)(holder_cls) if direct else ray.remote(holder_cls)
    opts = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_concurrency": 1, "max_restarts": max_restarts}
    if scheduling_strategy is not None:
        opts["scheduling_strategy"] = scheduling_strategy
    if name:
        opts["name"] = name
    if inline_max_bytes > 0:  # read by the holder's core worker at start; merged with the job's runtime_env
        opts["runtime_env"] = {"env_vars": {"RAY_max_direct_call_object_size": str(inline_max_bytes)}}
    return cls.options(**opts).remote(spec)
