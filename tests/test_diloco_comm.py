"""Compression wired into the outer step: payload checks, the compressed broadcast, holders' error feedback
and snapshots, and bytes counted from the serialized objects (checked against Ray's object store)."""

import pytest
import torch

from neuroray.config import AggregatorConfig, DilocoConfig, ModelConfig
from neuroray.configure import load_config
from neuroray.diloco.compress import PayloadError, check, decode, digest, encode, encode_update
from neuroray.diloco.sync import OuterMemory, outer_step, outer_step_task, wire_bytes
from neuroray.errors import ConfigError
from neuroray.swarm.holder import HolderSpec, StageHolder

INT8 = DilocoConfig(compression="int8", compression_block=64)


def _bad_payloads(n):
    x = torch.randn(n)
    good = encode(x, "int8", 64)
    return [
        ("not a payload", torch.zeros(3, dtype=torch.int8).tolist()),
        ("match no compression", {"int8": good["int8"]}),
        ("payload is fp16, the run uses int8", encode(x, "fp16")),
        ("not a tensor", {**good, "int8": good["int8"].tolist()}),
        ("expected 1-D torch.int8", {**good, "int8": good["int8"].to(torch.int16)}),
        ("expected 1-D torch.float32", {**good, "scale": good["scale"].view(-1, 1)}),
        (f"holds {n - 1} values, expected {n}", {**good, "int8": good["int8"][:-1]}),
        ("the run uses 64", {**good, "block": torch.tensor(2**40)}),  # would pad to 2^40 values if decoded
        ("scales, expected", {**good, "scale": good["scale"][:-1]}),
    ]


@pytest.mark.parametrize("case", range(9))
def test_check_names_what_is_wrong(case):
    fragment, payload = _bad_payloads(200)[case]
    with pytest.raises(PayloadError, match=fragment.replace("(", r"\(")):
        check(payload, "int8", 64, 200)
    check(encode(torch.randn(200), "int8", 64), "int8", 64, 200)  # a good one passes


def test_malformed_payloads_are_rejected_and_named_not_a_crash():
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(200, generator=g)
    good = [encode(torch.randn(200, generator=g) * 0.01, "int8", 64) for _ in range(3)]
    bad = _bad_payloads(200)
    for fragment, payload in bad:
        new, _, report = outer_step(AggregatorConfig("trimmed_mean", f=1), INT8, 0, theta0, None, *good, payload)
        assert report.accepted == [0, 1, 2] and not report.refused
        assert report.rejected == [(3, report.rejected[0][1])] and report.rejected[0][1].startswith("malformed payload:")
        assert fragment.split(",")[0] in report.rejected[0][1]
        expected, _, _ = outer_step(AggregatorConfig("trimmed_mean", f=1), INT8, 0, theta0, None, *good[:3],
                                    torch.full((200,), float("nan")))
        torch.testing.assert_close(new, expected, rtol=0, atol=0)  # the same step as with any rejected holder
    # with f=0 a malformed payload refuses the step (theta0 unchanged) and is named there too
    new, _, report = outer_step("mean", INT8, 0, theta0, None, good[0], bad[2][1])
    assert new is theta0 and report.refused and report.rejected[0][1] == "malformed payload: payload is fp16, the run uses int8"


def test_compressed_update_is_what_every_holder_computes_and_its_error_is_fed_back():
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(1000, generator=g)
    residual, exact = None, theta.clone()
    for _ in range(5):
        step = torch.randn(1000, generator=g) * 0.01  # the outer optimizer's step, from the theta0 holders have
        update, applied, residual = encode_update(theta, theta - step, "int8", 64, residual)
        assert update["base"] == digest(theta)
        assert torch.equal(applied, theta - decode(update["payload"]))  # what apply_update computes, bit for bit
        assert not torch.equal(applied, theta - step)  # int8 is lossy ...
        exact -= step
        # ... but nothing is lost: every step applied in full is the applied theta0 minus what is still owed
        torch.testing.assert_close(applied - residual, exact, rtol=0, atol=1e-5)
        theta = applied


def _holder(tmp_path, replica, diloco=INT8, layers=2):
    cfg = ModelConfig(d_model=32, n_layers=layers, n_heads=2, n_kv_heads=2, max_seq_len=16)
    spec = HolderSpec(replica=replica, stage=0, ranges=[(0, layers)], model=cfg, vocab_size=64, diloco=diloco, seed=0,
                      key_path=str(tmp_path / f"k{replica}.pem"))
    return StageHolder(spec)


