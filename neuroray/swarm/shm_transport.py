"""Same-node hops through preallocated shared memory (``swarm.hop_transport=shm``, docs/hops.md "Transport").

Why: through Ray's object store every hop pays a put (about 5 ms fixed, create and seal round trips to the store)
and, when the store hands out pages no process has touched yet, a page fault per 4 KiB in the writer and again
in the reader (50-260 ms for 64 MiB here). A fixed pipeline sends the same shape over the same edge every
microbatch, so each sender keeps, per edge whose receiver is on its own node, a **ring** of slots in one file on
/dev/shm, reserved (``posix_fallocate``: a full /dev/shm fails here, not with a SIGBUS later), faulted in once by
the sender and mapped once, populated, by the receiver. A hop is then one copy into a free slot, and the Ray
call carries only a :class:`ShmHop` (ring, slot, shape, dtype, sequence number): a few hundred bytes, inlined
in the task, no object store at all. The receiver reads the slot in place (zero copy).

The ring's first page is its header: one int64 per slot, 0 when free, else the sequence number of the hop
in it. Only the sender turns a 0 into a sequence number (one writer, under its lock), only the receiver turns
that number back to 0, and only while it still reads its own number there, so neither ever overwrites the
other. A slot is released when the receiver's last reference to the bytes goes: the array the tensor is made
from carries a finalizer, and torch keeps that array alive exactly as long as any view of the storage (the
autograd graph of an activation until its microbatch's backward; a gradient until ``backward`` has consumed it;
an aborted step's graphs when they are dropped). Nothing waits for a slot: a sender that finds none free, a
tensor bigger than a slot, or an edge whose peer is on another node, sends over the object store as before
(:meth:`ShmRing.put` returns None). So the ring cannot deadlock, and a receiver that dies holding slots only
costs its sender fallbacks until the driver remakes the rings after the recovery.

Files are named ``nrshm-<run>-r<replica>-s<stage>-<fwd|bwd>-<pid>-<n>``; the sender unlinks its ring when it
remakes or closes it, and also any left by a dead predecessor on its edge (the same name up to the pid); the
driver sweeps ``nrshm-<run>-*`` on its node at shutdown (holders that died and were not remade). A receiver maps
a ring once (kept by name) and lets an old mapping go when a new ring of the same edge arrives; Linux keeps an
unlinked file's pages until the last mapping goes, so a tensor still viewing an old ring stays valid.
"""

from __future__ import annotations

import glob
import logging
import math
import mmap
import os
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from neuroray.errors import HopPayloadError

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "nrshm"
PAGE = 4096
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What numpy reads a slot as: the same bytes per element (bf16, which numpy lacks, as uint16, then viewed by torch).
# A receiver builds the tensor with one numpy view and one torch call, no torch allocation: in an actor whose
# caches the hop's copy has just flushed, each torch call costs tens of microseconds (docs/hops.md).
_NUMPY = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16}
_ITEMSIZE = {name: np.dtype(n).itemsize for name, n in _NUMPY.items()}


@dataclass(frozen=True)
class ShmHop:
    """What crosses the Ray call for a hop in shared memory: where the bytes lie and what they are."""

    ring: str  # the file's name under /dev/shm
    slot: int
    offset: int  # byte offset of the slot in the file
    shape: tuple[int, ...]
    dtype: str  # torch dtype name
    seq: int  # the sequence number the header holds while the hop is in the slot
    sender: str  # the sending holder's label (for a refusal's message)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


def ring_name(run: str, replica: int, stage: int, direction: str, serial: int) -> str:
    return f"{PREFIX}-{run}-r{replica}-s{stage}-{direction}-{os.getpid()}-{serial}"


def _edge(name: str) -> str:
    """The name up to the pid: the same for every ring a slot ever had on one edge."""
    return name.rsplit("-", 2)[0]


