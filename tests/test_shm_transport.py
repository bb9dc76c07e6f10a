"""Shared-memory hops (swarm.hop_transport=shm, neuroray/swarm/shm_transport.py) without Ray: a ring's slots are
never handed out while a view of them lives, a full ring or an oversized tensor falls back, stale handles are
refused, files are unlinked; and two holders in one process give the object-store path's gradients bit for bit
with the hop checks running on what arrives."""

from __future__ import annotations

import gc
import glob
import os
import uuid
from dataclasses import replace

import pytest
import torch

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.config_checks import validate
from neuroray.configure import load_config
from neuroray.errors import ConfigError, HopPayloadError
from neuroray.swarm.holder import HolderSpec, StageHolder
from neuroray.swarm.hop_guard import HopRejected
from neuroray.swarm.shm_transport import SHM_DIR, ShmHop, ShmReader, ShmRing, ShmRings, sweep

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=16)


def _files(run: str) -> list[str]:
    return glob.glob(os.path.join(SHM_DIR, f"nrshm-{run}-*"))


@pytest.fixture
def run():
    """A run id whose ring files are swept afterwards, whatever the test did (a failed assert leaves none)."""
    name = uuid.uuid4().hex[:12]
    yield name
    sweep(name)


def test_a_slot_is_reused_only_after_the_receivers_last_view_goes_and_a_full_ring_falls_back(run):
    rings, reader = ShmRings(), ShmReader()
    rings.open(run, 0, 0, ["fwd"], slots=2, slot_bytes=4 * 64)
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    ha, hb = rings.put(a, "fwd", "s0"), rings.put(b, "fwd", "s0")
    assert isinstance(ha, ShmHop) and ha.slot != hb.slot and ha.nbytes == 256
    assert rings.put(a, "fwd", "s0") is None  # both slots in use: the caller sends through the object store
    assert rings.put(torch.randn(65), "fwd", "s0") is None  # bigger than a slot
    assert rings.put(torch.zeros(4, dtype=torch.int64), "fwd", "s0") is None  # not a dtype a hop carries
    xa = reader.take(ha, "s1")
    assert torch.equal(xa, a)
    view = xa.detach()[2:]  # a view of the storage keeps the slot, though xa itself goes
    del xa
    gc.collect()
    assert rings.put(a, "fwd", "s0") is None
    with pytest.raises(HopPayloadError, match="no longer holds"):
        reader.take(ShmHop(ha.ring, ha.slot, ha.offset, ha.shape, ha.dtype, ha.seq + 7, "s0"), "s1")
    for bad in [replace(hb, shape=(-1,)), replace(hb, shape=(-1, 64)), replace(hb, dtype="int64"),
                replace(hb, shape=(4096,))]:  # a forged shape would read the rest of the ring, or past its end
        with pytest.raises(HopPayloadError, match="shape|dtype|overruns"):
            reader.take(bad, "s1")
    del view
    hc = rings.put(2 * a, "fwd", "s0")  # slot a is free again
    xc = reader.take(hc, "s1")
    assert hc.slot == ha.slot and torch.equal(xc, 2 * a)
    assert rings.stats()["fwd"]["fallbacks"] == 4 and rings.stats()["fwd"]["sent"] == 3
    bf = torch.randn(3, 5).to(torch.bfloat16)
    assert rings.put(bf, "fwd", "s0") is None  # slot b was never read: the sender cannot tell it from one in use
    del xc
    hbf = rings.put(bf, "fwd", "s0")
    assert hbf.slot == ha.slot and torch.equal(reader.take(hbf, "s1"), bf)  # bf16 bits as they were
    rings.close()
    assert _files(run) == []


def test_rings_are_remade_under_new_names_the_old_unlinked_and_sweep_clears_a_run(run):
    rings = ShmRings()
    first = rings.open(run, 1, 1, ["fwd", "bwd"], slots=1, slot_bytes=100)
    assert sorted(os.path.basename(p) for p in _files(run)) == sorted(first)
    h = rings.put(torch.ones(5), "bwd", "s1")
    old = ShmReader().take(h, "s0")  # a receiver still viewing the old ring when it is remade
    second = rings.open(run, 1, 1, ["fwd"], slots=1, slot_bytes=100)
    assert set(first).isdisjoint(second) and [os.path.basename(p) for p in _files(run)] == second
    assert torch.equal(old, torch.ones(5))  # the unlinked file's pages live as long as the mapping
    with pytest.raises(HopPayloadError, match="not on this node"):
        ShmReader().take(h, "s0")
    h = rings.put(torch.ones(1100), "fwd", "s1")
    assert h is None and [os.path.basename(p) for p in _files(run)] == second  # grown: 4400 bytes > one page
    third = rings.reopen(4400)  # what StageHolder.grow does
    assert len(third) == 1 and third != second and isinstance(rings.put(torch.ones(1100), "fwd", "s1"), ShmHop)
    leftover = ShmRing(f"nrshm-{run}-r9-s0-fwd-1-1", 1, 10)  # as if its holder died without closing
    assert len(_files(run)) == 2
    assert sweep(run) == 2 and _files(run) == []
    del leftover


