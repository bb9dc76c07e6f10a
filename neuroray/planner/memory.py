"""Memory accounting per stage holder, and memory sizes written by people ("8GB", "1.5TiB").

A holder keeps float32 master weights in every precision (neuroray/swarm/compute.py; bf16 and fp16 only
autocast the forward), so whatever ``precision`` says it keeps, per parameter::

    weights 4 B + gradients 4 B + AdamW exp_avg and exp_avg_sq 8 B          = 16 B   (inner training)
    DiLoCo theta0 4 B + outer momentum 4 B + outer-step transient 4 B        = 12 B   (outer step)
                                                                      total  = 28 B / parameter

theta0 is the holder's own copy; the outer momentum of the range lives in Ray's object store, one
copy per range, and is counted per holder so whichever node ends up hosting it has room; the
transient is the pseudo-gradient (``theta0 - theta``) going out and the new theta0 coming in.

Activations saved by autograd (4 B each in float32; 2 B under bf16 or fp16 autocast,
``Batch.activation_bytes``, from :func:`activation_bytes`) for one token of one layer, counted from what
neuroray.model.layers actually saves (tests/test_planner_partition.py measures it with
``saved_tensors_hooks``), with ``d`` width, ``d_kv`` KV width, ``f`` SwiGLU hidden, ``H`` heads::

    two RMSNorms (input, normalised, gained): 6d + 2      q, k, v before and after RoPE: 2d + 4 d_kv
    GQA repeat of k and v (n_heads > n_kv_heads): 2d      attention output d + log-sum-exp H
    SwiGLU w1 out, w3 out, silu, product: 4f
    => per token per layer  a = 8d + 4 d_kv + 2d [GQA] + 4f + H + 2   (MHA: 8d + 3 d_kv + 4f + H + 2)

(the fused attention kernels keep only the log-sum-exp; a math-path kernel would also keep the
``H x T`` attention probabilities). Every non-last holder keeps the graphs of all
``num_microbatches`` microbatches of an inner step alive until their backwards arrive (GPipe order,
neuroray.training.schedule), plus each microbatch's output (d per token); the last holder runs forward
and backward per microbatch, so it keeps one, plus the head: the final norm (3d + 1), the logits,
their log-softmax and the logits' gradient (3V). Backward needs one more layer's worth of
activations as working space.

A holder also pays a fixed runtime overhead (Python + torch + the Ray worker in host memory, or the
CUDA context on a GPU), ``planner.holder_overhead``. The planner only uses ``safety_fraction`` of a
node's memory, which covers allocator fragmentation and what this model does not count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from neuroray.config import ModelConfig
from neuroray.planner.scaling import ffn_width, kv_width

FLOAT_BYTES = 4
HALF_BYTES = 2  # an activation saved under bf16 or fp16 autocast
INNER_BYTES_PER_PARAM = 4 + 4 + 8  # weights, gradients, AdamW moments
DILOCO_BYTES_PER_PARAM = 4 + 4 + 4  # theta0, outer momentum, outer-step transient
BYTES_PER_PARAM = INNER_BYTES_PER_PARAM + DILOCO_BYTES_PER_PARAM  # 28

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*$")


class MemoryUnitError(ValueError):
    """A memory size without a unit or with an unknown one (wrapped into ConfigError by callers)."""


def parse_quantity(text, units: dict[str, float], error: type[ValueError], what: str, kind: str,
                   examples: str, unit_list: str, bare_hint: tuple[str, str], zero: str = "") -> float:
    """``number unit`` -> number x units[unit] (unit in any case), above zero; else one ``error`` line
    saying what is wrong: a missing unit, not a ``kind`` at all, an unknown unit, or not above zero."""
    s = str(text)
    m = _QUANTITY.match(s)
    if m is None:
        if re.fullmatch(r"\s*[0-9]+(?:\.[0-9]+)?\s*", s):
            a, b = bare_hint
            raise error(f"{what} '{s}' has no unit; write it with one, e.g. {s.strip()}{a} or {s.strip()}{b}")
        raise error(f"{what} '{s}' is not a {kind}; write a number and a unit, e.g. {examples}")
    unit = m.group(2).lower()
    if unit not in units:
        raise error(f"{what} '{s}' has unknown unit '{m.group(2)}'; use one of {unit_list}")
    value = float(m.group(1)) * units[unit]
    if value <= 0:
        raise error(f"{what} '{s}' must be more than zero{zero}")
    return value


def parse_memory(text, what: str = "memory") -> int:
    """``"8GB"`` -> 8e9 bytes, ``"8GiB"`` -> 8 * 2**30; a bare number or an unknown unit is an error.

    Decimal units (KB, MB, GB, TB, PB) are powers of 1000, binary ones (KiB ... PiB) powers of 1024;
    case does not matter. A unit is required: ``8`` could mean bytes or gigabytes.
    """
    size = int(round(parse_quantity(text, _UNITS, MemoryUnitError, what, "size", "8GB, 512MiB or 1.5TB",
                                    "B, KB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB", ("GB", "GiB"), " bytes")))
    if size <= 0:
        raise MemoryUnitError(f"{what} '{text}' must be more than zero bytes")
    return size


def format_bytes(n: float) -> str:
    """Decimal units, about 3 significant figures: ``8.00 GB``, ``24.0 GB``, ``512 MB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}" if v >= 10 else f"{v:.2f} {unit}"
    return f"{int(n)} B"


