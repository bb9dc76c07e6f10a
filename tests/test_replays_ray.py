"""The replay check in a real run, with a holder that replays its previous round's pseudo-gradient (``stale_delta`` in
replica 2's Driver; round 1 it replays zeros, which the free-rider rule pays 0): every update of every range is
scored every round, exactly those under ``ponw.replay_min_lead`` are refused before the rule, named and paid 0, and
the others are paid. Whether the replay is under the margin in a given round is the rule's statistics (at H=4 the
margin is thin: docs/ponw.md, "Replayed pseudo-gradients"); the rule itself: tests/test_replays.py."""

import re
import sqlite3

import pytest

from neuroray.configure import load_config
from neuroray.swarm.attacks_in_holder import misbehaving
from tests.test_copies import SMALL

# slow: ray.init and a 3-replica run take longer than the non-slow budget on the 2-core machine
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def test_every_update_is_scored_and_exactly_the_refused_ones_are_paid_nothing(ray_cluster, tmp_path):
    from neuroray.ponw.identity import Identity
    from neuroray.training.run import run

    cfg = load_config([*SMALL, "swarm.num_stages=2", "diloco.replicas=3", "diloco.inner_steps=4", "rounds=2",
                       "aggregator=robust", f"run_dir={tmp_path / 'run'}", f"swarm.key_dir={tmp_path / 'keys'}",
                       "cluster.cpus_per_holder=0.25", "sample_tokens=1", "checkpoint.interval_s=0",
                       "checkpoint.every_round=false", "ponw.spot_check_rate=0", "ponw.hop_recheck_rate=0"])
    lines = []
    run(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))), holder_cls=misbehaving({"r2-s0": ("stale_delta", 0)}))
    text = "\n".join(lines)
    slots = [f"r{r}-s{s}" for r in range(3) for s in range(2)]
    node = {Identity.load_or_create(tmp_path / "keys" / f"holder-{x}.pem").node_id: x for x in slots}
    paid = {x: {} for x in slots}
    for who, rnd, st, reward in sqlite3.connect(tmp_path / "run" / "ledger.sqlite").execute(
            "SELECT node_id, outer_round, status, reward FROM proofs WHERE proof_type = 'training'"):
        if who in node:
            paid[node[who]][rnd] = reward if st == "credited" else 0
    refused = set()
    margin = cfg.ponw.replay_min_ratio
    for rnd in (1, 2):
        # the embedding's range: the fresh rows' ratio (in round 1 every token is fresh); the other range's loss
        # lead is off by default (ponw.replay_min_lead=-2)
        line = next(x for x in lines if f"replay check: outer round {rnd}: range 0: " in x)
        assert not any(f"replay check: outer round {rnd}: range 1: " in x for x in lines)
        scores = {int(r): float(x) for r, x in re.findall(r"r(\d+) fresh rows x([0-9.]+|inf)", line)}
        # every update scored, but the replayer's zeros of round 1 (the free-rider rule's)
        assert sorted(scores) == ([0, 1] if rnd == 1 else [0, 1, 2]), line
        for r, x in scores.items():
            named = f"outer round {rnd}: range 0 rejected holder #{r}: replayed pseudo-gradient" in text
            assert named == (x < margin), (rnd, r, x, text)
            if named:
                refused.add((f"r{r}-s0", rnd))
    assert ("r2-s0", 2) in refused, refused  # its fresh rows moved by weight decay alone: decisive
    assert paid["r2-s0"][1] == 0, paid
    for x in slots:
        for rnd in (1, 2):
            if (x, rnd) in refused:
                assert paid[x][rnd] == 0, (x, rnd, paid)
            elif x != "r2-s0":  # the honest holders, the replayer's replica-mate included
                assert paid[x][rnd] > 0, (x, rnd, paid)
    print("refused:", sorted(refused))
