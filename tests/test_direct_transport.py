"""Direct hops (swarm.hop_transport=gloo|nccl, neuroray/swarm/direct_transport.py) without Ray: the config
keys and their refusals, ``auto``, what a holder sends, and the holder's one-return forward_backward."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.config_checks import validate
from neuroray.configure import load_config
from neuroray.errors import ConfigError
from neuroray.swarm.direct_transport import HopGroups, direct_or_none, outgoing, resolve
from neuroray.swarm.holder import HolderSpec, StageHolder
from neuroray.swarm.hop_guard import HopRejected

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=16)


def test_the_transport_key_defaults_to_the_object_store_and_refuses_what_cannot_work():
    cfg = load_config([])
    assert cfg.swarm.hop_transport == "object_store"
    assert load_config(["swarm.hop_transport=gloo"]).swarm.hop_transport == "gloo"

    def check(cluster=None, **swarm):
        validate(replace(cfg, swarm=replace(cfg.swarm, **swarm), cluster=cluster or cfg.cluster))

    refusals = [
        (dict(hop_transport="tcp"), "is unknown; choose object_store, gloo, nccl, shm, auto"),
        (dict(hop_transport="nccl"), "nccl needs a GPU on every holder"),
        (dict(hop_transport="gloo", routing="router"), "needs swarm.routing=fixed"),
        (dict(hop_transport="gloo", hop_compression="int8"), "set swarm.hop_compression=none"),
    ]
    for swarm, words in refusals:
        with pytest.raises(ConfigError, match=words):
            check(**swarm)
    check(replace(cfg.cluster, gpus_per_holder=1), hop_transport="nccl")  # accepted: every holder has a GPU
    check(hop_transport="auto", routing="router")  # auto falls back instead


def test_auto_is_nccl_only_where_every_holder_has_a_gpu_and_hops_are_plain_fixed_ones():
    assert resolve("auto", True) == "nccl"
    assert resolve("auto", False) == "object_store"
    assert resolve("auto", True, routing="router") == "object_store"
    assert resolve("auto", True, compression="lowrank") == "object_store"
    assert resolve("gloo", False) == "gloo" and resolve("object_store", True) == "object_store"
    assert [direct_or_none(t) for t in ("object_store", "gloo", "nccl")] == [None, "gloo", "nccl"]
    with pytest.raises(ValueError, match="backend is one of"):
        HopGroups("object_store")


def test_a_direct_hop_is_the_tensor_itself_contiguous_detached_on_the_backends_device():
    x = torch.randn(4, 6, requires_grad=True)
    sent = outgoing(x.t(), "gloo")
    assert sent.is_contiguous() and not sent.requires_grad and torch.equal(sent, x.t())
    same = torch.randn(3, 5)
    assert outgoing(same, "gloo").data_ptr() == same.data_ptr()  # on the CPU: no copy
    with pytest.raises(ValueError, match="nccl sends CUDA tensors"):
        outgoing(same, "nccl")


def _pipeline(tmp_path, transport: str) -> list[StageHolder]:
    return [StageHolder(HolderSpec(replica=0, stage=s, ranges=[(0, 1), (1, 2)], model=CFG, vocab_size=64,
                                   diloco=DilocoConfig(), seed=0, key_path=str(tmp_path / f"{transport}{s}.pem"),
                                   seq_len=8, microbatch_size=2, hop_transport=transport)) for s in range(2)]


def test_direct_hops_give_the_object_store_paths_losses_and_gradients_and_keep_the_checks(tmp_path):
    """In process, the calls Ray would make: a holder under gloo sends plain tensors, the last holder's
    one-return call keeps the loss for take_loss, and the result is the object-store path's bit for bit. A
    NaN activation is refused by the receiver's checks, and take_loss then re-raises the rejection."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g)) for _ in range(3)]
    ref_driver, ref_validator = _pipeline(tmp_path, "object_store")
    driver, validator = _pipeline(tmp_path, "gloo")
    ref_losses, losses = [], []
    for mb, (x, y) in enumerate(batches):
        loss, grad = ref_validator.forward_backward(mb, ref_driver.forward(mb, x), y, 1 / 3)
        ref_driver.backward(mb, grad)
        ref_losses.append(loss)
        act = driver.forward(mb, x)
        assert isinstance(act, torch.Tensor)  # not a WireTensor: Ray sends the tensor over the group
        grad = validator.forward_backward_direct(mb, act, y, 1 / 3)
        assert isinstance(grad, torch.Tensor) and grad.shape == act.shape
        losses.append(validator.take_loss(mb))
        assert driver.backward(mb, grad) is None
    assert losses == ref_losses
    for ref, got in ((ref_driver, driver), (ref_validator, validator)):
        want = ref.grads()
        assert got.grads().keys() == want.keys()
        for name, g_ref in want.items():
            assert torch.equal(got.grads()[name], g_ref), name
    assert validator.compute.hop_counts["received"] == 3 and driver.compute.hop_counts["fwd_bytes"] == 3 * 2 * 8 * 32 * 4
    x, y = batches[0]
    act = driver.forward(3, x)
    with pytest.raises(HopRejected, match="rejected the activation of microbatch 3: finite"):
        validator.forward_backward_direct(3, act * float("nan"), y, 1.0)
    with pytest.raises(HopRejected, match="finite"):
        validator.take_loss(3)
    with pytest.raises(RuntimeError, match="no loss for microbatch 9"):
        validator.take_loss(9)
