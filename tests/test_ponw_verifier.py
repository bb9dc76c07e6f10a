"""The verifier: check order (cheapest first), plausibility against registration and receipts, spot checks."""

import random

import pytest
import torch

from neuroray.ponw.proof import SignedProof, loss_to_micro
from neuroray.ponw.verifier import DataMismatch, NodeRecord, Receipt, RegistrationError, spot_check
from tests._ponw import (
    LAYERS, TPB, Clock, digest, identity, make_ledger, node, plain_receipt, proof, receipt, registration, signed,
)


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    ledger = make_ledger(tmp_path / "l.sqlite", clock)
    (a, ra), (b, rb) = node(0), node(1)
    ledger.register(registration([ra, rb]))
    clock.t += 60  # a minute of work since registration
    yield ledger, clock, (a, ra), (b, rb)
    ledger.close()


class CountingBackend:
    """Wraps the real backend and counts signature verifications."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def verify(self, key, digest_, sig):
        self.calls += 1
        return self.inner.verify(key, digest_, sig)


def verdict(ledger, data, clock, rc=None):
    """The verifier's verdict, with the signed receipt opened as the ledger opens it."""
    return ledger.verifier.verify(data, ledger, clock.ms, None if rc is None else ledger.authority.receipt(rc))


def test_honest_proofs_pass_every_check(env):
    ledger, clock, (a, ra), (b, rb) = env
    for ident, rec in ((a, ra), (b, rb)):
        v = verdict(ledger, signed(ident, rec, clock.ms), clock, receipt(rec))
        assert (v.accepted, v.reason, v.useful, v.slash) == (True, "ok", True, False), v.detail


def broken(p) -> bytes:
    """The proof's payload under a well-formed (low-S) but wrong signature."""
    return SignedProof(p, bytes(31) + b"\x01" + bytes(31) + b"\x01").to_bytes()


def test_checks_run_cheapest_first(env):
    ledger, clock, (a, ra), _ = env
    counting = ledger.verifier.backend = CountingBackend(ledger.verifier.backend)
    # a stale proof with a wrong signature fails on its timestamp: the signature is never looked at
    assert verdict(ledger, broken(proof(ra, clock.ms - 301_000)), clock, receipt(ra)).reason == "timestamp"
    assert counting.calls == 0
    good = proof(ra, clock.ms)
    assert verdict(ledger, broken(good), clock, receipt(ra)).reason == "signature"
    assert counting.calls == 1
    # once booked, the payload is a replay whatever signature comes with it
    assert ledger.submit(good.sign(a).to_bytes(), receipt(ra)).accepted
    calls = counting.calls
    assert verdict(ledger, broken(good), clock, receipt(ra)).reason == "replay"
    # an unregistered node fails before any signature check
    stranger = identity()
    rec = NodeRecord(stranger.node_id, stranger.public_key, 0, 2, True, False)
    assert verdict(ledger, signed(stranger, rec, clock.ms), clock, receipt(rec)).reason == "unknown_node"
    assert counting.calls == calls


def test_signature_under_another_key_is_rejected_without_slash(env):
    ledger, clock, (a, ra), _ = env
    impostor = identity()
    p = proof(ra, clock.ms)
    forged = SignedProof(p, impostor.sign_digest(p.digest())).to_bytes()
    v = verdict(ledger, forged, clock, receipt(ra))
    assert (v.accepted, v.reason, v.slash, v.authentic) == (False, "signature", False, False)


LIES = {
    "tokens not batches x tokens per batch": dict(tokens_processed=10 * TPB + 1),
    "more layers than the model": dict(layers_held=LAYERS + 1),
    "another layer range": dict(layer_start=1),
    "embedding on the wrong stage": dict(has_embedding=False),
    "LM head it does not hold": dict(has_lm_head=True),
    "no theta0 commitment": dict(theta0_before=""),
    "no pseudo-gradient commitment": dict(pseudo_gradient=""),
    "driver without shard": dict(shard_id=None),
    "driver without losses": dict(theta0_losses=()),
    "more losses than batches": dict(theta0_losses=(1,) * 11),
}


@pytest.mark.parametrize("lie", LIES, ids=list(LIES))
def test_static_lies_are_implausible_and_slashable(env, lie):
    ledger, clock, (a, ra), _ = env
    v = verdict(ledger, signed(a, ra, clock.ms, **LIES[lie]), clock, receipt(ra))
    assert (v.accepted, v.reason, v.slash) == (False, "implausible", True), v.detail


def test_non_driver_must_not_claim_data(env):
    ledger, clock, _, (b, rb) = env
    for change in (dict(shard_id=3), dict(data_position=5), dict(theta0_losses=(1,)), dict(has_embedding=True)):
        v = verdict(ledger, signed(b, rb, clock.ms, **change), clock, receipt(rb))
        assert v.reason == "implausible", change


