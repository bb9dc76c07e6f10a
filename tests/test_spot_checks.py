"""Spot checks without Ray: the validator's recompute against the monolith, the ponw.* keys that steer it,
the fee and evidence the ledger books for it, and the naming of poisoned pseudo-gradients."""

from pathlib import Path

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from neuroray.config import AggregatorConfig, DilocoConfig, PonwConfig
from neuroray.configure import load_config
from neuroray.diloco.sync import outer_step
from neuroray.ponw.authority import sign_evidence
from neuroray.ponw.outliers import suspects
from neuroray.ponw.proof import SignedProof
from neuroray.ponw.service import RoundProver, validation_proof
from neuroray.ponw.verifier import NodeRecord, Receipt
from neuroray.training.audit import build_loss_at, recompute_checks
from tests._ponw import COORD, Clock, identity, registration
from tests.test_pipeline_ray import _write_corpus

QUIET = lambda *a, **k: None  # noqa: E731


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny dataset and a 2-range model at a trained-looking theta0 (random, not the init)."""
    from neuroray.genesis import Manifest, TokenStream, ensure_dataset, load_tokenizer
    from neuroray.model import build_monolith, build_stage

    tmp = tmp_path_factory.mktemp("spot")
    _write_corpus(tmp / "corpus.txt")
    cfg = load_config([f"data.source={tmp / 'corpus.txt'}", f"data.store={tmp / 'store'}", "data.vocab_size=320",
                       "data.shard_tokens=4096", "data.seq_len=32", "data.microbatch_size=4",
                       "data.num_microbatches=2", "model.d_model=64",
                       "model.n_layers=2", "model.max_seq_len=64"])
    root, manifest = ensure_dataset(cfg.data, log=QUIET)
    vocab = load_tokenizer(Path(root) / manifest.tokenizer_file).get_vocab_size()
    ranges = [(0, 1), (1, 2)]
    torch.manual_seed(1)
    theta0 = [parameters_to_vector(build_stage(cfg.model, vocab, s, ranges, seed=0).parameters()).detach()
              + 0.01 * torch.randn(())
              for s in range(2)]
    theta0 = [t + 0.02 * torch.randn_like(t) for t in theta0]
    spec = {"model": cfg.model, "vocab_size": vocab, "ranges": ranges, "seed": 0, "data_root": str(root),
            "manifest": manifest.to_json(), "seq_len": 32, "microbatch_size": 4, "ring_start": None}
    # the reference: the monolith holding the same weights
    mono = build_monolith(cfg.model, vocab, seed=0)
    state = {}
    for s in range(2):
        stage = build_stage(cfg.model, vocab, s, ranges, seed=0)
        torch.nn.utils.vector_to_parameters(theta0[s], stage.parameters())
        state |= stage.state_dict()
    mono.load_state_dict(state)

    def driver(scale: float = 1.0, position: int = 3):
        ident = identity()
        prover = RoundProver(ident, 0, 1, True, False, 32 * 4)
        stream = TokenStream(root, Manifest.from_json(manifest.to_json()), ident.node_id, 32, 4)
        stream.seek(position)
        prover.start_round(theta0[0], 0, position, stream.shard_id)
        losses = []
        with torch.no_grad():
            for _ in range(2):
                x, y = stream.next_microbatch()
                losses.append(float(mono.loss(mono(x), y)) * scale)
        prover.note_pseudo_gradient(torch.ones(3))
        return ident, prover, prover.finish_round(1, theta0[0], 2, theta0_losses=losses)

    return spec, theta0, mono, driver


def test_the_recompute_equals_the_monolith_and_catches_a_lying_driver(world):
    spec, theta0, mono, driver = world
    x = torch.randint(0, spec["vocab_size"], (4, 32))
    y = torch.randint(0, spec["vocab_size"], (4, 32))
    loss_fn = build_loss_at(spec["model"], spec["vocab_size"], spec["ranges"], 0, theta0)
    with torch.no_grad():
        assert loss_fn(x, y) == pytest.approx(float(mono.loss(mono(x), y)), abs=1e-5)
    _, _, honest = driver()
    _, _, liar = driver(scale=0.5)  # commits half the loss it computed
    checks = recompute_checks(spec, theta0, [honest, liar], seed=7, rate=1.0, tolerance=0.01, max_proof_bytes=4096)
    assert [(wire == honest, c.ok) for wire, c in checks] == [(True, True), (False, False)]
    assert abs(checks[1][1].claimed * 2 - checks[1][1].recomputed) < 1e-3  # the batch it committed, recomputed
    # ponw.spot_check_rate: 0 checks nothing; ponw.spot_check_tolerance: wide enough, the lie passes
    assert recompute_checks(spec, theta0, [honest, liar], 7, rate=0.0, tolerance=0.01, max_proof_bytes=4096) == []
    wide = recompute_checks(spec, theta0, [liar], 7, rate=1.0, tolerance=1.0, max_proof_bytes=4096)
    assert [c.ok for _, c in wide] == [True]
    # a theta0 that does not fit the model is refused, never recomputed into a false failure
    with pytest.raises(ValueError, match="theta0 has"):
        build_loss_at(spec["model"], spec["vocab_size"], spec["ranges"], 0, [theta0[0][:-1], theta0[1]])


def test_the_auto_tolerance_fits_the_holders_precision_and_catches_a_half_percent_lie(world):
    from neuroray.config import PonwConfig
    from neuroray.ponw.rules import Rules, spot_check_tolerance

    auto, given = PonwConfig(), PonwConfig(spot_check_tolerance=0.05)
    assert auto.spot_check_tolerance == 0  # auto by default
    assert spot_check_tolerance(auto, float32_only=True) == 1e-3
    assert spot_check_tolerance(auto, float32_only=False) == 1e-2
    assert spot_check_tolerance(given, float32_only=True) == 0.05
    assert Rules.from_config(auto).spot_check_tolerance == 1e-2  # a ledger that cannot know the holders: the wider
    spec, theta0, _, driver = world
    _, _, honest = driver()
    _, _, liar = driver(scale=0.995)
    tol = spot_check_tolerance(auto, float32_only=True)
    checks = recompute_checks(spec, theta0, [honest, liar], seed=7, rate=1.0, tolerance=tol, max_proof_bytes=4096)
    assert [c.ok for _, c in checks] == [True, False]
    assert recompute_checks(spec, theta0, [liar], 7, rate=1.0, tolerance=1e-2, max_proof_bytes=4096)[0][1].ok


def test_the_ledger_slashes_on_the_validators_evidence_and_pays_its_fee(world, tmp_path):
    from neuroray.ponw.ledger import Ledger

    spec, theta0, _, driver = world
    honest_id, honest_prover, honest = driver()
    liar_id, liar_prover, liar = driver(scale=0.5)
    validator = identity()
    vrec = NodeRecord(validator.node_id, validator.public_key, 0, 2, True, True)
    clock = Clock()
    cfg = PonwConfig(synchronous="OFF", validation_fee_per_batch=0.003)
    ledger = Ledger(tmp_path / "l.sqlite", cfg, model_layers=2, tokens_per_batch=128, clock=clock,
                    coordinator_key=COORD.public_key)
    ledger.register(registration([honest_prover.registration(), liar_prover.registration(), vrec],
                                 validators=[validator.node_id]))
    clock.t = SignedProof.from_bytes(honest).proof.timestamp_ms / 1000 + 60
    receipts = COORD.sign_receipts([Receipt(i.node_id, 1, batches=2) for i in (honest_id, liar_id)])
    assert all(o.accepted for o in ledger.submit_many(list(zip([honest, liar], receipts))))
    checks = recompute_checks(spec, theta0, [honest, liar], seed=3, rate=1.0, tolerance=0.01, max_proof_bytes=4096)
    for wire, check in checks:
        if not check.ok:
            out = ledger.invalidate(sign_evidence(validator, SignedProof.from_bytes(wire).proof, check))
            assert (out.node_id, out.reason) == (liar_id.node_id, "invalidated")
    fee = ledger.submit(validation_proof(validator, vrec, 1, len(checks), 128),
                        COORD.sign_receipt(Receipt(validator.node_id, 1, "validation", batches=len(checks))))
    assert fee.accepted and fee.reward == 2 * 3_000  # 2 recomputed batches x ponw.validation_fee_per_batch
    assert ledger.account(liar_id.node_id).balance == 0 and ledger.account(honest_id.node_id).balance > 0
    assert ledger.supply().consistent


def _round(seed: int, n: int = 5, numel: int = 4000):
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(numel, generator=g)
    return [common + 0.8 * torch.randn(numel, generator=g) for _ in range(n)]  # correlated, as DiLoCo deltas


def test_suspects_names_scaled_and_sign_flipped_deltas_and_no_honest_one():
    for seed in range(20):
        honest = _round(seed)
        assert suspects(honest, range(5), torch.stack(honest).mean(0), f=2) == []
    deltas = _round(0)
    deltas[1] = -deltas[1]
    deltas[3] = 10 * deltas[3]
    theta0 = torch.zeros(4000)
    _, _, report = outer_step(AggregatorConfig("trimmed_mean", f=2, nnm=True), DilocoConfig(), 0,
                              theta0, None, *deltas, observe=True)
    named = dict(report.rejected)
    assert sorted(named) == [1, 3] and report.accepted == [0, 2, 4], report
    assert "cosine" in named[1] and "norm" in named[3]
    assert report.not_aggregated == [1, 3]  # their receipts say aggregated=False: they earn nothing
    # at most f are named, and none when the run declares no Byzantine holder
    assert [i for i, _ in suspects(deltas, range(5), torch.stack(_round(0)).mean(0), f=1)] == [3]
    _, _, plain = outer_step("mean", DilocoConfig(), 0, theta0, None, *deltas, observe=True)
    assert plain.rejected == []
