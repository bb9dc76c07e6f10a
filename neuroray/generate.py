"""Text generation from a trained model (in one process; the pipeline path builds on this)."""

from __future__ import annotations

import torch

from neuroray.model import StageModule


@torch.no_grad()
def sample(model: StageModule, token_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: int = 40, seed: int = 0, stop_id: int | None = None) -> list[int]:
    """Autoregressive sampling with temperature and top-k; ``temperature=0`` is greedy."""
    if not token_ids:
        raise ValueError("empty prompt: give at least one token")
    gen = torch.Generator().manual_seed(seed)
    ids = list(token_ids)
    window = model.cfg.max_seq_len
    model.eval()
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-window:]], dtype=torch.long)
        logits = model(x)[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))
        if stop_id is not None and nxt == stop_id:
            break
        ids.append(nxt)
    return ids[len(token_ids):]
