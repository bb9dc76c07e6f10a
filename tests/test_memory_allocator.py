"""The planner's memory terms that depend on how memory is allocated and on the schedule, against direct
measurement of this process's resident set (Linux ``/proc``) and against the schedule's own orders.

docs/memory.md explains the terms: safetensors' two copies of a snapshot's file, the outer step's whole-range
buffers leaving the resident set above glibc's mmap threshold, and 1F1B's graphs kept per holder.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.planner.memory import (
    MMAP_THRESHOLD_MAX,
    OUTER_STEP_BYTES_PER_PARAM,
    SNAPSHOT_SERIALIZE_BYTES_PER_PARAM,
    Batch,
    holder_memory,
    kept_activation_bytes,
    outer_resident_bytes,
    whole_range_mapped,
)
from neuroray.training.schedule import peak_kept, stage_orders

STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
needs_proc = pytest.mark.skipif(not STATUS.exists() or not os.access(CLEAR_REFS, os.W_OK),
                                reason="needs Linux /proc/self/status and a writable /proc/self/clear_refs")


def _mem() -> dict[str, int]:
    text = STATUS.read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> int:
    """Set VmHWM to the current VmRSS (clear_refs 5) and return it."""
    CLEAR_REFS.write_text("5")
    return _mem()["VmRSS"]


@needs_proc
def test_snapshot_serialization_holds_two_copies_of_the_file():
    """The snapshot's serializer (neuroray.artifacts.tensor_bytes, safetensors) peaks at 2 x the file: it fills
    a buffer of its own, then copies it into the bytes it returns. The model counts 32 B / param for it."""
    from neuroray.artifacts import tensor_bytes

    params = 4_000_000  # 16 B each, the snapshot's copies: weights, two AdamW moments, theta0 (64 MB)
    tensors = {k: torch.randn(params) for k in ("weights", "exp_avg", "exp_avg_sq", "theta0")}
    before = _reset_peak()
    data = tensor_bytes(tensors)
    rise = _mem()["VmHWM"] - before
    assert len(data) >= 16 * params
    assert abs(rise / (SNAPSHOT_SERIALIZE_BYTES_PER_PARAM * params) - 1) < 0.1, rise


@needs_proc
def test_outer_step_buffers_leave_the_resident_set_above_the_mmap_threshold(tmp_path):
    """A real holder's outer step (pseudo-gradient out, a new theta0 in) on a range whose float32 vector is above
    glibc's largest mmap threshold: its buffers were there (the peak rose by more than one vector) and are gone
    from the resident set afterwards, which is why the model leaves them out of a snapshotting holder's peak."""
    from neuroray.swarm.holder import StageHolder
    from neuroray.swarm.spec import HolderSpec

    cfg = ModelConfig(d_model=512, n_layers=2, n_heads=8, n_kv_heads=2, max_seq_len=16)
    spec = HolderSpec(replica=0, stage=0, ranges=[(0, 2)], model=cfg, vocab_size=4096, diloco=DilocoConfig(),
                      seed=0, key_path=str(tmp_path / "k.pem"))
    holder = StageHolder(spec)
    params = holder.theta0.numel()
    assert whole_range_mapped(params) and 4 * params >= MMAP_THRESHOLD_MAX

    def outer_step(theta0):
        with torch.no_grad():
            for p in holder.module.parameters():
                p.add_(0.01)  # something learned, so theta0 - theta is not zero
        payload = holder.pseudo_gradient()
        holder.load_theta0(theta0)
        del payload

    # The first outer step also frees the parameters' first storages (the weights become views of one
    # whole-range vector, vector_to_parameters): measure the second, as every later round.
    outer_step(holder.theta0 - 0.001)
    new_theta0 = holder.theta0 - 0.001
    before = _reset_peak()
    outer_step(new_theta0)
    after = _mem()
    assert after["VmHWM"] - before > 4 * params  # the buffers were really resident for a while
    assert after["VmRSS"] - before < 0.1 * OUTER_STEP_BYTES_PER_PARAM * params
    assert outer_resident_bytes(params, snapshots=True) == 0
    assert outer_resident_bytes(params, snapshots=False) == OUTER_STEP_BYTES_PER_PARAM * params


def test_outer_and_snapshot_terms_follow_the_threshold():
    """Below the threshold (model=small's holders) the outer step's heap buffers stay on top of the
    snapshot; above it (d_model 512) the snapshot counts theta0's copy as a fresh mapping instead."""
    batch = Batch(4, 128, 4)
    small = ModelConfig(d_model=384, n_layers=8, n_heads=6, n_kv_heads=2, max_seq_len=512)  # model=small
    wide = replace(small, d_model=512, n_heads=8, n_kv_heads=2)
    for cfg, mapped in ((small, False), (wide, True)):
        mem = holder_memory(cfg, 4096, 4, has_embedding=True, has_head=False, batch=batch, overhead=0)
        assert whole_range_mapped(mem.params) is mapped
        freed = mem.activations + mem.working + mem.outer
        heap_copies = (12 if mapped else 16) * mem.params
        assert mem.outer == (0 if mapped else 12 * mem.params)
        assert mem.snapshot == max(0, heap_copies - freed) + (4 * mem.params if mapped else 0) + 32 * mem.params
        quiet = holder_memory(cfg, 4096, 4, has_embedding=True, has_head=False, batch=batch, overhead=0,
                              snapshots=False)
        assert quiet.snapshot == 0 and quiet.outer == 12 * mem.params


@pytest.mark.parametrize("stages, m", [(2, 4), (4, 2), (4, 8), (3, 1)])
def test_graphs_kept_follow_the_schedule(stages, m):
    """Each holder's kept activations are the per-microbatch graph times the most graphs its order in
    neuroray.training.schedule keeps (1f1b: min(m, S - s); gpipe: m; the fused last holder: 1)."""
    cfg = ModelConfig(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=16)
    for schedule in ("gpipe", "1f1b"):
        batch = Batch(2, 16, m, schedule=schedule)
        one = kept_activation_bytes(cfg, 300, 2, has_head=False, batch=replace(batch, num_microbatches=1))
        for s, order in enumerate(stage_orders(schedule, stages, m)):
            last = s == stages - 1
            kept = kept_activation_bytes(cfg, 300, 2, has_head=last, batch=batch, stage=s, stages=stages)
            graphs = 1 if last else peak_kept(order)
            assert graphs == batch.graphs_kept(last, s, stages)
            if not last:
                assert kept == graphs * one
                assert graphs == (min(m, stages - s) if schedule == "1f1b" else m)
    # the partition's search (no stage index yet) counts GPipe's m, an upper bound for 1f1b
    assert Batch(2, 16, m, schedule="1f1b").graphs_kept(False) == m


def test_planner_request_carries_the_schedule():
    """swarm.schedule reaches the planner's Batch for a fixed pipeline; a routed swarm keeps a whole step."""
    from neuroray.configure import load_config
    from neuroray.planner.cluster import request_from_config

    def schedule(*overrides):
        return request_from_config(load_config(["model=tiny", *overrides])).batch.schedule

    assert schedule("swarm.schedule=1f1b") == "1f1b"
    assert schedule() == "gpipe"
    assert schedule("swarm.schedule=1f1b", "swarm.routing=router") == "gpipe"
