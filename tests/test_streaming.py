"""Streaming DiLoCo (diloco.streaming_fragments=F): the schedule, the fragments, one fragment's outer step
through the real task and holders (with compression and error feedback), and training runs on Ray:
bytes per sync and per H, proofs credited, and an exact resume from a snapshot taken mid-H."""

import pytest
import torch

from neuroray.config import AggregatorConfig, DilocoConfig, ModelConfig
from neuroray.configure import load_config
from neuroray.diloco.compress import decode
from neuroray.diloco.streaming import due_fragment, fragment_slices
from neuroray.diloco.sync import OuterMemory, outer_step_task, wire_bytes
from neuroray.errors import ConfigError
from neuroray.model import build_stage
from tests.test_diloco_comm import _holder, _train


def test_fragments_sync_at_staggered_steps():
    """Fragment i syncs after inner step t exactly when (t - i*H/F) % H == 0: one fragment every H/F."""
    H, F = 12, 3
    for t in range(1, 100):
        due = [i for i in range(F) if (t - i * H // F) % H == 0]
        assert due_fragment(t, H, F) == (due[0] if due else None), t
    assert [t for t in range(1, 25) if due_fragment(t, 12, 1) is not None] == [12, 24]  # F=1: plain DiLoCo
    syncs = [due_fragment(t, 50, 2) for t in range(1, 301)]
    assert [t + 1 for t, f in enumerate(syncs) if f == 1] == [25, 75, 125, 175, 225, 275]  # each fragment once per H
    assert [t + 1 for t, f in enumerate(syncs) if f == 0] == [50, 100, 150, 200, 250, 300]


def _model(n_layers=4):
    return ModelConfig(d_model=32, n_layers=n_layers, n_heads=2, n_kv_heads=2, max_seq_len=16)


def test_fragments_are_contiguous_groups_of_layers():
    cfg = _model(4)
    whole = build_stage(cfg, 64, 0, [(0, 4)], seed=0)
    params = [(n, p.numel()) for n, p in whole.named_parameters()]
    total = sum(n for _, n in params)
    slices = fragment_slices(params, (0, 4), 2)
    assert slices[0][0] == 0 and slices[0][1] == slices[1][0] and slices[1][1] == total
    offsets, at = {}, 0
    for name, n in params:
        offsets[name], at = at, at + n
    # embedding and layers 0-1 in the first fragment; layers 2-3, the final norm and the head in the second
    assert offsets[next(n for n in offsets if n.startswith("layers.2."))] == slices[1][0]
    assert all(offsets[n] < slices[0][1] for n in offsets if n.startswith(("embed.", "layers.0.", "layers.1.")))
    # a middle range of a 3-stage split: 2 layers, 2 fragments of one layer each
    mid = build_stage(_model(6), 64, 1, [(0, 2), (2, 4), (4, 6)], seed=0)
    two = fragment_slices([(n, p.numel()) for n, p in mid.named_parameters()], (2, 4), 2)
    assert two[0][1] - two[0][0] == two[1][1] - two[1][0]
    with pytest.raises(ValueError, match="streaming_fragments=3 exceeds the 2 layers of range 2-3"):
        fragment_slices([(n, p.numel()) for n, p in mid.named_parameters()], (2, 4), 3)


@pytest.mark.parametrize("overrides, message", [
    (["diloco.streaming_fragments=0"], "streaming_fragments=0 must be >= 1"),
    (["diloco.streaming_fragments=4", "diloco.inner_steps=2"], "streaming_fragments=4 exceeds diloco.inner_steps=2"),
    (["diloco.streaming_fragments=3", "diloco.inner_steps=10"], "inner_steps=10 is not a multiple of diloco.stream"),
    (["diloco.streaming_fragments=2", "model=tiny", "swarm.num_stages=4"], "exceeds the 1 layers of the smallest"),
    (["diloco.streaming_fragments=2", "swarm=router"], "needs swarm.routing=fixed"),
])
def test_config_rejects_bad_streaming(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


def test_config_accepts_streaming():
    assert load_config(["diloco.streaming_fragments=2", "diloco.inner_steps=10"]).diloco.streaming_fragments == 2


@pytest.mark.parametrize("mode", ["none", "int8"])
def test_a_fragment_outer_step_touches_only_its_slice(tmp_path, mode):
    """Two holders, fragments 1, 0, 1 through the task's function: payloads and updates hold one slice,
    theta0 and momentum change only there, holders restart only that slice from theta0 (bit for bit) and
    keep training the other; error feedback covers exactly the slice sent."""
    dl = DilocoConfig(compression=mode, compression_block=64, streaming_fragments=2, inner_steps=4)
    holders = [_holder(tmp_path, r, dl, layers=4) for r in range(2)]
    slices = holders[0].fragment_slices()
    g = torch.Generator().manual_seed(0)
    theta0, momentum = holders[0].flat_params(), None
    for rnd, frag in enumerate([1, 0, 1]):
        lo, hi = slices[frag]
        for h in holders:
            _train(h, g)
        before = [h.flat_params() for h in holders]
        residuals = [h.feedback.residual for h in holders]
        payloads = [h.pseudo_gradient(fragment=frag) for h in holders]
        for p, r0, h in zip(payloads, residuals, holders):
            assert decode(p).numel() == hi - lo
            assert wire_bytes(p) < {"none": 4, "int8": 1.1}[mode] * (hi - lo) + 1500  # only the slice crosses
            if mode == "int8":  # the residual moved only inside the slice
                old = torch.zeros(theta0.numel()) if r0 is None else r0
                keep = torch.ones(theta0.numel(), dtype=torch.bool)
                keep[lo:hi] = False
                assert torch.equal(h.feedback.residual[keep], old[keep])
                assert h.feedback.residual[lo:hi].abs().sum() > 0
        # memory box [None]: in-process there is no object ref to read the broadcast residual from
        new, momentum, report, _, update = outer_step_task._function(
            AggregatorConfig("mean"), None, dl, 0, rnd, 0, theta0, momentum, [None], *payloads, part=(lo, hi))
        assert report.accepted == [0, 1] and update["slice"] == (lo, hi)
        assert report.update_bytes < {"none": 4, "int8": 1.1}[mode] * (hi - lo) + 1500
        assert torch.equal(new[:lo], theta0[:lo]) and torch.equal(new[hi:], theta0[hi:])
        assert not torch.equal(new[lo:hi], theta0[lo:hi])
        assert momentum.numel() == theta0.numel() and momentum[lo:hi].abs().sum() > 0
        if rnd == 0:  # fragment 0 has had no outer step yet: its momentum is still zero
            assert momentum[:lo].abs().sum() == 0
        for h, w in zip(holders, before):
            assert h.apply_update(update, [new]) is False
            assert torch.equal(h.theta0, new)  # what the task holds, bit for bit
            now = h.flat_params()
            assert torch.equal(now[lo:hi], new[lo:hi]) and torch.equal(now[:lo], w[:lo]) and torch.equal(now[hi:], w[hi:])
        theta0 = new
    assert holders[0].outer_rounds == 3
    # the final checkpoint is theta0 (the model every holder agrees on), not one holder's unsynced fragment
    live = holders[0].flat_params()
    assert not torch.equal(live, theta0)
    at_theta0 = holders[0].state_dict(at_theta0=True)
    names = [n for n, _ in holders[0].module.named_parameters()]
    assert torch.equal(torch.cat([at_theta0[n].reshape(-1) for n in names]), theta0)
    assert torch.equal(holders[0].flat_params(), live)  # the live weights are left as they were
    assert torch.equal(torch.cat([holders[0].state_dict()[n].reshape(-1) for n in names]), live)


def test_fragment_memory_keeps_full_size_vectors():
    full = OuterMemory(None, [], None)
    part = OuterMemory(torch.ones(3), [torch.full((3,), 2.0)], torch.full((3,), 5.0))
    merged = full.merged(part, 2, 5, 8)
    assert merged.previous[2:5].tolist() == [1, 1, 1] and merged.previous[:2].isnan().all()  # no centre yet: NaN
    assert merged.replay[0].tolist() == [0, 0, 2, 2, 2, 0, 0, 0] and merged.residual[5:].abs().sum() == 0
    back = merged.part(2, 5)
    assert torch.equal(back.previous, part.previous) and torch.equal(back.residual, part.residual)
    assert merged.part(0, 2).previous.isnan().all()  # screening rejects it: that fragment starts without a centre


def test_one_replica_with_outer_lr_1_streams_to_plain_training(tmp_path):
    """M=1, outer lr 1 without momentum: every fragment's outer step sets theta0 to the holder's own weights,
    so a streaming holder must train exactly like one that never syncs (up to float32 rounding of
    theta0 - (theta0 - theta)): nothing of the other fragments' progress may be lost or reset at a sync."""
    dl = DilocoConfig(outer_lr=1.0, outer_momentum=0.0, nesterov=False, streaming_fragments=2, inner_steps=4)
    streamed, plain = _holder(tmp_path, 0, dl, layers=4), _holder(tmp_path, 1, dl, layers=4)
    slices, theta0, momentum = streamed.fragment_slices(), streamed.flat_params(), None
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in range(1, 13):
        _train(streamed, g1, steps=1)
        _train(plain, g2, steps=1)
        frag = due_fragment(t, 4, 2)
        if frag is not None:
            theta0, momentum, _, _, update = outer_step_task._function(
                AggregatorConfig("mean"), None, dl, 0, t, 0, theta0, momentum, [None],
                streamed.pseudo_gradient(fragment=frag), part=slices[frag])
            streamed.apply_update(update, [theta0])
        torch.testing.assert_close(streamed.flat_params(), plain.flat_params(), rtol=0, atol=1e-5)