@pytest.mark.parametrize("field", ["pseudo_gradient", "theta0_before", "theta0_after"])
def test_commitments_must_match_what_the_orchestrator_received(env, field):
    ledger, clock, (a, ra), _ = env
    rc = receipt(ra, **{field: digest("something else")})
    assert verdict(ledger, signed(a, ra, clock.ms), clock, rc).reason == "implausible"


def test_data_position_must_match_the_orchestrator(env):
    ledger, clock, (a, ra), _ = env
    assert verdict(ledger, signed(a, ra, clock.ms, data_position=40), clock, receipt(ra, data_position=40)).accepted
    assert verdict(ledger, signed(a, ra, clock.ms, data_position=40), clock, receipt(ra, data_position=0)).slash


def test_claims_beyond_observed_work_are_lies(env):
    ledger, clock, (a, ra), _ = env
    v = verdict(ledger, signed(a, ra, clock.ms, batches=11), clock, receipt(ra, batches=10))
    assert (v.reason, v.slash) == ("implausible", True) and "swarm saw 10" in v.detail
    assert verdict(ledger, signed(a, ra, clock.ms, batches=9), clock, receipt(ra, batches=10)).accepted


def test_unobserved_and_mismatched_receipts_earn_nothing_but_are_not_slashed(env, tmp_path):
    ledger, clock, (a, ra), (b, rb) = env
    v = verdict(ledger, signed(a, ra, clock.ms), clock, None)
    assert (v.accepted, v.reason, v.slash) == (False, "unobserved", False)
    v = verdict(ledger, signed(a, ra, clock.ms), clock, receipt(rb))
    assert (v.accepted, v.reason, v.slash) == (False, "receipt_mismatch", False)
    v = verdict(ledger, signed(a, ra, clock.ms, rnd=2), clock, receipt(ra, rnd=1))
    assert v.reason == "receipt_mismatch"
    loose = make_ledger(tmp_path / "loose.sqlite", clock, require_receipts=False)
    loose.register(registration([ra]))
    assert verdict(loose, signed(a, ra, clock.ms), clock, None).accepted


def test_physical_bound_from_measured_throughput(tmp_path):
    clock = Clock()
    ledger = make_ledger(tmp_path / "l.sqlite", clock)
    a, ra = node(0)
    slow = NodeRecord(ra.node_id, ra.public_key, 0, 2, True, False, max_batches_per_s=1.0)
    ledger.register(registration([slow]))
    clock.t += 10  # 10 s at 1 batch/s, plus one second of slack: at most 11 batches
    assert verdict(ledger, signed(a, slow, clock.ms, batches=11), clock, receipt(slow, batches=50)).accepted
    v = verdict(ledger, signed(a, slow, clock.ms, batches=12), clock, receipt(slow, batches=50))
    assert v.reason == "implausible" and "physical bound" in v.detail


def test_free_riders_and_dropped_deltas_are_accepted_but_useless(env):
    ledger, clock, (a, ra), _ = env
    assert not verdict(ledger, signed(a, ra, clock.ms), clock, receipt(ra, norm=0.0)).useful
    assert not verdict(ledger, signed(a, ra, clock.ms), clock, receipt(ra, norm=0.05, median=1.0)).useful
    assert verdict(ledger, signed(a, ra, clock.ms), clock, receipt(ra, norm=0.5, median=1.0)).useful
    assert not verdict(ledger, signed(a, ra, clock.ms), clock, receipt(ra, aggregated=False)).useful


def test_registration_and_receipt_validation():
    a, ra = node(0)
    for bad in (dict(layer_start=2, layer_end=2), dict(layer_end=LAYERS + 1), dict(layer_start=1),
                dict(has_lm_head=True), dict(node_id="00" * 32), dict(max_batches_per_s=float("nan"))):
        fields = {**ra.__dict__, **bad}
        with pytest.raises(RegistrationError):
            NodeRecord(**fields).check(LAYERS)
    with pytest.raises(RegistrationError):
        Receipt(ra.node_id, 1, batches=-1)
    with pytest.raises(RegistrationError):
        Receipt(ra.node_id, 1, pseudo_gradient_norm=float("inf"))
    with pytest.raises(RegistrationError):
        Receipt.coerce({"node_id": ra.node_id, "outer_round": 1, "bonus": 1})
    assert Receipt.coerce(plain_receipt(ra).__dict__) == plain_receipt(ra)


