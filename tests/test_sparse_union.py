"""diloco.sparse_broadcast=union: the holders rebuild the outer step from the accepted sparse payloads
(neuroray/diloco/union.py), ending bit for bit at the outer step's theta0; malformed payloads are refused
and named on both sides; the bytes counted are the payloads each holder fetched."""

import pytest
import torch

from neuroray.config import AggregatorConfig, DilocoConfig, ModelConfig
from neuroray.configure import load_config
from neuroray.diloco.compress import PayloadError, decode, encode
from neuroray.diloco.sync import outer_step, outer_step_task, wire_bytes
from neuroray.diloco.union import apply_union, check_union
from neuroray.errors import ConfigError
from neuroray.swarm.holder import HolderSpec, StageHolder

UNION = DilocoConfig(compression="sparse", compression_block=64, sparse_density=0.05, sparse_broadcast="union",
                     outer_lr=1.0, outer_momentum=0.0, nesterov=False)


def _holder(tmp_path, replica, diloco=UNION):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16)
    spec = HolderSpec(replica=replica, stage=0, ranges=[(0, 2)], model=cfg, vocab_size=64, diloco=diloco, seed=0,
                      key_path=str(tmp_path / f"k{replica}.pem"))
    return StageHolder(spec)


def _train(h, g, steps=2):
    for i in range(steps):
        x = torch.randint(0, 64, (2, 8), generator=g)
        h.forward_backward(i, x, torch.roll(x, -1, 1), 1.0)
        h.step()


def _step(payloads, theta0, rnd=0, rule="mean", diloco=UNION):
    """The outer step as the range's actor runs it (no Ray): (theta0, momentum, report, memory, update)."""
    return outer_step_task._function(AggregatorConfig(rule), None, diloco, 0, rnd, 0, theta0, None, [None], *payloads)


def test_holders_end_at_the_outer_steps_theta0_and_the_support_is_the_union(tmp_path):
    """Three holders, three rounds: every holder's theta0 after the union update is the outer step's, bit for
    bit; the step changed theta0 wherever any accepted payload had an entry (more than one payload's k)."""
    holders = [_holder(tmp_path, r) for r in range(3)]
    g = torch.Generator().manual_seed(0)
    theta0 = holders[0].flat_params()
    for rnd in range(3):
        for h in holders:
            _train(h, g)
        payloads = [h.pseudo_gradient() for h in holders]
        new, momentum, report, _, update = _step(payloads, theta0, rnd)
        assert report.accepted == [0, 1, 2] and momentum is None
        assert update["base"] == report.theta0_before and update["from"] == [0, 1, 2]
        assert update["weights"] == [1 / 3] * 3 and update["lr"] == 1.0
        support = torch.stack([decode(p) != 0 for p in payloads]).any(0)
        changed = new != theta0  # within the union of the supports (where the mean is not 0 or lost in rounding)
        assert not (changed & ~support).any()
        assert changed.sum() > 0.95 * support.sum() > max(int((decode(p) != 0).sum()) for p in payloads)
        torch.testing.assert_close(new, theta0 - sum(decode(p) for p in payloads) / 3)
        for h in holders:
            assert h.apply_update(update, [new]) is False  # rebuilt from the payloads, not fetched
            assert torch.equal(h.theta0, new) and torch.equal(h.flat_params(), new)
        theta0 = new
    # the bytes counted: every payload the holders fetch back, and nothing dense
    assert report.update_bytes == wire_bytes(update) and report.update_bytes > sum(report.payload_bytes) * 0.99
    assert report.update_bytes < report.theta0_bytes / 5


