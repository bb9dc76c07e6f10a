"""Crash recovery on Ray: a killed holder restarts bit-exact from its snapshot; a killed job resumes
with the same loss curve; training survives a holder killed mid-run."""

import math
import time

import pytest
import torch

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.configure import load_config
from neuroray.snapshot import SnapshotStore, tensors_digest
from neuroray.swarm.holder import HolderSpec, holder_actor
from neuroray.training.plots import metric_rows
from tests.test_pipeline_ray import _write_corpus

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def kill_and_wait_restored(ray, h) -> dict | None:
    """Kill ``h`` (Ray restarts it) and return its counters once the restarted actor restored a snapshot."""
    ray.kill(h, no_restart=False)
    counters = None
    for _ in range(600):  # ray.kill is asynchronous: poll until the restarted actor (restore done) answers
        try:
            counters = ray.get(h.counters.remote(), timeout=60)
            if counters["restored_step"] is not None:
                break
        except ray.exceptions.RayActorError:
            pass
        time.sleep(0.1)
    return counters


def test_killed_holder_restores_its_snapshot_bit_for_bit(ray_cluster, tmp_path):
    ray = ray_cluster
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16)
    spec = HolderSpec(replica=0, stage=0, ranges=[(0, 2)], model=cfg, vocab_size=64, diloco=DilocoConfig(inner_lr=1e-2),
                      seed=0, key_path=str(tmp_path / "k.pem"), snapshot_root=str(tmp_path / "snaps"))
    h = holder_actor(spec, num_cpus=0, num_gpus=0, max_restarts=1)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for i in range(3):
        ray.get(h.forward_backward.options(num_returns=2).remote(i, x, torch.roll(x, -1, 1), 1.0)[0])
        ray.get(h.step.remote())
    ray.get(h.snapshot.remote(3))
    ray.get(h.flush_snapshots.remote())
    before = ray.get(h.state_digest.remote())
    ray.get(h.forward_backward.options(num_returns=2).remote(9, x, x, 1.0)[0])
    ray.get(h.step.remote())  # progress after the snapshot is lost by the crash
    assert ray.get(h.state_digest.remote()) != before

    counters = kill_and_wait_restored(ray, h)
    assert counters == {"inner_steps": 3, "outer_rounds": 0, "microbatches": 3, "restored_step": 3}
    stored = SnapshotStore(str(tmp_path / "snaps"), "r0-s0").read(3)
    assert ray.get(h.state_digest.remote()) == tensors_digest(stored.tensors) == before
    ray.kill(h)


def _cfg(tmp_path, run, rounds, *extra):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        _write_corpus(corpus)
    return load_config([
        f"data.source={corpus}", f"data.store={tmp_path / 'store'}", "data.vocab_size=320", "data.shard_tokens=4096",
        "data.seq_len=32", "data.microbatch_size=4", "data.num_microbatches=2", "model.d_model=64", "model.n_layers=2",
        "model.max_seq_len=64",
        f"swarm.key_dir={tmp_path / 'keys'}", "diloco.replicas=2", "diloco.inner_steps=4", "diloco.inner_lr=0.01",
        f"rounds={rounds}", f"run_dir={tmp_path / run}", "cluster.cpus_per_holder=0.25", "sample_tokens=4",
        "checkpoint.every_round=true", "checkpoint.interval_s=0", *extra,
    ])


