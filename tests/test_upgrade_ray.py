"""Live migration on Ray: running holders grow in place (depth, width, both), the whole pipeline's logits
stay equal within 1e-5, OuterSync's theta0 and momentum grow with them, and training carries on."""

import dataclasses

import pytest
import torch

from neuroray.config import AggregatorConfig, ClusterConfig, DilocoConfig, ModelConfig, PonwConfig, SwarmConfig, TrainConfig
from neuroray.diloco.compress import decode
from neuroray.planner.upgrade import migrate, migration_ranges
from neuroray.swarm.transport import as_tensor
from tests.test_growth import V, _markov_batch

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

# head size 16 and 4 query heads per KV head throughout, as the scaling law keeps them
OLD = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, max_seq_len=48)
GROWTHS = [  # applied one after another to the running swarm, with the ranges the swarm ends up with
    ("depth 2 -> 5 (a new layer in front of layer 0)", dataclasses.replace(OLD, n_layers=5), [(0, 3), (3, 5)]),
    ("width 64 -> 128", dataclasses.replace(OLD, n_layers=5, d_model=128, n_heads=8, n_kv_heads=2), [(0, 3), (3, 5)]),
    ("depth and width", dataclasses.replace(OLD, n_layers=7, d_model=192, n_heads=12, n_kv_heads=3), [(0, 4), (4, 7)]),
]
MICRO = 2  # microbatches per inner step
H = 4  # inner steps per round


def _swarm(tmp_path):
    from neuroray.diloco.sync import OuterSync
    from neuroray.swarm.faults import FaultyStageHolder
    from neuroray.swarm.swarm import Swarm

    # hop_check off: these tests drive the holders directly with probe batches of other shapes than the data config's
    cfg = TrainConfig(model=OLD, diloco=DilocoConfig(replicas=2, inner_steps=H, inner_lr=3e-3),
                      aggregator=AggregatorConfig(name="mean"),
                      swarm=SwarmConfig(num_stages=2, key_dir=str(tmp_path), hop_check=False),
                      cluster=ClusterConfig(cpus_per_holder=0.25), ponw=PonwConfig(enabled=False), seed=4)
    swarm = Swarm(cfg, V, None, log=lambda *a: None, holder_cls=FaultyStageHolder)  # fail_at: crashes in grow
    return swarm, OuterSync(swarm.by_range, cfg.diloco, cfg.aggregator, seed=cfg.seed)


def _inner_step(ray, pipeline, batches, mb0):
    """One inner step of a 2-stage replica on the given (x, y) microbatches; returns the mean loss."""
    losses, grads = [], []
    for m, (x, y) in enumerate(batches):
        act = pipeline[0].forward.remote(mb0 + m, x)
        loss, grad = pipeline[1].forward_backward.options(num_returns=2).remote(mb0 + m, act, y, 1 / len(batches))
        losses.append(loss)
        grads.append(grad)
    tails = [pipeline[0].backward.remote(mb0 + m, g) for m, g in enumerate(grads)]
    ray.get(tails + [h.step.remote() for h in pipeline])
    return sum(ray.get(losses)) / len(losses)


def _look(ray, pipeline, x, y):
    """Logits and loss of the whole pipeline on (x, y), leaving no gradient or graph behind."""
    logits = as_tensor(ray.get(pipeline[1].forward.remote(10**6, pipeline[0].forward.remote(10**6, x))))
    loss, _ = ray.get(pipeline[1].forward_backward.options(num_returns=2).remote(
        10**6 + 1, pipeline[0].forward.remote(10**6 + 1, x), y, 1.0))
    ray.get([h.abort_step.remote() for h in pipeline])
    return logits, loss


def _round(ray, swarm, outer, g, mb0, probe=None):
    """H inner steps on every replica (each its own batches), then the outer step.

    Returns the inner steps' losses (replica-major within a step) and, given ``probe`` = (x, y), replica
    0's loss on it right after its first inner step (a fixed batch: no batch-to-batch noise)."""
    losses, probed = [], None
    for step in range(H):
        for r, pipeline in enumerate(swarm.replicas):
            losses.append(_inner_step(ray, pipeline, [_markov_batch(g, n=8, t=24) for _ in range(MICRO)],
                                      mb0 + (step * len(swarm.replicas) + r) * MICRO))
        if step == 0 and probe is not None:
            probed = _look(ray, swarm.replicas[0], *probe)[1]
    reports, loads = outer.submit()
    ray.get(reports + loads)
    return losses, probed


