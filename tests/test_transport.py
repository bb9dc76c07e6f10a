"""Hop transport (neuroray/swarm/transport.py): tensors cross as numpy buffers, bf16 as its int16 bits, read in
place on arrival; a malformed wire tensor is refused naming its sender; through Ray's object store the receiver
reads the buffer where it lies (no copy, no torch pickle)."""

import numpy as np
import pytest
import torch

from neuroray.errors import HopPayloadError
from neuroray.swarm.transport import WireTensor, from_wire, to_device, to_host, to_wire


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact_and_shares_the_buffer(dtype):
    x = torch.randn(3, 5, 7).to(dtype)
    w = to_wire(x)
    assert w.dtype == str(dtype).removeprefix("torch.") and w.shape == (3, 5, 7) and w.nbytes == x.numel() * x.element_size()
    assert w.array.dtype == (np.int16 if dtype == torch.bfloat16 else np.float32)
    y = from_wire(w, "a", "b")
    assert y.dtype == dtype and torch.equal(y, x) and y.data_ptr() == x.data_ptr()


def test_cpu_copies_are_no_copies_and_a_strided_tensor_is_made_contiguous():
    x = torch.randn(4, 6)
    assert to_host(x).data_ptr() == x.data_ptr() and to_device(x, torch.device("cpu")) is x
    t = x.T  # not contiguous: the wire needs one buffer
    w = to_wire(t)
    assert w.array.flags.c_contiguous and torch.equal(from_wire(w, "a", "b"), t)


def test_a_malformed_wire_tensor_is_refused_naming_its_sender():
    good = to_wire(torch.ones(4))
    with pytest.raises(HopPayloadError, match="driver.*float32 but holds int16"):
        from_wire(WireTensor(good.array.view(np.int16), "float32"), "driver", "validator")
    with pytest.raises(HopPayloadError, match="expected a tensor on the wire, got list"):
        from_wire([1.0, 2.0], "driver", "validator")
    t = torch.ones(4)  # handed over in process: taken as it is
    assert from_wire(t, "driver", "validator") is t
    with pytest.raises(ValueError, match="a hop carries"):
        to_wire(torch.ones(4, dtype=torch.complex64))


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_through_the_object_store_the_receiver_reads_the_buffer_in_place(ray_cluster):
    """A 4 MiB activation put by one task and read by another: equal, and the tensor the receiver gets is a
    view of the object store's read-only buffer (Ray's zero-copy numpy read), bf16 included."""
    ray = ray_cluster

    @ray.remote(num_cpus=0)
    def send(dtype):
        return to_wire(torch.arange(1 << 20, dtype=torch.float32).to(dtype).view(256, 4096))

    @ray.remote(num_cpus=0)
    def receive(w):
        t = from_wire(w, "sender", "receiver")
        return w.array.flags.writeable, t.data_ptr() == w.array.ctypes.data, t.dtype, float(t.float().sum())

    for dtype in (torch.float32, torch.bfloat16):
        writeable, shared, got, total = ray.get(receive.remote(send.remote(dtype)))
        assert not writeable and shared and got == dtype
        assert total == float(torch.arange(1 << 20, dtype=torch.float32).to(dtype).float().sum())


class _Sender:
    """Stands in for a holder's class in holder_actor: it returns what a compressed hop carries (16 KiB)."""

    def __init__(self, spec):
        pass

    def send(self):
        return to_wire(torch.ones(64, 64, dtype=torch.float32))


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_small_hop_stays_on_the_senders_node_instead_of_passing_through_the_driver(ray_cluster):
    """swarm.hop_inline_max_bytes: a holder started by holder_actor keeps a 16 KiB result in its node's object store
    (the receiver pulls it from there); with 0, Ray inlines it into the driver, which then forwards it."""
    from neuroray.swarm.holder import holder_actor

    ray = ray_cluster
    from types import SimpleNamespace

    spec = SimpleNamespace(hop_transport="object_store")  # all holder_actor reads of a spec; _Sender ignores it
    kept, inlined = (holder_actor(spec, 0, 0, holder_cls=_Sender, inline_max_bytes=n) for n in (1024, 0))
    refs = [kept.send.remote(), inlined.send.remote()]
    ray.get(refs)
    where = ray.experimental.get_object_locations(refs)
    assert where[refs[0]]["node_ids"], "a hop above the limit should be in the sender's object store"
    assert not where[refs[1]]["node_ids"], "under Ray's own limit a 16 KiB result is inlined into the caller"
