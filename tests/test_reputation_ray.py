"""A run with ponw.reputation=true (#21 item 6): a holder that sends the sign-flipped pseudo-gradient scores 0
round after round, its reputation sinks below the honest holder's of the same range, its rewards with it,
and the reputation is saved in the snapshots and restored by resume=true."""

import json

import pytest

from tests.test_recovery_ray import _cfg

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


def _reputation(run_dir, step: int) -> dict:
    return json.loads((run_dir / "snapshots" / "outer-s0" / f"step-{step:08d}" / "meta.json").read_text())["reputation"]


def test_reputation_sinks_for_a_sign_flipper_and_survives_resume(ray_cluster, tmp_path):
    from neuroray.training.run import run

    extra = ["ponw.reputation=true", "attack=sign_flip", "attack.fraction=0.5", "ponw.spot_check_rate=0"]
    lines = []
    first = run(_cfg(tmp_path, "rep", 2, *extra), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    scored = [line for line in lines if line.startswith("reputation: round")]
    assert len(scored) == 2, lines
    keys = sorted((tmp_path / "keys").glob("holder-r*-s*.pem"))
    assert len(keys) == 4
    from neuroray.ponw.identity import Identity

    node = {k.stem.removeprefix("holder-"): Identity.load_or_create(k).node_id for k in keys}
    state = _reputation(tmp_path / "rep", 8)
    assert state["rounds"] == 2 and set(state["values"]) == set(node.values())
    values = state["values"]
    for s in (0, 1):  # replica 0 is the simulated Byzantine holder of every range: it removed no held-out loss
        flipper, honest = values[node[f"r0-s{s}"]], values[node[f"r1-s{s}"]]
        assert flipper == pytest.approx(0.5 * 0.7 * 0.7) and honest == pytest.approx(1 - 0.5 * 0.7 * 0.7)
    # its proofs earned less than the honest holder's, whose work was the same
    balances = first.ledger["balances_neuro"]
    assert balances[node["r0-s0"]] < balances[node["r1-s0"]]

    resumed = run(_cfg(tmp_path, "rep", 3, "resume=true", *extra), log=lambda *a, **k: None)
    assert resumed.start_step == 8
    after = _reputation(tmp_path / "rep", 12)
    assert after["rounds"] == 3  # it went on from the snapshot's two rounds, not from the prior
    assert after["values"][node["r0-s0"]] == pytest.approx(0.7 * values[node["r0-s0"]])
