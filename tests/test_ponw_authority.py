"""Authority from keys (issue 21): coordinator-signed receipts and registrations, validator evidence.

Every signature here is a real secp256k1 signature and every ledger a real SQLite file. The abuses are
those the issue reports: a node writing its own receipt, and a node slashing an honest one on its word.
"""

import logging

import pytest
import torch

from neuroray.config import DilocoConfig, PonwConfig
from neuroray.ponw.authority import AuthorityError, Coordinator, receipt_from_payload, receipt_payload
from neuroray.ponw.identity import Identity
from neuroray.ponw.ledger import Ledger, LedgerError
from neuroray.ponw.proof import canonical_json
from neuroray.ponw.service import RoundProver, round_receipts
from tests._ponw import (
    COORD, LAYERS, TPB, Clock, evidence, identity, make_ledger, node, plain_receipt, receipt, registration, signed,
)


def dump(ledger: Ledger) -> list[str]:
    return list(ledger._db.iterdump())


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    ledger = make_ledger(tmp_path / "ledger.sqlite", clock)
    (a, ra), (b, rb), (v, rv) = node(0), node(1), node(1)
    ledger.register(registration([ra, rb, rv], validators=[rv.node_id]))  # only v may file evidence
    clock.t += 60
    honest = ledger.submit(signed(a, ra, clock.ms, 1), receipt(ra, 1))
    assert honest.accepted and honest.reward == 24_000
    yield ledger, clock, (a, ra), (b, rb), (v, rv), honest
    ledger.close()


# ----- the two abuses of the issue --------------------------------------------------------------
def test_a_self_written_receipt_credits_nothing(env):
    ledger, clock, _, (b, rb), *_ = env
    before, supply = dump(ledger), ledger.supply()
    rogue = Coordinator(b)  # b signs a generous receipt for itself with its own (registered) key
    forged = rogue.sign_receipt(plain_receipt(rb, 1, batches=400_000))
    out = ledger.submit(signed(b, rb, clock.ms, 1, batches=400_000), forged)
    assert (out.accepted, out.reason, out.reward, out.node_id) == (False, "receipt_signature", 0, rb.node_id)
    unsigned = ledger.submit(signed(b, rb, clock.ms, 1), plain_receipt(rb, 1))  # a bare receipt object
    assert (unsigned.accepted, unsigned.reason) == (False, "receipt")
    assert dump(ledger) == before and ledger.supply() == supply
    # nothing was written for the proof: with the coordinator's receipt it is credited
    assert ledger.submit(signed(b, rb, clock.ms, 1), receipt(rb, 1)).accepted


def test_an_evidence_free_slash_is_refused(env):
    ledger, clock, (a, ra), (b, rb), (v, rv), honest = env
    before, supply = dump(ledger), ledger.supply()
    wire = ledger.wire(honest.proof_id)
    for bad, reason in [
        (b"", "evidence"),  # nothing at all
        (b"spot check failed", "evidence"),
        (evidence(b, wire), "unknown_validator"),  # b is registered, but not as a validator
        (evidence(identity(), wire), "unknown_validator"),  # a stranger
        (evidence(a, wire), "unknown_validator"),  # the accused itself
        (evidence(v, wire, recomputed=3.01), "unfounded"),  # a validator, but the loss agrees within tolerance
        (evidence(v, wire, claimed=9_000_000), "unfounded"),  # not the loss the proof committed
        (evidence(v, wire, position=7), "unfounded"),  # not a committed batch
        (evidence(v, wire, recomputed=None, shard=0), "unfounded"),  # the proof does name shard 0
        (evidence(v, wire, recomputed=None, shard=None), "evidence"),  # names neither loss nor shard
    ]:
        out = ledger.invalidate(bad)
        assert (out.accepted, out.reason) == (False, reason), (reason, out)
    assert dump(ledger) == before and ledger.supply() == supply
    assert ledger.account(ra.node_id).balance == 24_000


