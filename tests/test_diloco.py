"""DiLoCo math: the outer step starts from theta0, matches torch's Nesterov SGD, mean aggregation."""

import pytest
import torch

from neuroray.config import AggregatorConfig, DilocoConfig, ModelConfig
from neuroray.diloco.aggregate import AggregationRefused, aggregate, screen
from neuroray.diloco.compress import decode
from neuroray.diloco.outer import OuterOptimizer
from neuroray.diloco.sync import outer_step
from neuroray.swarm.holder import HolderSpec, StageHolder


def test_outer_step_hand_computed_from_theta0():
    # theta0 = 1.0, post-inner weights 0.8 -> delta 0.2.
    # Nesterov, first round: buf = 0.2, step = 0.2 + 0.9 * 0.2 = 0.38, theta0' = 1 - 0.7 * 0.38 = 0.734.
    # Had it (wrongly) started from the post-inner weights: 0.8 - 0.266 = 0.534.
    opt = OuterOptimizer(lr=0.7, momentum=0.9, nesterov=True)
    new = opt.step(torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64))
    assert new.item() == pytest.approx(0.734, abs=1e-12)
    # second round: delta 0.1 -> buf = 0.9 * 0.2 + 0.1 = 0.28, step = 0.1 + 0.9 * 0.28 = 0.352
    newer = opt.step(new, torch.tensor([0.1], dtype=torch.float64))
    assert newer.item() == pytest.approx(0.734 - 0.7 * 0.352, abs=1e-12)


def test_outer_step_matches_torch_sgd_nesterov():
    torch.manual_seed(0)
    theta0 = torch.randn(50, dtype=torch.float64)
    p = torch.nn.Parameter(theta0.clone())
    ref = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    ours = OuterOptimizer(0.7, 0.9, True)
    current = theta0.clone()
    for _ in range(4):
        delta = torch.randn(50, dtype=torch.float64) * 0.1
        p.grad = delta.clone()
        ref.step()
        current = ours.step(current, delta)
        torch.testing.assert_close(current, p.detach(), rtol=0, atol=1e-12)


def test_plain_momentum_and_no_momentum():
    assert OuterOptimizer(1.0, 0.0, False).step(torch.tensor([1.0]), torch.tensor([0.25])).item() == 0.75
    # momentum 0 with nesterov left at its default is plain SGD, not an error at the first outer step
    assert OuterOptimizer(1.0, 0.0, True).step(torch.tensor([1.0]), torch.tensor([0.25])).item() == 0.75
    with pytest.raises(ValueError):
        OuterOptimizer(1.0, -0.1, True)


def test_mean_aggregate_and_screening():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    res = aggregate("mean", [a, b], numel=2)
    assert res.value.tolist() == [2.0, 4.0] and res.accepted == [0, 1]
    bad = [a, torch.tensor([float("nan"), 0.0]), torch.zeros(3), torch.zeros(2, dtype=torch.float64), b]
    with pytest.raises(AggregationRefused, match="3 contributions failed screening"):
        aggregate("mean", bad, numel=2)  # f=0: no faulty holder expected, three found
    res = aggregate(AggregatorConfig("mean", f=3), bad, numel=2)
    assert res.value.tolist() == [2.0, 4.0]
    assert [(r.index, r.reason.split()[0]) for r in res.rejected] == [(1, "contains"), (2, "shape"), (3, "dtype")]
    with pytest.raises(AggregationRefused):
        aggregate("mean", [torch.tensor([float("inf"), 0.0])], numel=2)
    accepted, rejected = screen([a] * 3, 2)
    assert accepted == [0, 1, 2] and not rejected
    # identical inputs return exactly that input
    x = torch.randn(1000)
    assert torch.equal(aggregate("mean", [x] * 7, x.numel()).value, x)


def _holder(tmp_path, stage, ranges, replica=0):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16)
    spec = HolderSpec(replica=replica, stage=stage, ranges=ranges, model=cfg, vocab_size=64,
                      diloco=DilocoConfig(inner_lr=1e-2), seed=0, key_path=str(tmp_path / f"k{replica}{stage}.pem"))
    return StageHolder(spec)


