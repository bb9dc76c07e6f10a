"""Checks at every hop in a real run: a Driver that sends NaN (or wrongly shaped) activations from its own
process is refused by the holder it sends them to, named as the sender, left out of every outer step it
tampered in and paid nothing; the honest replica trains on (neuroray/swarm/hop_guard.py, docs/hops.md)."""

import math
import sqlite3

import pytest
import torch

from neuroray.swarm.holder import StageHolder
from tests.test_recovery_ray import _cfg

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

HONEST_FORWARDS = 2  # the tamperer's first forwards are honest (its band and its round start clean)


class NaNDriver(StageHolder):
    """Replica 1's Driver: after its first HONEST_FORWARDS activations, every one it sends is NaN. The holder
    itself tampers, in its own process, after its compute ran (test-only: a tiny subclass, as faults.py does)."""

    bad = "nan"

    def __init__(self, spec):
        super().__init__(spec)
        if spec.replica == 1 and spec.stage == 0:
            honest, sent = self.compute._send, [0]

            def tampered(t, direction):
                if t is not None and direction == "fwd":
                    sent[0] += 1
                    if sent[0] > HONEST_FORWARDS:
                        t = torch.full_like(t, float("nan")) if self.bad == "nan" else t[:, 1:]
                return honest(t, direction)

            self.compute._send = tampered


class ShortDriver(NaNDriver):
    """The same, sending activations one token short."""

    bad = "shape"


def _run(tmp_path, holder_cls, *extra):
    from neuroray.ponw.identity import Identity
    from neuroray.training.run import run

    lines = []
    # 2 replicas x 2 stages (tests/test_recovery_ray.py's run), 2 rounds of 2 inner steps of 2 microbatches
    cfg = _cfg(tmp_path, "run", 2, "diloco.inner_steps=2", "checkpoint.every_round=false", "ponw.spot_check_rate=0",
               *extra)
    result = run(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))), holder_cls=holder_cls)
    node = {slot: Identity.load_or_create(tmp_path / "keys" / f"holder-{slot}.pem").node_id
            for slot in ("r0-s0", "r0-s1", "r1-s0", "r1-s1")}
    rewards = {slot: 0 for slot in node}
    db = sqlite3.connect(tmp_path / "run" / "ledger.sqlite")
    for who, amount in db.execute("SELECT node_id, amount FROM events WHERE kind = 'reward'"):
        rewards.update({slot: rewards[slot] + amount for slot, n in node.items() if n == who})
    return result, "\n".join(lines), rewards


@pytest.mark.slow  # a 2 x 2 run: about 75 s on the shared 2-core machine, over the non-slow budget
def test_a_driver_sending_nan_activations_is_named_left_out_and_unpaid_under_fixed_routing(ray_cluster, tmp_path):
    result, text, rewards = _run(tmp_path, NaNDriver)
    # one rejection per round: its replica sits the rest of the round out, and tampers again in the next
    assert [(r["round"], r["sender"], r["check"], r["direction"]) for r in result.hop_rejections] == [
        (1, "r1-s0", "finite", "fwd"), (2, "r1-s0", "finite", "fwd")], result.hop_rejections
    assert result.hop_rejections[0]["receiver"] == "validator[r1 L1-1]" and result.hop_rejections[0]["step"] == 2
    assert "hop rejected: validator[r1 L1-1] rejected the activation of microbatch" in text
    assert "contains NaN" in text and "sent by r1-s0" in text
    # the honest replica trains on: every step has a finite loss, and the tamperer's proofs earn nothing.
    # Its replica is a chain: the Validator it fed is left out of the outer step with it but excused, paid for
    # the microbatches it did before the rejection (fewer than an honest holder's round)
    assert all(math.isfinite(x) for x in result.losses) and len(result.losses) == 4
    assert math.isfinite(result.eval_loss)
    assert rewards["r0-s0"] > 0 and rewards["r0-s1"] > 0, rewards
    assert rewards["r1-s0"] == 0 and 0 < rewards["r1-s1"] < rewards["r0-s1"], rewards
    assert "r1-s1 excused: it worked on what a holder proven faulty" in text


@pytest.mark.slow  # a routed run of four holders: over the non-slow budget on the 2-core machine
def test_a_driver_sending_short_activations_is_benched_under_swarm_routing(ray_cluster, tmp_path):
    result, text, rewards = _run(tmp_path, ShortDriver, "swarm.routing=router")
    assert {(r["sender"], r["check"]) for r in result.hop_rejections} == {("r1-s0", "shape")}, result.hop_rejections
    assert "expected [4, 32, 64]" in text and "rejoins after a round left out for a rejected hop" in text
    assert all(math.isfinite(x) for x in result.losses) and len(result.losses) == 4
    assert rewards["r1-s0"] == 0 and rewards["r0-s0"] > 0, rewards


@pytest.mark.slow  # a 2 x 2 run: about 75 s on the shared 2-core machine, over the non-slow budget
def test_with_the_outer_step_overlapped_the_tamperer_is_unpaid_and_its_mate_excused(ray_cluster, tmp_path):
    # the overlapped round books the same verdicts as the blocking one (neuroray/training/overlap.py)
    result, text, rewards = _run(tmp_path, NaNDriver, "diloco.overlap=delayed")
    assert {r["sender"] for r in result.hop_rejections} == {"r1-s0"}, result.hop_rejections
    assert all(math.isfinite(x) for x in result.losses) and math.isfinite(result.eval_loss)
    assert rewards["r0-s0"] > 0 and rewards["r0-s1"] > 0, rewards
    assert rewards["r1-s0"] == 0 and 0 < rewards["r1-s1"] < rewards["r0-s1"], rewards
    assert "r1-s1 excused: it worked on what a holder proven faulty" in text


@pytest.mark.slow  # a routed run of six holders: over the non-slow budget on the 2-core machine
def test_a_benched_holder_is_one_of_the_faulty_its_ranges_rule_tolerates(ray_cluster, tmp_path):
    """A lazy Validator's all-zero gradients are refused and the router benches it; its range's robust rule then
    runs over the 2 holders left with f lowered by one (as fixed routing does for a rejected hop), instead of
    refusing the range's step every round (trimmed_mean with f=1 needs 3)."""
    from neuroray.swarm.attacks_in_holder import misbehaving

    result, text, _ = _run(tmp_path, misbehaving({"r2-s1": ("lazy_zero", 0)}), "swarm.routing=router",
                           "diloco.replicas=3", "aggregator=robust")
    assert {(r["sender"], r["check"]) for r in result.hop_rejections} == {("r2-s1", "norm")}, result.hop_rejections
    assert "theta0 unchanged" not in text, text
