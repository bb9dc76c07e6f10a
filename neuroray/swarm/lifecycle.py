"""A range's life beyond training steps: snapshots and restore, growth, and copies between peers.

Everything here moves a range's whole state at once (weights, AdamW moments, theta0, error feedback,
counters, RNG and data position) between a holder and a snapshot store, a grown architecture, or a
peer holder: a restarted holder restores its snapshot or copies a peer's range (``export_range`` /
``import_range``), and a live upgrade grows the range in place (neuroray.planner.upgrade).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, replace

import torch
from torch.nn.utils import parameters_to_vector

from neuroray.config import ModelConfig
from neuroray.model.vocab import VOCAB_PARAMS
from neuroray.swarm.compute import RangeCompute
from neuroray.swarm.copy_check import check_copy
from neuroray.swarm.outer_state import OuterState
from neuroray.swarm.vocab_growth import grow_range_vocab, switch_stream

log = logging.getLogger(__name__)


def load_init_from(compute: RangeCompute) -> None:
    """``init_from=``: this range's tensors of the Hugging Face checkpoint over the seeded init (only they
    are read, so a holder's memory holds its own range, never the whole model)."""
    from neuroray.model.hf import load_hf_llama  # lazy: safetensors is only needed when importing

    s, module = compute.spec, compute.module
    _, state = load_hf_llama(s.init_from, s.model, s.vocab_size, keys=list(module.state_dict()))
    module.load_state_dict(state)  # copies into the parameters, on whatever device they live


