"""Replayed pseudo-gradients without Ray (#21 item 7, ``replay``): two DiLoCo rounds of 3 replicas on their own
Genesis streams, as fixed-routing Drivers read them; in round 2 each honest update leads on its own batches over
its stream's neighbours, a replay of round 1's update does not, and the outer step leaves a refused update out
and names its holder. tests/test_verification_ray.py runs it in real holders."""

import math
from pathlib import Path

import pytest
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from neuroray.config import AggregatorConfig, DilocoConfig, PonwConfig
from neuroray.configure import load_config
from neuroray.diloco.sync import outer_step
from neuroray.ponw.copies import scored_slice
from neuroray.ponw.replays import fresh_rows, lead, own_lead, replayed
from neuroray.training.replays import _tokens
from neuroray.training.copies import own_gains
from tests.test_copies import SMALL

RANGES, REPLICAS, H = [(0, 1), (1, 2)], 3, 4


@pytest.fixture(scope="module")
def rounds():
    """Rounds 1 and 2 of 3 replicas (2 ranges, H=4, AdamW kept across rounds as a holder keeps it; the outer
    step DiLoCo's on the mean): theta0 of round 2, every replica's round-1 and round-2 delta, its batches of rounds 1-3."""
    from neuroray.genesis import TokenStream, ensure_dataset, load_tokenizer
    from neuroray.model import build_stage
    from neuroray.training.reputation import StagePipeline

    torch.manual_seed(0)
    cfg = load_config(SMALL)
    root, manifest = ensure_dataset(cfg.data, log=lambda *a, **k: None)
    vocab = load_tokenizer(Path(root) / manifest.tokenizer_file).get_vocab_size()
    d, dl = cfg.data, cfg.diloco
    n = H * d.num_microbatches
    theta0 = [parameters_to_vector(build_stage(cfg.model, vocab, s, RANGES).parameters()).detach() for s in range(2)]
    models, opts, batches = [], [], []
    for r in range(REPLICAS):
        stream = TokenStream(root, manifest, f"replays-test-{r}", d.seq_len, d.microbatch_size, prefetch=False)
        batches.append([[stream.next_microbatch() for _ in range(n)] for _ in range(3)])
        stages = [build_stage(cfg.model, vocab, s, RANGES) for s in range(2)]
        models.append(stages)
        params = [p for m in stages for p in m.parameters()]
        opts.append(torch.optim.AdamW(params, lr=dl.inner_lr, weight_decay=dl.weight_decay, betas=(0.9, 0.95)))
    from neuroray.diloco.outer import OuterOptimizer

    outer = [OuterOptimizer(dl.outer_lr, dl.outer_momentum, dl.nesterov) for _ in range(2)]
    deltas, starts = [], []
    for k in range(2):
        starts.append(theta0)
        mine = []
        for r, (stages, opt) in enumerate(zip(models, opts)):
            for m, t0 in zip(stages, theta0):
                vector_to_parameters(t0.clone(), m.parameters())
            params = [p for m in stages for p in m.parameters()]
            for x, y in batches[r][k]:
                stages[1].loss(stages[1](stages[0](x)), y).backward()
                torch.nn.utils.clip_grad_norm_(params, dl.grad_clip)
                opt.step()
                opt.zero_grad()
            mine.append([t0 - parameters_to_vector(m.parameters()).detach() for t0, m in zip(theta0, stages)])
        deltas.append(mine)
        theta0 = [outer[s].step(t0, torch.stack([mine[r][s] for r in range(REPLICAS)]).mean(0))
                  for s, t0 in enumerate(theta0)]
    return {"theta0": starts[1], "deltas": deltas, "batches": batches, "pipe": StagePipeline(cfg.model, vocab, RANGES, 0)}


def test_round_two_honest_updates_lead_and_a_replay_does_not(rounds):
    """The loss lead (off by default, ``ponw.replay_min_lead=-2``: too weak at H=4): every replay leads less than its
    holder's honest update, and at -0.2 no honest update is refused and the replay of replica 2's embedding range
    is (the other two replays sit near -0.09, between -0.2 and the honest updates: at H=4 an honest update still
    carries much of the previous round in AdamW's momentum, docs/ponw.md)."""
    margin = -0.2
    leads = {}
    for s in range(2):
        for r in range(REPLICAS):
            b = rounds["batches"][r]
            sets = {"now": b[1], "before": b[0], "next": b[2]}
            for kind, k in (("honest", 1), ("replay", 0)):  # round 1's update sent again in round 2: a replay
                gains = own_gains(rounds["pipe"], rounds["theta0"], s, rounds["deltas"][k][r][s], sets)
                leads[kind, s, r] = (own_lead(gains), replayed(gains, margin))
    for s in range(2):
        for r in range(REPLICAS):
            assert leads["replay", s, r][0] < leads["honest", s, r][0], leads
            assert not leads["honest", s, r][1], leads
    assert leads["replay", 0, 2][1], leads


