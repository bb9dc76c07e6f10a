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

Every non-last holder of a GPipe pipeline keeps the graphs of all ``num_microbatches`` microbatches of an
inner step alive until their backwards arrive (neuroray.training.schedule); under ``swarm.schedule=1f1b``
holder ``s`` of ``S`` keeps ``min(num_microbatches, S - s)``. Each graph adds the microbatch's output (d per
token). The last holder runs forward and backward per microbatch, so it keeps one, plus the head
(per token: the final norm, the logits, their log-softmax and, in the loss's backward, both their gradients):
fp32 ``4 (3d + 1) + 16 V``, bf16 ``4 (2d + 1) + 2d + 14 V`` and a 16-bit copy of the head's weights.

On top of what is kept, a holder needs working space: backward's (one layer's activations rebuilt or
differentiated at a time, plus the gradient it sends) or AdamW's step (torch's foreach implementation
allocates two float32 temporaries per parameter: 8 B), whichever is larger.

The outer step and a snapshot come after the inner steps, when no graph is kept, and what they cost depends
on glibc's allocator. A block of at least its largest mmap threshold (32 MiB) is a mapping of its own,
returned to the system when freed; smaller blocks come from the heap, whose freed space stays with the
process and is reused by later small blocks. Training leaves ``activations + working`` of freed heap.

- The outer step: ``theta0 - theta``, its serialized copy out, the new theta0 in as bytes, as a tensor and
  cloned into the weights, 12 B per parameter. If a whole-range vector (``4 P``) is below the threshold these
  are heap blocks that stay with the process: they count on top. Above it they are mappings gone when the
  outer step ends, before the snapshot that follows it: with snapshots they are not part of the peak.
- A snapshot: weights, AdamW moments and theta0 copied (16 B), then serialized by safetensors, which builds
  the file in a buffer and copies it into the bytes it returns (2 x 16 B, counted in full: fresh mappings
  above the threshold, and alive with the copies). The per-parameter copies are heap blocks carved from the
  freed heap; only what does not fit counts. theta0's copy is one whole-range block: in the heap below the
  threshold, a fresh mapping above.

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
# a hot snapshot: weights, AdamW moments and theta0 copied (16 B), then serialized to safetensors bytes by the
# background writer while the next inner steps run (neuroray/swarm/lifecycle.py, neuroray/snapshot.py)
SNAPSHOT_COPY_BYTES_PER_PARAM = 16
# safetensors.torch.save builds the file in a buffer of its own and copies it into the bytes it returns: 2 x 16 B
# at the moment of serialization (tests/test_memory_allocator.py measures it)
SNAPSHOT_SERIALIZE_BYTES_PER_PARAM = 32
SNAPSHOT_BYTES_PER_PARAM = SNAPSHOT_COPY_BYTES_PER_PARAM + SNAPSHOT_SERIALIZE_BYTES_PER_PARAM  # 48, all at once
# glibc malloc's largest dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): a block this size or
# larger is always its own mapping, returned to the system when freed; smaller blocks, once the threshold has
# risen past them, come from the heap, whose freed space stays with the process and is reused by later blocks
MMAP_THRESHOLD_MAX = 32 * 2**20

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
    schedule: str = "gpipe"  # swarm.schedule of a fixed pipeline; routed swarms keep a whole step, as gpipe

    @property
    def tokens(self) -> int:
        return self.microbatch_size * self.seq_len

    @property
    def autocast(self) -> bool:
        return self.activation_bytes == HALF_BYTES

    def graphs_kept(self, has_head: bool, stage: int | None = None, stages: int | None = None) -> int:
        """Microbatch graphs a holder keeps at its peak (neuroray.training.schedule.peak_kept): the last holder
        fuses forward and backward (1); under gpipe every other one keeps all ``num_microbatches``; under 1f1b
        holder ``stage`` of ``stages`` keeps ``min(num_microbatches, stages - stage)``. Without a stage index
        (the partition's search, before stages are numbered) it counts all ``num_microbatches``, GPipe's: an
        upper bound the placement then tightens with each holder's own index."""
        m = self.num_microbatches
        if has_head:
            return 1
        if self.schedule != "1f1b" or stages is None:
            return m
        return min(m, stages - (stage or 0))


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
    outer: int  # the outer step's whole-range buffers still resident at the peak (outer_resident_bytes)
    snapshot: int  # a hot snapshot beyond the heap training freed (snapshot_peak_bytes); 0 without snapshots
    overhead: int

    @property
    def total(self) -> int:
        return (self.weights + self.grads + self.adam + self.diloco + self.activations + self.working + self.outer
                + self.snapshot + self.overhead)


