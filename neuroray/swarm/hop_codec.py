"""Pipeline hop compression: what crosses between stage holders on every microbatch (docs/hops.md).

``swarm.hop_compression`` picks the scheme for the activation a holder sends forward and for the gradient
it sends back:

* ``none``: the tensor itself (float32, or bf16 activations under bf16; neuroray/swarm/compute.py) as a
  :class:`~neuroray.swarm.transport.WireTensor`, a numpy buffer Ray ships without pickling its data.
* ``int8``: blockwise int8 with one float32 scale per ``block`` values, the DiLoCo int8 code
  (neuroray/diloco/compress.py). Error per value at most ``scale / 2``; 3.94x fewer bytes at block 256.
* ``lowrank``: the tensor as a ``[tokens, hidden]`` matrix, cut to its best rank-r approximation (a truncated
  SVD), both factors sent as int8 with one float32 scale per rank component. r is the largest rank whose
  payload is at least ``ratio`` times smaller than float32, so the ratio holds at any shape. It was picked
  over ternary, 1-bit and top-k codes by its gradient error and loss on the tiny model (docs/hops.md).
* ``lowrank_mixed``: the same SVD at the same ``ratio``, the leading components' factors in int8 and the next
  ones' in int4 (about twice as many for the bytes), the split picked per hop for the smallest estimated error:
  mostly int4 while the activations are close to full rank (early training), mostly int8 once they are low rank.

A compressed payload is a :class:`HopPayload`: the scheme, the shape, the label of the holder that sent it
and one ``bytes`` body, never float32 tensors. :func:`decode` checks the body before it decodes anything (its
length for the shape, finite scales, ranks in range, int4 values in [-7, 7]) and raises
:class:`~neuroray.errors.HopPayloadError` naming the sender, so a receiving holder never applies a malformed
payload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from neuroray.diloco import compress
from neuroray.errors import HopPayloadError
from neuroray.swarm.transport import WireTensor, from_wire, to_wire

SCHEMES = ("none", "int8", "lowrank", "lowrank_mixed")  # config.HOP_COMPRESSIONS mirrors this (config imports no torch)
_FP32 = 4


@dataclass(frozen=True)
class HopPayload:
    """One compressed activation or gradient on its way to the next (or previous) holder."""

    scheme: str
    shape: tuple[int, ...]
    sender: str  # the sending holder's label: named when the payload is rejected
    body: bytes
    block: int = 0  # int8: values per scale
    rank: int = 0  # lowrank: components kept (lowrank_mixed: those with int8 factors)
    rank4: int = 0  # lowrank_mixed: components after those, with int4 factors

    @property
    def nbytes(self) -> int:
        """The encoded bytes that cross: the body, plus 8 per dimension of the shape."""
        return len(self.body) + 8 * len(self.shape)


@dataclass(frozen=True)
class HopCodec:
    """One run's hop scheme and its parameters (``swarm.hop_*``)."""

    scheme: str = "none"
    block: int = 256  # int8: values per float32 scale
    ratio: float = 16.0  # lowrank: the payload is at least this many times smaller than float32

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown hop compression {self.scheme!r}; choose one of {SCHEMES}")

    def encode(self, x: torch.Tensor, sender: str) -> HopPayload | WireTensor:
        """The payload for ``x`` (the tensor itself, as a :class:`WireTensor`, under ``none``). ``x`` may be
        on the device: compression runs there and only the encoded bytes come to the host."""
        if self.scheme == "none":
            return to_wire(x)
        x = x.detach().float()
        shape = tuple(x.shape)
        if self.scheme == "int8":
            p = compress.encode(x.reshape(-1), "int8", self.block)
            return HopPayload("int8", shape, sender, _bytes(p["int8"]) + _bytes(p["scale"]), block=self.block)
        if self.scheme == "lowrank":
            return _encode_lowrank(x, shape, sender, self.ratio)
        return _encode_mixed(x, shape, sender, self.ratio)

    def decode(self, payload, receiver: str) -> torch.Tensor:
        """The tensor a payload carries (on the CPU), after checking it; raises HopPayloadError naming its sender."""
        if self.scheme == "none":
            return from_wire(payload, "an unknown holder", receiver)
        if not isinstance(payload, HopPayload):
            raise HopPayloadError("an unknown holder", receiver,
                                  f"expected a {self.scheme} hop payload, got {type(payload).__name__}")
        try:
            return _decode_checked(payload, self.scheme, self.block)
        except _Malformed as exc:
            raise HopPayloadError(str(payload.sender), receiver, str(exc)) from None


