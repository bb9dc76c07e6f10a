"""Memory accounting per stage holder, and memory sizes written by people ("8GB", "1.5TiB").

What a training holder's process holds at its peak, term by term (docs/memory.md explains each one and
``benchmarks/memory_model.py`` measures a real Ray holder against it). A holder keeps float32 master weights
in every precision (neuroray/swarm/compute.py; bf16 and fp16 only autocast the forward), so per parameter::

    weights 4 B + gradients 4 B + AdamW exp_avg and exp_avg_sq 8 B + DiLoCo theta0 4 B   = 20 B   (state)

The outer momentum is not on the holder: it lives in the outer-step task's memory and Ray's object
store, counted by :func:`outer_step_bytes` on the node that keeps room for that task.

Activations autograd saves, per token of one layer, measured with ``saved_tensors_hooks``
(tests/test_planner_scaling.py), with ``d`` width, ``d_kv`` KV width, ``f`` SwiGLU hidden, ``H`` heads::

    fp32:       4 B x (11d + 4f + H + 2)   two RMSNorms 6d + 2 (input, normalised, gained), attention's
                                           q, k, v at all H heads 3d (GQA repeats k and v), its output d and
                                           log-sum-exp H, the output projection's input d; SwiGLU 4f
    bf16/fp16:  2 B x (10d + 4f)  +  4 B x (4d + H + 2)     (the norms' float32 statistics and inputs, the
                                                              residual stream and the log-sum-exp stay float32)
    activation checkpointing: 4 B x d                      (each block keeps only its float32 input)

Under autocast each forward also casts every matmul weight to 16 bits and its graph keeps that copy until
its backward: 2 B per matmul weight per microbatch in flight (not with checkpointing, where only the block
being recomputed has one).

Every non-last holder keeps the graphs of all ``num_microbatches`` microbatches of an inner step alive
until their backwards arrive (GPipe order, neuroray.training.schedule), plus each microbatch's output
(d per token); the last holder runs forward and backward per microbatch, so it keeps one, plus the head
(per token: the final norm, the logits, their log-softmax and, in the loss's backward, both their gradients):
fp32 ``4 (3d + 1) + 16 V``, bf16 ``4 (2d + 1) + 2d + 14 V`` and a 16-bit copy of the head's weights.

On top of what is kept, a holder needs working space, at different moments, so the largest counts:
backward's (one layer's activations rebuilt or differentiated at a time, plus the gradient it sends),
AdamW's step (torch's foreach implementation allocates two float32 temporaries per parameter: 8 B),
and the outer step's (``theta0 - theta`` and its serialized copy going out, the new theta0 arriving as
bytes, then as a tensor, then cloned into the weights: 12 B at the most at one time).

A holder also pays a fixed runtime overhead (Python, torch and the Ray worker in host memory, with the
holder's own imports and thread pools; or the CUDA context on a GPU), ``planner.holder_overhead``. The
planner only uses ``safety_fraction`` of a node's memory, which covers allocator fragmentation and what
this model does not count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from neuroray.config import ModelConfig
from neuroray.planner.scaling import ffn_width

FLOAT_BYTES = 4
HALF_BYTES = 2  # a tensor saved under bf16 or fp16 autocast
INNER_BYTES_PER_PARAM = 4 + 4 + 8  # weights, gradients, AdamW moments
DILOCO_BYTES_PER_PARAM = 4  # theta0, the holder's copy
BYTES_PER_PARAM = INNER_BYTES_PER_PARAM + DILOCO_BYTES_PER_PARAM  # 20: what a holder keeps per parameter
ADAMW_STEP_BYTES_PER_PARAM = 8  # foreach AdamW's float32 temporaries during a step
OUTER_STEP_BYTES_PER_PARAM = 12  # theta0 - theta and its serialized copy out; theta0 in as bytes, tensor, clone
# a hot snapshot: weights, AdamW moments and theta0 copied (16 B), then serialized to safetensors bytes (16 B) by
# the background writer while the next inner steps run (neuroray/swarm/lifecycle.py, neuroray/snapshot.py)
SNAPSHOT_BYTES_PER_PARAM = 32

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
    """Bytes of most saved activations under TrainConfig.precision on planner.device (gpu, cpu or auto):
    2 under bf16 or fp16 autocast, else 4 (what :class:`Batch` carries to pick the formulas below).

    auto is bf16 on CUDA and fp32 on the CPU; with planner.device=auto the device is not known here, so
    it counts float32: an overestimate on GPUs, never an underestimate."""
    if precision in ("bf16", "fp16") or (precision == "auto" and device == "gpu"):
        return HALF_BYTES
    return FLOAT_BYTES


def activation_elems_per_token_layer(cfg: ModelConfig) -> int:
    """Elements autograd saves per token per layer in float32 (see the module docstring for each term)."""
    return 11 * cfg.d_model + 4 * ffn_width(cfg) + cfg.n_heads + 2


def full_layer_bytes_per_token(cfg: ModelConfig, act_bytes: int) -> int:
    """Bytes one layer's graph saves per token without checkpointing: float32, or under 16-bit autocast."""
    if act_bytes == FLOAT_BYTES:
        return FLOAT_BYTES * activation_elems_per_token_layer(cfg)
    d, f = cfg.d_model, ffn_width(cfg)
    return HALF_BYTES * (10 * d + 4 * f) + FLOAT_BYTES * (4 * d + cfg.n_heads + 2)


