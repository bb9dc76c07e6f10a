"""A pipeline stage: a contiguous slice of the decoder, plus the embedding and/or head at the ends.

One class serves every role. The monolith (``build_monolith``) is simply the stage that holds all
layers, the embedding and the head; pipeline stages hold slices of it. Two properties make stages
interchangeable with the monolith:

* layers are keyed by their GLOBAL index, so a stage's ``state_dict`` keys are a subset of the
  monolith's (``layers.5.attn.wq.weight`` whichever stage holds layer 5);
* every parameter is initialised from a generator seeded by ``(seed, parameter name)``, so its
  initial value does not depend on which other parameters live in the same module.

``model.activation_checkpointing`` wraps each block of a training forward in
``torch.utils.checkpoint`` (non-reentrant): between forward and backward a block keeps only its input,
and backward recomputes the rest. Forwards without autograd (evaluation, inference, KV caches) run as
they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neuroray.config import ModelConfig
from neuroray.model.kv_cache import PackedKV, SessionKV
from neuroray.model.layers import Block, RMSNorm, rope_cache
from neuroray.model.seeds import named_seed

# Residual-stream output projections: scaled down at init so the residual variance stays O(1) in depth.
_RESIDUAL_PROJECTIONS = ("attn.wo.weight", "mlp.w2.weight")


class StageModule(nn.Module):
    """Global layers ``[layer_start, layer_end)``, with the embedding if first and final norm + head if last."""

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        layer_start: int,
        layer_end: int,
        *,
        has_embedding: bool,
        has_head: bool,
        seed: int = 0,
    ):
        super().__init__()
        if not 0 <= layer_start < layer_end <= cfg.n_layers:
            raise ValueError(
                f"layer range [{layer_start}, {layer_end}) is empty or outside the model's {cfg.n_layers} layers"
            )
        self.cfg, self.vocab_size = cfg, vocab_size
        self.layer_start, self.layer_end = layer_start, layer_end
        self.has_embedding, self.has_head = has_embedding, has_head

        # Build on the meta device: the default nn.Linear init would waste time and, worse, consume the
        # global RNG. Real storage comes from to_empty(); values from init_weights().
        with torch.device("meta"):
            if has_embedding:
                self.embed = nn.Embedding(vocab_size, cfg.d_model)
            self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(layer_start, layer_end)})
            if has_head:
                self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
                self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.to_empty(device="cpu")
        self.init_weights(seed)

        # Derived from cfg, so non-persistent: not in state_dict, rebuilt on load, moved by .to(device).
        cos, sin = rope_cache(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic, split-independent init: each tensor from its own ``(seed, name)`` generator."""
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            g = torch.Generator(device="cpu").manual_seed(named_seed(seed, name))
            std = residual_std if name.endswith(_RESIDUAL_PROJECTIONS) else self.cfg.init_std
            p.normal_(0.0, std, generator=g)

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Token ids ``[B, T]`` (first stage) or hidden ``[B, T, d_model]`` -> hidden, or logits if last.

        ``start_pos`` shifts the RoPE positions to ``start_pos .. start_pos + T - 1``.
        """
        T = x.shape[1]
        if start_pos < 0 or start_pos + T > self.cfg.max_seq_len:
            raise ValueError(
                f"positions {start_pos}..{start_pos + T - 1} do not fit model.max_seq_len="
                f"{self.cfg.max_seq_len}; shorten the sequence or raise model.max_seq_len"
            )
        h = self.embed(x) if self.has_embedding else x
        recompute = self.cfg.activation_checkpointing and torch.is_grad_enabled()
        for block in self.layers.values():
            if recompute:
                # Keep only the block's input; backward reruns its forward (under the autocast state the
                # forward ran in) to rebuild what it saves. No block draws random numbers: no RNG to replay.
                h = checkpoint(block, h, self.rope_cos, self.rope_sin, start_pos, use_reentrant=False,
                               preserve_rng_state=False)
            else:
                h = block(h, self.rope_cos, self.rope_sin, start_pos)
        if self.has_head:
            h = self.lm_head(self.norm(h))
        return h

    def new_cache(self) -> SessionKV:
        """An empty KV cache for one session of this stage's layers."""
        return SessionKV(range(self.layer_start, self.layer_end))

    def forward_cached(self, x: torch.Tensor, caches: list[SessionKV], lengths: list[int],
                       last_only: bool = False) -> torch.Tensor:
        """Incremental forward of several sessions at once, each continuing its own KV cache.

        ``x`` packs the sessions' new chunks along the sequence axis: token ids ``[1, N]`` (first stage)
        or hidden ``[1, N, d_model]``, with ``N = sum(lengths)``; chunk i starts at position
        ``caches[i].length`` and is appended to that cache. The matmuls run once over all ``N`` rows;
        only attention is per session. Returns hidden ``[1, N, d_model]``, logits ``[1, N, vocab]`` if
        last, or with ``last_only`` the logits of each chunk's last token ``[len(lengths), vocab]``.
        """
        if len(caches) != len(lengths) or x.shape[0] != 1 or x.shape[1] != sum(lengths) or min(lengths, default=0) < 1:
            raise ValueError(
                f"packed input {tuple(x.shape)} does not match {len(caches)} caches with chunk lengths {lengths}; "
                "pass [1, sum(lengths)] with one non-empty chunk per cache"
            )
        for cache, n in zip(caches, lengths):
            if set(cache.layers) != set(range(self.layer_start, self.layer_end)):
                raise ValueError(f"a cache for layers {sorted(cache.layers)} cannot serve this stage's {self.extra_repr()}")
            end = cache.length + n
            if end > self.cfg.max_seq_len:  # checked for all before any cache changes
                raise ValueError(
                    f"positions {cache.length}..{end - 1} do not fit model.max_seq_len={self.cfg.max_seq_len}; "
                    "shorten the prompt or generate fewer tokens"
                )
        h = self.embed(x) if self.has_embedding else x
        for idx, block in self.layers.items():
            kv = PackedKV(tuple(lengths), tuple(c.layers[int(idx)] for c in caches))
            h = block(h, self.rope_cos, self.rope_sin, 0, kv)
        if not self.has_head:
            return h
        if last_only:
            # The head is the largest matmul of a small model: run it on the rows that are sampled from.
            last = torch.tensor(lengths, device=h.device).cumsum(0) - 1
            h = h[0, last]
        return self.lm_head(self.norm(h))

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over all ``B * T`` positions (computed in float32)."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    def extra_repr(self) -> str:
        return (
            f"layers=[{self.layer_start}, {self.layer_end}), "
            f"has_embedding={self.has_embedding}, has_head={self.has_head}"
        )


