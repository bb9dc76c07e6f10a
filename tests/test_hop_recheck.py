"""Hop rechecks without Ray (neuroray/training/hop_audit.py, neuroray/swarm/hop_record.py): 3 replicas x 3 stages
of real holders, one inner step run by hand as the fixed schedule runs it, every microbatch re-executed on another
replica's holder of its range and judged; and the ledger's re-verification of the evidence."""

import random

import pytest
import torch

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.ponw.authority import sign_hop_evidence
from neuroray.ponw.proof import SignedProof
from neuroray.swarm.attacks_in_holder import misbehaving
from neuroray.swarm.holder import HolderSpec
from neuroray.training.hop_audit import Draw, data_findings, draw_checks, inputs_for, judge, relative_l2
from tests._ponw import Clock, digest, identity, make_ledger, node, receipt, registration, signed

CFG = ModelConfig(d_model=32, n_layers=3, n_heads=2, n_kv_heads=2, max_seq_len=16)
V, R, S, M = 64, 3, 3, 2
TOL = 0.01  # ponw.spot_check_tolerance under autocast (auto: 0.001 when every holder runs float32)


def _swarm(tmp_path, attacks: dict) -> list[list]:
    cls = misbehaving(attacks)
    return [[cls(HolderSpec(replica=r, stage=s, ranges=[(0, 1), (1, 2), (2, 3)], model=CFG, vocab_size=V,
                            diloco=DilocoConfig(inner_lr=1e-2), seed=0, key_path=str(tmp_path / f"r{r}s{s}.pem"),
                            hop_record=True)) for s in range(S)] for r in range(R)]


def _first_step(swarm) -> tuple[dict, dict]:
    """One inner step of every replica (each its own data), GPipe order; the holders' records and the losses
    the driver collected, keyed by ``(replica, mb)``."""
    losses = {}
    for r, (h0, h1, h2) in enumerate(swarm):
        gen = torch.Generator().manual_seed(r)
        for mb in range(M):
            x, labels = torch.randint(0, V, (2, 8), generator=gen), torch.randint(0, V, (2, 8), generator=gen)
            loss, g = h2.forward_backward(mb, h1.forward(mb, h0.forward(mb, x)), labels, 1 / M)
            h0.backward(mb, h1.backward(mb, g))
            losses[r, mb] = loss
        for h in (h0, h1, h2):
            h.step()
    return {(s, r): swarm[r][s].take_hop_record() for r in range(R) for s in range(S)}, losses


def _recheck_all(swarm, records, losses) -> tuple[list, float]:
    """Every microbatch of every holder redone on another replica's holder (rate 1); the findings and the
    largest relative L2 error among the hops that passed."""
    draws = draw_checks(records, S, list(range(R)), 1.0, random.Random(0))
    assert len(draws) == R * S * M and all(d.checker != d.replica for d in draws)
    findings, worst = [], 0.0
    for d in draws:
        inputs, forged = inputs_for(records, d, S)
        assert forged is None
        out = swarm[d.checker][d.stage].reexecute(inputs["x"], inputs["grad"], inputs["labels"], inputs["scale"])
        f = judge(records, d, out, losses, S, TOL)
        if f is None:
            for key, receiver, got in (("fwd", d.stage + 1, "x"), ("bwd", d.stage - 1, "g")):
                if 0 <= receiver < S:
                    worst = max(worst, relative_l2(records[receiver, d.replica]["received"][d.mb][got], out[key]))
        findings.append(f)
    return [f for f in findings if f is not None], worst


