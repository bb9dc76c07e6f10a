"""Pseudo-gradient compression for the outer step: fp16, or int8 with one scale per block, with error feedback.

A holder sends ``encode(delta + residual)`` and keeps ``residual = (delta + residual) - decode(sent)``, so
what quantization drops in one round is sent in a later one instead of being lost (error feedback, as in
1-bit SGD / EF-SGD). The outer-step task decodes every payload back to float32 before screening and
aggregation, so the robust rules see ordinary vectors.

int8 layout: the vector is cut into blocks of ``block`` values; each block stores ``round(x / s)`` as int8
with ``s = max|x| / 127`` (a float32 per block). The error per value is at most ``s / 2``.
"""

from __future__ import annotations

import torch

MODES = ("none", "fp16", "int8")


def encode(x: torch.Tensor, mode: str, block: int = 256) -> dict[str, torch.Tensor]:
    """Compress a flat float32 vector into a payload of tensors (what crosses the network)."""
    if mode == "none":
        return {"fp32": x.contiguous()}
    if mode == "fp16":
        return {"fp16": x.to(torch.float16)}
    if mode == "int8":
        n = x.numel()
        pad = (-n) % block
        blocks = torch.nn.functional.pad(x, (0, pad)).view(-1, block)
        scale = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        q = torch.round(blocks / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return {"int8": q.view(-1)[:n].contiguous(), "scale": scale.to(torch.float32), "block": torch.tensor(block)}
    raise ValueError(f"unknown compression {mode!r}; choose one of {MODES}")


def decode(payload: dict[str, torch.Tensor]) -> torch.Tensor:
    """Back to a flat float32 vector."""
    if "fp32" in payload:
        return payload["fp32"]
    if "fp16" in payload:
        return payload["fp16"].to(torch.float32)
    if "int8" in payload:
        q, scale, block = payload["int8"], payload["scale"], int(payload["block"])
        n = q.numel()
        pad = (-n) % block
        blocks = torch.nn.functional.pad(q.to(torch.float32), (0, pad)).view(-1, block)
        return (blocks * scale[:, None]).view(-1)[:n]
    raise ValueError(f"not a pseudo-gradient payload (keys {sorted(payload)})")


def payload_bytes(payload: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data in a payload: what the object store ships for it, less a few bytes of framing."""
    return sum(t.numel() * t.element_size() for t in payload.values())


class ErrorFeedback:
    """Per-holder residual carried across rounds."""

    def __init__(self, mode: str, block: int = 256):
        if mode not in MODES:
            raise ValueError(f"unknown compression {mode!r}; choose one of {MODES}")
        self.mode, self.block = mode, block
        self.residual: torch.Tensor | None = None

    def compress(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.mode == "none":
            return encode(delta, "none")
        corrected = delta if self.residual is None else delta + self.residual
        payload = encode(corrected, self.mode, self.block)
        self.residual = corrected - decode(payload)
        return payload
