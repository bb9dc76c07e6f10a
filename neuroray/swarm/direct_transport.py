"""Hops over Ray Direct Transport (``swarm.hop_transport=gloo|nccl``, docs/hops.md "Transport").

A holder method called with ``.options(tensor_transport=...)`` keeps the torch tensor it returns in its own
process; when the driver passes that ref to the next holder, Ray has the two ends send and receive it over a
collective group (``ray.experimental.collective``), and only the tensor's shape and dtype cross the object
store. So the bytes are copied once, sender to receiver, and never pickled. gloo carries CPU tensors over
TCP, nccl CUDA tensors GPU to GPU; the code is the same, the backend name swapped.

What it needs, and what this module gives:
- the holders made with ``enable_tensor_transport=True`` (neuroray/swarm/holder.py, ``holder_actor``);
- one collective group per fixed pipeline, made after its holders start, remade when a holder is restarted or
  replaced (a new process is in no group), destroyed at shutdown: :class:`HopGroups`. Ray lets an actor be in
  one group per backend, and the driver that made the group is the one whose submissions use it;
- the tensor a holder sends in the form the backend takes: :func:`outgoing`.

Ray's own rule, which this module cannot change: a transfer that fails (its sender or receiver died in the middle)
makes Ray kill both ends without restart and destroy the group (``ray/experimental/rdt/rdt_manager.py``,
``_abort_transport``: "Killing the actors"). So a holder that dies mid-transfer takes its peer with it for good;
:func:`ended_for_good` finds such holders, and fixed routing starts them afresh from their newest snapshots
(neuroray/training/fixed.py) before the replica recovers as from any crash.
"""

from __future__ import annotations

import logging

import ray
import torch

from neuroray.swarm.transport import to_host

log = logging.getLogger(__name__)

DIRECT = ("gloo", "nccl")  # the hop_transport values that go through Ray Direct Transport


def resolve(transport: str, every_holder_has_gpu: bool, routing: str = "fixed", compression: str = "none") -> str:
    """The transport a run uses: ``auto`` is nccl when every holder has a GPU and the hops are plain tensors of
    fixed pipelines, else the object store (gloo and nccl asked for by name are checked in config_checks.py)."""
    if transport == "auto":
        direct = every_holder_has_gpu and routing == "fixed" and compression == "none"
        return "nccl" if direct else "object_store"
    return transport


def direct_or_none(transport: str) -> str | None:
    """The tensor_transport name a hop is submitted with, or None for the object store."""
    return transport if transport in DIRECT else None


def outgoing(t: torch.Tensor, transport: str) -> torch.Tensor:
    """``t`` as a direct hop carries it: detached and contiguous; on the CPU for gloo (from CUDA through pinned
    memory), on its device for nccl. Every tensor of one RDT value must be on the backend's device type."""
    if transport == "gloo":
        return to_host(t)
    if t.device.type != "cuda":
        raise ValueError(f"swarm.hop_transport=nccl sends CUDA tensors; this holder's tensor is on {t.device}")
    return t.detach().contiguous()


def ended_for_good(holder, timeout_s: float) -> bool:
    """True when ``holder`` is dead and Ray will not restart it (a restarting or slow holder is not)."""
    try:
        ray.get(holder.counters.remote(), timeout=timeout_s)
    except ray.exceptions.ActorDiedError:
        return True
    except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
        pass  # Ray is restarting it, or it is busy restoring a snapshot: it comes back
    return False


class HopGroups:
    """The collective group of every fixed pipeline (replica) whose hops go direct, by replica index."""

    def __init__(self, backend: str, prefix: str = "neuroray-hops"):
        if backend not in DIRECT:
            raise ValueError(f"a hop group's backend is one of {DIRECT}, not {backend}")
        self.backend, self.prefix = backend, prefix
        self.groups: dict[int, object] = {}  # replica -> CommunicatorHandle
        self.made = 0  # groups made so far: each gets a new name (a restarted holder may still hold an old one)

    def ensure(self, replica: int, pipeline: list) -> None:
        """A group over ``pipeline``'s holders (ranks in stage order) unless the replica has one."""
        if replica in self.groups or len(pipeline) < 2:
            return
        from ray.experimental.collective import create_collective_group

        self.made += 1
        name = f"{self.prefix}-r{replica}-{self.made}"
        self.groups[replica] = create_collective_group(list(pipeline), backend=self.backend, name=name)

    def remake(self, replica: int, pipeline: list) -> None:
        """After a holder of the replica was restarted or replaced: drop the old group, make a new one."""
        self.drop(replica)
        self.ensure(replica, pipeline)

    def drop(self, replica: int) -> None:
        from ray.experimental.collective import destroy_collective_group

        handle = self.groups.pop(replica, None)
        if handle is None:
            return
        try:
            destroy_collective_group(handle)
        except ValueError:  # Ray destroyed it already, after a failed transfer
            pass
        except ray.exceptions.RayError as exc:  # a member is gone: nothing left to tear down there
            log.warning("destroying hop group %s: %s", handle.name, exc)

    def close(self) -> None:
        for replica in list(self.groups):
            self.drop(replica)