# ----- evidence that holds ----------------------------------------------------------------------
def test_validator_evidence_claws_back_once_and_a_replay_is_refused(env, caplog):
    ledger, clock, (a, ra), _, (v, rv), honest = env
    good = evidence(v, ledger.wire(honest.proof_id), recomputed=9.0)
    out = ledger.invalidate(good)
    assert (out.reason, out.reward, out.slashed) == ("invalidated", -24_000, 0)  # nothing left to slash
    assert ledger.supply().consistent and ledger.supply().burned == 24_000
    before = dump(ledger)
    with caplog.at_level(logging.WARNING, logger="neuroray.ponw"):
        again = ledger.invalidate(good)
    assert (again.accepted, again.reason) == (False, "replay") and dump(ledger) == before
    # attributed: the log names the accused node and the validator who filed it
    assert any(ra.node_id[:12] in r.message and rv.node_id[:12] in r.message and "replay" in r.message
               for r in caplog.records)


def test_data_mismatch_evidence_and_coordinator_evidence(env):
    ledger, clock, (a, ra), _, (v, rv), honest = env
    out = ledger.invalidate(evidence(v, ledger.wire(honest.proof_id), recomputed=None, shard=3))
    assert out.reason == "invalidated" and "shard 3" in out.detail
    second = ledger.submit(signed(a, ra, clock.ms, 2), receipt(ra, 2))
    assert second.accepted and ledger.submit(signed(a, ra, clock.ms, 3), receipt(ra, 3)).accepted
    ledger.stake(ra.node_id, 10_000)  # balance 38000, stake 10000
    by_coordinator = ledger.invalidate(evidence(COORD.identity, ledger.wire(second.proof_id)))
    # clawback 24000 from the balance, then half of the 24000 left, stake first
    assert (by_coordinator.reason, by_coordinator.reward, by_coordinator.slashed) == ("invalidated", -24_000, 12_000)
    assert ledger.supply().burned == 24_000 + 24_000 + 12_000  # the coordinator takes no fee: all burned
    assert ledger.supply().consistent and ledger.account(rv.node_id).balance == 0


# ----- registrations ----------------------------------------------------------------------------
def test_only_the_coordinator_registers_keys(env, caplog):
    ledger, clock, (a, ra), (b, rb), *_ = env
    before = dump(ledger)
    intruder, rec = node(0)
    with pytest.raises(AuthorityError, match="not signed by this ledger's coordinator"):
        ledger.register(Coordinator(b).sign_registration([rec]))
    with pytest.raises(AuthorityError, match="Coordinator.sign_registration"):
        ledger.register([rec])  # plain records: no authority
    assert dump(ledger) == before
    out = ledger.submit(signed(intruder, rec, clock.ms, 1), receipt(rec, 1))
    assert (out.accepted, out.reason) == (False, "unknown_node")  # proofs under unregistered keys
    assert any(rec.node_id[:12] in r.message and "unknown_node" in r.message for r in caplog.records)
    signed_reg = registration([rec])
    assert ledger.register(signed_reg) == 1
    with pytest.raises(LedgerError, match="replay"):
        ledger.register(signed_reg)
    with pytest.raises(Exception, match="not a registered node"):
        ledger.register(registration([], validators=["ab" * 32]))


def test_a_ledger_keeps_its_coordinator(tmp_path):
    path = tmp_path / "l.sqlite"
    make_ledger(path).close()
    other = Identity.from_secret(b"\x07" * 32)
    with pytest.raises(LedgerError, match="belongs to coordinator") as err:
        Ledger(path, PonwConfig(synchronous="OFF"), coordinator_key=other.public_key)
    assert "\n" not in str(err.value)
    reopened = Ledger(path, create=False)  # the CLI: no key given, the stored one rules
    assert reopened.authority.node_id == COORD.node_id
    reopened.close()
    keyless = Ledger(tmp_path / "k.sqlite", PonwConfig(synchronous="OFF"), model_layers=LAYERS, tokens_per_batch=TPB)
    with pytest.raises(LedgerError, match="no coordinator key"):
        keyless.register(registration([node(0)[1]]))
    keyless.close()