def build_monolith(cfg: ModelConfig, vocab_size: int, seed: int = 0) -> StageModule:
    """The whole model in one module: the reference the pipeline is checked against."""
    return StageModule(cfg, vocab_size, 0, cfg.n_layers, has_embedding=True, has_head=True, seed=seed)


def split_layers(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous, balanced ``[start, end)`` layer ranges, one per stage.

    When uneven, the EARLIER stages get the extra layer: the last stage already pays for the
    ``d_model x vocab`` head matmul and the loss, which outweigh the embedding lookup on stage 0.
    """
    if n_layers < 1 or n_stages < 1:
        raise ValueError(f"need at least one layer and one stage, got n_layers={n_layers}, n_stages={n_stages}")
    if n_stages > n_layers:
        raise ValueError(
            f"{n_stages} stages for {n_layers} layers: every stage needs at least one layer; "
            "use fewer stages or more layers"
        )
    base, extra = divmod(n_layers, n_stages)
    ranges, start = [], 0
    for i in range(n_stages):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def build_stage(
    cfg: ModelConfig, vocab_size: int, stage_index: int, ranges: list[tuple[int, int]], seed: int = 0
) -> StageModule:
    """Stage ``stage_index`` of the split ``ranges``: embedding on the first, norm + head on the last."""
    if not 0 <= stage_index < len(ranges):
        raise ValueError(f"stage_index={stage_index} is outside the {len(ranges)} stages")
    start, end = ranges[stage_index]
    return StageModule(
        cfg,
        vocab_size,
        start,
        end,
        has_embedding=stage_index == 0,
        has_head=stage_index == len(ranges) - 1,
        seed=seed,
    )


def merge_state_dicts(dicts: list[dict]) -> dict:
    """Union of stage state dicts into one monolith state dict; raises ValueError on a repeated key."""
    merged: dict = {}
    for d in dicts:
        clash = merged.keys() & d.keys()
        if clash:
            raise ValueError(f"state dicts overlap on {sorted(clash)[:5]}: stages must hold disjoint layers")
        merged.update(d)
    return merged


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters in ``module``."""
    return sum(p.numel() for p in module.parameters())
