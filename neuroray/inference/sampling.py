"""Sampling the next token from logits: temperature, top-k and top-p, one seeded generator per session."""

from __future__ import annotations

import torch

from neuroray.errors import GenerationError


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the ``top_k`` largest logits, then the smallest set whose probability reaches ``top_p``.

    Everything else becomes ``-inf``. ``top_k=0`` and ``top_p=1`` disable each filter. The most likely
    token always survives, so the result can always be sampled from.
    """
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (nucleus sampling).
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


class Sampler:
    """Picks the next token from logits: greedy at ``temperature=0``, else temperature + top-k + top-p.

    Each sampler owns a generator seeded with ``seed``, so a session's draws do not depend on how many
    other sessions share the batch or which holders served it.
    """

    def __init__(self, temperature: float = 0.8, top_k: int = 40, top_p: float = 1.0, seed: int = 0):
        if not temperature >= 0:
            raise GenerationError(f"temperature={temperature} must be >= 0 (0 is greedy)")
        if top_k < 0:
            raise GenerationError(f"top_k={top_k} must be >= 0 (0 keeps every token)")
        if not 0 < top_p <= 1:
            raise GenerationError(f"top_p={top_p} must be in (0, 1] (1 keeps every token)")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        logits = logits.detach().float().cpu()
        if self.temperature == 0:
            return int(logits.argmax())
        logits = filter_logits(logits / self.temperature, self.top_k, self.top_p)
        return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=self.generator))