def test_running_holders_grow_in_place_and_training_continues(ray_cluster, tmp_path):
    ray = ray_cluster
    swarm, outer = _swarm(tmp_path)
    try:
        g = torch.Generator().manual_seed(0)
        held_out = _markov_batch(torch.Generator().manual_seed(99), n=16, t=24)
        first, _ = _round(ray, swarm, outer, g, 0)
        for i in range(1, 3):
            _round(ray, swarm, outer, g, 1000 * i)
        assert outer.momentum[0] is not None  # the outer momentum exists and has to grow too
        _, start_loss = _look(ray, swarm.replicas[0], *held_out)
        assert start_loss < sum(first[:2]) / 2 - 0.5  # learned something worth keeping

        model, mb0, steps = OLD, 10_000, 3 * H
        for name, new, expected_ranges in GROWTHS:
            before = [_look(ray, p, *held_out) for p in swarm.replicas]
            assert before[0][0].shape[-1] == V
            torch.testing.assert_close(before[1][0], before[0][0], rtol=0, atol=1e-6)  # replicas hold theta0
            # the next training batch, looked at before the growth: the grown model must see the same loss
            state = g.get_state()
            nxt = [_markov_batch(g, n=8, t=24) for _ in range(MICRO)]
            g.set_state(state)
            nxt_loss = sum(_look(ray, swarm.replicas[0], x, y)[1] for x, y in nxt) / MICRO
            old_numels = list(swarm.numels)

            ranges = migration_ranges(swarm.ranges, model, new)
            migrate(swarm, outer, model, new, ranges, seed=4, timeout_s=120)
            assert swarm.ranges == ranges == expected_ranges
            assert all(b > a for a, b in zip(old_numels, swarm.numels))
            for p, (logits, loss) in zip(swarm.replicas, before):
                after, after_loss = _look(ray, p, *held_out)
                torch.testing.assert_close(after, logits, rtol=0, atol=1e-5, msg=name)
                assert abs(after_loss - loss) < 1e-5, name
            # OuterSync's theta0 grew to exactly what every holder of the range now holds; momentum alike in shape
            for s, holders in enumerate(swarm.by_range):
                theta0 = ray.get(outer.theta0[s])
                assert theta0.numel() == swarm.numels[s]
                assert ray.get(outer.momentum[s]).shape == theta0.shape
                for h in holders:
                    torch.testing.assert_close(ray.get(h.flat_params.remote()), theta0, rtol=0, atol=0, msg=name)
                    delta = decode(ray.get(h.pseudo_gradient.remote()))
                    assert delta.abs().max() == 0  # its own theta0 grew alike
            # AdamW state was carried over for every parameter, new ones included
            snap = ray.get(swarm.replicas[0][0].capture.remote(-1))
            n_params = len(ray.get(swarm.replicas[0][0].param_layout.remote()))
            assert sum(k.startswith("opt.") and k.endswith(".exp_avg") for k in snap.tensors) == n_params
            assert all(float(v) == steps for k, v in snap.tensors.items() if k.endswith(".step"))

            # training continues: the first step sees the loss the small model saw (computed at theta0), one
            # AdamW step later the held-out loss has not jumped (a fresh AdamW's sign-sized step on every weight
            # would make it jump: tests/test_growth.py), and after the round it is lower than before the growth
            losses, one_step = _round(ray, swarm, outer, g, mb0, probe=held_out)
            assert abs(losses[0] - nxt_loss) < 1e-4, (name, losses[0], nxt_loss)
            _, after_round = _look(ray, swarm.replicas[0], *held_out)
            assert one_step < before[0][1] + 0.01 and after_round < before[0][1], (name, before[0][1], one_step,
                                                                                  after_round)
            model, mb0, steps = new, mb0 + 10_000, steps + H
    finally:
        swarm.shutdown()