def activation_bytes_per_token_layer(cfg: ModelConfig, precision: str | int) -> int:
    """Bytes a layer keeps per token between its forward and backward: :func:`full_layer_bytes_per_token`,
    or with ``activation_checkpointing`` the block's float32 input alone. ``precision``: fp32/bf16/fp16 or
    the bytes :func:`activation_bytes` gives."""
    act = precision if isinstance(precision, int) else activation_bytes(precision, "cpu")
    if cfg.activation_checkpointing:
        return FLOAT_BYTES * cfg.d_model
    return full_layer_bytes_per_token(cfg, act)


def head_bytes_per_token(cfg: ModelConfig, vocab_size: int, act_bytes: int = FLOAT_BYTES) -> int:
    """Last holder, per token, at the loss's backward: final norm, logits, log-softmax and both gradients."""
    d, v = cfg.d_model, vocab_size
    if act_bytes == FLOAT_BYTES:
        return FLOAT_BYTES * (3 * d + 1) + 16 * v
    return FLOAT_BYTES * (2 * d + 1) + HALF_BYTES * d + 14 * v


def head_elems_per_token(cfg: ModelConfig, vocab_size: int) -> int:
    """:func:`head_bytes_per_token` in float32 elements (4 B each)."""
    return head_bytes_per_token(cfg, vocab_size) // FLOAT_BYTES


def matmul_params_per_layer(cfg: ModelConfig) -> int:
    """A layer's matmul weights (what autocast casts to 16 bits): all but the two norm gains."""
    from neuroray.planner.scaling import param_count

    return param_count(cfg, 1).per_layer - 2 * cfg.d_model


@dataclass(frozen=True)
class Batch:
    """What activations are counted for: microbatch size x sequence length x microbatches in flight."""

    microbatch_size: int
    seq_len: int
    num_microbatches: int
    activation_bytes: int = FLOAT_BYTES  # 2 under bf16/fp16 autocast (activation_bytes()), else 4

    @property
    def tokens(self) -> int:
        return self.microbatch_size * self.seq_len

    @property
    def autocast(self) -> bool:
        return self.activation_bytes == HALF_BYTES


@dataclass(frozen=True)
class HolderMemory:
    """Bytes one stage holder needs; ``total`` is what must fit in ``safety_fraction`` of its device."""

    params: int
    weights: int  # 4 B / param
    grads: int  # 4 B / param
    adam: int  # 8 B / param
    diloco: int  # theta0, 4 B / param
    activations: int  # kept between forward and backward, for every microbatch in flight
    working: int  # backward's working space, or AdamW's step beyond the activations (they never coincide)
    outer: int  # the outer step's whole-range buffers, 12 B / param (not carved from freed activations)
    snapshot: int  # a hot snapshot's copies, written in the background while training goes on: 32 B / param
    overhead: int

    @property
    def total(self) -> int:
        return (self.weights + self.grads + self.adam + self.diloco + self.activations + self.working + self.outer
                + self.snapshot + self.overhead)


