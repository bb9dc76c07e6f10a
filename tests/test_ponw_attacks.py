"""Attacks on Proof of Neural Work (issue 5, point 7): each is rejected or earns nothing."""

import hashlib

import ecdsa
import pytest
import torch
from ecdsa.util import sigencode_string_canonize

from neuroray.ponw import crypto
from neuroray.ponw.proof import SignedProof
from neuroray.ponw.service import RoundProver, observe_delta, round_receipts
from tests._ponw import COORD, TPB, Clock, make_ledger, node, proof, receipt, registration, signed


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    ledger = make_ledger(tmp_path / "l.sqlite", clock)
    (a, ra), (b, rb) = node(0), node(1)
    ledger.register(registration([ra, rb]))
    clock.t += 60
    yield ledger, clock, (a, ra), (b, rb)
    ledger.close()


def dump(ledger):
    return list(ledger._db.iterdump())


def test_every_single_bit_flip_is_rejected(env):
    ledger, clock, (a, ra), _ = env
    wire = signed(a, ra, clock.ms)
    rc = receipt(ra)
    before = dump(ledger)
    reasons = set()
    for i in range(len(wire)):
        for bit in range(8):
            flipped = bytearray(wire)
            flipped[i] ^= 1 << bit
            out = ledger.submit(bytes(flipped), rc)
            assert not out.accepted and out.reward == 0, (i, bit, out)
            reasons.add(out.reason)
    assert dump(ledger) == before  # nothing was booked, nobody was slashed
    assert {"json", "canonical", "schema", "signature"} <= reasons
    assert ledger.submit(wire, rc).accepted  # and the untouched proof is still good


def test_replay_earns_nothing(env):
    ledger, clock, (a, ra), _ = env
    wire = signed(a, ra, clock.ms)
    first = ledger.submit(wire, receipt(ra))
    balance = ledger.account(ra.node_id).balance
    again = ledger.submit(wire, receipt(ra))
    assert first.accepted and (again.accepted, again.reason) == (False, "replay")
    assert ledger.account(ra.node_id).balance == balance


def _twin(wire: bytes) -> bytes:
    s = SignedProof.from_bytes(wire)
    return SignedProof(s.proof, crypto.high_s_twin(s.signature)).to_bytes()


def test_high_s_twin_is_rejected_before_and_after_the_original(env):
    ledger, clock, (a, ra), _ = env
    wire = signed(a, ra, clock.ms)
    twin = _twin(wire)
    assert twin != wire
    assert ledger.submit(twin, receipt(ra)).reason == "signature"  # never valid on its own
    assert ledger.submit(wire, receipt(ra)).accepted
    assert ledger.submit(twin, receipt(ra)).reason == "replay"


def test_re_signed_copy_is_a_replay(env):
    ledger, clock, (a, ra), _ = env
    p = proof(ra, clock.ms)
    original = p.sign(a).to_bytes()
    # the key owner signs the same payload again with a random nonce k: a different, valid signature
    sk = ecdsa.SigningKey.from_string(a.secret, curve=ecdsa.SECP256k1)
    other_sig = sk.sign_digest(p.digest(), sigencode=sigencode_string_canonize)
    copy = SignedProof(p, other_sig).to_bytes()
    assert copy != original
    backend = crypto.backend()
    assert backend.verify(backend.load_public_key(a.public_key), p.digest(), other_sig)
    assert ledger.submit(original, receipt(ra)).accepted
    out = ledger.submit(copy, receipt(ra))
    assert (out.accepted, out.reason, out.reward) == (False, "replay", 0)


@pytest.mark.parametrize("offset_s, accepted", [(-301, False), (301, False), (-300, True), (300, True)])
def test_timestamp_window_edges(env, offset_s, accepted):
    ledger, clock, (a, ra), _ = env
    out = ledger.submit(signed(a, ra, clock.ms + offset_s * 1000), receipt(ra))
    assert out.accepted == accepted and (accepted or out.reason == "timestamp")


class CountingBackend:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def verify(self, key, d, sig):
        self.calls += 1
        return self.inner.verify(key, d, sig)


def test_the_121st_proof_in_an_hour_is_rejected_without_touching_the_signature(env):
    ledger, clock, (a, ra), _ = env
    counting = ledger.verifier.backend = CountingBackend(ledger.verifier.backend)
    for rnd in range(1, 121):
        clock.t += 1
        assert ledger.submit(signed(a, ra, clock.ms, rnd), receipt(ra, rnd)).accepted, rnd
    calls = counting.calls
    out = ledger.submit(signed(a, ra, clock.ms, 121), receipt(ra, 121))
    assert (out.accepted, out.reason) == (False, "rate_limit") and counting.calls == calls
    clock.t += 3600  # an hour later the window has moved on
    assert ledger.submit(signed(a, ra, clock.ms, 122), receipt(ra, 122)).accepted