def test_an_honest_step_rechecks_exactly_and_leaves_the_checker_untouched(tmp_path):
    swarm = _swarm(tmp_path, {})
    records, losses = _first_step(swarm)
    checker = swarm[1][1]
    before = (checker.flat_params(), checker.compute.inner_steps, checker.compute.microbatches_done)
    findings, worst = _recheck_all(swarm, records, losses)
    assert findings == []
    assert worst < 1e-6, worst  # fp32, the same code: the tolerance (1e-2) has four orders of margin
    assert torch.equal(checker.flat_params(), before[0]) and not checker.compute.pending
    assert (checker.compute.inner_steps, checker.compute.microbatches_done) == before[1:]
    assert checker.grads() == {}
    # only the round's first step is kept: the next step records nothing
    assert all(not rec["sent"] for rec in (h.take_hop_record() for p in swarm for h in p))


def test_tampered_hops_blame_their_sender_not_the_replica_mates_who_computed_on_them(tmp_path):
    swarm = _swarm(tmp_path, {"r1-s1": ("tamper_activations", 1.0, 1, 1.0),  # + noise at 1 x the RMS
                              "r2-s1": ("tamper_gradients", -1.0)})  # sign-flipped gradients back
    records, losses = _first_step(swarm)
    findings, _ = _recheck_all(swarm, records, losses)
    blamed = {(f.slot, f.direction) for f in findings}
    assert blamed == {("r1-s1", "fwd"), ("r2-s1", "bwd")}, findings
    assert all(f.error > 0.5 and f.sent and f.recomputed and f.sent != f.recomputed for f in findings)


def test_a_lying_loss_and_forged_records_are_attributed(tmp_path):
    swarm = _swarm(tmp_path, {})
    records, losses = _first_step(swarm)
    last = inputs_for(records, Draw(2, 0, 0, 1), S)[0]
    redo = swarm[1][2].reexecute(last["x"], last["grad"], last["labels"], last["scale"])
    assert judge(records, Draw(2, 0, 0, 1), redo, losses, S, TOL) is None
    lied = {**losses, (0, 0): losses[0, 0] * 0.9}
    f = judge(records, Draw(2, 0, 0, 1), redo, lied, S, TOL)
    assert (f.slot, f.direction) == ("r0-s2", "loss")
    # the Validator's record of the activation it received is not what r0-s1 sent: its own record is forged
    records[2, 0]["received"][0]["x"] = records[2, 0]["received"][0]["x"] + 1
    inputs, forged = inputs_for(records, Draw(2, 0, 0, 1), S)
    assert inputs is None and (forged.slot, forged.direction) == ("r0-s2", "record")
    # and when r0-s1 is the one checked, the same forged copy blames the receiver, not r0-s1
    middle = inputs_for(records, Draw(1, 0, 0, 2), S)[0]
    out = swarm[2][1].reexecute(middle["x"], middle["grad"], middle["labels"], middle["scale"])
    f = judge(records, Draw(1, 0, 0, 2), out, losses, S, TOL)
    assert (f.slot, f.direction) == ("r0-s2", "record")


def _ledger_with_proofs(tmp_path, first_stage: int):
    """A ledger, a holder (``first_stage``) and a last-range holder that each proved round 1, and a validator."""
    clock = Clock()
    ledger = make_ledger(tmp_path / "ledger.sqlite", clock)
    (a, ra), (c, rc), (v, rv) = node(first_stage), node(1), node(1)
    ledger.register(registration([ra, rc, rv], validators=[rv.node_id]))
    clock.t += 60
    outs = [ledger.submit(signed(i, r, clock.ms, 1), receipt(r, 1)) for i, r in ((a, ra), (c, rc))]
    proofs = [SignedProof.from_bytes(ledger.wire(o.proof_id)).proof for o in outs]
    return ledger, (ra, rc, rv), (c, v), outs, proofs