def kept_activation_bytes(cfg: ModelConfig, vocab_size: int, n_layers: int, *, has_head: bool,
                          batch: Batch) -> int:
    """What the graphs in flight keep: ``in_flight x (tokens x (n_layers x layer + d) + [autocast copies])``."""
    in_flight = 1 if has_head else batch.num_microbatches
    per_mb = batch.tokens * (n_layers * activation_bytes_per_token_layer(cfg, batch.activation_bytes)
                             + FLOAT_BYTES * cfg.d_model)
    if batch.autocast and not cfg.activation_checkpointing:
        per_mb += HALF_BYTES * n_layers * matmul_params_per_layer(cfg)
    return in_flight * per_mb


def backward_working_bytes(cfg: ModelConfig, vocab_size: int, *, has_head: bool, batch: Batch) -> int:
    """Backward's working space: one layer's worth of activation gradients (and the layer's 16-bit weight copy
    under autocast), the gradient it sends, on the last holder the head at the loss's backward; with
    checkpointing also the layer being recomputed, which the graph no longer keeps."""
    act = batch.activation_bytes
    layers = 2 if cfg.activation_checkpointing else 1
    space = batch.tokens * (layers * full_layer_bytes_per_token(cfg, act) + FLOAT_BYTES * cfg.d_model)
    if batch.autocast:
        space += HALF_BYTES * matmul_params_per_layer(cfg)
    if has_head:
        space += batch.tokens * head_bytes_per_token(cfg, vocab_size, act)
        if batch.autocast:
            space += HALF_BYTES * vocab_size * cfg.d_model
    return space


def holder_memory(cfg: ModelConfig, vocab_size: int, n_layers: int, *, has_embedding: bool, has_head: bool,
                  batch: Batch, overhead: int, snapshots: bool = True) -> HolderMemory:
    """Memory of a holder of ``n_layers`` layers (+ embedding if first, + final norm and head if last).

    ``params = n_layers * per_layer + [V d] + [V d + d]``; state = 20 B x params; activations kept by the
    graphs in flight (:func:`kept_activation_bytes`); working = backward's (:func:`backward_working_bytes`) or
    AdamW's (8 B x params) beyond them; the outer step's buffers (12 B x params); with ``snapshots``, a
    snapshot's copies (32 B x params); ``overhead``: planner.holder_overhead (the module docstring and
    docs/memory.md explain every term).
    """
    from neuroray.planner.scaling import param_count

    pc = param_count(cfg, vocab_size)
    params = n_layers * pc.per_layer + (pc.embedding if has_embedding else 0) + (pc.head if has_head else 0)
    kept = kept_activation_bytes(cfg, vocab_size, n_layers, has_head=has_head, batch=batch)
    # AdamW's step runs when no graph is kept, on tensors the size of single parameters, which fit where
    # activations were freed: it counts only beyond the activations. The outer step's buffers span the whole
    # range (P x 4 B each), which the holes freed activations leave cannot hold: they count on top.
    working = max(backward_working_bytes(cfg, vocab_size, has_head=has_head, batch=batch),
                  ADAMW_STEP_BYTES_PER_PARAM * params - kept)
    return HolderMemory(
        params=params, weights=4 * params, grads=4 * params, adam=8 * params, diloco=DILOCO_BYTES_PER_PARAM * params,
        activations=kept, working=working, outer=OUTER_STEP_BYTES_PER_PARAM * params,
        snapshot=SNAPSHOT_BYTES_PER_PARAM * params if snapshots else 0, overhead=overhead,
    )


def layer_bytes(cfg: ModelConfig, batch: Batch) -> int:
    """What one more layer adds to a non-last holder: its state and the activations it keeps (the partition's
    per-layer memory cost)."""
    from neuroray.planner.scaling import param_count

    per_layer = param_count(cfg, 1).per_layer
    kept = kept_activation_bytes(cfg, 1, 1, has_head=False, batch=batch) - \
        batch.num_microbatches * batch.tokens * FLOAT_BYTES * cfg.d_model
    return BYTES_PER_PARAM * per_layer + kept


def outer_step_bytes(range_params: int, replicas: int) -> int:
    """Host memory of one range's outer-step task: ``4 B x P x (R + 6)``.

    R pseudo-gradients in; theta0, outer momentum and the previous aggregate (centered clipping's
    centre) in; the aggregate, the new theta0 and the new momentum out. The reducers of
    neuroray.diloco.aggregate work chunk by chunk, so they add no full-size copy of their own.
    """
    return FLOAT_BYTES * range_params * (replicas + 6)
