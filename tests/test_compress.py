"""Pseudo-gradient compression: error bounds and error feedback across rounds."""

import pytest
import torch

from neuroray.diloco.compress import ErrorFeedback, decode, encode, payload_bytes


@pytest.mark.parametrize("n", [1, 255, 256, 1000, 4097])
def test_int8_error_is_at_most_half_a_step_per_block(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * torch.logspace(-3, 1, n)
    p = encode(x, "int8", block=256)
    y = decode(p)
    assert y.shape == x.shape and y.dtype == torch.float32
    pad = (-n) % 256
    blocks = torch.nn.functional.pad(x, (0, pad)).view(-1, 256)
    bound = (blocks.abs().amax(dim=1) / 127 / 2).repeat_interleave(256)[:n]
    assert ((y - x).abs() <= bound * (1 + 1e-6) + 1e-12).all()
    assert payload_bytes(p) == n + 4 * ((n + 255) // 256) + 8  # 1 byte per value + a float32 scale per block


def test_fp16_and_none():
    x = torch.randn(3000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(decode(encode(x, "none")), x)
    y = decode(encode(x, "fp16"))
    assert ((y - x).abs() <= x.abs() * 2**-11 + 2**-24).all()
    assert payload_bytes(encode(x, "fp16")) == 2 * 3000 and payload_bytes(encode(x, "none")) == 4 * 3000


def test_zero_block_and_bad_mode():
    assert torch.equal(decode(encode(torch.zeros(300), "int8")), torch.zeros(300))
    with pytest.raises(ValueError, match="unknown compression"):
        encode(torch.zeros(3), "int4")
    with pytest.raises(ValueError):
        ErrorFeedback("int2")


def test_error_feedback_carries_the_residual_across_rounds():
    g = torch.Generator().manual_seed(1)
    ef = ErrorFeedback("int8", block=64)
    deltas = [torch.randn(500, generator=g) for _ in range(6)]
    sent_total = torch.zeros(500)
    for r, d in enumerate(deltas):
        before = torch.zeros(500) if ef.residual is None else ef.residual.clone()
        sent = decode(ef.compress(d))
        # what was sent plus what is kept back is exactly what had to be sent
        torch.testing.assert_close(sent + ef.residual, d + before, rtol=0, atol=1e-6)
        sent_total += sent
    # over the rounds nothing is lost: the sum sent differs from the sum of deltas only by the last residual
    torch.testing.assert_close(sent_total + ef.residual, torch.stack(deltas).sum(0), rtol=0, atol=1e-5)
    # and error feedback beats plain rounding of the sum
    plain = sum(decode(encode(d, "int8", 64)) for d in deltas)
    exact = torch.stack(deltas).sum(0)
    assert (sent_total - exact).abs().max() < (plain - exact).abs().max()


def test_sparse_keeps_the_largest_values_per_chunk_with_their_signs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10_000, generator=g) * torch.logspace(-3, 0, 10_000)
    p = encode(x, "sparse", block=256, density=0.015)
    y = decode(p)
    k = 4  # ceil(0.015 x 256)
    chunks = torch.nn.functional.pad(x, (0, (-10_000) % 256)).view(-1, 256)
    want = torch.zeros_like(chunks).scatter_(1, chunks.abs().topk(k, dim=1).indices, 1).view(-1)[:10_000].bool()
    assert torch.equal(y != 0, want)  # exactly the top k of every chunk survive
    assert torch.equal(torch.sign(y[want]), torch.sign(x[want]))
    # each kept value is its chunk half's mean magnitude: within the spread of the values it stands for
    assert ((y[want].abs() - x[want].abs()).abs() <= x[want].abs() + 1e-3).all()
    # 1 index byte + 2 bits per kept value, two float16 levels per chunk, 3 int64 of metadata
    chunks_n = -(-10_000 // 256)
    assert payload_bytes(p) == chunks_n * k + -(-chunks_n * k // 4) + 4 * chunks_n + 24
    assert 4 * x.numel() / payload_bytes(p) > 100


def test_sparse_error_feedback_sends_everything_eventually():
    g = torch.Generator().manual_seed(4)
    ef = ErrorFeedback("sparse", block=64, density=0.05)
    deltas = [torch.randn(640, generator=g) for _ in range(40)]
    sent_total = torch.zeros(640)
    for d in deltas:
        before = torch.zeros(640) if ef.residual is None else ef.residual.clone()
        sent = decode(ef.compress(d))
        torch.testing.assert_close(sent + ef.residual, d + before, rtol=0, atol=1e-5)
        sent_total += sent
    exact = torch.stack(deltas).sum(0)
    torch.testing.assert_close(sent_total + ef.residual, exact, rtol=0, atol=1e-4)
    # the residual stays bounded (it does not grow with the rounds): what is held back is sent later
    assert ef.residual.abs().max() < 0.5 * exact.abs().max()


@pytest.mark.parametrize("block", [64, 4096])
def test_sparse_payload_checks_reject_what_cannot_decode(block):
    from neuroray.diloco.compress import PayloadError, check

    x = torch.randn(5000, generator=torch.Generator().manual_seed(5))
    good = encode(x, "sparse", block=block)
    check(good, "sparse", block, 5000)
    bad_index = dict(good, sp_index=good["sp_index"].clone())
    bad_index["sp_index"][-1] = -1 if block > 256 else 255  # int16: negative; uint8: past a 64-value chunk
    with pytest.raises(PayloadError, match="out of range"):
        check(bad_index, "sparse", block, 5000)
    cases = {
        "values, block, k": dict(good, sp_meta=torch.tensor([5001, block, good["sp_meta"][2]])),
        "code bytes": dict(good, sp_code=good["sp_code"][:-1]),
        "not finite": dict(good, sp_level=torch.full_like(good["sp_level"], float("inf"))),
        "indices are": dict(good, sp_index=good["sp_index"].to(torch.int64)),
    }
    for match, payload in cases.items():
        with pytest.raises(PayloadError, match=match):
            check(payload, "sparse", block, 5000)
    with pytest.raises(PayloadError, match="the run uses"):
        check(good, "sparse", block, 5000, density=0.5)


def test_sparse_feedback_decay_one_is_bit_for_bit_the_undecayed_payload():
    """diloco.sparse_feedback_decay=1.0 (the default) sends exactly what error feedback without a decay
    sends: e = e + delta, top-k of e, e -= sent; also for streaming's slices of the residual."""
    g = torch.Generator().manual_seed(5)
    ef = ErrorFeedback("sparse", block=64, density=0.05, decay=1.0)
    residual = None
    for r in range(8):
        d = torch.randn(640, generator=g)
        corrected = d if residual is None else d + residual
        want = encode(corrected, "sparse", 64, 0.05)
        got = ef.compress(d)
        assert all(torch.equal(got[k], want[k]) for k in want)
        residual = corrected - decode(want)
        assert torch.equal(ef.residual, residual)
    lo, hi = 128, 384  # a streaming fragment: only its slice of the residual is used and renewed
    d = torch.randn(hi - lo, generator=g)
    want = encode(d + residual[lo:hi], "sparse", 64, 0.05)
    got = ef.compress(d, lo=lo, numel=640)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_sparse_feedback_decay_scales_the_residual_before_the_delta_is_added():
    g = torch.Generator().manual_seed(6)
    ef = ErrorFeedback("sparse", block=64, density=0.05, decay=0.9)
    for r in range(6):
        before = torch.zeros(640) if ef.residual is None else ef.residual.clone()
        d = torch.randn(640, generator=g)
        sent = decode(ef.compress(d))
        # SparseLoCo's e = 0.9 e + delta, of which what was sent leaves
        torch.testing.assert_close(sent + ef.residual, d + 0.9 * before, rtol=0, atol=1e-5)
    # decay 0: nothing is carried, every payload is the delta's own top-k
    ef0 = ErrorFeedback("sparse", block=64, density=0.05, decay=0.0)
    for r in range(3):
        d = torch.randn(640, generator=g)
        got, want = ef0.compress(d), encode(d, "sparse", 64, 0.05)
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="decay"):
        ErrorFeedback("sparse", decay=1.5)


def test_config_takes_the_feedback_decay_in_zero_to_one():
    from neuroray.configure import load_config
    from neuroray.errors import ConfigError

    assert load_config([]).diloco.sparse_feedback_decay == 1.0
    assert load_config(["diloco.sparse_feedback_decay=0.95"]).diloco.sparse_feedback_decay == 0.95
    with pytest.raises(ConfigError, match="sparse_feedback_decay=1.5 must be in \\[0, 1\\]"):
        load_config(["diloco.sparse_feedback_decay=1.5"])
