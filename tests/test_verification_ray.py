"""Holders that really cheat, from inside their own processes, in a real run (neuroray/swarm/faults.py):
the spot checks catch the Driver that lies about its losses and the ledger slashes it; the sign-flipped pseudo-gradient is neutralised by the robust
rule and its holder named among the round's rejections. The honest holder is credited and never slashed.
(A proof that claims more batches than the holder did is refused by the receipt check: benchmarks/verification.py.)"""

import sqlite3

import pytest

from neuroray.configure import load_config
from neuroray.swarm.attacks_in_holder import misbehaving
from tests.test_pipeline_ray import _write_corpus

# slow: ray.init and a 3-holder run take longer than the non-slow budget on the 2-core machine
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def _cfg(tmp_path, *extra):
    _write_corpus(tmp_path / "corpus.txt")
    return load_config([
        f"data.source={tmp_path / 'corpus.txt'}", f"data.store={tmp_path / 'store'}", "data.vocab_size=320",
        "data.shard_tokens=4096", "data.seq_len=32", "data.microbatch_size=4", "data.num_microbatches=2",
        "model.d_model=64", "model.n_layers=2", "model.max_seq_len=64", f"swarm.key_dir={tmp_path / 'keys'}",
        "swarm.num_stages=1", "diloco.replicas=3", "diloco.inner_steps=2", "rounds=2", "aggregator=robust",
        f"run_dir={tmp_path / 'run'}", "cluster.cpus_per_holder=0.25", "sample_tokens=4", "checkpoint.interval_s=0",
        "checkpoint.every_round=false", "ponw.spot_check_rate=1.0", "ponw.validation_fee_per_batch=0.003", *extra,
    ])


def test_cheating_holders_are_caught_and_honest_ones_paid(ray_cluster, tmp_path):
    from neuroray.ponw.identity import Identity
    from neuroray.training.audit import VALIDATOR_KEY_FILE
    from neuroray.training.run import run

    cfg = _cfg(tmp_path)
    holders = misbehaving({
        "r1-s0": ("lie_loss", 0.5, 2),  # honest in round 1 (so it has a balance to lose), lies in round 2
        "r2-s0": ("sign_flip", 1),  # sends minus its pseudo-gradient
    })
    lines = []
    result = run(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))), holder_cls=holders)
    text = "\n".join(lines)
    node = {slot: Identity.load_or_create(tmp_path / "keys" / f"holder-{slot}.pem").node_id
            for slot in ("r0-s0", "r1-s0", "r2-s0")}
    validator = Identity.load_or_create(tmp_path / "keys" / VALIDATOR_KEY_FILE).node_id
    db = sqlite3.connect(tmp_path / "run" / "ledger.sqlite")
    events = {}
    for who, kind, amount in db.execute("SELECT node_id, kind, amount FROM events"):
        events.setdefault(who, {}).setdefault(kind, []).append(amount)
    status = {}
    for who, st, reason in db.execute("SELECT node_id, status, reason FROM proofs"):
        status.setdefault(who, []).append((st, reason))
    balance = dict(db.execute("SELECT node_id, balance + stake FROM accounts"))

    # the lying Driver: credited in round 1, caught by the spot check of round 2, its reward clawed back,
    # half of what it holds slashed, part of that paid to the validator that caught it
    assert [(st, reason.split(" by ")[0]) for st, reason in status[node["r1-s0"]]] == [
        ("credited", "ok"), ("invalidated", "spot check")], status
    assert events[node["r1-s0"]]["clawback"] and events[node["r1-s0"]]["slash"], events[node["r1-s0"]]
    assert "fee" in events[validator] and "spot check: round 2: Driver" in text
    # the sign-flipped pseudo-gradient: named in both rounds' rejections, credited nothing
    assert text.count("range 0 rejected holder #2: suspected poison") == 2, text
    assert balance[node["r2-s0"]] == 0 and status[node["r2-s0"]] == [("credited", "ok")] * 2
    # the honest holder: credited every round, never slashed, never named
    assert status[node["r0-s0"]] == [("credited", "ok")] * 2 and balance[node["r0-s0"]] > 0
    assert not {"slash", "clawback"} & set(events[node["r0-s0"]])
    assert "rejected holder #0" not in text and "rejected holder #1" not in text
    # the validator's fee: each round it recomputed one batch of each of the 3 Drivers, at 0.003 NEURO each
    assert sorted(events[validator]["reward"]) == [9_000, 9_000]
    assert result.ledger["supply_consistent"]