# ----- spot checks ------------------------------------------------------------------------------
def test_spot_check_samples_a_committed_batch_and_compares_losses():
    _, ra = node(0)
    p = proof(ra, 0, batches=4, data_position=100, theta0_losses=(3_000_000, 3_100_000, 2_900_000, 3_050_000))
    truth = {100 + j: x / 1e6 for j, x in enumerate(p.theta0_losses)}
    seen = set()
    for seed in range(20):
        check = spot_check(p, lambda pr, pos: truth[pos] + 0.001, 0.01, random.Random(seed))
        assert check.ok and check.position in truth
        seen.add(check.position)
    assert len(seen) > 1  # the sample moves: a prover cannot know which batch is checked
    bad = spot_check(p, lambda pr, pos: truth[pos] + 0.5, 0.01, random.Random(0))
    assert not bad.ok and "recomputed" in bad.detail

    def wrong_shard(pr, pos):
        raise DataMismatch("not that shard")

    assert not spot_check(p, wrong_shard, 0.01, random.Random(0)).ok
    _, rb = node(1)
    assert spot_check(proof(rb, 0), lambda pr, pos: 0.0, 0.01) is None  # a Worker commits no batch


def test_ledger_spot_check_failure_rejects_and_slashes(env):
    ledger, clock, (a, ra), _ = env
    honest = ledger.submit(signed(a, ra, clock.ms, rnd=1), receipt(ra, rnd=1), recompute=lambda p, pos: 3.0)
    assert honest.accepted and honest.reward > 0
    ledger.stake(ra.node_id, honest.reward // 2)
    cheat = ledger.submit(signed(a, ra, clock.ms, rnd=2), receipt(ra, rnd=2), recompute=lambda p, pos: 5.0)
    assert (cheat.accepted, cheat.reason, cheat.reward) == (False, "spot_check", 0)
    assert cheat.slashed > 0 and ledger.supply().consistent


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A real Genesis dataset (a few small shards) and a tiny model over its vocabulary."""
    from neuroray.config import DataConfig, ModelConfig
    from neuroray.genesis import build_dataset
    from neuroray.model import build_monolith

    d = tmp_path_factory.mktemp("spot")
    text = "\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog {i * 7}. " * 4 for i in range(300))
    (d / "corpus.txt").write_text(text)
    cfg = DataConfig(source=str(d / "corpus.txt"), store=str(d / "store"), vocab_size=300, shard_tokens=3000,
                     eval_shards=1, seq_len=16, microbatch_size=2)
    manifest = build_dataset(cfg, str(d / "ds"), log=lambda *a, **k: None)
    torch.manual_seed(0)
    model = build_monolith(ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=32),
                           manifest.vocab_size, seed=0).eval()
    return str(d / "ds"), manifest, model


def test_validator_recomputes_a_drivers_batch_from_its_shard(tiny_data):
    from neuroray.genesis import TokenStream
    from neuroray.ponw.service import make_recompute

    root, manifest, model = tiny_data

    def loss_fn(x, y):
        with torch.no_grad():
            return float(model.loss(model(x), y))

    a, ra = node(0)
    # the Driver's honest round: stream position 5..8, losses at theta0 as the pipeline computed them
    stream = TokenStream(root, manifest, a.node_id, 16, 2)
    stream.seek(5)
    shard = stream.shard_id
    losses = tuple(loss_to_micro(loss_fn(*stream.next_microbatch())) for _ in range(4))
    recompute = make_recompute(root, manifest, 16, 2, loss_fn)
    honest = proof(ra, 0, batches=4, data_position=5, shard_id=shard, theta0_losses=losses)
    assert all(spot_check(honest, recompute, 1e-3, random.Random(s)).ok for s in range(4))
    # fabricated losses, or a claim about another shard, fail
    fake = proof(ra, 0, batches=4, data_position=5, shard_id=shard, theta0_losses=(1_000_000,) * 4)
    assert not spot_check(fake, recompute, 1e-3, random.Random(0)).ok
    other = (shard + 1) % len(manifest.train_shards)
    moved = proof(ra, 0, batches=4, data_position=5, shard_id=other, theta0_losses=losses)
    assert not spot_check(moved, recompute, 1e-3, random.Random(0)).ok


def test_routed_drivers_losses_are_recomputed_from_the_shared_ring(tiny_data):
    """Under swarm routing every Driver reads one ring starting at shard 0: ``ring_start=0`` checks it."""
    from neuroray.genesis import TokenStream
    from neuroray.ponw.service import make_recompute

    root, manifest, model = tiny_data

    def loss_fn(x, y):
        with torch.no_grad():
            return float(model.loss(model(x), y))

    a, ra = next((n, r) for n, r in (node(0) for _ in range(50))
                 if TokenStream(root, manifest, n.node_id, 16, 2).start_index != 0)  # own ring != shared ring
    shared = TokenStream(root, manifest, a.node_id, 16, 2, _start=0)
    shared.seek(6)
    shard = shared.shard_id
    losses = tuple(loss_to_micro(loss_fn(*shared.next_microbatch())) for _ in range(2))
    routed = proof(ra, 0, batches=2, data_position=6, shard_id=shard, theta0_losses=losses)
    assert all(spot_check(routed, make_recompute(root, manifest, 16, 2, loss_fn, ring_start=0), 1e-3,
                          random.Random(s)).ok for s in range(4))
    assert not spot_check(routed, make_recompute(root, manifest, 16, 2, loss_fn), 1e-3, random.Random(0)).ok
