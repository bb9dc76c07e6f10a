"""No work only to measure on the hot path: a range is hashed once per round per party, the holder's hashes run
off its compute thread, and the bytes counted for what crosses come from sizes already known, matching the
pickled size of the real payloads without pickling their data."""

import pickle
import threading

import pytest
import torch

import neuroray.digest
import neuroray.diloco.compress
import neuroray.ponw.service
from neuroray.config import AggregatorConfig, DilocoConfig, ModelConfig
from neuroray.diloco.compress import encode, encode_update
from neuroray.diloco.sync import OuterReport, outer_step_task, wire_bytes
from neuroray.swarm.holder import HolderSpec, StageHolder

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16)


def _holder(tmp_path, replica, diloco):
    spec = HolderSpec(replica=replica, stage=0, ranges=[(0, 2)], model=CFG, vocab_size=64, diloco=diloco, seed=0,
                      key_path=str(tmp_path / f"k{replica}.pem"), tokens_per_batch=16)
    return StageHolder(spec)


@pytest.fixture
def hashes(monkeypatch):
    """Every call of the real tensor_digest, wherever it is bound: (tensor size, thread name)."""
    calls, real = [], neuroray.digest.tensor_digest

    def counted(t):
        calls.append((t.numel(), threading.current_thread().name))
        return real(t)

    for module in (neuroray.digest, neuroray.ponw.service, neuroray.diloco.compress):
        monkeypatch.setattr(module, "tensor_digest", counted)
    return calls


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_a_range_is_hashed_once_per_round_and_off_the_compute_thread(tmp_path, hashes, compression):
    """Two holders with proofs on, three rounds through the outer step's function and back (dense theta0
    under none, the compressed update checked against its base under int8): each holder hashes its theta0
    once and its delta once per round, all on its digest thread; the outer step hashes theta0 before and
    after once each and each delta once (none) or never (int8: receipts carry no digest then)."""
    diloco = DilocoConfig(compression=compression, compression_block=64)
    holders = [_holder(tmp_path, r, diloco) for r in range(2)]
    numel = holders[0].flat_params().numel()
    theta0, momentum = holders[0].flat_params(), None
    g = torch.Generator().manual_seed(0)
    hashes.clear()  # the first round's start, hashed when the holders were made
    for rnd in range(3):
        for h in holders:
            x = torch.randint(0, 64, (2, 8), generator=g)
            h.forward_backward(0, x, torch.roll(x, -1, 1), 1.0)
            h.step()
        payloads = [h.pseudo_gradient() for h in holders]
        theta0, momentum, report, _, update = outer_step_task._function(
            AggregatorConfig("mean"), None, diloco, 0, rnd, 0, theta0, momentum, [None], *payloads)
        for h in holders:
            if update is None:
                h.load_theta0(theta0)
            else:
                assert h.apply_update(update, [theta0]) is False  # the base matched: no dense fallback
            assert h.take_proof() is not None  # signed: every hash it commits to is done
        # the holders hash only on their digest threads; the outer step (in-process here) on this one
        holder_side = [name for n, name in hashes if name != "MainThread"]
        assert sorted(holder_side) == sorted(f"digest-{h.name}_0" for h in holders for _ in range(2)), hashes
        task = [n for n, name in hashes if name == "MainThread"]
        assert task == [numel] * (2 + (len(holders) if compression == "none" else 0)), hashes
        assert report.theta0_after == neuroray.digest.tensor_digest(holders[0].theta0)
        hashes.clear()


def _payloads():
    x = torch.randn(10_000)
    update, applied, _ = encode_update(x, x - 0.01 * torch.randn(10_000), "int8", 64, None)
    return {mode: encode(x, mode, 64) for mode in ("none", "fp16", "int8", "sparse")} | {
        "update": update, "theta0": applied, "report": OuterReport(0, accepted=[0, 1], payload_bytes=[1, 2])}


def test_counted_bytes_equal_the_pickled_size_of_the_real_payloads(monkeypatch):
    """wire_bytes counts what pickle (protocol 5, as Ray) produces for each payload, an update, a dense theta0
    and a report, within the framing pickle adds per tensor, and never serializes a tensor to do it."""
    objects = _payloads()
    pickled = {k: len(pickle.dumps(v, protocol=5)) for k, v in objects.items()}
    reduced, real = [], torch.Tensor.__reduce_ex__

    def spy(self, proto):
        reduced.append(self.numel())
        return real(self, proto)

    monkeypatch.setattr(torch.Tensor, "__reduce_ex__", spy)
    assert len(pickle.dumps(torch.ones(3), protocol=5)) > 0 and reduced == [3]  # the spy sees a real pickle
    reduced.clear()
    counted = {k: wire_bytes(v) for k, v in objects.items()}
    assert reduced == []  # counted from sizes: no tensor was serialized
    for k, v in objects.items():
        tensors = 1 if isinstance(v, torch.Tensor) else sum(
            isinstance(t, torch.Tensor) for t in (v.values() if isinstance(v, dict) else []))
        tensors += sum(isinstance(t, torch.Tensor) for t in v.get("payload", {}).values()) if isinstance(v, dict) else 0
        assert abs(counted[k] - pickled[k]) <= 24 * max(tensors, 1), (k, counted[k], pickled[k])
    assert counted["report"] == pickled["report"]  # no tensor in it: exactly pickle's size