def optimizer_state_to_cpu(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with its moments on the CPU (``load_state_dict`` moves them back to the
    device of the weights it is loaded beside)."""
    opt = optimizer.state_dict()
    opt["state"] = {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in st.items()}
                    for i, st in opt["state"].items()}
    return opt


def saved_vocab(snap) -> int | None:
    """The vocabulary a snapshot's tensors have (its architecture's record, else the rows of its embedding or
    LM head); None for a middle range recorded before vocabularies grew (it has no row per token)."""
    arch = snap.meta.get("architecture") or {}
    if arch.get("vocab_size"):
        return arch["vocab_size"]
    rows = [snap.tensors[f"model.{name}"].shape[0] for name in VOCAB_PARAMS if f"model.{name}" in snap.tensors]
    return rows[0] if rows else None


def was_reconstructed() -> bool:
    """True inside an actor that Ray restarted after a crash (``max_restarts``)."""
    try:
        import ray

        # Ray's own property reads its deprecated actor_id: one RayDeprecationWarning per holder, not ours to fix
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # not inside a Ray actor
        return False


class RangeLifecycle:
    """Snapshots, growth and peer copies of the range that ``compute`` trains and ``outer`` syncs."""

    def __init__(self, compute: RangeCompute, outer: OuterState, node_id: str):
        self.compute, self.outer, self.node_id = compute, outer, node_id
        self.snapshots = None
        self.restored_step: int | None = None
        spec = compute.spec
        self.created_manifest = spec.manifest  # the data this actor was started on (a Ray restart starts on it again)
        if spec.snapshot_root:
            from neuroray.snapshot import SnapshotStore

            self.snapshots = SnapshotStore(spec.snapshot_root, spec.slot, keep=spec.snapshot_keep)

    def counters(self) -> dict:
        c = self.compute
        return {"inner_steps": c.inner_steps, "outer_rounds": self.outer.outer_rounds,
                "microbatches": c.microbatches_done, "restored_step": self.restored_step}

    def restore_on_start(self) -> None:
        """A Ray restart, or a holder taking a crashed one's slot over (``spec.restore_latest``: a spare or a fresh
        holder, checkpoint.spares), restores the newest good snapshot; a resumed job restores the step it was told."""
        spec, name = self.compute.spec, self.compute.name
        if self.snapshots is None:
            return
        restarted = was_reconstructed() or spec.restore_latest
        if restarted:
            snap = self.snapshots.latest()
        elif spec.resume_step is not None:
            snap = self.snapshots.latest(at_most=spec.resume_step)
            if snap is None or snap.step != spec.resume_step:
                raise RuntimeError(f"{name}: no good snapshot at step {spec.resume_step} in {self.snapshots.dir}")
        else:
            return
        if snap is not None:
            # a Ray restart goes on with the run's data as the snapshot knew it (a live vocabulary growth may
            # have switched it); a resumed job trains on the dataset as its store holds it now
            self.restore(snap, follow_data=restarted)
            log.warning("%s: restored snapshot of step %d", name, snap.step)

    # ----- snapshots --------------------------------------------------------------------------
    def capture(self, step: int):
        """Copy everything a restart needs (weights, AdamW, theta0, counters, RNG, data position)."""
        from neuroray.snapshot import Snapshot

        c, o = self.compute, self.outer
        if c.pending:
            # Under swarm routing a re-sent or hedged forward that lost may land on the failover thread after
            # the holder's step: its graph waits for a backward that went elsewhere. As at the step, drop it
            # (the gradients it never made are not in the snapshot either). Fixed routing never gets here:
            # its calls run in order on one thread, so the snapshot follows the step that cleared them.
            log.warning("%s: dropping %d graphs no backward will use before the snapshot", c.name, len(c.pending))
            c.pending.clear()
        tensors = {f"model.{k}": v for k, v in c.weights().items()}
        opt = c.optimizer.state_dict()
        for idx, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().clone()
        tensors["theta0"] = o.theta0.detach().cpu().clone()
        if o.feedback.residual is not None:
            tensors["feedback.residual"] = o.feedback.residual.clone()
        tensors["rng.torch"] = torch.get_rng_state()
        overlap, overlap_meta = o.overlap_snapshot()  # diloco.overlap: the round in flight
        meta = {"slot": c.spec.slot, "node_id": self.node_id, "param_groups": opt["param_groups"],
                "counters": self.counters(), "stream": None if c.stream is None else c.stream.state(),
                "architecture": self.architecture()} | overlap_meta
        if c.stream is not None and c.spec.manifest != self.created_manifest:  # switched by a vocabulary growth
            meta["data_manifest"] = c.spec.manifest
        tensors |= overlap
        return Snapshot(step, tensors, meta)

    def restore(self, snap, follow_data: bool = True) -> None:
        """Load ``snap``. A snapshot of a smaller vocabulary than this holder's (taken before the dataset grew)
        is loaded at its own size and then grown (neuroray/swarm/vocab_growth.py), the data kept as the spec
        says; a larger one (taken after a live growth; a Ray restart starts on the old spec) is adopted, and
        with ``follow_data`` so is the data it was reading."""
        c, o, t = self.compute, self.outer, snap.tensors
        target = c.spec.vocab_size
        self.adopt(snap.meta.get("architecture"), saved_vocab(snap))
        if follow_data and snap.meta.get("data_manifest") is not None:
            switch_stream(c, snap.meta["data_manifest"])
            c.spec = replace(c.spec, manifest=snap.meta["data_manifest"])
        c.module.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        state: dict[int, dict] = {}
        for key, value in t.items():
            if key.startswith("opt."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        c.optimizer.load_state_dict({"state": state, "param_groups": snap.meta["param_groups"]})
        o.theta0 = t["theta0"].to(c.device).clone()
        o.feedback.residual = t["feedback.residual"].clone() if "feedback.residual" in t else None
        o.feedback_round = None
        o.overlap_restore(t, snap.meta)
        torch.set_rng_state(t["rng.torch"])
        n = snap.meta["counters"]
        c.inner_steps, o.outer_rounds, c.microbatches_done = n["inner_steps"], n["outer_rounds"], n["microbatches"]
        if c.stream is not None and snap.meta.get("stream"):
            c.stream.seek(snap.meta["stream"]["position"])
        c.pending.clear()
        self.restored_step = snap.step
        if target > c.spec.vocab_size:
            grow_range_vocab(c, o, target, c.spec.seed)

    def align(self, inner_steps: int, microbatches_per_step: int) -> None:
        """Go on at the swarm's inner step ``inner_steps`` after a restore (or a peer copy): a Driver skips the
        microbatches of the steps its snapshot missed, which the lost process trained on (their learning is in
        theta0, or went with the process), so its stream, and the data position its next proof names, are the
        batches it trains on next, not ones it already used."""
        c = self.compute
        if c.stream is not None:
            c.stream.seek(max(0, c.stream.position + (inner_steps - c.inner_steps) * microbatches_per_step))
        c.inner_steps = inner_steps

    # ----- architecture -------------------------------------------------------------------------
    def architecture(self) -> dict:
        spec = self.compute.spec
        return {"model": asdict(spec.model), "ranges": [list(r) for r in spec.ranges], "vocab_size": spec.vocab_size}

    def adopt(self, arch: dict | None, vocab_size: int | None = None) -> bool:
        """Rebuild for the architecture a snapshot or a peer recorded (True if it did): after an upgrade or a
        vocabulary growth, a Ray restart begins on the spec the actor was created with, i.e. the old shapes."""
        spec = self.compute.spec
        vocab = vocab_size or (arch or {}).get("vocab_size") or spec.vocab_size
        if arch is None:  # recorded before upgrades existed: the spec's model and split
            model, ranges = spec.model, list(spec.ranges)
        else:
            model, ranges = ModelConfig(**arch["model"]), [tuple(r) for r in arch["ranges"]]
        # how to train (recompute or keep activations) is this run's choice, not the snapshot's shapes
        model = replace(model, activation_checkpointing=spec.model.activation_checkpointing)
        if (model, ranges, vocab) == (spec.model, list(spec.ranges), spec.vocab_size):
            return False
        self.compute.spec = replace(spec, vocab_size=vocab)
        self.compute.rebuild(model, ranges)
        return True

    def grow(self, model: ModelConfig, ranges: list[tuple[int, int]], seed: int) -> None:
        """Grow weights, theta0 and the AdamW moments together to ``model`` (neuroray.model.growth)."""
        from neuroray.model.growth import flat_to_state, grow_optimizer_state, grow_state_dict, state_to_flat

        c, o = self.compute, self.outer
        assert not c.pending, f"{c.name}: grow with microbatches in flight"
        old, (lo, hi) = c.spec.model, ranges[c.spec.stage]
        old_names = [n for n, _ in c.module.named_parameters()]
        weights = {k: v.detach().cpu() for k, v in c.module.state_dict().items()}
        theta0 = flat_to_state(o.theta0.detach().cpu(), c.module)
        opt = optimizer_state_to_cpu(c.optimizer)  # grown on the CPU; load_state_dict moves it to the weights' device
        c.rebuild(model, ranges)
        c.module.load_state_dict(grow_state_dict(weights, old, model, seed=seed, layers=range(lo, hi)))
        o.theta0 = state_to_flat(grow_state_dict(theta0, old, model, seed=seed, layers=range(lo, hi)),
                                 c.module).to(c.device)
        c.optimizer.load_state_dict(grow_optimizer_state(
            opt, old_names, [n for n, _ in c.module.named_parameters()], old, model, layers=range(lo, hi)))
        # the residual is laid out as the old range: drop it (at most one round's quantisation error is lost)
        o.drop_residual()

    # ----- copies between peers -------------------------------------------------------------------
    def export_range(self, optimizer: bool = False) -> dict:
        c = self.compute
        out = {**{f"model.{k}": v.detach().cpu() for k, v in c.module.state_dict().items()},
               "theta0": self.outer.theta0.detach().cpu(),
               "architecture": self.architecture()}
        if c.stream is not None:  # the data a vocabulary growth switched to, for a restarted Driver
            out["data_manifest"] = c.spec.manifest
        if optimizer:
            out["optimizer"] = optimizer_state_to_cpu(c.optimizer)
        return out

    def import_range(self, tensors: dict, accepted_theta0: list[torch.Tensor] | None = None,
                     at_theta0: bool = False) -> bool:
        """Load a peer's :meth:`export_range`; True if the range was rebuilt to the peer's architecture.
        ``accepted_theta0``: the theta0 vectors the coordinator vouches for; the copy is checked against them
        first (neuroray/swarm/copy_check.py), and ``at_theta0`` checks its weights are at its theta0 too."""
        if accepted_theta0 is not None:
            check_copy(tensors, accepted_theta0)
        c = self.compute
        rebuilt = self.adopt(tensors.get("architecture"))
        manifest = tensors.get("data_manifest")
        if manifest is not None and c.stream is not None and manifest != c.spec.manifest:
            switch_stream(c, manifest)
            c.spec = replace(c.spec, manifest=manifest)
        c.module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.outer.theta0 = tensors["theta0"].to(c.device).clone()
        c.pending.clear()
        if "optimizer" in tensors:  # load_state_dict moves the moments to the weights' device
            c.optimizer.load_state_dict(tensors["optimizer"])
        if accepted_theta0 is not None and at_theta0:  # the flat layout exists only once the range is built
            check_copy(tensors, accepted_theta0, parameters_to_vector(c.module.parameters()).detach())
        return rebuilt
