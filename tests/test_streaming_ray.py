"""Streaming DiLoCo through the real training path on Ray: 2 replicas x 2 stages of 2 layers, F=2 fragments.

A streaming run syncs twice as often, each time about half of every range: the peak bytes of one sync
fall by about F while the bytes per H stay those of the unstreamed run; every holder's proof of every
sync is credited; and a job resumed from a snapshot taken between two fragments' syncs (mid-H, int8 with
error feedback, centered clipping and stale replays) continues exactly as the uninterrupted run.
"""

import math

import pytest
import torch

from neuroray.diloco.lr import inner_lr_at
from neuroray.training.plots import metric_rows
from tests.test_recovery_ray import _cfg

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
STREAM = ["model.n_layers=4", "diloco.streaming_fragments=2"]


# slow: ~30 s on a quiet machine; make test measured 14:01-14:08 of its 15 minutes on a clean clone (2026-12-07);
# tests/test_streaming.py keeps the fragments, their bytes and their order in make test
@pytest.mark.slow
def test_streaming_run_trains_counts_bytes_and_credits_every_sync(ray_cluster, tmp_path):
    from neuroray.training.run import run

    quiet = lambda *a, **k: None  # noqa: E731
    # the unstreamed run also checks the cosine inner lr reaches metrics.jsonl, step by step
    plain = run(_cfg(tmp_path, "plain", 2, "model.n_layers=4", "diloco.lr_schedule=cosine", "diloco.warmup_steps=2"),
                log=quiet)
    lrs = [r["lr"] for r in metric_rows(plain.run_dir / "metrics.jsonl")[0]]
    top = lrs[1]  # diloco.inner_lr, after the warmup
    assert lrs == pytest.approx([inner_lr_at(s, 8, top, "cosine", 2, 0.1) for s in range(8)])
    assert lrs[0] == pytest.approx(top / 2) and lrs[-1] == pytest.approx(top / 10)
    lines = []
    streamed = run(_cfg(tmp_path, "stream", 2, *STREAM), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert len(streamed.losses) == 8 and all(math.isfinite(v) for v in streamed.losses)
    assert sum(streamed.losses[-2:]) < sum(streamed.losses[:2])
    # H=4, F=2: a fragment's outer step after inner steps 2, 4, 6, 8 instead of a whole one after 4 and 8
    assert [c["round"] for c in streamed.comm] == [1, 2, 3, 4] and len(plain.comm) == 2
    whole = plain.comm[0]["sync_bytes"]
    peak = max(c["sync_bytes"] for c in streamed.comm)
    assert 0.4 * whole < peak < 0.65 * whole, (peak, whole)  # about half: the fragments are about equal
    # the same values cross per H, in twice as many payloads (a little more pickle framing)
    assert streamed.sync_bytes == pytest.approx(plain.sync_bytes, rel=0.01)
    for c in streamed.comm:
        assert c["payload_bytes"] == pytest.approx(c["broadcast_bytes"], rel=0.01)
    # every holder's proof of every sync is verified and credited
    ledger = streamed.ledger
    assert ledger["supply_consistent"] and ledger["proofs_rejected"] == 0
    assert ledger["proofs_credited"] == 4 * 2 * 2  # syncs x replicas x stages
    assert any(line.startswith("ledger: round 4: 4/4 proofs credited") for line in lines)


# slow: ~45 s on a quiet 2-core machine; resuming mid-H is covered in make test by test_recovery_ray's resume tests
@pytest.mark.slow
def test_streaming_int8_resume_mid_h_continues_identically(ray_cluster, tmp_path):
    from safetensors.torch import load_file

    from neuroray.training.run import run

    quiet = lambda *a, **k: None  # noqa: E731
    # with the rule's memory in play too: centered clipping's centre and the stale replays, per fragment slice
    extra = [*STREAM, "diloco.compression=int8", "diloco.compression_block=64", "aggregator=centered_clip",
             "aggregator.f=0", "aggregator.tau=1", "attack=stale", "attack.fraction=0.5", "ponw.enabled=false"]
    full = run(_cfg(tmp_path, "full", 3, *extra), log=quiet)
    run(_cfg(tmp_path, "split", 2, *extra), log=quiet)  # "killed" after step 8 ...
    part = tmp_path / "split" / "snapshots" / "r1-s1" / "step-00000008" / "tensors.safetensors"
    part.write_bytes(part.read_bytes()[:-7])  # ... with its last snapshot set torn: resume from step 6
    resumed = run(_cfg(tmp_path, "split", 3, "resume=true", *extra), log=quiet)
    # step 6 is fragment 1's sync: fragment 0 resumes with 2 steps of local progress and its residuals
    assert resumed.start_step == 6 and resumed.losses == full.losses[6:]
    # the same fragments cross (pickle framing varies by a few bytes with the tensors' storage keys)
    assert [c["sync_bytes"] for c in resumed.comm] == pytest.approx([c["sync_bytes"] for c in full.comm[3:]], abs=64)
    want, got = (load_file(str(r.checkpoint / "model.safetensors")) for r in (full, resumed))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