def test_on_the_embedding_range_a_replay_moved_its_fresh_rows_by_weight_decay_alone(rounds):
    """The decisive score where the embedding is: the rows of the tokens new in round 2's batches moved about 100x
    as much as never-seen rows in every honest update, 1x in every replay."""
    module = rounds["pipe"].stages[0]
    lo, hi = scored_slice(list(module.parameters()), True, module.embed.weight)
    vocab = module.embed.weight.shape[0]
    minimum = PonwConfig().replay_min_ratio
    for r in range(REPLICAS):
        seen, now = _tokens(rounds["batches"][r][0]), _tokens(rounds["batches"][r][1])
        rows = lambda d: d[lo:hi].view(vocab, -1)  # noqa: E731
        honest = fresh_rows(rows(rounds["deltas"][1][r][0]), rows(rounds["theta0"][0]), seen, now)
        replay = fresh_rows(rows(rounds["deltas"][0][r][0]), rows(rounds["theta0"][0]), seen, now)
        assert honest >= 5 * minimum and replay < 1.5, (r, honest, replay)
    assert math.isnan(fresh_rows(torch.ones(4, 2), torch.ones(4, 2), {0, 1}, {0, 1}))  # nothing fresh: no verdict


def test_the_lead_and_its_verdict():
    assert lead(2.0, 1.0) == 0.5 and lead(1.0, 2.0) == -0.5
    assert math.isnan(lead(0.0, 0.0)) and math.isnan(lead(float("nan"), 1.0))
    assert own_lead({"now": 2.0, "before": 1.0, "next": 0.0}) == pytest.approx(0.75)
    assert not replayed({"now": 2.0, "before": 1.0, "next": 0.0}, -0.15)
    assert replayed({"now": 1.0, "before": 3.0, "next": 1.0}, -0.15)  # (-2/3 + 0) / 2
    assert not replayed({"now": 0.0, "before": 0.0}, -0.15)  # a zero update: no verdict here
    assert not replayed({"now": 1.0}, -0.15)  # no neighbour to compare with


def test_the_outer_step_leaves_a_refused_update_out_and_names_it():
    torch.manual_seed(1)
    deltas = [torch.randn(64) for _ in range(4)]
    rule, dl = AggregatorConfig(name="trimmed_mean", f=1), DilocoConfig(outer_lr=1.0, outer_momentum=0.0, nesterov=False)
    theta0 = torch.zeros(64)
    new, _, report = outer_step(rule, dl, 0, theta0, None, *deltas, observe=True, refused={3: "replayed pseudo-gradient"})
    assert (3, "replayed pseudo-gradient") in report.rejected and 3 in report.not_aggregated
    assert report.observations[3] is not None  # observed as sent: its receipt still names what it sent
    # the rule saw the other three with f lowered by the one refused: their mean
    assert torch.allclose(new, -torch.stack(deltas[:3]).mean(0), atol=1e-6)


def test_a_refused_update_does_not_stop_the_default_rule():
    """The default mean tolerates f=0 faulty holders: a replay the coordinator refused must not count against that
    f (as a malformed payload does), or one caught replayer would freeze its range every round it replays."""
    torch.manual_seed(2)
    deltas = [torch.randn(32) for _ in range(3)]
    rule, dl = AggregatorConfig(name="mean", f=0), DilocoConfig(outer_lr=1.0, outer_momentum=0.0, nesterov=False)
    new, _, report = outer_step(rule, dl, 0, torch.zeros(32), None, *deltas, observe=True,
                                refused={0: "replayed pseudo-gradient"})
    assert not report.refused and report.accepted == [1, 2]
    assert (0, "replayed pseudo-gradient") in report.rejected and 0 in report.not_aggregated
    assert torch.allclose(new, -torch.stack(deltas[1:]).mean(0), atol=1e-6)