def test_self_minting_by_inflated_counts_earns_nothing(env):
    ledger, clock, (a, ra), _ = env
    attempts = [
        # tokens inflated alone: inconsistent with the batches
        (signed(a, ra, clock.ms, 1, batches=10, tokens_processed=10**9), receipt(ra, 1, 10), "implausible"),
        # tokens and batches inflated together: more than the swarm saw
        (signed(a, ra, clock.ms, 2, batches=10**6), receipt(ra, 2, 10), "implausible"),
        # beyond what any node could physically process since its last credit
        (signed(a, ra, clock.ms, 3, batches=10**6), receipt(ra, 3, 10**6), "implausible"),
        # within that bound, but with no observation at all
        (signed(a, ra, clock.ms, 4, batches=5000), None, "unobserved"),
        # "observed" by a receipt for someone else
        (signed(a, ra, clock.ms, 5, batches=5000), receipt(node(0)[1], 5, 5000), "receipt_mismatch"),
    ]
    for wire, rc, reason in attempts:
        out = ledger.submit(wire, rc)
        assert (out.accepted, out.reason, out.reward) == (False, reason, 0), out
    assert ledger.account(ra.node_id).balance == 0 and ledger.supply().minted == 0


def test_inflation_is_bounded_even_without_receipts(tmp_path):
    clock = Clock()
    ledger = make_ledger(tmp_path / "l.sqlite", clock, require_receipts=False, max_batches_per_s=10)
    a, ra = node(0)
    ledger.register(registration([ra]))
    clock.t += 60  # 60 s at 10 batches/s (+1 s slack): 610 batches is the physical bound
    assert ledger.submit(signed(a, ra, clock.ms, 1, batches=10**6)).reason == "implausible"
    out = ledger.submit(signed(a, ra, clock.ms, 2, batches=610))
    assert out.accepted and out.reward <= ledger.rules.max_reward_per_proof  # and the per-proof cap holds


def test_sybils_without_stake_earn_nothing_beyond_their_observed_work(tmp_path):
    clock = Clock()
    ledger = make_ledger(tmp_path / "l.sqlite", clock)
    honest_id, honest = node(0)
    sybils = [node(0) for _ in range(10)]
    ledger.register(registration([honest] + [rec for _, rec in sybils]))
    clock.t += 60
    # the swarm saw the honest node do 100 batches, and each Sybil 10 (the same 100 in total)
    honest_reward = ledger.submit(signed(honest_id, honest, clock.ms, 1, 100), receipt(honest, 1, 100)).reward
    for ident, rec in sybils:  # every Sybil claims the whole 100
        out = ledger.submit(signed(ident, rec, clock.ms, 1, 100), receipt(rec, 1, 10))
        assert (out.accepted, out.reward) == (False, 0)
    for ident, rec in sybils:  # and unobserved work earns nothing either
        assert ledger.submit(signed(ident, rec, clock.ms, 2, 10), None).reward == 0
    sybil_total = sum(ledger.submit(signed(ident, rec, clock.ms, 3, 10), receipt(rec, 3, 10)).reward
                      for ident, rec in sybils)
    assert sybil_total <= honest_reward  # splitting one node's work over identities gains nothing
    unregistered, rec = node(0)
    assert ledger.submit(signed(unregistered, rec, clock.ms, 1, 10), receipt(rec, 1, 10)).reason == "unknown_node"


def test_free_rider_earns_at_most_a_tenth_of_an_honest_holder_over_10_rounds(tmp_path):
    clock = Clock()
    ledger = make_ledger(tmp_path / "l.sqlite", clock)
    (h, _), (f, _), (g, _) = node(0), node(0), node(0)
    provers = [RoundProver(ident, 0, 2, True, False, TPB) for ident in (h, f, g)]  # 3 holders of range 0
    ledger.register(registration([p.registration() for p in provers]))
    torch.manual_seed(0)
    theta = torch.randn(64)
    for rnd in range(1, 11):
        clock.t += 60
        deltas = [0.01 * torch.randn(64), torch.zeros(64), 0.01 * torch.randn(64)]  # f sends a zero delta
        for k, p in enumerate(provers):
            p.start_round(theta, microbatches_done=40 * (rnd - 1), data_position=40 * (rnd - 1), shard_id=0)
            p.note_pseudo_gradient(deltas[k])
        theta = theta - (deltas[0] + deltas[2]) / 3
        wires = [p.finish_round(rnd, theta, 40 * rnd, theta0_losses=[3.0], timestamp_ms=clock.ms) for p in provers]
        receipts = round_receipts([p.identity.node_id for p in provers], rnd, 40, [observe_delta(d) for d in deltas])
        outcomes = ledger.submit_many(list(zip(wires, COORD.sign_receipts(receipts))))
        assert all(o.accepted for o in outcomes), outcomes
    honest = ledger.account(h.node_id).balance
    free = ledger.account(f.node_id).balance
    assert honest > 0 and free <= honest / 10
    # claiming an honest holder's delta instead of its own zero one is a lie, and slashed
    p = provers[1]
    p.start_round(theta, 400, 400, 0)
    p.note_pseudo_gradient(deltas[0])
    wire = p.finish_round(11, theta, 440, theta0_losses=[3.0], timestamp_ms=clock.ms)
    rc = round_receipts([f.node_id], 11, 40, [observe_delta(torch.zeros(64))])[0]
    assert ledger.submit(wire, COORD.sign_receipt(rc)).reason == "implausible"


def test_proof_id_ignores_the_signature():
    """The replay key is the payload hash: it does not move when the signature does."""
    _, ra = node(0)
    p = proof(ra, 0)
    assert p.proof_id == hashlib.sha256(p.message()).hexdigest()
