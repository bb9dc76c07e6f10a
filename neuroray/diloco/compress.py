"""Pseudo-gradient compression for the outer step: fp16, or int8 with one scale per block, with error feedback.

A holder sends ``encode(delta + residual)`` and keeps ``residual = (delta + residual) - decode(sent)``, so
what quantization drops in one round is sent in a later one instead of being lost (error feedback, as in
1-bit SGD / EF-SGD). The outer-step task decodes every payload back to float32 before screening and
aggregation, so the robust rules see ordinary vectors.

int8 layout: the vector is cut into blocks of ``block`` values; each block stores ``round(x / s)`` as int8
with ``s = max|x| / 127`` (a float32 per block). The error per value is at most ``s / 2``.

sparse layout (SparseLoCo-style, arXiv 2508.15706): the vector is cut into chunks of ``block`` values and
only the ``k = ceil(density x block)`` largest magnitudes of each chunk are sent, each as a position inside
its chunk (uint8 for chunks of up to 256 values, else int16, int32 past 32,768) and a 2-bit code: a sign bit and a bit that
says whether its magnitude is in the chunk's upper or lower half; the chunk carries the mean magnitude of
each half as two float16 levels. Everything else is left to error feedback, which sends it in a later
round once it has grown. At the defaults (block 256, density 1.5 %) that is 0.035 bytes per value against
4 for float32, about 113x fewer.

The way back (outer step -> holders) is compressed the same way: the task sends the *update*
``theta0_old - theta0_new`` (:func:`encode_update`) with its own error feedback, and the new theta0 is by
definition ``theta0_old - decode(update)``, computed bit-identically by the task and by every holder
(float32 subtraction on CPU). The update names the digest of the theta0 it applies to, so a holder whose
theta0 differs (restored from an older snapshot) notices and fetches the dense theta0 instead.
"""

from __future__ import annotations

import math

import torch

from neuroray.digest import tensor_digest

MODES = ("none", "fp16", "int8", "sparse")
SPARSE_DENSITY = 0.015  # DilocoConfig.sparse_density's default
_LAYOUT = {"none": {"fp32": torch.float32}, "fp16": {"fp16": torch.float16},
           "int8": {"int8": torch.int8, "scale": torch.float32, "block": None},
           "sparse": {"sp_index": None, "sp_code": torch.uint8, "sp_level": torch.float16, "sp_meta": torch.int64}}


class PayloadError(ValueError):
    """A payload that is not what the run's compression produces (wrong kind, keys, dtypes or sizes)."""


def sparse_k(block: int, density: float) -> int:
    """Values kept per chunk of ``block``."""
    return max(1, min(block, math.ceil(density * block)))


def _index_dtype(block: int) -> torch.dtype:
    return torch.uint8 if block <= 256 else torch.int16 if block <= 1 << 15 else torch.int32


def _encode_sparse(x: torch.Tensor, block: int, density: float) -> dict[str, torch.Tensor]:
    n, k = x.numel(), sparse_k(block, density)
    chunks = torch.nn.functional.pad(x, (0, (-n) % block)).view(-1, block)
    index = chunks.abs().topk(k, dim=1, sorted=False).indices
    values = chunks.gather(1, index)
    mags = values.abs()
    upper = mags > mags.median(dim=1, keepdim=True).values
    count_up = upper.sum(dim=1)
    hi = torch.where(upper, mags, 0).sum(dim=1) / count_up.clamp_min(1)
    lo = torch.where(upper, 0, mags).sum(dim=1) / (k - count_up).clamp_min(1)
    codes = ((values < 0).to(torch.uint8) << 1 | upper.to(torch.uint8)).view(-1)
    codes = torch.nn.functional.pad(codes, (0, (-codes.numel()) % 4)).view(-1, 4)
    packed = codes[:, 0] | codes[:, 1] << 2 | codes[:, 2] << 4 | codes[:, 3] << 6
    levels = torch.stack([lo, hi], dim=1).clamp_max(torch.finfo(torch.float16).max).to(torch.float16).view(-1)
    return {"sp_index": index.to(_index_dtype(block)).view(-1), "sp_code": packed, "sp_level": levels,
            "sp_meta": torch.tensor([n, block, k])}


