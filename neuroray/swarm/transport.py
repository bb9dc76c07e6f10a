"""A hop's tensor on the wire: a numpy buffer that Ray ships without pickling its data, and the device copies
at both ends (docs/hops.md, "Transport").

Ray pickles a torch tensor through ``Storage.__reduce__``: ``torch.save`` into a bytes object on the sender and
``torch.load`` on the receiver, two extra copies of the data plus a pickle pass. A numpy array instead travels as
an out-of-band pickle-5 buffer: written once into the object store, read in place on arrival. So every
uncompressed activation and gradient crosses as a :class:`WireTensor` (a contiguous numpy array and the torch
dtype it holds). bfloat16 has no numpy dtype: its bits cross as int16 and are viewed back.

On the receiving side the tensor is a view of the object-store buffer, which is read-only: holders only read
what they receive (an activation becomes a new leaf via ``detach().requires_grad_()``, a gradient is fed to
``backward``, which clones it before accumulating), so no copy is made on the CPU.

CUDA: device -> host goes into pinned memory with a non-blocking copy, and the sending stream is synchronized
before the buffer is handed to Ray (Ray reads it as soon as the call returns). Host -> device is staged in
pinned memory and copied non-blocking on the current stream, so later kernels on that stream see it; the
caching host allocator keeps the pinned block until the copy is done.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from neuroray.errors import HopPayloadError

# torch dtype name -> the numpy dtype its bits cross as
_CARRIER = {"float32": np.float32, "bfloat16": np.int16, "float16": np.float16, "int64": np.int64}


@dataclass(frozen=True)
class WireTensor:
    """One tensor as it crosses between holders: ``array`` holds its bytes, ``dtype`` names the torch dtype."""

    array: np.ndarray
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU, contiguous: the tensor itself when it already is; from CUDA through pinned memory."""
    t = t.detach()
    if t.device.type != "cuda":
        return t.contiguous()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()  # the bytes must be in host memory before Ray reads them
    return host


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A received host tensor on ``device``: itself on the CPU; on CUDA staged in pinned memory, non-blocking."""
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    if not t.is_pinned():
        staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        staged.copy_(t)
        t = staged
    return t.to(device, non_blocking=True)


def to_wire(t: torch.Tensor) -> WireTensor:
    """The wire form of ``t`` (one device -> host copy on CUDA, none on the CPU)."""
    host = to_host(t)
    name = str(host.dtype).removeprefix("torch.")
    if name not in _CARRIER:
        raise ValueError(f"a hop carries {sorted(_CARRIER)} tensors, not {name}")
    bits = host.view(torch.int16) if host.dtype == torch.bfloat16 else host
    return WireTensor(bits.numpy(), name)


def from_wire(w, sender: str, receiver: str) -> torch.Tensor:
    """The CPU tensor a :class:`WireTensor` carries, a view of its buffer (a tensor handed over as it is, by an
    in-process caller, is taken as it is); HopPayloadError naming the sender when it is neither, or its array
    does not hold the dtype it names."""
    if isinstance(w, torch.Tensor):
        return w
    if not isinstance(w, WireTensor) or not isinstance(w.array, np.ndarray):
        raise HopPayloadError(sender, receiver, f"expected a tensor on the wire, got {type(w).__name__}")
    carrier = _CARRIER.get(w.dtype)
    if carrier is None or w.array.dtype != carrier:
        raise HopPayloadError(sender, receiver, f"wire tensor says {w.dtype} but holds {w.array.dtype}")
    with warnings.catch_warnings():  # the object store's buffer is read-only; holders never write what they receive
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(w.array)
    return t.view(torch.bfloat16) if w.dtype == "bfloat16" else t


def as_tensor(x) -> torch.Tensor:
    """What a holder returned, as a torch tensor: for a caller outside the pipeline (a notebook, a test) that
    reads an activation or logits a holder sent as a :class:`WireTensor` (or, on the holder's node, as a
    shared-memory hop: a copy, since the slot is the sender's to reuse)."""
    from neuroray.swarm.shm_transport import ShmHop, read

    if isinstance(x, ShmHop):
        return read(x).clone()
    return from_wire(x, "a holder", "the caller")
