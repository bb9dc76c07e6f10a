"""A slow walker that hides its stretch from its own busy clock (``slow_walk_hidden``) under fixed routing: the
coordinator times the calls itself (neuroray/training/call_clock.py), so the straggler rule names it and the
ledger pays it 0 from round 2 on (round 3 over gloo hops), while its replica-mate (which waits on it) and the other replicas are paid."""

import sqlite3

import pytest

from neuroray.configure import load_config
from neuroray.swarm.attacks_in_holder import misbehaving
from tests.test_pipeline_ray import _write_corpus

# slow: ray.init and a 6-holder run take longer than the non-slow budget on the 2-core machine
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


# every hop transport: a direct (gloo) hop's ref is waited on without pulling its tensor, a shm hop's is a handle
@pytest.mark.parametrize("transport", ["object_store", "gloo", "shm"])
def test_a_slow_walker_hiding_it_from_its_own_clock_is_named_and_paid_nothing(ray_cluster, tmp_path, transport):
    from neuroray.ponw.identity import Identity
    from neuroray.training.run import run

    _write_corpus(tmp_path / "corpus.txt")
    cfg = load_config([
        f"data.source={tmp_path / 'corpus.txt'}", f"data.store={tmp_path / 'store'}", "data.vocab_size=320",
        "data.shard_tokens=4096", "data.seq_len=32", "data.microbatch_size=4", "data.num_microbatches=2",
        "model.d_model=64", "model.n_layers=2", "model.max_seq_len=64", f"swarm.key_dir={tmp_path / 'keys'}",
        "swarm.num_stages=2", "swarm.routing=fixed", f"swarm.hop_transport={transport}", "diloco.replicas=3", "diloco.inner_steps=4", "rounds=3",
        f"run_dir={tmp_path / 'run'}", "cluster.cpus_per_holder=0.25", "sample_tokens=4", "checkpoint.interval_s=0",
        "checkpoint.every_round=false", "ponw.spot_check_rate=0", "ponw.hop_recheck_rate=0",
        "ponw.straggler_factor=2.5", "ponw.straggler_rounds=2",
    ])
    # the Validator of replica 2: every compute call 8x as long; its own busy clock records 1x
    holders = misbehaving({"r2-s1": ("slow_walk_hidden", 8)})
    lines = []
    run(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))), holder_cls=holders)
    text = "\n".join(lines)
    slots = [f"r{r}-s{s}" for r in range(3) for s in range(2)]
    node = {x: Identity.load_or_create(tmp_path / "keys" / f"holder-{x}.pem").node_id for x in slots}
    db = sqlite3.connect(tmp_path / "run" / "ledger.sqlite")
    reward = {(who, rnd): paid for who, rnd, paid in db.execute(
        "SELECT node_id, outer_round, reward FROM proofs WHERE proof_type = 'training'")}

    # gloo: a direct hop's transfer is set up in round 1 and its trips dilute the stretch there (measured 2.0x against
    # the Validators' median, under the factor of 2.5), so 2 rounds in a row end in round 3
    first = 3 if transport == "gloo" else 2
    assert f"ledger: round {first}: r2-s1 is a straggler" in text, [x for x in lines if "call clock" in x]
    assert [reward[node["r2-s1"], k] == 0 for k in (1, 2, 3)] == [k >= first for k in (1, 2, 3)]  # paid 0 once named
    assert text.count("is a straggler") == 4 - first  # no one else: its replica-mate waited on it, and is not blamed
    for x in slots:
        if x != "r2-s1":
            assert all(reward[node[x], k] > 0 for k in (1, 2, 3)), (x, [reward[node[x], k] for k in (1, 2, 3)], [
                line for line in lines if x in line or "round 3" in line])