def kept_activation_bytes(cfg: ModelConfig, vocab_size: int, n_layers: int, *, has_head: bool,
                          batch: Batch, stage: int | None = None, stages: int | None = None) -> int:
    """What the graphs in flight keep: ``in_flight x (tokens x (n_layers x layer + d) + [autocast copies])``,
    ``in_flight`` = :meth:`Batch.graphs_kept`."""
    in_flight = batch.graphs_kept(has_head, stage, stages)
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


def whole_range_mapped(params: int) -> bool:
    """Whether a float32 vector of the whole range (``4 P`` bytes: theta0, ``theta0 - theta``) is above glibc's
    largest mmap threshold, so each such buffer is its own mapping, gone from the resident set once freed."""
    return FLOAT_BYTES * params >= MMAP_THRESHOLD_MAX


def outer_resident_bytes(params: int, snapshots: bool) -> int:
    """The outer step's buffers (12 B / param) resident at the holder's peak. Below the mmap threshold they come
    from the heap and its freed space stays with the process: they count on top of the activations' heap. Above
    it they are mappings returned when the outer step ends; the snapshot, which comes after the outer step and
    needs more (48 B / param), is then the peak without them. A holder that never snapshots peaks in the outer
    step, with all 12 B / param in use."""
    if snapshots and whole_range_mapped(params):
        return 0
    return OUTER_STEP_BYTES_PER_PARAM * params


def snapshot_peak_bytes(params: int, freed_heap: int) -> int:
    """A snapshot's bytes at its peak beyond what the holder already holds. The per-parameter copies (weights
    and AdamW moments, 12 B / param, and theta0 below the mmap threshold) are heap blocks carved out of the
    ``freed_heap`` training left (no graph is kept during a snapshot), so only their excess counts; theta0's
    copy above the threshold is a fresh mapping; safetensors' file buffer and the bytes copied out of it
    (2 x 16 B / param) are fresh mappings too, both alive while the copies are."""
    mapped = whole_range_mapped(params)
    heap_copies = (SNAPSHOT_COPY_BYTES_PER_PARAM - (FLOAT_BYTES if mapped else 0)) * params
    theta0_copy = FLOAT_BYTES * params if mapped else 0
    return max(0, heap_copies - freed_heap) + theta0_copy + SNAPSHOT_SERIALIZE_BYTES_PER_PARAM * params


def holder_memory(cfg: ModelConfig, vocab_size: int, n_layers: int, *, has_embedding: bool, has_head: bool,
                  batch: Batch, overhead: int, snapshots: bool = True, stage: int | None = None,
                  stages: int | None = None) -> HolderMemory:
    """Memory of a holder of ``n_layers`` layers (+ embedding if first, + final norm and head if last), the
    ``stage``-th of ``stages`` (only 1f1b needs them: :meth:`Batch.graphs_kept`).

    ``params = n_layers * per_layer + [V d] + [V d + d]``; state = 20 B x params; activations kept by the
    graphs in flight (:func:`kept_activation_bytes`); working = backward's (:func:`backward_working_bytes`) or
    AdamW's (8 B x params) beyond them; the outer step's buffers still resident (:func:`outer_resident_bytes`);
    with ``snapshots``, a snapshot beyond the heap training freed (:func:`snapshot_peak_bytes`); ``overhead``:
    planner.holder_overhead (the module docstring and docs/memory.md explain every term).
    """
    from neuroray.planner.scaling import param_count

    pc = param_count(cfg, vocab_size)
    params = n_layers * pc.per_layer + (pc.embedding if has_embedding else 0) + (pc.head if has_head else 0)
    kept = kept_activation_bytes(cfg, vocab_size, n_layers, has_head=has_head, batch=batch, stage=stage,
                                 stages=stages)
    # AdamW's step runs when no graph is kept, on tensors the size of single parameters, which fit where
    # activations were freed: it counts only beyond the activations.
    working = max(backward_working_bytes(cfg, vocab_size, has_head=has_head, batch=batch),
                  ADAMW_STEP_BYTES_PER_PARAM * params - kept)
    outer = outer_resident_bytes(params, snapshots)
    return HolderMemory(
        params=params, weights=4 * params, grads=4 * params, adam=8 * params, diloco=DILOCO_BYTES_PER_PARAM * params,
        activations=kept, working=working, outer=outer,
        snapshot=snapshot_peak_bytes(params, kept + working + outer) if snapshots else 0, overhead=overhead,
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