def wire_bytes(payload) -> int:
    """Bytes a hop carries: the encoded payload, or the tensor's own bytes under ``none``."""
    if isinstance(payload, (HopPayload, WireTensor)):
        return payload.nbytes
    return payload.numel() * payload.element_size() if isinstance(payload, torch.Tensor) else 0


class _Malformed(ValueError):
    pass


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


def _decode_checked(p: HopPayload, scheme: str, block: int) -> torch.Tensor:
    if p.scheme != scheme:
        raise _Malformed(f"payload is {p.scheme}, the run uses {scheme}")
    if not isinstance(p.body, bytes) or any(not isinstance(d, int) or d < 0 for d in p.shape):
        raise _Malformed(f"payload shape {p.shape} or body type {type(p.body).__name__} is not a hop payload")
    n = math.prod(p.shape)
    if scheme == "int8":
        if p.block != block:
            raise _Malformed(f"payload block {p.block}, the run uses {block}")
        scales = -(-n // block)
        _expect_len(p, n + _FP32 * scales)
        scale = _scales(p.body, n, scales)
        q = torch.from_numpy(np.frombuffer(p.body, np.int8, n).copy())
        return compress.decode({"int8": q, "scale": scale, "block": torch.tensor(block)}).view(p.shape)
    rows, cols = _matrix_shape(p.shape)
    if scheme == "lowrank_mixed":
        return _decode_mixed(p, rows, cols)
    if not 1 <= p.rank <= min(rows, cols):
        raise _Malformed(f"rank {p.rank} is out of range [1, {min(rows, cols)}] for a {rows}x{cols} matrix")
    r = p.rank
    _expect_len(p, (rows + cols) * r + 2 * _FP32 * r)
    left = _int8_rows(p.body, 0, r, rows, (rows + cols) * r)
    right = _int8_rows(p.body, rows * r, r, cols, (rows + cols) * r + _FP32 * r)
    return (left.T @ right).view(p.shape)


def _expect_len(p: HopPayload, want: int) -> None:
    if len(p.body) != want:
        raise _Malformed(f"body is {len(p.body)} bytes, a {p.scheme} payload of shape {p.shape} has {want}")


def _scales(body: bytes, offset: int, count: int) -> torch.Tensor:
    s = np.frombuffer(body, np.float32, count, offset)
    if not np.isfinite(s).all() or (s < 0).any():
        raise _Malformed("scales are not finite non-negative numbers")
    return torch.from_numpy(s.copy())


def _int8_rows(body: bytes, offset: int, r: int, length: int, scale_offset: int) -> torch.Tensor:
    """``r`` int8 rows of ``length`` values, one scale each (compress's int8 with a block of one row)."""
    q = torch.from_numpy(np.frombuffer(body, np.int8, r * length, offset).copy())
    scale = _scales(body, scale_offset, r)
    return compress.decode({"int8": q, "scale": scale, "block": torch.tensor(length)}).view(r, length)


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``[..., hidden]`` as ``[tokens, hidden]``."""
    cols = shape[-1] if shape else 1
    return (math.prod(shape) // cols if cols else 0), cols


def lowrank_rank(rows: int, cols: int, ratio: float, overhead: int = 0) -> int:
    """The largest rank whose payload (``overhead`` bytes of framing included) is ``ratio`` times smaller than
    the float32 matrix; at least 1."""
    per_rank = rows + cols + 2 * _FP32
    return max(1, min(rows, cols, int((_FP32 * rows * cols / ratio - overhead) // per_rank)))


def _svd(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``r`` singular triplets of ``m``: ``u [rows, r], s [r], vh [r, cols]``."""
    rows, cols = m.shape
    if min(rows, cols) <= 1024:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:  # randomized range finder (torch.svd_lowrank); a fixed seed keeps encodes reproducible
        with torch.random.fork_rng(devices=[m.device] if m.is_cuda else []):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(m, q=min(r + 8, rows, cols), niter=2)
        u, s, vh = u[:, :r], s[:r], v[:, :r].T
    return u, s, vh


def _encode_lowrank(x: torch.Tensor, shape: tuple[int, ...], sender: str, ratio: float) -> HopPayload:
    rows, cols = _matrix_shape(shape)
    m = x.reshape(rows, cols)
    r = lowrank_rank(rows, cols, ratio, 8 * len(shape))
    u, s, vh = _svd(m, r)
    # balance the singular values between the factors so both quantize on similar scales
    root = s.sqrt()
    left, right = (u * root).T.contiguous(), (vh * root[:, None]).contiguous()  # [r, rows], [r, cols]
    a = compress.encode(left.reshape(-1), "int8", rows)
    b = compress.encode(right.reshape(-1), "int8", cols)
    body = b"".join(map(_bytes, (a["int8"], b["int8"], a["scale"], b["scale"])))
    return HopPayload("lowrank", shape, sender, body, rank=r)


# ----- lowrank_mixed: the leading components' factors in int8, the next ones' in int4 ---------------------------
# A component's quantization error scales with its singular value, its truncation error with the square of it,
# so the small components are worth more as int4 (twice as many for the bytes) than as nothing. Per hop the
# encoder picks the split (int8 count) whose estimated error is smallest: early in training, when the activations
# are close to full rank, mostly int4; once they are low rank, mostly int8 (docs/hops.md, "Why lowrank_mixed").


def _mixed_costs(rows: int, cols: int) -> tuple[int, int]:
    """Bytes of one component: int8 factors + 2 float32 scales; int4 factors (a row padded to whole bytes) + 2."""
    return rows + cols + 2 * _FP32, (rows + 1) // 2 + (cols + 1) // 2 + 2 * _FP32


def mixed_budget(rows: int, cols: int, ratio: float, overhead: int) -> int:
    """The body bytes a lowrank_mixed payload may use: ``ratio`` times fewer than the float32 matrix, framing off."""
    return max(0, int(_FP32 * rows * cols / ratio) - overhead)


def _quant_rows(m: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row as integers in [-levels, levels] and its float32 scale (absmax / levels)."""
    scale = m.abs().amax(1) / levels
    q = torch.round(m / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-levels, levels)
    return q, scale


def _pack4(q: torch.Tensor) -> torch.Tensor:
    """Rows of int4 values (-7..7) as bytes, two a byte (low nibble first), each row padded with a zero value."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def _unpack4(body: bytes, offset: int, r: int, length: int) -> torch.Tensor:
    per_row = (length + 1) // 2
    b = torch.from_numpy(np.frombuffer(body, np.uint8, r * per_row, offset).copy()).view(r, per_row)
    u = torch.stack([b & 15, b >> 4], 2).view(r, 2 * per_row)[:, :length]
    if r and int(u.min()) == 0:  # nibble 0 would be -8, outside the code's [-7, 7]
        raise _Malformed("an int4 factor value is out of range")
    return u.to(torch.float32) - 8


def _prefix_sums(v: torch.Tensor) -> torch.Tensor:
    """``[0, v0, v0 + v1, ...]``: entry k is the sum of the first k values."""
    return torch.cat([v.new_zeros(1), v.cumsum(0)])


def _encode_mixed(x: torch.Tensor, shape: tuple[int, ...], sender: str, ratio: float) -> HopPayload:
    rows, cols = _matrix_shape(shape)
    m = x.reshape(rows, cols)
    c8, c4 = _mixed_costs(rows, cols)
    budget = mixed_budget(rows, cols, ratio, 8 * len(shape))
    top = max(1, min(rows, cols, budget // c4))  # the most components any split keeps
    u, s, vh = _svd(m, top)
    top = len(s)
    root = s.sqrt()
    left, right = (u * root).T, vh * root[:, None]  # [top, rows], [top, cols]
    # per component: its squared error as int8 and as int4 (first order: |da|^2 |b|^2 + |a|^2 |db|^2, |a|^2 = s)
    err = {}
    for bits, levels in ((8, 127), (4, 7)):
        qa, sa = _quant_rows(left, levels)
        qb, sb = _quant_rows(right, levels)
        err[bits] = s * (((qa * sa[:, None] - left) ** 2).sum(1) + ((qb * sb[:, None] - right) ** 2).sum(1))
    cum = _prefix_sums
    # every split at once: the energy not kept + the int8 part's error + the int4 part's error
    r8 = torch.arange(0, min(top, budget // c8) + 1, device=s.device)
    r4 = torch.minimum(top - r8, (budget - r8 * c8) // c4)
    e = m.pow(2).sum() - cum(s * s)[r8 + r4] + cum(err[8])[r8] + cum(err[4])[r8 + r4] - cum(err[4])[r8]
    e = torch.where(r8 + r4 > 0, e, torch.inf)
    i = int(e.argmin())
    r8, r4 = (int(r8[i]), int(r4[i])) if r8[i] + r4[i] > 0 else (0, 1)  # below one int4 component: keep one
    q8a, s8a = _quant_rows(left[:r8], 127)
    q8b, s8b = _quant_rows(right[:r8], 127)
    q4a, s4a = _quant_rows(left[r8:r8 + r4], 7)
    q4b, s4b = _quant_rows(right[r8:r8 + r4], 7)
    parts = [q8a.to(torch.int8), q8b.to(torch.int8), _pack4(q4a), _pack4(q4b),
             *(t.to(torch.float32) for t in (s8a, s8b, s4a, s4b))]
    return HopPayload("lowrank_mixed", shape, sender, b"".join(map(_bytes, parts)), rank=r8, rank4=r4)


def _decode_mixed(p: HopPayload, rows: int, cols: int) -> torch.Tensor:
    r8, r4 = p.rank, p.rank4
    if not (isinstance(r8, int) and isinstance(r4, int) and r8 >= 0 and r4 >= 0 and 1 <= r8 + r4 <= min(rows, cols)):
        raise _Malformed(f"ranks {r8} (int8) + {r4} (int4) are out of range [1, {min(rows, cols)}] for a "
                         f"{rows}x{cols} matrix")
    c8, c4 = _mixed_costs(rows, cols)
    _expect_len(p, r8 * c8 + r4 * c4)
    a4 = r8 * (rows + cols)
    b4 = a4 + r4 * ((rows + 1) // 2)
    sc = b4 + r4 * ((cols + 1) // 2)
    scales = _scales(p.body, sc, 2 * (r8 + r4))
    q8 = torch.from_numpy(np.frombuffer(p.body, np.int8, a4, 0).astype(np.float32))
    left8 = q8[:r8 * rows].view(r8, rows) * scales[:r8, None]
    right8 = q8[r8 * rows:].view(r8, cols) * scales[r8:2 * r8, None]
    left4 = _unpack4(p.body, a4, r4, rows) * scales[2 * r8:2 * r8 + r4, None]
    right4 = _unpack4(p.body, b4, r4, cols) * scales[2 * r8 + r4:, None]
    return (left8.T @ right8 + left4.T @ right4).view(p.shape)