def _decode_sparse(payload: dict[str, torch.Tensor]) -> torch.Tensor:
    n, block, k = (int(v) for v in payload["sp_meta"])
    rows = -(-n // block)
    packed = payload["sp_code"]
    codes = torch.stack([packed & 3, packed >> 2 & 3, packed >> 4 & 3, packed >> 6 & 3], dim=1).view(-1)
    codes = codes[: rows * k].view(rows, k).long()
    levels = payload["sp_level"].to(torch.float32).view(rows, 2)
    values = levels.gather(1, codes & 1) * (1 - 2 * (codes >> 1)).to(torch.float32)
    index = payload["sp_index"].long().view(rows, k)
    out = torch.zeros(rows, block).scatter_(1, index, values)
    return out.view(-1)[:n]  # chosen padding positions (a last chunk shorter than k) fall away here


def encode(x: torch.Tensor, mode: str, block: int = 256, density: float = SPARSE_DENSITY) -> dict[str, torch.Tensor]:
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
    if mode == "sparse":
        return _encode_sparse(x, block, density)
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
    if "sp_index" in payload:
        return _decode_sparse(payload)
    raise ValueError(f"not a pseudo-gradient payload (keys {sorted(payload)})")


def check(payload, mode: str, block: int, numel: int, density: float = SPARSE_DENSITY) -> None:
    """Raise :class:`PayloadError` naming what is wrong unless ``payload`` is a well-formed ``mode`` payload
    of ``numel`` values. Cheap (no math on values): the outer step runs it before decoding anything, so a
    malformed contribution is rejected like any other bad one instead of crashing the step."""
    if not isinstance(payload, dict):
        raise PayloadError(f"not a payload ({type(payload).__name__})")
    kind = next((k for k, layout in _LAYOUT.items() if set(payload) == set(layout)), None)
    if kind is None:
        raise PayloadError(f"payload keys {sorted(map(str, payload))} match no compression")
    if kind != mode:
        raise PayloadError(f"payload is {kind}, the run uses {mode}")
    for key, dtype in _LAYOUT[kind].items():
        t = payload[key]
        if not isinstance(t, torch.Tensor):
            raise PayloadError(f"payload {key} is {type(t).__name__}, not a tensor")
        if dtype is not None and (t.dtype != dtype or t.dim() != 1):
            raise PayloadError(f"payload {key} is {t.dtype} {tuple(t.shape)}, expected 1-D {dtype}")
    if kind == "sparse":
        _check_sparse(payload, block, numel, density)
        return
    data = payload[next(iter(_LAYOUT[kind]))]
    if data.numel() != numel:
        raise PayloadError(f"payload holds {data.numel()} values, expected {numel}")
    if kind == "int8":
        b = payload["block"]
        if b.numel() != 1 or b.is_floating_point() or int(b) != block:
            raise PayloadError(f"payload block {b.tolist()}, the run uses {block}")
        if payload["scale"].numel() != -(-numel // block):
            raise PayloadError(f"payload has {payload['scale'].numel()} scales, expected {-(-numel // block)}")


def _check_sparse(payload: dict, block: int, numel: int, density: float) -> None:
    meta = payload["sp_meta"]
    k = sparse_k(block, density)
    if meta.numel() != 3 or meta.tolist() != [numel, block, k]:
        raise PayloadError(f"sparse payload says (values, block, k) = {meta.tolist()}, the run uses "
                           f"{[numel, block, k]}")
    rows = -(-numel // block)
    index, code, level = payload["sp_index"], payload["sp_code"], payload["sp_level"]
    if index.dtype != _index_dtype(block) or index.dim() != 1 or index.numel() != rows * k:
        raise PayloadError(f"sparse indices are {index.dtype} {tuple(index.shape)}, expected "
                           f"{_index_dtype(block)} ({rows * k},)")
    if code.numel() != -(-rows * k // 4) or level.numel() != 2 * rows:
        raise PayloadError(f"sparse payload has {code.numel()} code bytes and {level.numel()} levels, expected "
                           f"{-(-rows * k // 4)} and {2 * rows}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= block):
        raise PayloadError(f"sparse indices out of range [0, {block})")
    if not torch.isfinite(level).all() or (level < 0).any():
        raise PayloadError("sparse levels are not finite non-negative magnitudes")


def digest(theta: torch.Tensor) -> str:
    """Names the theta0 an update applies to: the PoNW commitment (neuroray/digest.py), so a holder checks an
    update's base against the digest it already made of its theta0 for its proof, without hashing again."""
    return tensor_digest(theta)


def encode_update(old: torch.Tensor, new: torch.Tensor, mode: str, block: int,
                  residual: torch.Tensor | None, base: torch.Tensor | None = None,
                  part: tuple[int, int] | None = None, density: float = SPARSE_DENSITY,
                  base_digest: str = "") -> tuple[dict, torch.Tensor, torch.Tensor | None]:
    """Compress the outer update ``old - new`` (plus the carried residual) for the holders.

    Returns ``(update, applied, residual)``: ``update`` is what is broadcast (``{"base": digest(old),
    "payload": ...}``), ``applied = old - decode(payload)`` is the new theta0 every holder will compute,
    and ``residual`` is what the broadcast dropped this round, sent in a later one (None for fp32).
    Streaming: ``old`` and ``new`` are the slice ``part`` of the range's full theta0 ``base``; the update
    names the digest of ``base`` and the slice. ``base_digest``: that digest, when the caller has it already.
    """
    wanted = old - new if residual is None else old - new + residual
    payload = encode(wanted, mode, block, density)
    sent = decode(payload)
    update = {"base": base_digest or digest(old if base is None else base), "payload": payload}
    if part is not None:
        update["slice"] = tuple(part)
    return update, old - sent, None if mode == "none" else wanted - sent


def payload_bytes(payload: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data in a payload: what the object store ships for it, less a few bytes of framing."""
    return sum(t.numel() * t.element_size() for t in payload.values())


class ErrorFeedback:
    """Per-holder residual carried across rounds.

    ``decay`` (``diloco.sparse_feedback_decay``): the residual is multiplied by it before this round's delta
    is added, SparseLoCo's ``e = decay * e + delta`` (arXiv 2508.15706), so what compression left out fades
    over rounds instead of being sent in full however stale. 1.0 keeps it whole (the multiplication is
    skipped, so payloads are bit for bit those without a decay)."""

    def __init__(self, mode: str, block: int = 256, density: float = SPARSE_DENSITY, decay: float = 1.0):
        if mode not in MODES:
            raise ValueError(f"unknown compression {mode!r}; choose one of {MODES}")
        if not 0 <= decay <= 1:
            raise ValueError(f"error-feedback decay {decay} must be in [0, 1]")
        self.mode, self.block, self.density, self.decay = mode, block, density, decay
        self.residual: torch.Tensor | None = None

    def compress(self, delta: torch.Tensor, lo: int = 0, numel: int | None = None) -> dict[str, torch.Tensor]:
        """Payload of ``delta`` plus its residual. Streaming sends one slice ``[lo, lo + len(delta))`` of a
        ``numel`` vector at a time: only that slice's residual is used and renewed. The residual is replaced,
        never changed in place, so a copy kept to redo a round stays what it was."""
        if self.mode == "none":
            return encode(delta, "none")
        hi, numel = lo + delta.numel(), delta.numel() if numel is None else numel
        if self.residual is None:
            corrected = delta
        elif self.decay == 1.0:
            corrected = delta + self.residual[lo:hi]
        else:
            corrected = delta + self.decay * self.residual[lo:hi]
        payload = encode(corrected, self.mode, self.block, self.density)
        error = corrected - decode(payload)
        if (lo, hi) == (0, numel):
            self.residual = error
        else:
            self.residual = torch.zeros(numel) if self.residual is None else self.residual.clone()
            self.residual[lo:hi] = error
        return payload
