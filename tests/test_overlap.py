"""diloco.overlap without Ray: the refused combinations, and in-process holders checked against the outer
step computed directly -- what an overlapped holder sends, trains from and lands on."""

import pytest
import torch

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.configure import load_config
from neuroray.diloco.compress import decode
from neuroray.diloco.outer import OuterOptimizer
from neuroray.diloco.overlap import overlap_problem, recover_step
from neuroray.diloco.sync import outer_step, outer_step_task
from neuroray.errors import ConfigError
from neuroray.swarm.holder import HolderSpec, StageHolder


@pytest.mark.parametrize("args, expected", [
    (("later", 1, 20, 1, "fixed", "mean", "tiny"), "diloco.overlap=later is unknown"),
    (("delayed", 20, 20, 1, "fixed", "mean", "tiny"), "must land before the next round ends"),
    (("delayed", 1, 20, 2, "fixed", "mean", "tiny"), "use one or the other"),
    (("eager", 1, 20, 1, "router", "mean", "tiny"), "needs swarm.routing=fixed"),
    (("eager", 1, 20, 1, "fixed", "multi_krum", "tiny"), "no stand-in"),
    (("delayed", 1, 20, 1, "fixed", "mean", "auto"), "model=auto"),
])
def test_combinations_that_cannot_work_are_named(args, expected):
    problem = overlap_problem(*args)
    assert expected in problem and "\n" not in problem
    assert overlap_problem("none", *args[1:]) is None


def test_refused_at_start_in_one_line_and_the_keys_compose():
    with pytest.raises(ConfigError, match="no stand-in") as info:
        load_config(["diloco.overlap=eager", "aggregator=krum", "aggregator.f=1", "diloco.replicas=5"])
    assert "\n" not in str(info.value)
    d = load_config(["diloco.overlap=delayed", "diloco.overlap_steps=3"]).diloco
    assert (d.overlap, d.overlap_steps) == ("delayed", 3) and DilocoConfig().overlap == "none"


def _holder(tmp_path, replica, mode, compression="none"):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16)
    dl = DilocoConfig(inner_lr=1e-2, overlap=mode, compression=compression, compression_block=64)
    return StageHolder(HolderSpec(replica=replica, stage=0, ranges=[(0, 2)], model=cfg, vocab_size=64, diloco=dl,
                                  seed=0, key_path=str(tmp_path / f"k{replica}.pem")))


def _train(h, g, steps=2):
    for i in range(steps):
        x = torch.randint(0, 64, (2, 8), generator=g)
        h.forward_backward(i, x, torch.roll(x, -1, 1), 1.0)
        h.step()


