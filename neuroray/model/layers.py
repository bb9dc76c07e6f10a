"""Transformer building blocks: RMSNorm, RoPE, grouped-query causal attention, SwiGLU, Block.

Llama-style pre-norm decoder layer, written for reading (in the spirit of nanoGPT's model.py).
No layer here initialises its own weights: :class:`neuroray.model.stage.StageModule` does that by
parameter name, so that any split of the model gets the same tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neuroray.config import ModelConfig
from neuroray.model.kv_cache import PackedKV


def ffn_hidden_size(cfg: ModelConfig) -> int:
    """SwiGLU hidden width: ``cfg.ffn_hidden`` if set, else 8/3 * d_model rounded up to a multiple of 64.

    8/3 keeps the three SwiGLU matrices at the parameter count of a 4x two-matrix MLP; the multiple
    of 64 keeps matmuls on friendly shapes.
    """
    if cfg.ffn_hidden > 0:
        return cfg.ffn_hidden
    return 64 * -(-8 * cfg.d_model // (3 * 64))  # integer ceil, no float rounding surprises


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: the mean of squares is the precision-sensitive part under bf16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_cache(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of rotary embeddings, each ``[max_seq_len, head_dim // 2]`` in float32.

    Channel pair i rotates at frequency ``theta ** (-2i / head_dim)``; row p holds the angles of position p.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head size, got {head_dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    # Build in float64 so large positions keep accurate angles, store in float32.
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, head_dim]`` to positions ``start_pos .. start_pos + T - 1``.

    ``cos``/``sin`` are full tables from :func:`rope_cache`; the caller checks that the positions fit.
    Uses the "rotate half" layout: channel j pairs with channel j + head_dim/2.
    """
    T = x.shape[-2]
    cos, sin = cos[start_pos : start_pos + T], sin[start_pos : start_pos + T]  # [T, hd/2], broadcasts over B, H
    xf = x.float()  # rotate in float32, then return in the input dtype so SDPA sees one dtype
    x1, x2 = xf.chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with grouped-query attention (n_kv_heads <= n_heads) and RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
            raise ValueError(
                f"d_model={cfg.d_model}, n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}: "
                "d_model must divide by n_heads and n_heads by n_kv_heads"
            )
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0,
                kv: PackedKV | None = None) -> torch.Tensor:
        """Attention over ``x`` ``[B, T, d]`` at positions ``start_pos..``; with ``kv``, over cached prefixes.

        Without ``kv`` (training, full sequences) the chunk attends causally to itself only. With ``kv``,
        ``x`` is ``[1, N, d]`` packing several sessions' chunks (see :class:`PackedKV`), each continuing
        its own cache at its own position.
        """
        B, T, _ = x.shape
        # [B, T, heads * hd] -> [B, heads, T, hd]
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if kv is not None:
            y = self._attend_cached(q, k, v, cos, sin, kv)
        else:
            q, k = apply_rope(q, cos, sin, start_pos), apply_rope(k, cos, sin, start_pos)
            k, v = self._repeat_kv(k), self._repeat_kv(v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        # GQA: each group of n_heads // n_kv_heads query heads shares one key/value head.
        n_rep = self.n_heads // self.n_kv_heads
        return t.repeat_interleave(n_rep, dim=1) if n_rep > 1 else t

    def _attend_cached(self, q, k, v, cos, sin, kv: PackedKV) -> torch.Tensor:
        """Per session: rotate the chunk to the positions after its cache, append it, attend to all of it."""
        assert q.shape[0] == 1 and sum(kv.lengths) == q.shape[2], "packed input must be [1, sum(lengths), d]"
        ys, off = [], 0
        for n, cache in zip(kv.lengths, kv.caches):
            start = cache.length  # positions continue where this session's cache ends
            qs = apply_rope(q[:, :, off : off + n], cos, sin, start)
            ks = apply_rope(k[:, :, off : off + n], cos, sin, start)
            k_all, v_all = cache.append(ks, v[:, :, off : off + n])
            k_all, v_all = self._repeat_kv(k_all), self._repeat_kv(v_all)
            if start == 0:  # a fresh prefill is exactly the training computation
                y = F.scaled_dot_product_attention(qs, k_all, v_all, is_causal=True)
            elif n == 1:  # one new token sees the whole prefix: no mask needed
                y = F.scaled_dot_product_attention(qs, k_all, v_all)
            else:
                # Query i sits at position start + i and may see keys 0 .. start + i. is_causal would
                # align the square top-left and hide the cached prefix, so the mask is explicit.
                mask = torch.arange(start + n, device=q.device) <= (start + torch.arange(n, device=q.device))[:, None]
                y = F.scaled_dot_product_attention(qs, k_all, v_all, attn_mask=mask)
            ys.append(y)
            off += n
        return torch.cat(ys, dim=2) if len(ys) > 1 else ys[0]


class SwiGLU(nn.Module):
    """Gated MLP: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=False)  # down (residual output projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm decoder layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0,
                kv: PackedKV | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, start_pos, kv)
        return x + self.mlp(self.mlp_norm(x))