class ShmRing:
    """A sender's ring of ``slots`` slots of ``slot_bytes`` each, in one file on /dev/shm."""

    def __init__(self, name: str, slots: int, slot_bytes: int):
        if slots < 1 or slot_bytes < 1:
            raise ValueError(f"a ring needs at least one slot of at least one byte, not {slots} x {slot_bytes}")
        self.name, self.slots = name, slots
        self.slot_bytes = -(-slot_bytes // PAGE) * PAGE  # page-aligned slots
        self.size = PAGE + slots * self.slot_bytes
        for old in glob.glob(os.path.join(SHM_DIR, _edge(name) + "-*")):  # a dead predecessor's ring of this edge
            _unlink(old)
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.size)  # ENOSPC here, not SIGBUS at the first write
            self.map = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except BaseException:
            os.close(fd)
            _unlink(os.path.join(SHM_DIR, name))
            raise
        os.close(fd)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)
        self.bytes.zero_()  # every page faulted in by the writer once, here, not on the hot path
        self.header = np.frombuffer(self.map, dtype=np.int64, count=slots)
        self.lock = threading.Lock()
        self.seq, self.next, self.sent, self.fallbacks = 0, 0, 0, 0

    def put(self, t: torch.Tensor, sender: str) -> ShmHop | None:
        """Copy ``t`` into a free slot and return its handle; None (the caller sends it another way) when it does
        not fit a slot, its dtype is not one a hop carries, or every slot is still in use."""
        name = str(t.dtype).removeprefix("torch.")
        nbytes = t.numel() * t.element_size()
        if name not in _DTYPES or nbytes > self.slot_bytes or self.map.closed:
            self.fallbacks += 1
            return None
        with self.lock:
            for i in range(self.slots):
                slot = (self.next + i) % self.slots
                if self.header[slot] == 0:
                    break
            else:
                self.fallbacks += 1
                return None
            self.seq += 1
            offset = PAGE + slot * self.slot_bytes
            dst = self.bytes[offset:offset + nbytes].view(t.dtype).view(t.shape)
            dst.copy_(t.detach())  # from CUDA: a synchronous device -> host copy (pageable memory)
            self.header[slot] = self.seq  # published after the bytes; the Ray call that carries the handle orders it
            self.next, self.sent = slot + 1, self.sent + 1
            return ShmHop(self.name, slot, offset, tuple(t.shape), name, self.seq, sender)

    def in_use(self) -> int:
        return int(np.count_nonzero(self.header))

    def close(self) -> None:
        """Unlink the file; the mapping goes with the last view of it (a receiver may still read an old slot)."""
        _unlink(os.path.join(SHM_DIR, self.name))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Mapped:
    """A receiver's mapping of one sender's ring."""

    def __init__(self, name: str):
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)  # page tables filled once
        finally:
            os.close(fd)
        self.size = size
        self.header = np.frombuffer(self.map, dtype=np.int64, count=PAGE // 8)


def _release(header: np.ndarray, slot: int, seq: int) -> None:
    if header[slot] == seq:  # still this hop's: the sender writes a slot only once it reads 0 there
        header[slot] = 0


class ShmReader:
    """A receiver's side: the rings it has mapped, by name; one per edge (a remade ring replaces the old one)."""

    def __init__(self):
        self.maps: dict[str, _Mapped] = {}
        self.lock = threading.Lock()

    def take(self, hop: ShmHop, receiver: str) -> torch.Tensor:
        """The tensor ``hop`` names, a view of the slot; the slot is released when the last view of it goes.
        HopPayloadError when the ring is not on this node, the slot no longer holds this hop, or the handle
        does not fit its ring."""
        if hop.dtype not in _DTYPES or hop.slot < 0 or hop.offset < PAGE or min(hop.shape, default=0) < 0:
            raise HopPayloadError(hop.sender, receiver, f"shared-memory hop names dtype {hop.dtype}, slot {hop.slot}, "
                                  f"shape {hop.shape}")
        m = self._mapped(hop, receiver)
        if hop.slot >= PAGE // 8 or hop.offset + hop.nbytes > m.size:
            raise HopPayloadError(hop.sender, receiver, f"shared-memory hop overruns its ring {hop.ring}")
        if m.header[hop.slot] != hop.seq:
            raise HopPayloadError(hop.sender, receiver, f"slot {hop.slot} of {hop.ring} no longer holds hop "
                                  f"{hop.seq} (read twice, or released)")
        arr = np.frombuffer(m.map, dtype=_NUMPY[hop.dtype], count=math.prod(hop.shape), offset=hop.offset)
        weakref.finalize(arr, _release, m.header, hop.slot, hop.seq)  # torch keeps arr alive as long as the storage
        t = torch.from_numpy(arr.reshape(hop.shape))  # the reshaped array's base is arr: arr lives as long
        return t.view(torch.bfloat16) if hop.dtype == "bfloat16" else t

    def _mapped(self, hop: ShmHop, receiver: str) -> _Mapped:
        with self.lock:
            m = self.maps.get(hop.ring)
            if m is not None:
                return m
            try:
                m = _Mapped(hop.ring)
            except (FileNotFoundError, ValueError, OSError) as exc:
                raise HopPayloadError(hop.sender, receiver, f"shared-memory ring {hop.ring} is not on this node "
                                      f"({type(exc).__name__})") from None
            edge = _edge(hop.ring)  # a new ring of the edge: the old mapping goes with its last view
            for old in [n for n in self.maps if _edge(n) == edge]:
                del self.maps[old]
            self.maps[hop.ring] = m
            return m


class ShmRings:
    """A holder's outgoing rings, by direction (``fwd``: to the next stage, ``bwd``: to the previous one)."""

    def __init__(self):
        self.rings: dict[str, ShmRing] = {}
        self.serial = 0
        self.made: tuple | None = None  # the last open()'s arguments, for reopen()

    def open(self, run: str, replica: int, stage: int, directions: list[str], slots: int, slot_bytes: int) -> list[str]:
        """(Re)make the rings of ``directions`` (closing every ring this holder had); the names made. A ring that
        cannot be made (/dev/shm too small) is left out with a warning: that edge uses the object store."""
        self.close()
        self.made = (run, replica, stage, list(directions), slots)
        for d in directions:
            self.serial += 1
            name = ring_name(run, replica, stage, d, self.serial)
            try:
                self.rings[d] = ShmRing(name, slots, slot_bytes)
                register(self.rings[d])
            except OSError as exc:
                log.warning("shared-memory ring %s (%d x %d bytes) not made, hops go through the object store: %s",
                            name, slots, slot_bytes, exc)
        return [r.name for r in self.rings.values()]

    def reopen(self, slot_bytes: int) -> list[str]:
        """The same rings anew with slots of ``slot_bytes`` (the model grew: its hops no longer fit)."""
        if not self.rings or self.made is None:
            return []
        run, replica, stage, directions, slots = self.made
        return self.open(run, replica, stage, [d for d in directions if d in self.rings], slots, slot_bytes)

    def put(self, t: torch.Tensor, direction: str, sender: str) -> ShmHop | None:
        ring = self.rings.get(direction)
        return None if ring is None else ring.put(t, sender)

    def stats(self) -> dict:
        return {d: {"name": r.name, "sent": r.sent, "fallbacks": r.fallbacks, "in_use": r.in_use(), "slots": r.slots}
                for d, r in self.rings.items()}

    def close(self) -> None:
        for r in self.rings.values():
            r.close()
            _OWN.pop(r.name, None)
        self.rings = {}


def sweep(run: str) -> int:
    """Unlink every ring file of run ``run`` on this node (holders that died and were never remade); the count."""
    paths = glob.glob(os.path.join(SHM_DIR, f"{PREFIX}-{run}-*"))
    for p in paths:
        _unlink(p)
    return len(paths)


# The rings this process made, by name: a holder reads back what it sent (its hop record's digests) without a map.
_OWN: dict[str, ShmRing] = {}
_READER = ShmReader()


def register(ring: ShmRing) -> None:
    _OWN[ring.name] = ring


def read(hop: ShmHop) -> torch.Tensor:
    """The tensor a handle names, for a reader that is not the pipeline's receiver (the sender's own hop record,
    a caller on the same node): a view of the slot, from this process's own ring where it made it."""
    ring = _OWN.get(hop.ring)
    if ring is None:
        return _READER.take(hop, "a reader")
    return ring.bytes[hop.offset:hop.offset + hop.nbytes].view(_DTYPES[hop.dtype]).view(hop.shape)


class ShmEdges:
    """Driver side: the rings of every fixed pipeline (replica) whose hops go through shared memory.

    For each replica it asks its holders which Ray node they are on, and has each holder make a ring for every
    edge whose receiver is on its own node (``fwd`` to the next stage, ``bwd`` to the previous one); remade after
    every recovery of the replica (a restarted holder has none, a surviving one may have slots a dead peer never
    released), closed and swept at shutdown."""

    def __init__(self, run: str, slots: int, timeout_s: float):
        self.run, self.slots, self.timeout_s = run, slots, timeout_s
        self.made: dict[int, list] = {}  # replica -> per holder, the ring names it made

    def ensure(self, replica: int, pipeline: list) -> None:
        if replica not in self.made:
            self.remake(replica, pipeline)

    def remake(self, replica: int, pipeline: list) -> None:
        import ray

        nodes = ray.get([h.ray_node.remote() for h in pipeline], timeout=self.timeout_s)
        calls = []
        for s, h in enumerate(pipeline):
            dirs = [d for d, peer in (("fwd", s + 1), ("bwd", s - 1))
                    if 0 <= peer < len(pipeline) and nodes[peer] == nodes[s]]
            calls.append(h.open_hop_rings.remote(self.run, dirs, self.slots))
        self.made[replica] = ray.get(calls, timeout=self.timeout_s)

    def close(self, pipelines: list[list]) -> None:
        """Every holder unlinks its rings; then whatever is left of this run on this node (holders that died)."""
        import ray

        calls = [h.close_hop_rings.remote() for p in pipelines for h in p]
        ray.wait(calls, num_returns=len(calls), timeout=self.timeout_s)
        for c in calls:
            try:
                ray.get(c, timeout=0)
            except Exception as exc:  # a dead holder: its files are swept below (on this node)
                log.warning("closing a holder's shared-memory rings: %s", type(exc).__name__)
        self.made = {}
        sweep(self.run)