def test_a_grown_holder_restarts_from_its_grown_snapshot(ray_cluster, tmp_path):
    """Ray restarts a holder with the spec it was started with (the small model); its snapshot says which
    architecture it had grown to, and the restart rebuilds that before restoring, bit for bit."""
    from neuroray.swarm.holder import HolderSpec, holder_actor
    from tests.test_recovery_ray import kill_and_wait_restored

    ray = ray_cluster
    spec = HolderSpec(replica=0, stage=0, ranges=[(0, 2)], model=OLD, vocab_size=V, diloco=DilocoConfig(inner_lr=1e-2),
                      seed=0, key_path=str(tmp_path / "k.pem"), snapshot_root=str(tmp_path / "snaps"))
    h = holder_actor(spec, num_cpus=0, num_gpus=0, max_restarts=1)
    g = torch.Generator().manual_seed(1)
    x, y = _markov_batch(g, n=4, t=16)
    ray.get(h.forward_backward.options(num_returns=2).remote(0, x, y, 1.0)[0])
    ray.get(h.step.remote())
    new = GROWTHS[2][1]
    info = ray.get(h.grow.remote(new, migration_ranges([(0, 2)], OLD, new), 4))
    assert info["layers"] == (0, 7)
    ray.get(h.forward_backward.options(num_returns=2).remote(1, x, y, 1.0)[0])
    ray.get(h.step.remote())
    ray.get(h.snapshot.remote(2))
    ray.get(h.flush_snapshots.remote())
    before = ray.get(h.state_digest.remote())

    counters = kill_and_wait_restored(ray, h)
    assert counters["restored_step"] == 2 and counters["inner_steps"] == 2
    assert ray.get(h.info.remote())["layers"] == (0, 7)
    assert ray.get(h.state_digest.remote()) == before
    # a restarted holder with no snapshot copies its range from a grown peer, architecture included
    fresh = holder_actor(dataclasses.replace(spec, snapshot_root=None, key_path=str(tmp_path / "f.pem")),
                         num_cpus=0, num_gpus=0)
    ray.get(fresh.import_range.remote(h.export_range.remote()))
    assert ray.get(fresh.info.remote())["layers"] == (0, 7)
    mine, theirs = ray.get([fresh.state_dict.remote(), h.state_dict.remote()])
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    ray.kill(h)
    ray.kill(fresh)


def test_holders_dying_during_the_growth_come_back_grown(ray_cluster, tmp_path):
    """Holders that die inside grow() (fault injection: the process exits) come back -- Ray restarts them on
    their original, small spec -- and the migration completes: r1-s0 copies its grown peer r0-s0; r0-s1 has no
    grown peer (r1-s1 died too), so it rejoins at range 1's theta0 from before the growth and grows again
    (seeded: where the others landed), and r1-s1 then copies it. The logits are those of before the growth,
    every holder holds the grown theta0 at the swarm's round, and training goes on."""
    ray = ray_cluster
    swarm, outer = _swarm(tmp_path)
    try:
        g = torch.Generator().manual_seed(0)
        held_out = _markov_batch(torch.Generator().manual_seed(99), n=16, t=24)
        _round(ray, swarm, outer, g, 0)
        before = [_look(ray, p, *held_out) for p in swarm.replicas]
        new = GROWTHS[2][1]  # depth and width at once, 2 x 64 -> 7 x 192
        ranges = migration_ranges(swarm.ranges, OLD, new)
        ray.get([h.fail_at.remote("grow") for h in (swarm.replicas[1][0], swarm.replicas[0][1], swarm.replicas[1][1])])
        lines = []
        migrate(swarm, outer, OLD, new, ranges, seed=4, timeout_s=120, recovery_timeout_s=120, log=lines.append)
        assert swarm.ranges == ranges and [i["layers"] for i in swarm.infos] == ranges + ranges
        assert lines == ["upgrade: holder r0-s1 died during its growth; restarted and grew again from the range's theta0",
                         "upgrade: holder r1-s0 died during its growth; restarted and copied its grown range from a peer",
                         "upgrade: holder r1-s1 died during its growth; restarted and copied its grown range from a peer"]
        for p, (logits, loss) in zip(swarm.replicas, before):
            after, after_loss = _look(ray, p, *held_out)
            torch.testing.assert_close(after, logits, rtol=0, atol=1e-5)
        for s, holders in enumerate(swarm.by_range):
            theta0 = ray.get(outer.theta0[s])
            for h in holders:
                torch.testing.assert_close(ray.get(h.flat_params.remote()), theta0, rtol=0, atol=0)
                assert ray.get(h.counters.remote())["outer_rounds"] == outer.rounds
        losses, _ = _round(ray, swarm, outer, g, 10_000)
        _, after_round = _look(ray, swarm.replicas[0], *held_out)
        assert all(torch.isfinite(torch.tensor(losses))) and after_round < before[0][1] + 0.05
    finally:
        swarm.shutdown()