def test_outer_step_task_applies_to_theta0_not_post_inner_weights(tmp_path):
    """Two replicas of a one-stage model train apart, then one outer step (the function the Ray task
    runs) makes both equal theta0 - lr * (1 + m) * mean(delta): a hand computation from theta0."""
    ranges = [(0, 2)]
    holders = [_holder(tmp_path, 0, ranges, replica=r) for r in range(2)]
    theta0 = holders[0].flat_params()
    assert torch.equal(theta0, holders[1].flat_params())
    g = torch.Generator().manual_seed(0)
    for i, h in enumerate(holders):
        for _ in range(3):
            x = torch.randint(0, 64, (2, 8), generator=g)
            h.forward_backward(i, x, torch.roll(x, -1, 1), 1.0)
            h.step()
    deltas = [decode(h.pseudo_gradient()) for h in holders]  # compression=none: the float32 vector itself
    assert not torch.equal(deltas[0], deltas[1]) and deltas[0].abs().sum() > 0
    torch.testing.assert_close(deltas[0], theta0 - holders[0].flat_params())
    new_theta0, momentum, report = outer_step("mean", DilocoConfig(), 0, theta0, None, *deltas)
    mean = (deltas[0] + deltas[1]) / 2
    expected = theta0 - 0.7 * (1 + 0.9) * mean
    torch.testing.assert_close(new_theta0, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(momentum, mean, rtol=0, atol=1e-7)
    assert report.accepted == [0, 1] and not report.refused
    for h in holders:
        h.load_theta0(new_theta0)
        torch.testing.assert_close(h.flat_params(), expected, rtol=0, atol=1e-6)
        assert decode(h.pseudo_gradient()).abs().max() == 0  # restarted from theta0


def test_refused_outer_step_leaves_theta0_unchanged():
    theta0, momentum = torch.ones(4), torch.full((4,), 0.5)
    bad = [torch.full((4,), float("nan")), torch.zeros(3)]
    new_theta0, new_momentum, report = outer_step("mean", DilocoConfig(), 1, theta0, momentum, *bad)
    assert new_theta0 is theta0 and new_momentum is momentum
    assert report.refused and "NaN" in report.refused and "shape" in report.refused


def test_config_knows_where_the_outer_step_runs():
    from neuroray.configure import load_config
    from neuroray.errors import ConfigError

    assert load_config([]).diloco.outer_step_in == "actor"
    assert load_config(["diloco.outer_step_in=task"]).diloco.outer_step_in == "task"
    with pytest.raises(ConfigError, match="diloco.outer_step_in=thread is unknown; choose actor or task"):
        load_config(["diloco.outer_step_in=thread"])


def _scripted_holders(ray, theta0: list, script: list) -> list:
    """Per range, actors with just the DiLoCo surface of a stage holder: a scripted pseudo-gradient per round."""

    class FakeHolder:  # local, so Ray ships it by value and its workers need not import this test module
        def __init__(self, theta0, deltas):
            self.theta, self.deltas, self.round = theta0.clone(), deltas, 0

        def flat_params(self):
            return self.theta

        def pseudo_gradient(self):
            return self.deltas[self.round % len(self.deltas)]

        def load_theta0(self, theta0):
            self.theta, self.round = theta0.clone(), self.round + 1

    return [[ray.remote(num_cpus=0)(FakeHolder).remote(t, deltas) for deltas in per_holder]
            for t, per_holder in zip(theta0, script)]


@pytest.mark.ray
@pytest.mark.parametrize("where", ["actor", pytest.param("task", marks=pytest.mark.slow)])
def test_outer_sync_ray_tasks_match_the_function_per_range(ray_cluster, where):
    """Two ranges x 3 holders on Ray, trimmed mean f=1 under a stale-replay attack then a NaN attack: every
    range's step (in its long-lived actor, or a fresh task each round) returns what outer_step computes
    in-process, bit for bit, Byzantine and rejected holders are named, and a refused step leaves theta0 and
    momentum untouched."""
    from neuroray.config import AggregatorConfig, AttackConfig
    from neuroray.diloco.sync import OuterMemory, OuterSync

    ray = ray_cluster
    g = torch.Generator().manual_seed(0)
    sizes, n, rounds = [30, 17], 3, 2
    theta0 = [torch.randn(d, generator=g) for d in sizes]
    script = [[[torch.randn(d, generator=g) * 0.1 for _ in range(rounds)] for _ in range(n)] for d in sizes]
    holders = _scripted_holders(ray, theta0, script)
    agg, dl = AggregatorConfig("trimmed_mean", f=1), DilocoConfig(outer_step_in=where)
    attack = AttackConfig("stale", fraction=0.34)
    sync = OuterSync(holders, dl, agg, attack, seed=7)
    expected = [(theta0[s], None, OuterMemory()) for s in range(len(sizes))]
    for r in range(rounds):
        reports, loads = sync.submit()
        got = ray.get(reports + loads)[: len(reports)]
        for s in range(len(sizes)):
            t, m, mem = expected[s]
            t, m, report, mem = outer_step(agg, dl, s, t, m, *[script[s][i][r] for i in range(n)], attack=attack,
                                           memory=mem, round_index=r, seed=7)
            expected[s] = (t, m, mem)
            assert got[s].range_index == s and got[s].byzantine == [0] and got[s].accepted == list(range(n))
            torch.testing.assert_close(ray.get(sync.theta0[s]), t, rtol=0, atol=0)
            torch.testing.assert_close(ray.get(sync.momentum[s]), m, rtol=0, atol=0)
            for h in holders[s]:  # every holder of the range restarted from the new theta0
                torch.testing.assert_close(ray.get(h.flat_params.remote()), t, rtol=0, atol=0)

    # 2 of 3 holders send NaN: 1 acceptable < 2f+1 = 3, so the step is refused and theta0 stays
    before = [ray.get(t) for t in sync.theta0]
    sync.attack = AttackConfig("nan", fraction=0.67)
    reports, loads = sync.submit()
    for s, report in enumerate(ray.get(reports)):
        assert report.refused and [i for i, _ in report.rejected] == [0, 1]
        assert torch.equal(ray.get(sync.theta0[s]), before[s])
    ray.get(loads)
    sync.close()


def _step_workers(ray, actor_ids: list[str], calls: int) -> list[str]:
    """The worker that ran each OuterStepActor.step call of these actors, in order (Ray's timeline; its task
    events arrive about once a second, so it is read until every call is in)."""
    import time

    while True:
        events = sorted((e for e in ray.timeline() if e.get("cat") == "task::OuterStepActor.step"
                         and e["args"]["task_id"][-32:] in actor_ids), key=lambda e: e["ts"])
        if len(events) >= calls:
            return [e["tid"] for e in events]
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.slow  # ~20 s of actor kills and restarts; make test sits near its 15-minute budget on 2 cores
@pytest.mark.timeout(120)
def test_outer_step_actor_is_reused_restarted_and_replaced(ray_cluster):
    """One range's outer steps run in one actor process round after round. Its process killed, Ray restarts it
    (a new worker); the actor killed for good, the round that finds it dead fails, is rolled back as the
    trainer does, and the redo runs in a new actor. Every round's theta0 and momentum are the in-process
    step's, bit for bit: centered clipping's centre (the step's memory) crosses each change of process."""
    from neuroray.config import AggregatorConfig
    from neuroray.diloco.sync import OuterMemory, OuterSync

    ray = ray_cluster
    g = torch.Generator().manual_seed(1)
    n, rounds = 2, 5
    theta0 = torch.randn(40, generator=g)
    script = [[torch.randn(40, generator=g) * 0.1 for _ in range(rounds)] for _ in range(n)]
    holders = _scripted_holders(ray, [theta0], [script])
    agg, dl = AggregatorConfig("centered_clip"), DilocoConfig()
    sync = OuterSync(holders, dl, agg, seed=3, node_id=ray.get_runtime_context().get_node_id())  # pinned there
    expected = [theta0, None, OuterMemory()]

    def one_round(r):
        reports, loads = sync.submit()
        ray.get(reports + loads)
        t, m, _, mem = outer_step(agg, dl, 0, *expected[:2], *[script[i][r] for i in range(n)], memory=expected[2],
                                  round_index=r, seed=3)
        expected[:] = [t, m, mem]
        assert torch.equal(ray.get(sync.theta0[0]), t) and torch.equal(ray.get(sync.momentum[0]), m)

    first = sync.actors.for_range(0)
    ids = [first._actor_id.hex()]
    one_round(0)
    one_round(1)
    _step_workers(ray, ids, 2)  # a killed process takes the task events it has not sent yet with it
    ray.kill(first, no_restart=False)  # its process dies; Ray starts it again
    one_round(2)
    assert sync.actors.for_range(0) is first and sync.actors.replaced == 0
    _step_workers(ray, ids, 3)
    ray.kill(first)  # for good
    saved = (list(sync.theta0), list(sync.momentum), list(sync.memory))
    reports, loads = sync.submit()
    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(reports)
    sync.theta0, sync.momentum, sync.memory = map(list, saved)
    sync.rounds -= 1
    one_round(3)
    second = sync.actors.for_range(0)
    assert second is not first and sync.actors.replaced == 1
    one_round(4)
    assert sync.actors.for_range(0) is second
    workers = _step_workers(ray, ids + [second._actor_id.hex()], 5)
    assert workers[0] == workers[1] and len(set(workers)) == 3 and workers[3] == workers[4], workers
    sync.close()
