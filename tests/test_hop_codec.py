"""Hop compression (swarm.hop_compression): each codec's round-trip error bound and real payload size, the
gradients of a 2-holder split against the uncompressed pipeline (tolerances in docs/hops.md), and malformed
payloads rejected by the receiving holder, naming the holder that sent them, with nothing applied."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.configure import load_config
from neuroray.errors import ConfigError
from neuroray.swarm.hop_codec import HopCodec, HopPayload, lowrank_rank, wire_bytes
from neuroray.swarm.hop_guard import HopRejected
from neuroray.swarm.holder import HolderSpec, StageHolder
from neuroray.swarm.transport import WireTensor

# docs/hops.md: the gradients of both holders' parameters, compressed vs uncompressed pipeline, one microbatch
# of Zipf-distributed tokens at initialisation (the worst case for lowrank: trained activations are lower rank)
INT8_GRAD_TOLERANCE = 0.02  # relative L2 error
LOWRANK_GRAD_COSINE = 0.75  # cosine similarity: the direction survives, the magnitude need not
MIXED_GRAD_COSINE = 0.9  # lowrank_mixed: int4 factors keep about twice the components at the same bytes

CFG = ModelConfig(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=64)
VOCAB = 512


def _activation(rows=256, cols=128, seed=0):
    """A residual-stream-like matrix: a few strong directions, outlier channels, and noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(rows, 8, generator=g) @ torch.randn(8, cols, generator=g)
    x = low + 0.1 * torch.randn(rows, cols, generator=g)
    x[:, :3] *= 20
    return x.view(4, rows // 4, cols)


def test_int8_round_trip_is_within_half_a_step_per_block_and_4x_smaller():
    x = _activation()
    codec = HopCodec("int8", block=256)
    p = codec.encode(x, "driver[r0 L0-1]")
    assert isinstance(p, HopPayload) and isinstance(p.body, bytes)
    y = codec.decode(p, "validator[r0 L2-3]")
    assert y.shape == x.shape and y.dtype == torch.float32
    blocks = x.reshape(-1, 256)
    step = blocks.abs().amax(1, keepdim=True) / 127
    assert ((y.reshape(-1, 256) - blocks).abs() <= step / 2 + 1e-6).all()
    n = x.numel()
    assert p.nbytes == wire_bytes(p) == n + 4 * (n // 256) + 8 * 3  # int8 values, float32 scales, the shape
    assert 3.9 < 4 * n / p.nbytes < 4  # float32's 4 bytes a value, less the scales


def test_lowrank_round_trip_is_the_truncated_svd_plus_int8_and_at_least_the_ratio_smaller():
    x = _activation()
    codec = HopCodec("lowrank", ratio=16)
    p = codec.encode(x, "driver[r0 L0-1]")
    assert p.rank == lowrank_rank(256, 128, 16, 24) == 20
    assert 4 * x.numel() / p.nbytes >= 16  # counted from the real body
    y = codec.decode(p, "validator[r0 L2-3]")
    m = x.reshape(-1, 128)
    s = torch.linalg.svdvals(m)
    best = float(s[p.rank:].norm())  # the best rank-r error (Eckart-Young)
    err = float((y.reshape(-1, 128) - m).norm())
    assert best <= err <= best + 0.04 * float(m.norm())  # int8 factors (outlier channels included) cost < 4 %
    # an exactly low-rank matrix crosses with only the int8 error
    exact = (torch.randn(200, 5) @ torch.randn(5, 64))
    back = codec.decode(codec.encode(exact, "a"), "b")
    assert float((back - exact).norm() / exact.norm()) < 0.01
    # the ratio holds whatever the shape; higher ratios keep fewer components
    for shape, ratio in [((3, 7, 96), 16), ((1, 512, 64), 32), ((2, 33, 200), 16)]:
        t = torch.randn(shape)
        q = HopCodec("lowrank", ratio=ratio).encode(t, "a")
        assert 4 * t.numel() / q.nbytes >= ratio or q.rank == 1


def test_lowrank_mixed_keeps_more_components_for_the_same_bytes_and_never_errs_more_than_lowrank():
    """lowrank_mixed: int8 factors for the leading components, int4 for the next ones, the split chosen per hop.
    On a nearly full-rank matrix (the activations at initialisation) it keeps mostly int4 components, on an
    exactly low-rank one int8 ones; at the same ratio its error is at most lowrank's, and within 4 % of the
    matrix norm of the best approximation at the rank it kept."""
    mixed, plain = HopCodec("lowrank_mixed", ratio=16), HopCodec("lowrank", ratio=16)
    g = torch.Generator().manual_seed(1)
    full = torch.randn(4, 64, 128, generator=g)
    for x in (_activation(), full, torch.randn(300, 6, generator=g) @ torch.randn(6, 96, generator=g)):
        p = mixed.encode(x, "driver[r0 L0-1]")
        assert isinstance(p.body, bytes) and p.nbytes == wire_bytes(p) and 4 * x.numel() / p.nbytes >= 16
        y = mixed.decode(p, "validator[r0 L2-3]")
        m, back = x.reshape(-1, x.shape[-1]), y.reshape(-1, x.shape[-1])
        err = float((back - m).norm())
        best = float(torch.linalg.svdvals(m)[p.rank + p.rank4:].norm())
        assert best <= err <= best + 0.04 * float(m.norm())
        lowrank_err = float((plain.decode(plain.encode(x, "a"), "b").reshape(m.shape) - m).norm())
        assert err <= lowrank_err * 1.001, (p.rank, p.rank4, err, lowrank_err)
        if x is full:  # close to full rank: more components, mostly int4, and a clearly smaller error
            assert p.rank4 > p.rank and p.rank + p.rank4 > 20 and err < 0.9 * lowrank_err
    exact = mixed.encode(torch.randn(200, 5, generator=g) @ torch.randn(5, 64, generator=g), "a")
    assert exact.rank >= 5  # a rank-5 matrix: its five components in int8
    for shape, ratio in [((3, 7, 96), 16), ((1, 512, 64), 32), ((2, 33, 200), 16)]:
        t = torch.randn(shape, generator=g)
        q = HopCodec("lowrank_mixed", ratio=ratio).encode(t, "a")
        assert 4 * t.numel() / q.nbytes >= ratio


def test_none_sends_the_tensor_itself_without_a_copy():
    """Under none the payload is the tensor's own buffer as a numpy array (neuroray/swarm/transport.py), and the
    receiver's tensor is a view of that buffer: no byte is copied on the CPU at either end."""
    x = _activation()
    codec = HopCodec("none")
    p = codec.encode(x, "a")
    y = codec.decode(p, "b")
    assert torch.equal(y, x) and y.dtype == x.dtype and wire_bytes(p) == 4 * x.numel()
    assert p.array.ctypes.data == x.data_ptr() == y.data_ptr()


def _pipeline(tmp_path, scheme):
    return [StageHolder(HolderSpec(replica=0, stage=s, ranges=[(0, 1), (1, 2)], model=CFG, vocab_size=VOCAB,
                                   diloco=DilocoConfig(), seed=0, key_path=str(tmp_path / f"{scheme}{s}.pem"),
                                   hop_compression=scheme)) for s in range(2)]


def _zipf_batch(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.multinomial(1.0 / torch.arange(1, VOCAB + 1).float(), 4 * 65, replacement=True, generator=g)
    tokens = tokens.view(4, 65)
    return tokens[:, :-1], tokens[:, 1:]


def _grads(tmp_path, scheme, seed):
    """Both holders' parameter gradients of one microbatch, and what crossed each way."""
    x, y = _zipf_batch(seed)
    driver, validator = _pipeline(tmp_path, scheme)
    act = driver.forward(0, x)
    _, grad = validator.forward_backward(0, act, y, 1.0)
    assert driver.backward(0, grad) is None
    g = {**driver.grads(), **validator.grads()}
    return torch.cat([g[k].reshape(-1) for k in sorted(g)]), act, grad, driver, validator


@pytest.mark.parametrize("seed", [0, 1])
def test_split_gradients_with_compression_stay_within_the_documented_tolerance(tmp_path, seed):
    """The uncompressed split equals the monolith (tests/test_pipeline_ray.py); compressed ones are held to it."""
    ref, act, grad, *_ = _grads(tmp_path, "none", seed)
    assert isinstance(act, WireTensor) and isinstance(grad, WireTensor) and act.dtype == grad.dtype == "float32"
    n_act, n_grad = math.prod(act.shape), math.prod(grad.shape)
    for scheme in ("int8", "lowrank", "lowrank_mixed"):
        got, act_p, grad_p, driver, validator = _grads(tmp_path, scheme, seed)
        rel = float((got - ref).norm() / ref.norm())
        cos = float(torch.nn.functional.cosine_similarity(got, ref, dim=0))
        print(f"{scheme} seed {seed}: gradient relative error {rel:.4f}, cosine {cos:.4f}")
        if scheme == "int8":
            assert rel < INT8_GRAD_TOLERANCE
        else:
            assert cos > (LOWRANK_GRAD_COSINE if scheme == "lowrank" else MIXED_GRAD_COSINE)
            assert rel > INT8_GRAD_TOLERANCE  # a real approximation, not a copy
            assert 4 * n_act / act_p.nbytes >= 16 and 4 * n_grad / grad_p.nbytes >= 16
        # each holder counted the hops it sent and received, from the payloads themselves
        d, v = driver.compute.hop_counts, validator.compute.hop_counts
        assert d["fwd_sent"] == v["bwd_sent"] == 1 and d["fwd_bytes"] == act_p.nbytes == v["received_bytes"]
        assert v["bwd_bytes"] == grad_p.nbytes == d["received_bytes"] and d["fwd_fp32_bytes"] == 4 * n_act


def _bad(p: HopPayload) -> list[tuple[HopPayload, str]]:
    body = bytearray(p.body)
    nan_scale = bytearray(body)
    nan_scale[-4:] = np.array([np.nan], np.float32).tobytes()
    return [
        (dataclasses.replace(p, body=p.body[:-1]), "body is"),
        (dataclasses.replace(p, body=bytes(nan_scale)), "not finite"),
        (dataclasses.replace(p, scheme="int8" if p.scheme != "int8" else "lowrank"), "the run uses"),
        *([(dataclasses.replace(p, rank=10_000), "out of range"), (dataclasses.replace(p, rank=0), "out of range")]
          if p.scheme == "lowrank" else []),
        *([(dataclasses.replace(p, block=128), "block 128")] if p.scheme == "int8" else []),
        *(_bad_mixed(p) if p.scheme == "lowrank_mixed" else []),
    ]


def _bad_mixed(p: HopPayload) -> list[tuple[HopPayload, str]]:
    """lowrank_mixed: ranks out of range or moved between the int8 and int4 parts, an int4 value of -8."""
    rows, cols = math.prod(p.shape[:-1]), p.shape[-1]
    assert p.rank4 > 0
    start = p.rank * (rows + cols)  # the first int4 byte: two values, the low nibble first
    minus8 = bytearray(p.body)
    minus8[start] = (minus8[start] & 0xF0) | 0  # nibble 0 decodes to -8, outside [-7, 7]
    return [(dataclasses.replace(p, rank4=-1), "out of range"),
            (dataclasses.replace(p, rank=0, rank4=0), "out of range"),
            (dataclasses.replace(p, rank=p.rank + 1, rank4=p.rank4 - 1), "body is"),
            (dataclasses.replace(p, rank4=min(rows, cols) + 1 - p.rank), "out of range"),
            (dataclasses.replace(p, body=bytes(minus8)), "int4 factor value is out of range")]


@pytest.mark.parametrize("scheme", ["int8", "lowrank", "lowrank_mixed"])
def test_a_malformed_payload_is_rejected_naming_its_sender_and_never_applied(tmp_path, scheme):
    x, y = _zipf_batch(0)
    driver, validator = _pipeline(tmp_path, scheme)
    act = driver.forward(0, x)
    assert act.sender == driver.name == "driver[r0 L0-0]"
    for bad, words in _bad(act):
        with pytest.raises(HopRejected, match=r"validator\[r0 L1-1\] rejected the activation of microbatch 0: "
                                              r"payload: .*" + words + r".*the payload says driver\[r0 L0-0\] sent it"
                           ) as err:
            validator.forward_backward(0, bad, y, 1.0)
        assert (err.value.check, err.value.sender_stage) == ("payload", 0)  # the coordinator names stage 0's holder
    assert validator.grads() == {} and not validator._pending and validator.compute.step_microbatches == 0
    with pytest.raises(HopRejected, match="an unknown holder sent it"):
        validator.forward_backward(0, torch.zeros(4, 64, 128), y, 1.0)
    _, grad = validator.forward_backward(0, act, y, 1.0)
    for bad, words in _bad(grad):
        with pytest.raises(HopRejected, match=r"rejected the gradient of microbatch 0: payload: .*" + words
                                              + r".*says validator\[r0 L1-1\] sent it") as err:
            driver.backward(0, bad)
        assert err.value.sender_stage == 1
    assert driver.grads() == {} and 0 in driver._pending  # the graph waits for a good gradient
    assert driver.backward(0, grad) is None and driver.grads()


def test_hop_config_keys_are_checked():
    cfg = load_config(["swarm.hop_compression=lowrank", "swarm.hop_ratio=32"])
    assert (cfg.swarm.hop_compression, cfg.swarm.hop_ratio, cfg.swarm.hop_block) == ("lowrank", 32.0, 256)
    for override, words in [("swarm.hop_compression=topk", "swarm.hop_compression=topk is unknown; choose none, "
                                                            "int8, lowrank, lowrank_mixed"),
                            ("swarm.hop_block=0", "swarm.hop_block=0 must be in"),
                            ("swarm.hop_ratio=0.5", "swarm.hop_ratio=0.5 must be in [1, 1024]")]:
        with pytest.raises(ConfigError, match=None) as err:
            load_config([override])
        assert words in str(err.value)
    assert math.isclose(load_config([]).swarm.hop_ratio, 16.0) and load_config([]).swarm.hop_compression == "none"
