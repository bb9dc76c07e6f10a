"""Checks at every hop (neuroray/swarm/hop_guard.py): the checks themselves, and through a holder's receive path."""

from __future__ import annotations

import pickle

import pytest
import torch

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.configure import load_config
from neuroray.errors import ConfigError
from neuroray.swarm.holder import HolderSpec, StageHolder
from neuroray.swarm.hop_guard import HopGuard, HopRejected, NormBand
from neuroray.swarm.transport import as_tensor

SHAPE = (2, 8, 16)


def _guard(**kw) -> HopGuard:
    args = dict(history=32, warmup=8, factor=100.0) | kw
    return HopGuard("worker[r0 L1-1]", 1, {"fwd": SHAPE, "bwd": SHAPE},
                    {"fwd": torch.float32, "bwd": torch.float32}, **args)


def _x(scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return scale * torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _warm(g: HopGuard, direction: str = "fwd", n: int = 8) -> None:
    for i in range(n):
        g.check(_x(seed=i), direction, mb=i)


@pytest.mark.parametrize("bad, check, words", [
    (torch.zeros(2, 8, 17), "shape", r"\[2, 8, 17\], expected \[2, 8, 16\]"),
    (torch.zeros(16, 16), "shape", r"\[16, 16\], expected"),
    (torch.zeros(SHAPE, dtype=torch.bfloat16), "dtype", "torch.bfloat16, expected torch.float32"),
    (torch.zeros(SHAPE, dtype=torch.float64), "dtype", "torch.float64"),
])
def test_a_tensor_of_the_wrong_shape_or_dtype_is_rejected_naming_the_check(bad, check, words):
    g = _guard()
    with pytest.raises(HopRejected, match=r"worker\[r0 L1-1\] rejected the activation of microbatch 7: " + check
                       + ": " + words) as err:
        g.check(bad, "fwd", mb=7)
    assert (err.value.check, err.value.direction, err.value.sender_stage) == (check, "fwd", 0)
    assert g.rejected[check] == 1 and not g.bands["fwd"].norms  # nothing rejected enters the band


@pytest.mark.parametrize("value, words", [(float("nan"), "contains NaN"), (float("inf"), "contains Inf"),
                                          (-float("inf"), "contains Inf")])
def test_a_gradient_with_nan_or_inf_is_rejected_even_before_the_band_is_warm(value, words):
    g = _guard()
    x = _x()
    x[1, 3, 5] = value
    with pytest.raises(HopRejected, match="rejected the gradient of microbatch 3: finite: " + words) as err:
        g.check(x, "bwd", mb=3)
    assert err.value.sender_stage == 2  # a gradient comes from the next range's holder


def test_a_norm_far_outside_the_band_is_rejected_once_it_is_warm():
    g = _guard()
    g.check(_x(1000.0), "fwd")  # warming up: accepted (the band knows nothing yet)
    g = _guard()
    _warm(g)
    for scale in (1000.0, 1e-3):
        with pytest.raises(HopRejected, match=r"norm: norm .* outside \[.*\] \(median .* of the last 8 hops") as err:
            g.check(_x(scale), "fwd", mb=9)
        assert err.value.check == "norm"
    assert len(g.bands["fwd"].norms) == 8 and g.rejected["norm"] == 2
    g.check(_x(30.0), "fwd")  # well inside x100: accepted
    g.check(_x(1000.0), "bwd")  # each direction has its own band: the gradients' is still warming up


def test_an_all_zero_hop_is_rejected_from_the_first_even_where_the_band_learned_zeros():
    """A neighbour that sends zeros from its first hop on (a lazy holder under fixed routing) would teach the band a
    median of 0, inside which zeros fit: an empty hop is refused on its own."""
    g = _guard()
    for mb in range(3):
        with pytest.raises(HopRejected, match="norm: all zeros") as err:
            g.check(torch.zeros(SHAPE), "bwd", mb=mb)
        assert err.value.sender_stage == 2
    assert not g.bands["bwd"].norms and g.rejected["norm"] == 3


def test_honest_norms_drifting_slowly_stay_inside_the_band():
    """Norms that fall 1000-fold over a run (gradients as the loss falls, docs/hops.md) or grow 1000-fold
    (activations at a high learning rate) move the band with them: nothing is rejected."""
    for rate in (0.97, 1.03):
        g = _guard()
        for i in range(240):
            g.check(_x(rate ** i, seed=i), "bwd", mb=i)
        assert sum(g.rejected.values()) == 0 and len(g.bands["bwd"].norms) == 32


def test_the_band_is_the_median_of_the_last_history_norms():
    band = NormBand(history=4, warmup=2, factor=10.0)
    band.add(1.0)
    assert band.violation(1e6) is None  # not warm
    for n in (2.0, 3.0, 1000.0, 4.0):
        band.add(n)
    assert list(band.norms) == [2.0, 3.0, 1000.0, 4.0]  # the oldest left
    assert band.violation(35.0) is None and band.violation(36.0) and band.violation(0.3)  # median 3.5


def test_a_disabled_guard_lets_anything_through_and_the_error_crosses_pickle():
    _guard(enabled=False).check(torch.full((3,), float("nan")), "fwd")
    err = HopRejected("validator[r1 L2-3]", 2, "bwd", "finite", "contains NaN", 4)
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.sender_stage, back.mb) == (str(err), 3, 4)


CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=16)


def _pipeline(tmp_path, **kw) -> list[StageHolder]:
    return [StageHolder(HolderSpec(replica=0, stage=s, ranges=[(0, 1), (1, 2)], model=CFG, vocab_size=64,
                                   diloco=DilocoConfig(), seed=0, key_path=str(tmp_path / f"k{s}.pem"),
                                   seq_len=8, microbatch_size=2, hop_check_warmup=4, **kw)) for s in range(2)]


@pytest.mark.parametrize("scheme", ["none", "int8", "lowrank"])
def test_a_holder_refuses_a_bad_hop_before_it_claims_the_call_and_accepts_the_good_one(tmp_path, scheme):
    """Through the receive path (decode, then check): a tampered activation or gradient is refused before
    anything runs, the graph waits, and the honest tensor is then used as if nothing happened."""
    driver, validator = _pipeline(tmp_path, hop_compression=scheme)
    g = torch.Generator().manual_seed(0)
    for mb in range(5):  # warm both bands with honest hops
        x, y = torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g)
        act = driver.forward(mb, x)
        _, grad = validator.forward_backward(mb, act, y, 1.0)
        driver.backward(mb, grad)
    x, y = torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g)
    act = driver.forward(5, x)
    honest = as_tensor(driver.compute.hop.decode(act, "test")) if scheme != "none" else as_tensor(act)
    done = validator.compute.step_microbatches
    bads = [(honest[:, :4], "shape"), (honest * 1e4, "norm")]
    if scheme == "none":  # a compressed NaN never decodes (its scales are checked: tests/test_hop_codec.py)
        bads.append((honest * float("nan"), "finite"))
    for bad, check in bads:  # tampered, then encoded as the run's codec does: the check sees the decoded tensor
        with pytest.raises(HopRejected, match=f"validator.* rejected the activation of microbatch 5: {check}"):
            validator.forward_backward(5, driver.compute.hop.encode(bad.contiguous(), driver.name), y, 1.0)
    assert validator.compute.step_microbatches == done and not validator.grads() == {}
    loss, grad = validator.forward_backward(5, act, y, 1.0)  # not claimed by the refused calls: it runs
    assert loss is not None and validator.compute.step_microbatches == done + 1
    g_honest = as_tensor(validator.compute.hop.decode(grad, "test")) if scheme != "none" else as_tensor(grad)
    # uncompressed, a float16 gradient crosses as it is; compressed, every payload decodes to float32
    bad, check = (g_honest.half(), "dtype") if scheme == "none" else (g_honest[:1], "shape")
    with pytest.raises(HopRejected, match=f"driver.* rejected the gradient of microbatch 5: {check}"):
        driver.backward(5, validator.compute.hop.encode(bad.contiguous(), validator.name))
    assert 5 in driver._pending  # the graph waits for a good gradient
    assert driver.backward(5, grad) is None and 5 not in driver._pending
    assert driver.compute.guard.rejected[check] == 1 and validator.compute.guard.rejected["norm"] == 1


def test_the_hop_check_keys_are_checked():
    cfg = load_config(["swarm.hop_check_factor=20", "swarm.hop_check_history=8", "swarm.hop_check_warmup=8"])
    assert (cfg.swarm.hop_check, cfg.swarm.hop_check_factor, cfg.swarm.hop_check_history) == (True, 20.0, 8)
    for override in ("swarm.hop_check_factor=1", "swarm.hop_check_warmup=0", "swarm.hop_check_warmup=100"):
        with pytest.raises(ConfigError, match="swarm.hop_check_warmup=.* and swarm.hop_check_factor="):
            load_config([override])


def test_a_round_without_a_benched_replica_books_its_holders_by_replica_and_unused():
    """The outer step of a fixed run that left replica 1 out reduces replicas 0 and 2: its report's holder
    indices 0 and 1 are replicas 0 and 2, and every holder of replica 1 is unused (earns nothing)."""
    from neuroray.diloco.sync import OuterReport
    from neuroray.training.executor import by_replica, members

    kept = members(3, {1})
    assert kept == [0, 2]
    reports = [OuterReport(s, accepted=[0], dropped=[1], observations=[("d0", 1.0), ("d2", 2.0)]) for s in range(2)]
    unused, observed = by_replica(reports, [kept, kept], {(s, 1) for s in range(2)})
    assert unused == {(0, 2), (1, 2), (0, 1), (1, 1)}
    assert observed == {(0, 0): ("d0", 1.0), (0, 2): ("d2", 2.0), (1, 0): ("d0", 1.0), (1, 2): ("d2", 2.0)}