def test_only_accepted_payloads_cross_and_a_malformed_one_is_named(tmp_path):
    """One holder sends a malformed payload: the outer step rejects and names it, the union leaves it out,
    and the holders still end at the outer step's theta0. Krum's unpicked payloads do not cross either."""
    holders = [_holder(tmp_path, r) for r in range(5)]
    g = torch.Generator().manual_seed(1)
    for h in holders:
        _train(h, g)
    theta0 = holders[0].theta0.clone()
    payloads = [h.pseudo_gradient() for h in holders]
    bad = {**payloads[3], "sp_index": payloads[3]["sp_index"][:-1]}
    f1 = AggregatorConfig("mean", f=1)
    new, _, report, _, update = outer_step_task._function(f1, None, UNION, 0, 0, 0, theta0, None, [None],
                                                          *payloads[:3], bad, payloads[4])
    assert report.rejected[0][0] == 3 and report.rejected[0][1].startswith("malformed payload: sparse indices")
    assert update["from"] == [0, 1, 2, 4] and all(u is p for u, p in zip(update["union"], payloads[:3] + payloads[4:]))
    for h in holders:
        assert h.apply_update(update, [new]) is False and torch.equal(h.theta0, new)
    krum = _step(payloads, theta0, rule="krum")
    assert len(krum[4]["union"]) == 1 and krum[4]["weights"] == [1.0]


def test_a_malformed_payload_in_the_broadcast_is_refused_by_the_holder(tmp_path):
    """A union update tampered with on the way: the holder checks every payload before decoding, names the
    sender, does not apply it, and takes the dense theta0 instead."""
    holders = [_holder(tmp_path, r) for r in range(2)]
    g = torch.Generator().manual_seed(2)
    for h in holders:
        _train(h, g)
    theta0 = holders[0].theta0.clone()
    new, _, _, _, update = _step([h.pseudo_gradient() for h in holders], theta0)
    numel = theta0.numel()
    p = update["union"][1]
    cases = [("replica 1: sparse indices out of range", {**p, "sp_index": torch.full_like(p["sp_index"], 255)}),
             ("replica 1: sparse levels are not finite",
              {**p, "sp_level": torch.full_like(p["sp_level"], float("inf"))}),
             ("replica 1: payload is int8", encode(torch.zeros(numel), "int8", 64))]
    for fragment, forged in cases:
        tampered = {**update, "union": [update["union"][0], forged]}
        with pytest.raises(PayloadError, match=fragment):
            check_union(tampered, 64, numel, UNION.sparse_density)
        h = _holder(tmp_path, 7)
        assert h.apply_update(tampered, [new]) is True  # refused: fetched the dense theta0
        assert torch.equal(h.theta0, new)
    with pytest.raises(PayloadError, match="finite floats"):
        check_union({**update, "lr": float("nan")}, 64, numel, UNION.sparse_density)


def test_a_refused_step_leaves_theta0_exactly(tmp_path):
    h = _holder(tmp_path, 0)
    _train(h, torch.Generator().manual_seed(3))
    theta0 = h.theta0.clone()
    nan = {**h.pseudo_gradient()}
    nan["sp_level"] = torch.full_like(nan["sp_level"], float("nan"))
    new, _, report, _, update = _step([nan], theta0)
    assert report.refused and update["union"] == [] and torch.equal(apply_union(theta0, update), theta0)
    assert h.apply_update(update, [new]) is False and torch.equal(h.theta0, theta0)


def test_a_simulated_attackers_vector_crosses_as_the_payload_it_would_send(tmp_path):
    """attack=sign_flip in the reduce task: the attacker's flipped vector is sparse-encoded like any holder's
    payload, the rule weighs that payload decoded, and the holders rebuild exactly the outer step's theta0."""
    from neuroray.config import AttackConfig

    holders = [_holder(tmp_path, r) for r in range(4)]
    g = torch.Generator().manual_seed(5)
    for h in holders:
        _train(h, g)
    theta0 = holders[0].theta0.clone()
    payloads = [h.pseudo_gradient() for h in holders]
    attack = AttackConfig(name="sign_flip", fraction=0.25)
    new, _, report, _, update = outer_step_task._function(AggregatorConfig("mean"), attack, UNION, 0, 0, 0, theta0,
                                                          None, [None], *payloads)
    assert report.byzantine == [0] and update["from"] == [0, 1, 2, 3]
    assert update["union"][0] is not payloads[0] and all(u is p for u, p in zip(update["union"][1:], payloads[1:]))
    torch.testing.assert_close(decode(update["union"][0]), -decode(payloads[0]))  # the flipped vector, as sent
    for h in holders:
        assert h.apply_update(update, [new]) is False and torch.equal(h.theta0, new)