# ----- malformed receipts -----------------------------------------------------------------------
def test_malformed_receipts_are_refused_and_write_nothing(env):
    ledger, clock, _, (b, rb), *_ = env
    good = receipt(rb, 1)
    payload = receipt_payload(plain_receipt(rb, 1))
    variants = [good[:-3], good + b" ", good.replace(b'"batches":10', b'"batches":10.0'),
                good.replace(b'"pseudo_gradient_norm":"1.0"', b'"pseudo_gradient_norm":"1.00"'),
                canonical_json({"payload": {**payload, "extra": 1}, "signature": "00" * 64}), b"x" * 5000]
    flipped = bytearray(good)
    flipped[good.index(b'"batches":') + 10] ^= 1  # 10 -> 00: still JSON, no longer the coordinator's
    variants.append(bytes(flipped))
    before = dump(ledger)
    for bad in variants:
        out = ledger.submit(signed(b, rb, clock.ms, 1), bad)
        assert not out.accepted and out.reason in ("receipt", "receipt_signature"), (bad[:60], out)
    assert dump(ledger) == before


def test_receipt_norms_round_trip_exactly():
    _, ra = node(0)
    r = plain_receipt(ra, 3, norm=0.1 + 0.2, median=1e-300, data_position=40)
    assert receipt_from_payload(receipt_payload(r)) == r
    for bad in ("nan", "-1.0", "1e400", "0.30000000000000001"):
        with pytest.raises(AuthorityError):
            receipt_from_payload({**receipt_payload(r), "pseudo_gradient_norm": bad})


# ----- item 3: the receipt's observations make the commitment and free-rider checks fire ----------
def test_observed_receipts_catch_commitment_lies_and_free_riders(tmp_path):
    """A round through the real outer step: its report's digests and norms become signed receipts."""
    from neuroray.diloco.sync import outer_step

    clock = Clock()
    ledger = make_ledger(tmp_path / "l.sqlite", clock)
    ids = [identity() for _ in range(3)]
    provers = [RoundProver(i, 0, 2, True, False, TPB) for i in ids]
    ledger.register(registration([p.registration() for p in provers]))
    clock.t += 60
    torch.manual_seed(0)
    theta0 = torch.randn(32)
    deltas = [0.01 * torch.randn(32), torch.zeros(32), 0.01 * torch.randn(32)]  # the second is a free rider
    new_theta0, _, report = outer_step("mean", DilocoConfig(), 0, theta0, None, *deltas, observe=True)
    from neuroray.ponw.service import tensor_digest

    report.theta0_after = tensor_digest(new_theta0)  # outer_step_task sets it (after any compression)
    wires = []
    for k, (p, d) in enumerate(zip(provers, deltas)):
        p.start_round(theta0, microbatches_done=0, data_position=8 * k, shard_id=0)
        p.note_pseudo_gradient(d)
        # the third holder claims the theta0 the round did NOT produce
        wires.append(p.finish_round(1, new_theta0 if k < 2 else theta0, 10, theta0_losses=[3.0], timestamp_ms=clock.ms))
    receipts = round_receipts([i.node_id for i in ids], 1, 10, report.observations, None,
                              report.theta0_before, report.theta0_after, data_positions=[0, 8, 16])
    outcomes = ledger.submit_many(list(zip(wires, COORD.sign_receipts(receipts))))
    assert outcomes[0].accepted and outcomes[0].reward > 0
    assert outcomes[1].accepted and outcomes[1].reward == 0  # free rider: zero norm earns nothing
    assert (outcomes[2].reason, outcomes[2].slashed >= 0) == ("implausible", True)
    assert "theta0_after" in outcomes[2].detail
    # a wrong data position is a lie too
    p = provers[0]
    p.start_round(new_theta0, 10, data_position=99, shard_id=0)
    p.note_pseudo_gradient(deltas[0])
    wire = p.finish_round(2, new_theta0, 20, theta0_losses=[3.0], timestamp_ms=clock.ms)
    rc = round_receipts([ids[0].node_id], 2, 10, [report.observations[0]], data_positions=[20])[0]
    out = ledger.submit(wire, COORD.sign_receipt(rc))
    assert out.reason == "implausible" and "data_position" in out.detail
    assert ledger.supply().consistent
