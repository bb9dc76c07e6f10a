"""model=auto end to end on a multi-node Ray cluster (ray.cluster_utils.Cluster, injected memory), and a
node joining mid-run: the trainer's watcher sees it, recomputes, adopts the >= 1.3x bigger architecture
(deeper and wider) and the running holders grow in place; training continues on the loss curve it was
on, and the ledger credits the proofs of the grown ranges."""

import json
import math

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

GiB = 2**30
# The law: 2.6 GiB -> 8 x 256 (width 377 rounds to 256); + 10 GiB -> 16 x 512. The head holds both holders and
# the outer-step room of the grown model within its 0.8 safety fraction (2.15 of 2.23 GB; fit_problem checks).
HEAD = dict(memory=int(2.6 * GiB), object_store_memory=300 * 2**20)
JOINER = dict(memory=10 * GiB, object_store_memory=100 * 2**20)
H, ROUNDS = 2, 3


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    # 3 logical CPUs: two holders of 0.25 CPU and the outer-step reserve of 1 fit on the head alone
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=3, include_dashboard=False, **HEAD))
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def _cfg(tmp_path, run):
    from neuroray.config import load_config
    from tests.test_pipeline_ray import _write_corpus

    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        _write_corpus(corpus)
    return load_config([
        "model=auto", "model.max_seq_len=64", f"data.source={corpus}", f"data.store={tmp_path / 'store'}",
        "data.vocab_size=320", "data.shard_tokens=4096", "data.seq_len=16", "data.microbatch_size=2",
        "data.num_microbatches=2", f"swarm.key_dir={tmp_path / 'keys'}", f"diloco.inner_steps={H}",
        "diloco.inner_lr=0.003", f"rounds={ROUNDS}", f"run_dir={tmp_path / run}", "cluster.cpus_per_holder=0.25",
        "sample_tokens=4", "planner.stages=2", "planner.max_replicas=1", "planner.holder_overhead=100MB",
        "planner.upgrade_every_nodes=1", "planner.watch_interval_s=0.001", "checkpoint.every_round=true",
        "checkpoint.interval_s=0",
    ])


def test_model_auto_trains_and_grows_live_when_a_node_joins(cluster, tmp_path):
    from safetensors.torch import load_file

    from neuroray.snapshot import SnapshotStore
    from neuroray.train import run

    # 1. model=auto end to end on the head alone: the law's 8 x 256, planned, placed, trained, no upgrade
    lines = []
    control = run(_cfg(tmp_path, "control"), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert "\nmodel: 8 x 256" in "\n".join(lines), lines[:5]  # the plan, printed before training
    assert len(control.losses) == ROUNDS * H and all(math.isfinite(v) for v in control.losses)
    assert control.upgrades == [] and not any("cluster watch" in line for line in lines)
    assert json.loads((control.checkpoint / "meta.json").read_text())["model"]["d_model"] == 256
    assert math.isfinite(control.eval_loss) and control.eval_loss < control.losses[0]

    # 2. the same run, with a node joining once the swarm is up (the log line "train: ..." comes right
    #    before the loop starts, after the watcher took its first look)
    lines, added = [], []

    def log(*a, **k):
        line = " ".join(map(str, a))
        lines.append(line)
        if line.startswith("train:") and not added:
            added.append(cluster.add_node(num_cpus=1, **JOINER))
            cluster.wait_for_nodes()

    grown = run(_cfg(tmp_path, "grown"), log=log)
    assert any(line.startswith(f"cluster watch: joined {added[0].node_id[:8]}") for line in lines), lines
    assert any(line.startswith("cluster watch: recomputed plan: 16 x 512") for line in lines), lines
    assert len(grown.upgrades) == 1, [line for line in lines if "watch" in line or "upgrade" in line]
    up = grown.upgrades[0]
    assert up["round"] == 1 and up["growth"] >= 1.3
    assert (up["from"]["n_layers"], up["from"]["d_model"], up["to"]["n_layers"], up["to"]["d_model"]) == (8, 256, 16, 512)
    assert up["ranges"] == [[0, 8], [8, 16]]  # each new layer joined the range of the old layer before it
    assert any(line.startswith("upgrade: after round 1 grew 8 x 256") for line in lines)

    # Identical until the growth; the first step after it runs at the grown theta0, which computes what the
    # small theta0 did (same batch): the same loss. Then no jump: it stays on the small model's curve
    # (measured within 0.05; with a fresh AdamW instead of the grown moments the next step jumps by ~3.6).
    assert grown.losses[:H] == pytest.approx(control.losses[:H], rel=1e-6)
    assert grown.losses[H] == pytest.approx(control.losses[H], abs=1e-4)
    assert all(g < c + 0.15 for g, c in zip(grown.losses[H:], control.losses[H:])), (grown.losses, control.losses)
    assert len(grown.losses) == ROUNDS * H and grown.losses[-1] < grown.losses[0]
    # the snapshot set taken right after the growth holds the grown model; so does the checkpoint
    snap = SnapshotStore(str(grown.run_dir / "snapshots"), "r0-s1").read(H)
    assert snap.meta["architecture"]["model"]["n_layers"] == 16 and snap.meta["architecture"]["ranges"] == [[0, 8], [8, 16]]
    state = load_file(str(grown.checkpoint / "model.safetensors"))
    assert tuple(state["layers.15.attn.wq.weight"].shape) == (512, 512)
    assert json.loads((grown.checkpoint / "meta.json").read_text())["model"]["d_model"] == 512
    assert math.isfinite(grown.eval_loss)
    # Proofs of Neural Work went on after the growth (the ledger learned the deeper model and the grown
    # ranges): every proof of every round verified and credited
    assert grown.ledger["proofs_rejected"] == 0 and grown.ledger["proofs_credited"] == ROUNDS * 2
