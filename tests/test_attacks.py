"""Attack simulators: each attack's vector by hand, and what the outer step does with it."""

import math
from statistics import NormalDist

import pytest
import torch

from neuroray.config import AggregatorConfig, AttackConfig, DilocoConfig
from neuroray.configure import load_config
from neuroray.diloco.attacks import ATTACKS, alie_z, attack_problem, byzantine_count, simulate
from neuroray.diloco.sync import OuterMemory, outer_step

# four holders; with fraction 0.5 the first two are Byzantine
DELTAS = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0]), torch.tensor([5.0, 2.0]), torch.tensor([7.0, 6.0])]
MU = torch.tensor([4.0, 3.0])  # mean of all four true deltas
SIGMA = torch.tensor([math.sqrt(20 / 3), 2.0])  # sample std (ddof 1): sqrt((9+1+1+9)/3), sqrt((1+1+1+9)/3)


def run(name, **kw):
    out, _ = simulate(AttackConfig(name=name, fraction=0.5, **kw), DELTAS, 2)
    assert out[2] is DELTAS[2] and out[3] is DELTAS[3]  # honest holders untouched
    return out[:2]


def test_byzantine_count_rounds_half_up():
    assert byzantine_count(AttackConfig("alie", 0.25), 8) == 2
    assert byzantine_count(AttackConfig("alie", 0.25), 6) == 2  # 1.5 -> 2
    assert byzantine_count(AttackConfig("alie", 0.2), 6) == 1  # 1.2 -> 1
    assert byzantine_count(AttackConfig("alie", 1.0), 3) == 3
    assert byzantine_count(AttackConfig("none", 0.5), 8) == 0


def test_simple_attacks_by_hand():
    assert [t.tolist() for t in run("sign_flip")] == [[-1.0, -2.0], [-3.0, -2.0]]
    assert [t.tolist() for t in run("scaled", scale=1e6)] == [[1e6, 2e6], [3e6, 2e6]]
    assert [t.tolist() for t in run("zero")] == [[0.0, 0.0], [0.0, 0.0]]
    assert all(torch.isnan(t).all() for t in run("nan"))
    assert all(a is b for a, b in zip(simulate(AttackConfig("none", 0.5), DELTAS, 2)[0], DELTAS))


def test_omniscient_attacks_by_hand():
    for z in (1.0, 1.5):
        for t in run("alie", z=z):
            torch.testing.assert_close(t, (MU - z * SIGMA).float())
    # the paper's z for n=4, b=2: s = floor(4/2 + 1) - 2 = 1, z = Phi^-1(3/4)
    assert alie_z(4, 2) == pytest.approx(NormalDist().inv_cdf(0.75))
    assert alie_z(8, 2) == pytest.approx(NormalDist().inv_cdf(5 / 8))  # 0.3186
    for t in run("alie"):
        torch.testing.assert_close(t, (MU - alie_z(4, 2) * SIGMA).float())
    for eps in (0.1, 0.5, 2.0, 10.0):
        for t in run("ipm", epsilon=eps):
            torch.testing.assert_close(t, -eps * MU)
    # mimic: the honest delta farthest from the mean is holder 3's ([7, 6] is sqrt(18) away, [5, 2] sqrt(2))
    assert [t.tolist() for t in run("mimic")] == [[7.0, 6.0], [7.0, 6.0]]


def test_gaussian_noise_is_seeded():
    a, _ = simulate(AttackConfig("gaussian", 0.5, std=3.0), [torch.zeros(20000)] * 4, 20000, seed=1)
    b, _ = simulate(AttackConfig("gaussian", 0.5, std=3.0), [torch.zeros(20000)] * 4, 20000, seed=1)
    c, _ = simulate(AttackConfig("gaussian", 0.5, std=3.0), [torch.zeros(20000)] * 4, 20000, seed=2)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])
    assert a[0].std().item() == pytest.approx(3.0, rel=0.05)


def test_stale_replays_the_previous_round():
    cfg = AttackConfig("stale", 0.5)
    first, replay = simulate(cfg, DELTAS, 2)
    assert [t.tolist() for t in first[:2]] == [[0.0, 0.0], [0.0, 0.0]]  # nothing to replay yet
    new = [d + 10 for d in DELTAS]
    second, _ = simulate(cfg, new, 2, replay=replay)
    assert [t.tolist() for t in second[:2]] == [[1.0, 2.0], [3.0, 2.0]] and second[2] is new[2]