def test_the_ledger_reverifies_hop_evidence(tmp_path):
    ledger, (ra, rc, rv), (c, v), (out, _), (proof, _) = _ledger_with_proofs(tmp_path, 1)
    sent, redone = digest("sent"), digest("redone")
    for bad, reason in [
        (sign_hop_evidence(c, proof, rc.node_id, 0, "bwd", sent, redone, 1.0), "unknown_validator"),  # not a validator
        (sign_hop_evidence(v, proof, rc.node_id, 0, "bwd", sent, redone, 0.005), "unfounded"),  # within tolerance
        (sign_hop_evidence(v, proof, rc.node_id, 0, "bwd", sent, sent, 1.0), "unfounded"),  # the same hop
        (sign_hop_evidence(v, proof, rc.node_id, 0, "fwd", sent, redone, 1.0), "unfounded"),  # the last range sends none
        (sign_hop_evidence(v, proof, ra.node_id, 0, "loss", sent, redone, 1.0), "conflict"),  # checked by itself
    ]:
        assert ledger.invalidate(bad).reason == reason
    assert ledger.account(ra.node_id).balance == out.reward > 0
    good = sign_hop_evidence(v, proof, rc.node_id, 0, "bwd", sent, redone, 1.0)
    verdict = ledger.invalidate(good)
    assert verdict.reason == "invalidated" and verdict.reward == -out.reward and "hop recheck" in verdict.detail
    assert ledger.invalidate(good).reason == "replay" and ledger.supply().consistent
    ledger.close()


def test_a_driver_whose_first_step_is_not_its_assigned_data_is_blamed(tmp_path):
    """The data check: each Driver's recorded token ids against the batch at its recorded position + j (here a
    seeded generator per replica stands for its shard ring; the Ray test reads real shards)."""
    def batch(r: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(1000 * r + position)
        return torch.randint(0, V, (2, 8), generator=gen), torch.randint(0, V, (2, 8), generator=gen)

    swarm = _swarm(tmp_path, {})
    for r in range(R):  # each Driver's stream position when its round started
        swarm[r][0].hops.arm(position=10 * r)
    for r, (h0, h1, h2) in enumerate(swarm):
        for j, mb in enumerate(range(4, 4 + M)):  # the round's first microbatch ids need not be positions
            # replica 2's Driver reads the batches of another ring (replica 0's) from its second microbatch on
            x, labels = batch(0 if (r == 2 and j == 1) else r, 10 * r + j)
            loss, g = h2.forward_backward(mb, h1.forward(mb, h0.forward(mb, x)), labels, 1 / M)
            h0.backward(mb, h1.backward(mb, g))
    records = {(s, r): swarm[r][s].take_hop_record() for r in range(R) for s in range(S)}
    assert [records[0, r]["position"] for r in range(R)] == [0, 10, 20]
    found = data_findings(records, list(range(R)), batch)
    assert [(f.slot, f.direction, f.mb) for f in found] == [("r2-s0", "data", 5)], found
    assert found[0].sent != found[0].recomputed and "position 21" in found[0].detail


def test_the_ledger_takes_data_evidence_only_against_a_driver(tmp_path):
    ledger, (_, _, rv), (_, v), _, (driver, last) = _ledger_with_proofs(tmp_path, 0)
    sent, rebuilt = digest("trained on"), digest("assigned")
    on_last = sign_hop_evidence(v, last, rv.node_id, 0, "data", sent, rebuilt, float("inf"))
    assert ledger.invalidate(on_last).reason == "unfounded"  # only a Driver reads data
    verdict = ledger.invalidate(sign_hop_evidence(v, driver, rv.node_id, 0, "data", sent, rebuilt, float("inf")))
    assert verdict.reason == "invalidated" and "data check" in verdict.detail
    assert ledger.supply().consistent
    ledger.close()


@pytest.mark.parametrize("overrides, off", [
    ([], None),
    (["swarm.routing=router"], None),
    (["swarm.hop_compression=int8"], "hop_compression"),
    (["diloco.replicas=1"], "replicas=1"),
    (["ponw.hop_recheck_rate=0"], "hop_recheck_rate=0"),
])
def test_where_hop_rechecks_run(overrides, off):
    from neuroray.config_checks import hop_recheck_off
    from neuroray.configure import load_config

    reason = hop_recheck_off(load_config(["diloco.replicas=2", "swarm.num_stages=2", *overrides]))
    assert reason is None if off is None else off in reason