def activation_bytes(precision: str, device: str) -> int:
    """Bytes per saved activation under TrainConfig.precision on planner.device (gpu, cpu or auto).

    auto is bf16 on CUDA and fp32 on the CPU; with planner.device=auto the device is not known here, so
    it counts float32: an overestimate on GPUs, never an underestimate."""
    if precision in ("bf16", "fp16") or (precision == "auto" and device == "gpu"):
        return HALF_BYTES
    return FLOAT_BYTES


def activation_elems_per_token_layer(cfg: ModelConfig) -> int:
    """Elements autograd saves per token per layer (see the module docstring for each term)."""
    d, dkv, f, h = cfg.d_model, kv_width(cfg), ffn_width(cfg), cfg.n_heads
    if cfg.n_heads > cfg.n_kv_heads:
        return 8 * d + 4 * dkv + 2 * d + 4 * f + h + 2
    return 8 * d + 3 * dkv + 4 * f + h + 2


def head_elems_per_token(cfg: ModelConfig, vocab_size: int) -> int:
    """Last holder, per token: final norm (3d + 1), logits + log-softmax + logits' gradient (3V)."""
    return 3 * cfg.d_model + 1 + 3 * vocab_size


@dataclass(frozen=True)
class Batch:
    """What activations are counted for: microbatch size x sequence length x microbatches in flight."""

    microbatch_size: int
    seq_len: int
    num_microbatches: int
    activation_bytes: int = FLOAT_BYTES  # per saved activation: 2 under bf16/fp16 autocast (activation_bytes())

    @property
    def tokens(self) -> int:
        return self.microbatch_size * self.seq_len


@dataclass(frozen=True)
class HolderMemory:
    """Bytes one stage holder needs; ``total`` is what must fit in ``safety_fraction`` of its device."""

    params: int
    weights: int  # 4 B / param
    grads: int  # 4 B / param
    adam: int  # 8 B / param
    diloco: int  # theta0 + outer momentum + outer-step transient, 12 B / param
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.adam + self.diloco + self.activations + self.overhead


def holder_memory(cfg: ModelConfig, vocab_size: int, n_layers: int, *, has_embedding: bool, has_head: bool,
                  batch: Batch, overhead: int) -> HolderMemory:
    """Memory of a holder of ``n_layers`` layers (+ embedding if first, + final norm and head if last).

    ``params = n_layers * per_layer + [V d] + [V d + d]``; state = 28 B x params;
    activations = activation_bytes (4 B, 2 B in bf16/fp16) x tokens x (in_flight x (n_layers x a + d) + a + [head])
    with ``in_flight`` = num_microbatches, or 1 on the last holder (see the module docstring).
    """
    from neuroray.planner.scaling import param_count

    pc = param_count(cfg, vocab_size)
    params = n_layers * pc.per_layer + (pc.embedding if has_embedding else 0) + (pc.head if has_head else 0)
    a = activation_elems_per_token_layer(cfg)
    in_flight = 1 if has_head else batch.num_microbatches
    elems = in_flight * (n_layers * a + cfg.d_model) + a  # + one layer of backward working space
    if has_head:
        elems += head_elems_per_token(cfg, vocab_size)
    return HolderMemory(
        params=params, weights=4 * params, grads=4 * params, adam=8 * params, diloco=DILOCO_BYTES_PER_PARAM * params,
        activations=batch.activation_bytes * batch.tokens * elems, overhead=overhead,
    )


def outer_step_bytes(range_params: int, replicas: int) -> int:
    """Host memory of one range's outer-step task: ``4 B x P x (R + 6)``.

    R pseudo-gradients in; theta0, outer momentum and the previous aggregate (centered clipping's
    centre) in; the aggregate, the new theta0 and the new momentum out. The reducers of
    neuroray.diloco.aggregate work chunk by chunk, so they add no full-size copy of their own.
    """
    return FLOAT_BYTES * range_params * (replicas + 6)
