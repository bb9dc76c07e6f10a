"""A slow walker earns nothing, not even for the rounds before the straggler rule names it (neuroray/ponw/escrow.py):
its first slow round is paid into escrow and forfeited when the next round names it; honest holders are paid."""

import sqlite3

import pytest

from neuroray.swarm.attacks_in_holder import misbehaving
from tests.test_verification_ray import _cfg

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_slow_walker_is_named_in_round_2_and_its_round_1_pay_is_forfeited(ray_cluster, tmp_path):
    from neuroray.ponw.identity import Identity
    from neuroray.training.run import run

    # x12: the driver's call clock sees a stretch diluted by each call's trip through Ray (x6 measured 5.1x, then 2.4x)
    cfg = _cfg(tmp_path, "ponw.spot_check_rate=0", "sample_tokens=1")
    lines = []
    result = run(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))),
                 holder_cls=misbehaving({"r2-s0": ("slow_walk", 12.0)}))
    text = "\n".join(lines)
    node = {Identity.load_or_create(tmp_path / "keys" / f"holder-{slot}.pem").node_id: slot
            for slot in ("r0-s0", "r1-s0", "r2-s0")}
    assert "round 1: r2-s0's pay held in escrow" in text, text
    assert "round 2: r2-s0 is a straggler" in text, text
    db = sqlite3.connect(tmp_path / "run" / "ledger.sqlite")
    balance = {node[n]: v for n, v in db.execute("SELECT node_id, balance + stake FROM accounts") if n in node}
    forfeits = [node[n] for (n,) in db.execute("SELECT node_id FROM events WHERE kind = 'forfeit'")]
    assert balance["r2-s0"] == 0 and forfeits == ["r2-s0"], (balance, forfeits)
    assert balance["r0-s0"] > 0 and balance["r1-s0"] > 0, balance
    assert db.execute("SELECT COUNT(*) FROM escrow").fetchone()[0] == 0  # nothing left held after the run
    assert result.ledger["supply_consistent"]