def test_the_config_takes_shm_for_fixed_pipelines_only():
    cfg = load_config(["swarm.hop_transport=shm"])
    validate(cfg)
    for swarm, words in [(dict(routing="router"), "needs swarm.routing=fixed"),
                         (dict(hop_compression="int8"), "set swarm.hop_compression=none"),
                         (dict(hop_shm_slots=-1), "hop_shm_slots=-1 must be >= 0")]:
        with pytest.raises(ConfigError, match=words):
            validate(replace(cfg, swarm=replace(cfg.swarm, **swarm)))


def _pipeline(tmp_path, transport: str) -> list[StageHolder]:
    return [StageHolder(HolderSpec(replica=0, stage=s, ranges=[(0, 1), (1, 2)], model=CFG, vocab_size=64,
                                   diloco=DilocoConfig(), seed=0, key_path=str(tmp_path / f"{transport}{s}.pem"),
                                   seq_len=8, microbatch_size=2, hop_transport=transport, hop_record=True))
            for s in range(2)]


def test_shm_hops_give_the_object_store_paths_gradients_bit_for_bit_and_keep_the_checks(tmp_path, run):
    """In process, the calls Ray would make: activations and gradients cross as handles to slots, the losses and
    gradients equal the object-store path's exactly; every slot is free after the step; a NaN activation in a
    slot is refused by the receiver's checks (check finite), a handle read twice as a payload error."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g)) for _ in range(3)]
    ref_driver, ref_validator = _pipeline(tmp_path, "object_store")
    driver, validator = _pipeline(tmp_path, "shm")
    assert driver.open_hop_rings(run, ["fwd"], 4) and validator.open_hop_rings(run, ["bwd"], 4)
    acts, ref_losses, losses = [], [], []
    for mb, (x, _) in enumerate(batches):  # GPipe: every forward first, so every slot is held at once
        ref_losses.append(ref_driver.forward(mb, x))
        acts.append(driver.forward(mb, x))
    assert all(isinstance(a, ShmHop) for a in acts) and driver.hop_rings()["fwd"]["in_use"] == 3
    grads = []
    for mb, (_, y) in enumerate(batches):
        loss, grad = ref_validator.forward_backward(mb, ref_losses[mb], y, 1 / 3)
        ref_losses[mb] = (loss, grad)
        loss, grad = validator.forward_backward(mb, acts[mb], y, 1 / 3)
        assert isinstance(grad, ShmHop)
        losses.append(loss)
        grads.append(grad)
    for mb in range(3):
        ref_driver.backward(mb, ref_losses[mb][1])
        assert driver.backward(mb, grads[mb]) is None
    assert losses == [r[0] for r in ref_losses]
    for ref, got in ((ref_driver, driver), (ref_validator, validator)):
        want = ref.grads()
        assert got.grads().keys() == want.keys()
        for name, g_ref in want.items():
            assert torch.equal(got.grads()[name], g_ref), name
    for ref, got in ((ref_driver, driver), (ref_validator, validator)):  # hop rechecks' records: the same bytes
        want, have = ref.take_hop_record(), got.take_hop_record()
        assert len(want["sent"]) == 3 and have["sent"] == want["sent"]  # digests of what each sent
        assert have["received"].keys() == want["received"].keys()
        for mb, parts in want["received"].items():
            for k, v in parts.items():
                same = torch.equal if isinstance(v, torch.Tensor) else (lambda a, b: a == b)
                assert same(have["received"][mb][k], v), (mb, k)
    gc.collect()
    assert driver.hop_rings()["fwd"]["in_use"] == 0 and validator.hop_rings()["bwd"]["in_use"] == 0
    sent, received = driver.compute.hop_counts["fwd_bytes"], validator.compute.hop_counts["received_bytes"]
    assert sent == 3 * 2 * 8 * 32 * 4 == received
    assert driver.step() > 0 and validator.step() > 0

    x, y = batches[0]
    bad = driver.compute.rings.put(torch.full((2, 8, 32), float("nan")), "fwd", driver.name)
    with pytest.raises(HopRejected, match="rejected the activation of microbatch 5: finite"):
        validator.forward_backward(5, bad, y, 1.0)
    act = driver.forward(6, x)
    validator.forward_backward(6, act, y, 1.0)
    with pytest.raises(HopRejected, match="payload: slot .* no longer holds"):
        validator.forward_backward(7, act, y, 1.0)
    driver.close_hop_rings()
    validator.close_hop_rings()
    assert _files(run) == []