@pytest.mark.parametrize("mode", ["delayed", "eager"])
def test_overlapped_holders_land_on_the_aggregate_plus_their_progress(tmp_path, mode):
    """Two holders, two rounds: each sends theta0 - theta, trains on (delayed: from its own weights; eager: from
    theta0 - lr (1 + m) delta, its own delta through the outer optimizer), and when the outer step lands it
    holds exactly theta0_new + what it learned since; theta0 is the aggregate's, computed here by hand."""
    d = DilocoConfig()
    holders = [_holder(tmp_path, r, mode) for r in range(2)]
    g = torch.Generator().manual_seed(0)
    theta0, buf, previous = holders[0].flat_params(), None, None
    for rnd in range(2):
        for h in holders:
            _train(h, g)
        ends = [h.flat_params() for h in holders]
        payloads = [h.send_pseudo_gradient() for h in holders]
        deltas = [decode(p) for p in payloads]
        for h, end, delta in zip(holders, ends, deltas):
            torch.testing.assert_close(delta, theta0 - end, rtol=0, atol=0)
            if mode == "delayed":  # goes on from its own weights
                assert torch.equal(h.flat_params(), end)
            else:  # restarts from its guess: the outer optimizer with its fresh delta standing in for its
                # share of the mean, the last round's aggregate for the others' (its own delta alone at first)
                opt = OuterOptimizer(d.outer_lr, d.outer_momentum, d.nesterov)
                opt.buf = None if buf is None else buf.clone()
                stand_in = delta if previous is None else (delta + previous) / 2
                torch.testing.assert_close(h.flat_params(), opt.step(theta0, stand_in), rtol=0, atol=2e-6)
        bases = [h.flat_params() for h in holders]
        for h in holders:
            _train(h, g, steps=1)  # the overlap window: one inner step while the outer step runs
        new_theta0, momentum, report = outer_step("mean", d, 0, theta0, buf, *payloads)
        mean = (deltas[0] + deltas[1]) / 2
        hand = mean if buf is None else 0.9 * buf + mean
        torch.testing.assert_close(new_theta0, theta0 - 0.7 * (mean + 0.9 * hand), rtol=0, atol=1e-6)
        for h, base in zip(holders, bases):
            before = h.flat_params()
            assert h.land_outer(rnd + 1, new_theta0, [new_theta0]) is False
            assert torch.equal(h.theta0.cpu(), new_theta0) and h.outer_rounds == rnd + 1
            torch.testing.assert_close(h.flat_params(), new_theta0 + (before - base), rtol=0, atol=1e-6)
            assert h.land_outer(rnd + 1, new_theta0, [new_theta0]) is False  # landed: a repeat changes nothing
            torch.testing.assert_close(h.flat_params(), new_theta0 + (before - base), rtol=0, atol=1e-6)
            if mode == "eager":  # the aggregate and momentum the holder recovered from the step are the outer step's
                torch.testing.assert_close(h.outer.outer_buf, momentum, rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(h.outer.outer_grad, mean, rtol=1e-3, atol=1e-6)
        theta0, buf, previous = new_theta0, momentum, mean


def test_aggregate_and_momentum_recovered_from_steps_follow_the_outer_optimizer():
    g = torch.Generator().manual_seed(1)
    for nesterov, m in ((True, 0.9), (False, 0.9), (False, 0.0)):
        opt, est, theta = OuterOptimizer(0.7, m, nesterov), None, torch.randn(100, generator=g)
        for _ in range(4):
            agg = torch.randn(100, generator=g)
            new = opt.step(theta, agg)
            got, est = recover_step(est, theta, new, 0.7, m, nesterov)
            torch.testing.assert_close(got, agg, rtol=1e-4, atol=1e-5)
            assert (est is None) if m == 0 else torch.allclose(est, opt.buf, rtol=1e-4, atol=1e-5)
            theta = new
        assert recover_step(est, theta, theta.clone(), 0.7, m, nesterov) == (None, est)  # refused: unchanged


def test_int8_update_lands_and_a_snapshot_with_a_round_in_flight_restores_exactly(tmp_path):
    """int8: the task's compressed update lands to its theta0 bit for bit. A snapshot taken with the round in
    flight, restored in a fresh holder, lands on exactly the weights the original does."""
    holders = [_holder(tmp_path, r, "eager", "int8") for r in range(2)]
    g = torch.Generator().manual_seed(2)
    theta0 = holders[0].flat_params()
    for h in holders:
        _train(h, g)
    payloads = [h.send_pseudo_gradient() for h in holders]
    snap = holders[0].capture(4)
    twin = _holder(tmp_path, 5, "eager", "int8")
    twin.restore(snap)
    batch = torch.randint(0, 64, (2, 8), generator=g)
    for h in (holders[0], twin):  # the same step after the snapshot on both
        h.forward_backward(0, batch, torch.roll(batch, -1, 1), 1.0)
        h.step()
    out = outer_step_task._function("mean", None, holders[0].spec.diloco, 0, 0, 0, theta0, None, [None], *payloads)
    new_theta0, update = out[0], out[4]
    assert update is not None and out[2].update_bytes < out[2].theta0_bytes / 3
    for h in (holders[0], twin):
        assert h.land_outer(1, update, [new_theta0]) is False  # no fallback: its theta0 is the update's base
        assert torch.equal(h.theta0.cpu(), new_theta0)
    assert torch.equal(holders[0].flat_params(), twin.flat_params())
    assert torch.equal(holders[0].outer.outer_buf, twin.outer.outer_buf)
    assert torch.equal(holders[0].outer.outer_grad, twin.outer.outer_grad)
