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
