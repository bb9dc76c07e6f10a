"""Held-out scores and reputation (#21 item 6): the scoring, the EMA, the aggregation weights, the receipts'
reward factor in the ledger. No Ray here; tests/test_reputation_ray.py runs it in a real run and resumes it."""

import json
import math

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from neuroray.config import AggregatorConfig, ModelConfig
from neuroray.diloco.aggregate import aggregate
from neuroray.ponw.reputation import BP, ReputationBook, normalized
from neuroray.training.reputation import StagePipeline, held_out_scores

MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16)
VOCAB, RANGES = 300, [(0, 1), (1, 2)]


# ----- the score ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    """A two-range model at theta0, a held-out batch, and what two honest holders of range 0 and one of
    range 1 learned by SGD on data from the same distribution (a fixed token pattern)."""
    from neuroray.model import build_stage

    torch.manual_seed(0)
    pattern = torch.randint(0, VOCAB, (12,))

    def batch(n):  # sequences that follow one cycle of the pattern, at random offsets
        starts = torch.randint(0, 12, (n,))
        seq = torch.stack([pattern[(s + torch.arange(9)) % 12] for s in starts])
        return seq[:, :-1], seq[:, 1:]

    stages = [build_stage(MODEL, VOCAB, s, RANGES, seed=0) for s in range(2)]
    theta0 = [parameters_to_vector(m.parameters()).detach().clone() for m in stages]
    opt = torch.optim.SGD([p for m in stages for p in m.parameters()], lr=0.5)
    for _ in range(5):
        x, y = batch(8)
        loss = stages[1].loss(stages[1](stages[0](x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    learned = [t0 - parameters_to_vector(m.parameters()).detach() for t0, m in zip(theta0, stages)]
    return theta0, learned, batch(4)


def _reference_loss(theta: list[torch.Tensor], inputs, labels) -> float:
    """The whole model, built afresh at these flat weights, chained once (no cached cuts)."""
    from torch.nn.utils import vector_to_parameters

    from neuroray.model import build_stage

    x = inputs
    for s, flat in enumerate(theta):
        module = build_stage(MODEL, VOCAB, s, RANGES, seed=0).eval()
        vector_to_parameters(flat, module.parameters())
        with torch.no_grad():
            x = module(x)
    with torch.no_grad():
        return float(module.loss(x, labels))


def test_an_update_that_lowers_held_out_loss_outscores_one_that_raises_it(world):
    theta0, learned, (x, y) = world
    pipe = StagePipeline(MODEL, VOCAB, RANGES, seed=0)
    noise = torch.randn(learned[0].numel(), generator=torch.Generator().manual_seed(1)) * float(learned[0].std())
    candidates = {"honest": (0, learned[0]), "flipped": (0, -learned[0]), "lazy": (0, torch.zeros_like(learned[0])),
                  "noise": (0, noise), "tail": (1, learned[1]), "malformed": (1, None)}
    base, scores = held_out_scores(pipe, theta0, candidates, 0.7, x, y)
    assert base == pytest.approx(_reference_loss(theta0, x, y), abs=1e-5)
    # each score is the loss the update removes, against the model rebuilt from scratch at the moved weights
    for key in ("honest", "flipped", "tail"):
        s, delta = candidates[key]
        moved = [t - 0.7 * delta if i == s else t for i, t in enumerate(theta0)]
        assert scores[key] == pytest.approx(base - _reference_loss(moved, x, y), abs=1e-5), key
    assert scores["honest"] > 0 > scores["flipped"] and scores["tail"] > 0
    assert scores["lazy"] == 0.0 and math.isnan(scores["malformed"])
    assert scores["noise"] < scores["honest"]
    by_range = normalized({k: scores[k] for k in ("honest", "flipped", "lazy", "noise")})
    assert by_range["honest"] == 1.0 and by_range["flipped"] == 0.0 and by_range["lazy"] == 0.0
    assert normalized({"tail": scores["tail"], "malformed": scores["malformed"]}) == {"tail": 1.0, "malformed": 0.0}
    # theta0 is back in every range afterwards: scoring again gives the same numbers
    assert held_out_scores(pipe, theta0, candidates, 0.7, x, y)[1]["honest"] == scores["honest"]


def test_normalized_scores():
    assert normalized({"a": 2.0, "b": 1.0, "c": -3.0, "d": float("nan")}) == {"a": 1.0, "b": 0.5, "c": 0.0, "d": 0.0}
    assert normalized({"a": -1.0, "b": 0.0}) == {}  # nobody helped: the round says nothing about who did
    assert normalized({}) == {}


# ----- the reputation -------------------------------------------------------------------------------
def test_reputation_moves_by_ema_from_the_prior_and_pays_nothing_below_the_floor():
    book = ReputationBook(decay=0.5, prior=0.5, floor=0.2)
    assert book.value("new") == 0.5 and book.reward_bp("new") == 5000
    book.update({"good": 1.0, "bad": 0.0})
    assert book.value("good") == 0.75 and book.value("bad") == 0.25
    book.update({"good": 1.0, "bad": 0.0})
    assert book.value("bad") == 0.125 and book.factor("bad") == 0.0 and book.reward_bp("bad") == 0
    assert book.reward_bp("good") == 8750 and book.rounds == 2
    # a low reputation is still scored: it can earn its way back
    for _ in range(3):
        book.update({"bad": 1.0})
    assert book.factor("bad") > 0.2
    with pytest.raises(ValueError):
        book.update({"x": 1.5})


def test_reputation_weights_are_none_when_all_equal():
    book = ReputationBook(0.5, 0.5, 0.1)
    assert book.weights(["a", "b", "c"]) is None  # nobody scored yet: the prior for all
    book.update({"a": 1.0, "b": 1.0, "c": 1.0})
    assert book.weights(["a", "b", "c"]) is None
    book.update({"c": 0.0})
    assert book.weights(["a", "b", "c"]) == [0.75, 0.75, 0.375]


def test_reputation_survives_a_save_and_restore_round_trip():
    book = ReputationBook(0.7, 0.5, 0.1)
    book.update({"a" * 64: 1.0, "b" * 64: 0.3})
    book.update({"a" * 64: 0.9})
    restored = ReputationBook(0.7, 0.5, 0.1)
    restored.load(json.loads(json.dumps(book.state())))  # as the snapshot's meta.json carries it
    assert restored.values == book.values and restored.rounds == 2
    assert [restored.reward_bp(n) for n in ("a" * 64, "b" * 64, "c" * 64)] == \
        [book.reward_bp(n) for n in ("a" * 64, "b" * 64, "c" * 64)]
    with pytest.raises(ValueError):
        restored.load({"values": {"a": 2.0}})


# ----- aggregation weights ----------------------------------------------------------------------------
RULES = [AggregatorConfig(name="mean"), AggregatorConfig(name="multi_krum", f=1),
         AggregatorConfig(name="geometric_median", f=1), AggregatorConfig(name="centered_clip", f=1),
         AggregatorConfig(name="mean", bucket=2), AggregatorConfig(name="median", f=1)]


@pytest.mark.parametrize("cfg", RULES, ids=lambda c: c.name + ("+bucket" if c.bucket else ""))
def test_equal_weights_leave_the_aggregate_bit_identical(cfg):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(1000, generator=g) for _ in range(5)]
    plain = aggregate(cfg, xs, 1000, seed=4)
    for w in ([0.6] * 5, [1.0] * 5, [0.0] * 5):
        weighted = aggregate(cfg, xs, 1000, seed=4, weights=w)
        assert torch.equal(plain.value, weighted.value) and plain.weights == weighted.weights


def test_reputation_weighs_the_mean_and_a_zero_weight_drops_the_input():
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(300, generator=g) for _ in range(4)]
    w = [1.0, 0.5, 0.25, 0.0]
    out = aggregate("mean", xs, 300, weights=w)
    ref = sum(wi * x.double() for wi, x in zip(w, xs)) / sum(w)  # float64 reference
    assert torch.allclose(out.value.double(), ref, atol=1e-6)
    assert out.weights[3] == 0.0  # not used: the receipts say aggregated=False and it earns nothing
    with pytest.raises(ValueError, match="weights"):
        aggregate("mean", xs, 300, weights=[1.0, -1.0, 1.0, 1.0])


def test_reputation_pulls_the_weighted_geometric_median_towards_trusted_inputs():
    xs = [torch.zeros(50), torch.zeros(50), torch.ones(50), torch.ones(50)]
    cfg = AggregatorConfig(name="geometric_median", f=1)
    towards_ones = aggregate(cfg, xs, 50, weights=[0.1, 0.1, 1.0, 1.0]).value
    towards_zeros = aggregate(cfg, xs, 50, weights=[1.0, 1.0, 0.1, 0.1]).value
    assert float(towards_ones.mean()) > 0.9 and float(towards_zeros.mean()) < 0.1


# ----- rewards ----------------------------------------------------------------------------------------
def test_the_receipts_reward_factor_scales_the_reward_and_is_bounded(tmp_path):
    from neuroray.ponw.authority import AuthorityError, receipt_from_payload, receipt_payload
    from neuroray.ponw.verifier import RegistrationError
    from tests._ponw import COORD, Clock, make_ledger, node, plain_receipt, receipt, registration, signed

    clock = Clock()
    ledger = make_ledger(tmp_path / "l.sqlite", clock)
    nodes = [node(0) for _ in range(3)]
    ledger.register(registration([rec for _, rec in nodes]))
    clock.t += 60
    paid = [ledger.submit(signed(ident, rec, clock.ms, 1), receipt(rec, 1, reward_bp=bp)).reward
            for (ident, rec), bp in zip(nodes, (BP, BP // 2, 0))]
    assert paid == [24_000, 12_000, 0]  # full, half, nothing: a reputation of 0 earns 0
    assert ledger.supply().consistent
    _, rec = nodes[0]
    with pytest.raises(RegistrationError):
        plain_receipt(rec, 2, reward_bp=BP + 1)
    payload = receipt_payload(plain_receipt(rec, 2))
    for bad in (BP + 1, -1, 0.5, True):  # a factor in [0, 1] only: no coordinator mistake can inflate a reward
        with pytest.raises(AuthorityError):
            receipt_from_payload({**payload, "reward_bp": bad})
    assert receipt_from_payload(payload).reward_bp == BP
    assert COORD.sign_receipt(plain_receipt(rec, 2, reward_bp=7)) != COORD.sign_receipt(plain_receipt(rec, 2))
    ledger.close()


def test_the_outer_step_weighs_by_reputation_and_reports_a_zero_weight_as_not_aggregated():
    from neuroray.config import DilocoConfig
    from neuroray.diloco.sync import outer_step

    theta0 = torch.zeros(64)
    deltas = [torch.full((64,), 1.0), torch.full((64,), 3.0)]
    cfg = DilocoConfig(outer_lr=1.0, outer_momentum=0.0, nesterov=False)
    plain, _, report = outer_step("mean", cfg, 0, theta0, None, *deltas, observe=True)
    assert torch.equal(plain, torch.full((64,), -2.0)) and report.not_aggregated == []
    weighted, _, report = outer_step("mean", cfg, 0, theta0, None, *deltas, observe=True, weights=[1.0, 0.0])
    assert torch.equal(weighted, torch.full((64,), -1.0)) and report.not_aggregated == [1]


@pytest.mark.parametrize("bad, match", [("ponw.reputation_decay=1.0", "reputation_decay"),
                                        ("ponw.reputation_batch=0", "reputation_batch"),
                                        ("ponw.reputation_floor=0.6", "above ponw.reputation_prior")])
def test_reputation_config_mistakes_are_named(bad, match):
    from neuroray.configure import load_config
    from neuroray.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(["ponw.reputation=true", bad])