def test_a_streaming_fragments_union_changes_only_its_slice(tmp_path):
    """Streaming: the fragment's payloads cross with its slice; every holder ends at the outer step's theta0."""
    import dataclasses

    dl = dataclasses.replace(UNION, streaming_fragments=2)
    holders = [_holder(tmp_path, r, dl) for r in range(2)]
    g = torch.Generator().manual_seed(4)
    for h in holders:
        _train(h, g)
    theta0 = holders[0].theta0.clone()
    lo, hi = holders[0].fragment_slices()[1]
    payloads = [h.pseudo_gradient(fragment=1) for h in holders]
    new, _, _, _, update = outer_step_task._function(AggregatorConfig("mean"), None, dl, 0, 0, 0, theta0, None,
                                                     [None], *payloads, part=(lo, hi))
    assert update["slice"] == (lo, hi) and len(update["union"]) == 2
    assert torch.equal(new[:lo], theta0[:lo]) and not torch.equal(new[lo:hi], theta0[lo:hi])
    for h in holders:
        assert h.apply_update(update, [new]) is False and torch.equal(h.theta0, new)


def test_config_refuses_what_the_holders_cannot_rebuild():
    ok = ["diloco.compression=sparse", "diloco.sparse_broadcast=union", "diloco.outer_momentum=0",
          "diloco.nesterov=false"]
    assert load_config(ok).diloco.sparse_broadcast == "union"
    assert load_config(ok[:3]).diloco.nesterov  # nesterov without momentum is plain SGD: nothing to refuse
    with pytest.raises(ConfigError, match="sparse_broadcast=allgather is unknown; choose resparsify or union"):
        load_config(["diloco.sparse_broadcast=allgather"])
    with pytest.raises(ConfigError, match="outer_momentum=0.9 .*sparse_broadcast=union"):
        load_config(ok[:2] + ["diloco.outer_momentum=0.9"])
    with pytest.raises(ConfigError, match="aggregator=median .*union"):
        load_config(ok + ["aggregator=median"])


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_union_round_on_ray_counts_every_payload_back(ray_cluster, tmp_path):
    """Real holder actors and the range's outer-step actor, two rounds with sparse_broadcast=union: every
    holder ends on the outer step's theta0 without fetching it, and the bytes counted back are the accepted
    payloads, once to each holder (about M times what each holder sent)."""
    import ray

    from neuroray.diloco.sync import OuterSync

    dl = DilocoConfig(compression="sparse", compression_block=256, sparse_density=0.015, sparse_broadcast="union",
                      outer_lr=1.0, outer_momentum=0.0, nesterov=False)
    cfg = ModelConfig(d_model=64, n_layers=4, n_heads=2, n_kv_heads=2, max_seq_len=16)
    cls = ray.remote(num_cpus=0)(StageHolder)
    holders = [cls.remote(HolderSpec(replica=r, stage=0, ranges=[(0, 4)], model=cfg, vocab_size=64, diloco=dl,
                                     seed=0, key_path=str(tmp_path / f"u{r}.pem"))) for r in range(3)]
    sync = OuterSync([holders], dl, "mean")
    try:
        for rnd in range(2):
            for i, h in enumerate(holders):
                x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(10 * rnd + i))
                ray.get(h.forward_backward.remote(0, x, torch.roll(x, -1, 1), 1.0))
                ray.get(h.step.remote())
            reports, loads = sync.submit()
            values = ray.get(reports + loads)
            assert values[0].accepted == [0, 1, 2] and values[1:] == [False] * 3  # nobody fetched the dense theta0
            theta0 = ray.get(sync.theta0[0])
            for h in holders:
                assert torch.equal(ray.get(h.flat_params.remote()), theta0)
            counted = sync.measure(values[:1], values[1:])
            sent = counted["payload_bytes"]
            assert 0.95 * 3 * sent < counted["broadcast_bytes"] < 3 * sent + 3 * 1000  # 3 payloads to each of 3 holders
            assert counted["broadcast_bytes"] < 3 * 4 * theta0.numel() / 20  # still far below the dense theta0, 3 times
    finally:
        sync.close()
        for h in holders:
            ray.kill(h)