# slow: two whole runs (about 35 s); resuming is also in the default suite through tests/test_resume_ray.py
@pytest.mark.slow
def test_resumed_job_continues_the_same_loss_curve(ray_cluster, tmp_path):
    from neuroray.training.run import run

    quiet = lambda *a, **k: None  # noqa: E731
    full = run(_cfg(tmp_path, "full", 4), log=quiet)
    first = run(_cfg(tmp_path, "split", 2), log=quiet)  # "killed" after round 2
    assert first.losses == pytest.approx(full.losses[:8], rel=1e-6)
    lines = []
    resumed = run(_cfg(tmp_path, "split", 4, "resume=true"), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert resumed.start_step == 8 and len(resumed.losses) == 8
    assert resumed.losses == pytest.approx(full.losses[8:], rel=1e-5)  # no jump: the very same curve
    assert any("continuing from the snapshot set of step 8" in line for line in lines)
    train, evals = metric_rows(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in train] == list(range(1, 17)) and [r["step"] for r in evals] == [8, 16]


# slow: ~25 s; make test keeps test_resumed_job_continues_the_same_loss_curve (the same resume identity, default rule)
@pytest.mark.slow
def test_resume_with_centered_clip_and_stale_replay_continues_identically(ray_cluster, tmp_path):
    """The outer-step memory (centered clipping's centre, the stale-replay buffer) is snapshotted with
    theta0, so the first outer step after a resume aggregates exactly as the uninterrupted run did."""
    from safetensors.torch import load_file

    from neuroray.training.run import run

    quiet = lambda *a, **k: None  # noqa: E731
    # tau=1 so that clipping bites with two holders (at tau=2 it never does, and the centre would not matter)
    rule = ["aggregator=centered_clip", "aggregator.f=0", "aggregator.tau=1", "attack=stale", "attack.fraction=0.5",
            "ponw.enabled=false"]
    full = run(_cfg(tmp_path, "full", 3, *rule), log=quiet)
    run(_cfg(tmp_path, "split", 2, *rule), log=quiet)  # "killed" after round 2
    resumed = run(_cfg(tmp_path, "split", 3, "resume=true", *rule), log=quiet)
    assert resumed.start_step == 8 and resumed.losses == full.losses[8:]
    want, got = (load_file(str(r.checkpoint / "model.safetensors")) for r in (full, resumed))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)  # round 3's outer step
    assert resumed.eval_loss == full.eval_loss