def test_attack_config_checks():
    assert attack_problem(AttackConfig("bogus")) and attack_problem(AttackConfig("ipm", 1.5))
    assert all(attack_problem(AttackConfig(name, 0.25)) is None for name in ATTACKS)


# ----- through the outer step ------------------------------------------------------------------------
def _deltas(n=8, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g) * 0.01
    return [base + 0.002 * torch.randn(d, generator=g) for _ in range(n)]


def test_attack_nan_is_a_valid_override():
    # Hydra's grammar reads a bare nan as a float; the documented `attack=nan` must still choose the attack
    assert load_config(["attack=nan", "attack.fraction=0.25"]).attack.name == "nan"


def test_nan_holders_are_rejected_and_named():
    theta0, deltas = torch.zeros(64), _deltas()
    new, _, report = outer_step(AggregatorConfig("trimmed_mean", f=2), DilocoConfig(), 3, theta0, None, *deltas,
                                attack=AttackConfig("nan", 0.25))
    assert report.byzantine == [0, 1] and report.accepted == [2, 3, 4, 5, 6, 7] and not report.refused
    assert [(i, "NaN" in why) for i, why in report.rejected] == [(0, True), (1, True)]
    assert torch.isfinite(new).all()
    assert report.not_aggregated == [0, 1]  # PoNW credits them nothing


def test_beyond_tolerance_is_refused_and_theta0_unchanged():
    theta0, momentum, deltas = torch.ones(64), torch.full((64,), 0.5), _deltas()
    new, new_m, report = outer_step(AggregatorConfig("trimmed_mean", f=2), DilocoConfig(), 0, theta0, momentum,
                                    *deltas, attack=AttackConfig("nan", 0.5))
    assert new is theta0 and new_m is momentum and torch.equal(theta0, torch.ones(64))
    assert "4 contributions failed screening" in report.refused and [i for i, _ in report.rejected] == [0, 1, 2, 3]
    assert report.not_aggregated == [0, 1, 2, 3]  # only the rejected ones: the others' work was valid


def test_robust_rule_shrugs_off_scaling_where_mean_does_not():
    theta0, deltas = torch.zeros(64), _deltas()
    honest = torch.stack(deltas[2:]).mean(0)
    attack = AttackConfig("scaled", 0.25, scale=1e6)
    mean, _, _ = outer_step("mean", DilocoConfig(outer_momentum=0.0, nesterov=False, outer_lr=1.0), 0, theta0, None,
                            *deltas, attack=attack)
    robust, _, _ = outer_step(AggregatorConfig("trimmed_mean", f=2), DilocoConfig(outer_momentum=0.0, nesterov=False,
                                                                                  outer_lr=1.0),
                              0, theta0, None, *deltas, attack=attack)
    assert (mean + honest).norm() > 1e3 * honest.norm()
    assert (robust + honest).norm() < 0.5 * honest.norm()


def test_krum_reports_the_holders_it_dropped():
    theta0, deltas = torch.zeros(64), _deltas()
    _, _, report = outer_step(AggregatorConfig("krum", f=2), DilocoConfig(), 0, theta0, None, *deltas,
                              attack=AttackConfig("gaussian", 0.25))
    assert len(report.dropped) == 7 and 0 in report.dropped and 1 in report.dropped
    assert report.not_aggregated == report.dropped
    _, _, report = outer_step(AggregatorConfig("krum", f=2), DilocoConfig(), 0, theta0, None, *deltas,
                              attack=AttackConfig("nan", 0.25))
    assert [i for i, _ in report.rejected] == [0, 1] and len(report.dropped) == 5
    assert report.not_aggregated == sorted([0, 1] + report.dropped)


def test_memory_carries_replay_and_previous_aggregate():
    theta0, deltas = torch.zeros(64), _deltas()
    cc = AggregatorConfig("centered_clip", f=2)
    out = outer_step(cc, DilocoConfig(), 0, theta0, None, *deltas, attack=AttackConfig("stale", 0.25),
                     memory=OuterMemory())
    assert len(out) == 4
    memory = out[3]
    assert memory.previous is not None and len(memory.replay) == 2 and torch.equal(memory.replay[0], deltas[0])
    later = outer_step(cc, DilocoConfig(), 0, out[0], out[1], *_deltas(seed=1), attack=AttackConfig("stale", 0.25),
                       memory=memory, round_index=1)
    assert torch.isfinite(later[0]).all() and later[2].accepted == list(range(8))