def _train(h, g, steps=2):
    for i in range(steps):
        x = torch.randint(0, 64, (2, 8), generator=g)
        h.forward_backward(i, x, torch.roll(x, -1, 1), 1.0)
        h.step()


def test_holders_compress_with_error_feedback_and_restart_identical(tmp_path):
    """Two int8 holders, three rounds through the task's function: payloads are int8, each holder's residual
    is exactly what its payload dropped, and after apply_update every holder holds the task's theta0."""
    holders = [_holder(tmp_path, r) for r in range(2)]
    g = torch.Generator().manual_seed(0)
    theta0, momentum, memory = holders[0].flat_params(), None, OuterMemory()
    for rnd in range(3):
        for h in holders:
            _train(h, g)
        residuals = [h.feedback.residual for h in holders]
        truths = [h.theta0 - h.flat_params() for h in holders]
        payloads = [h.pseudo_gradient() for h in holders]
        for p, truth, before, h in zip(payloads, truths, residuals, holders):
            assert p["int8"].dtype == torch.int8 and p["scale"].numel() == -(-truth.numel() // 64)
            owed = truth if before is None else truth + before
            torch.testing.assert_close(decode(p) + h.feedback.residual, owed, rtol=0, atol=1e-6)
        # a redone outer step in the same round sends the same payload (the residual is not fed twice)
        assert torch.equal(holders[0].pseudo_gradient()["int8"], payloads[0]["int8"])
        theta0, momentum, report, memory, update = outer_step_task._function(
            AggregatorConfig("mean"), None, INT8, 0, rnd, 0, theta0, momentum, [None], *payloads)
        assert report.accepted == [0, 1] and report.payload_bytes == [wire_bytes(p) for p in payloads]
        assert report.update_bytes == wire_bytes(update) < report.theta0_bytes / 3.5
        for h in holders:
            assert h.apply_update(update, [theta0]) is False
            assert torch.equal(h.theta0, theta0) and torch.equal(h.flat_params(), theta0)
    # a holder whose theta0 is not the update's base falls back to the dense theta0
    stale = _holder(tmp_path, 5)
    assert stale.apply_update(update, [theta0]) is True and torch.equal(stale.flat_params(), theta0)


def test_snapshot_keeps_the_error_feedback_residual(tmp_path):
    h = _holder(tmp_path, 0)
    _train(h, torch.Generator().manual_seed(3))
    h.pseudo_gradient()
    assert h.feedback.residual is not None and h.feedback.residual.abs().sum() > 0
    snap = h.capture(7)
    fresh = _holder(tmp_path, 1)
    fresh.restore(snap)
    assert torch.equal(fresh.feedback.residual, h.feedback.residual)


def test_config_rejects_bad_compression():
    assert load_config(["diloco.compression=int8"]).diloco.compression == "int8"
    with pytest.raises(ConfigError, match="diloco.compression=int4 is unknown; choose none, fp16, int8 or sparse"):
        load_config(["diloco.compression=int4"])
    with pytest.raises(ConfigError, match="compression_block=0"):
        load_config(["diloco.compression_block=0"])


def _one_round_on_ray(holders, sync) -> list:
    """One inner step on each holder actor (its own microbatch), then the outer step: reports + acks."""
    import ray

    for i, h in enumerate(holders):
        x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i))
        ray.get(h.forward_backward.remote(0, x, torch.roll(x, -1, 1), 1.0))
        ray.get(h.step.remote())
    reports, loads = sync.submit()
    return ray.get(reports + loads)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_counted_bytes_are_real_on_ray(ray_cluster, tmp_path):
    """Real holder actors, one round per compression: int8 payloads measure ~1/4 of fp32 plus the scales,
    the counts match the object-store size Ray reports for the same values, and holders end on theta0."""
    import ray

    from neuroray.diloco.sync import OuterSync

    counted, numel = {}, None
    for mode in ("none", "int8"):
        dl = DilocoConfig(compression=mode, compression_block=64)
        cls = ray.remote(num_cpus=0)(StageHolder)
        cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16)
        holders = [cls.remote(HolderSpec(replica=r, stage=0, ranges=[(0, 2)], model=cfg, vocab_size=64, diloco=dl,
                                         seed=0, key_path=str(tmp_path / f"{mode}{r}.pem"))) for r in range(2)]
        sync = OuterSync([holders], dl, "mean")  # before training: theta0 = the holders' initial weights
        values = _one_round_on_ray(holders, sync)
        counted[mode] = sync.measure(values[:1], values[1:])
        theta0 = ray.get(sync.theta0[0])
        numel = theta0.numel()
        for h in holders:
            assert torch.equal(ray.get(h.flat_params.remote()), theta0)
        assert values[1:] == ([None, None] if mode == "none" else [False, False])  # no holder fell back to dense
        # the measured size is what Ray's object store holds for the same value (within its framing)
        payload = ray.get(holders[0].pseudo_gradient.remote())
        ref = ray.put(payload)
        size = ray.experimental.get_object_locations([ref])[ref]["object_size"]
        assert abs(size - wire_bytes(payload)) < 200, (size, wire_bytes(payload))
        for h in holders:
            ray.kill(h)
    fp32, int8 = counted["none"], counted["int8"]

    def framed(measured, data):  # measured = the tensor bytes + a little pickle framing per payload (2 holders)
        return data < measured < data + 2 * 1500

    assert framed(fp32["payload_bytes"], 2 * 4 * numel), (fp32, numel)
    assert framed(int8["payload_bytes"], 2 * (numel + 4 * -(-numel // 64))), (int8, numel)  # int8 + a scale per 64
    assert framed(fp32["broadcast_bytes"], 2 * 4 * numel)  # the dense theta0, to each holder
    assert framed(int8["broadcast_bytes"], 2 * (numel + 4 * -(-numel // 64)))  # the int8 update, to each holder
    assert 3.4 < fp32["sync_bytes"] / int8["sync_bytes"] < 3.77  # 4 / (1 + 4/64), less the framing
    assert 0 < int8["control_bytes"] < 0.05 * int8["sync_bytes"]


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_sparse_round_on_ray_sends_the_configured_density(ray_cluster, tmp_path):
    """Real holder actors, one round with compression=sparse at a density other than the module default
    (a holder built with the default would send 4 values per chunk where the run checks for 3, and every
    payload would be rejected): payloads measure >= 100x below fp32's, holders end on the new theta0 through
    the sparse update, none falls back to the dense theta0."""
    import ray

    from neuroray.diloco.compress import SPARSE_DENSITY, sparse_k
    from neuroray.diloco.sync import OuterSync

    counted = {}
    cfg = ModelConfig(d_model=64, n_layers=8, n_heads=2, n_kv_heads=2, max_seq_len=16)
    for mode in ("none", "sparse"):
        dl = DilocoConfig(compression=mode, compression_block=256, sparse_density=0.01)
        assert sparse_k(256, dl.sparse_density) != sparse_k(256, SPARSE_DENSITY)
        cls = ray.remote(num_cpus=0)(StageHolder)
        holders = [cls.remote(HolderSpec(replica=r, stage=0, ranges=[(0, 8)], model=cfg, vocab_size=64, diloco=dl,
                                         seed=0, key_path=str(tmp_path / f"sp-{mode}{r}.pem"))) for r in range(2)]
        sync = OuterSync([holders], dl, "mean")
        before = ray.get(sync.theta0[0])
        values = _one_round_on_ray(holders, sync)
        report = values[0]
        assert report.accepted == [0, 1] and not report.rejected and not report.refused, report
        counted[mode] = sync.measure(values[:1], values[1:])
        theta0 = ray.get(sync.theta0[0])
        assert not torch.equal(theta0, before)  # the round moved theta0
        for h in holders:
            assert torch.equal(ray.get(h.flat_params.remote()), theta0)
        assert values[1:] == ([None, None] if mode == "none" else [False, False])  # no dense fallback
        if mode == "sparse":
            payload = ray.get(holders[0].pseudo_gradient.remote())
            assert payload["sp_meta"].tolist()[1:] == [256, sparse_k(256, 0.01)]
        for h in holders:
            ray.kill(h)
    ratio = counted["none"]["payload_bytes"] / counted["sparse"]["payload_bytes"]
    assert ratio >= 100, (ratio, counted)