def test_resume_skips_a_corrupt_newest_snapshot_set(ray_cluster, tmp_path):
    from neuroray.training.run import run

    quiet = lambda *a, **k: None  # noqa: E731
    run(_cfg(tmp_path, "c", 2), log=quiet)
    part = tmp_path / "c" / "snapshots" / "r1-s1" / "step-00000008" / "tensors.safetensors"
    part.write_bytes(part.read_bytes()[:-7])  # torn write of the newest set
    lines = []
    resumed = run(_cfg(tmp_path, "c", 3, "resume=true"), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert resumed.start_step == 4 and len(resumed.losses) == 8
    assert any("step 8 is unusable" in line for line in lines)


def _run_killing(ray, tmp_path, name: str, replica: int, *extra) -> tuple:
    """A 3-round run in which holder ``r<replica>-s1`` is killed (Ray restarts it) at round 2's step 6;
    ``(result, log lines)``."""
    from neuroray.training.run import run

    lines = []

    def log(*a, **k):
        line = " ".join(map(str, a))
        lines.append(line)
        if line.startswith("round 2/3 step 6/12"):
            ray.kill(ray.get_actor(f"neuroray-{name}-r{replica}-s1"), no_restart=False)

    result = run(_cfg(tmp_path, name, 3, "log_every=1", *extra), log=log)
    assert len(result.losses) == 12 and all(math.isfinite(v) for v in result.losses)
    assert result.recoveries[0]["replica"] == replica and result.losses[-1] < result.losses[0]
    return result, lines


def test_training_survives_a_holder_killed_mid_run(ray_cluster, tmp_path):
    result, _ = _run_killing(ray_cluster, tmp_path, "kill", 1)
    assert len(result.recoveries) == 1
    assert result.recoveries[0]["restored_steps"][1] == 4  # r1-s1 came back from its round-1 snapshot


@pytest.mark.slow  # a whole run (about a minute and a half on 2 shared cores)
def test_training_survives_a_holder_killed_mid_run_under_direct_gloo_hops(ray_cluster, tmp_path):
    """swarm.hop_transport=gloo: a holder killed while hops cross makes Ray end both ends of the failed transfer
    for good (rdt_manager.py, _abort_transport); the executor starts them afresh from their snapshots, the
    replica recovers, its group is made anew and training goes on."""
    result, lines = _run_killing(ray_cluster, tmp_path, "gkill", 1, "swarm.hop_transport=gloo")
    assert [r["replica"] for r in result.recoveries] == [1]
    assert any(line.startswith("recovery: replica 1 back") for line in lines)


@pytest.mark.slow  # a whole run (about a minute and a half on 2 shared cores)
def test_training_survives_a_holder_killed_mid_run_under_shm_hops(ray_cluster, tmp_path):
    """swarm.hop_transport=shm: a holder killed mid-run restarts with no ring (its edge goes through the object
    store), the replica recovers and its rings are made anew; at shutdown no ring file is left, the dead
    process's included."""
    import glob

    before = set(glob.glob("/dev/shm/nrshm-*"))
    result, lines = _run_killing(ray_cluster, tmp_path, "skill", 1, "swarm.hop_transport=shm")
    assert [r["replica"] for r in result.recoveries] == [1]
    assert "hops: replica 1's shared-memory rings made anew (2 rings)" in lines
    assert set(glob.glob("/dev/shm/nrshm-*")) - before == set()


def test_a_holder_without_snapshot_copies_its_range_from_a_live_peer(ray_cluster, tmp_path):
    """No snapshot yet (snapshots off): the restarted holder is refilled from the other replica's holder."""
    result, lines = _run_killing(ray_cluster, tmp_path, "peer", 0, "checkpoint.every_round=false")
    assert result.recoveries[0]["restored_steps"][1] is None
    assert any("copied its range from a live peer" in line for line in lines)


def test_the_liveness_probe_finds_a_live_actor_s_node_answering(ray_cluster):
    """The probe the liveness deadline uses (neuroray.swarm.liveness): the GCS names the node an actor runs
    on, and that node's raylet accepts a connection. (A node that does not: tests/test_lab_ops.py cuts one.)"""
    from neuroray.swarm.liveness import actor_node, live_node, lost

    ray = ray_cluster

    @ray.remote(num_cpus=0)
    class Where:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    a = Where.remote()
    here = ray.get(a.node.remote(), timeout=120)
    assert actor_node(a) == here
    assert lost([a], 1.0) == [False]
    assert live_node(0, 0, exclude=set()) == here and live_node(0, 0, exclude={here}) is None
    ray.kill(a)


@pytest.mark.slow
def test_a_holder_that_dies_while_the_final_snapshots_are_written_is_recovered(ray_cluster, tmp_path):
    """The memory monitor kills at the end of a run as at any other time: a holder that dies while the final
    snapshot set is flushed is recovered, the set is taken again, and a resume continues from the end."""
    from neuroray.swarm.faults import FaultyStageHolder
    from neuroray.training.run import run

    ray = ray_cluster

    def log(*a, **k):
        if " ".join(map(str, a)).startswith("round 2/2 step 8/8"):  # runs after the steps queued before it
            ray.get_actor("neuroray-flushkill-r1-s1").fail_at.remote("flush_snapshots")

    result = run(_cfg(tmp_path, "flushkill", 2, "log_every=1"), log=log, holder_cls=FaultyStageHolder)
    assert len(result.losses) == 8 and [r["replica"] for r in result.recoveries] == [1]
    lines = []
    resumed = run(_cfg(tmp_path, "flushkill", 3, "resume=true"), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert resumed.start_step == 8 and len(resumed.losses) == 4, lines


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", ["ledger: round 2:", "round 2/3 step 3/6"])
def test_a_killed_driver_is_credited_and_not_slashed_by_the_next_spot_check(ray_cluster, tmp_path, kill_after):
    """A Driver killed between rounds, or in the middle of one, comes back from an older snapshot: its replica goes
    on from theta0 at the step it re-runs, at the swarm's data position, so the proofs name the batches trained on
    and the committed losses are at theta0. Before, the spot check slashed the honest Driver (the restored stream
    re-read batches the lost process had trained on, or the surviving stage had already taken the lost step, so
    the losses were not at theta0) and the surviving holder's proof, which counted the lost step twice, was refused."""
    from neuroray.training.run import run

    ray = ray_cluster
    lines = []

    def log(*a, **k):
        line = " ".join(map(str, a))
        lines.append(line)
        if line.startswith(kill_after):
            ray.kill(ray.get_actor("neuroray-drvkill-r1-s0"), no_restart=False)

    result = run(_cfg(tmp_path, "drvkill", 3, "diloco.inner_steps=2", "ponw.spot_check_rate=1.0", "log_every=1"), log=log)
    assert [r["replica"] for r in result.recoveries] == [1], lines
    checks = [line for line in lines if line.startswith("spot check: round")]
    assert checks and not [line for line in checks if "failed (" in line or "invalidated" in line], "\n".join(lines)
    # the round's booking line (the escrow lines of the straggler rule start alike)
    booked = [line for line in lines if line.startswith("ledger: round") and "proofs credited" in line]
    assert len(booked) == 3 and all("4/4 proofs credited" in line for line in booked), "\n".join(lines)
