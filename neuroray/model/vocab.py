"""Growing a model to a larger vocabulary (the Genesis tokenizer grows append-only).

The embedding (first stage) and the LM head (last stage) get new rows; every old row is kept bit for
bit, so old token ids mean what they meant. New rows start at the mean of the old rows plus a little
noise (Hewitt, "Initializing new word embeddings for pretrained language models", 2021): a new token's
logit starts near the average logit, so the model's distribution over old tokens barely moves, and
its embedding starts inside the cloud of known ones. The noise comes from a generator seeded by
``(seed, parameter name, old and new size)``, so every holder of a layer range grows identically and
DiLoCo's theta0 stays shared.

The optimizer must follow: PyTorch keys optimizer state by the Parameter object, so swapping in a new
tensor would silently leave AdamW stepping the old one (a bug a previous implementation shipped).
:func:`grow_vocab` swaps the parameter inside the optimizer's groups and carries its state over: old
rows keep ``exp_avg`` / ``exp_avg_sq``, new rows start at zero, ``step`` is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from neuroray.model.seeds import named_seed

NEW_ROW_NOISE = 0.1  # noise std, as a fraction of the old rows' per-coordinate std
VOCAB_PARAMS = ("embed.weight", "lm_head.weight")  # the parameters with one row per token id


def new_rows(old: torch.Tensor, count: int, seed: int, name: str) -> torch.Tensor:
    """``count`` rows for a ``[rows, dim]`` weight: the old rows' mean plus seeded noise."""
    old32 = old.detach().float()
    mean, std = old32.mean(dim=0), old32.std(dim=0, unbiased=False)
    g = torch.Generator(device="cpu").manual_seed(named_seed(seed, f"{name}:grow:{old.shape[0]}->{old.shape[0] + count}"))
    noise = torch.randn(count, old.shape[1], generator=g)
    return (mean.cpu() + NEW_ROW_NOISE * std.cpu() * noise).to(dtype=old.dtype, device=old.device)


def grow_rows(t: torch.Tensor, rows: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` with rows appended up to ``rows`` in all: ``fill`` if given, else zeros."""
    extra = rows - t.shape[0]
    if extra < 0:
        raise ValueError(f"cannot grow a tensor of {t.shape[0]} rows to {rows}")
    if fill is None:
        fill = torch.zeros((extra, *t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, fill.to(dtype=t.dtype, device=t.device)], dim=0)


def follow(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter) -> None:
    """Make ``optimizer`` step ``new`` instead of ``old``, carrying ``old``'s state over row by row."""
    found = False
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                found = True
    if not found:
        raise ValueError("the optimizer does not hold the parameter being grown; pass the optimizer built on "
                         "this module's parameters")
    state = optimizer.state.pop(old, None)
    if state:
        # Per-element buffers (exp_avg, exp_avg_sq, max_exp_avg_sq, momentum_buffer) get zero rows;
        # scalars such as AdamW's `step` are kept as they are.
        optimizer.state[new] = {
            k: grow_rows(v, new.shape[0]) if torch.is_tensor(v) and v.shape == old.shape else v
            for k, v in state.items()
        }


def grow_vocab(module: nn.Module, vocab_size: int, optimizer: torch.optim.Optimizer | None = None,
               seed: int = 0, fill: Mapping[str, torch.Tensor] | None = None) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Grow ``module``'s embedding and/or LM head to ``vocab_size`` rows in place.

    ``module`` is a StageModule (or anything with an ``embed`` nn.Embedding and/or an ``lm_head``
    nn.Linear and a ``vocab_size``). Returns ``{parameter name: (old, new)}`` for callers that keep
    their own per-parameter buffers (DiLoCo theta0 and momentum: see :func:`regrow_flat`).
    ``fill``: the rows to append per parameter name (a holder takes them from its grown theta0, see
    :func:`grow_flat`); by default :func:`new_rows` around the module's own rows.
    """
    current = module.vocab_size
    if vocab_size < current:
        raise ValueError(f"vocab_size={vocab_size} is below the model's {current}: a vocabulary only grows")
    replaced: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    if vocab_size == current:
        return replaced
    count = vocab_size - current
    with torch.no_grad():
        for attr, size_attr in (("embed", "num_embeddings"), ("lm_head", "out_features")):
            layer = getattr(module, attr, None)
            if layer is None:
                continue
            old = layer.weight
            if old.shape[0] != current:
                raise ValueError(f"{attr}.weight has {old.shape[0]} rows but the model's vocab_size is {current}")
            name = f"{attr}.weight"
            rows = fill[name] if fill is not None else new_rows(old, count, seed, name)
            new = nn.Parameter(grow_rows(old.detach(), vocab_size, rows), requires_grad=old.requires_grad)
            layer.weight = new  # same registered name, so parameters() keeps its order
            setattr(layer, size_attr, vocab_size)
            replaced[name] = (old, new)
            if optimizer is not None:
                follow(optimizer, old, new)
    module.vocab_size = vocab_size
    return replaced


def regrow_flat(flat: torch.Tensor, old_shapes: list[torch.Size], module: nn.Module,
                new_from_module: bool) -> torch.Tensor:
    """A flat vector laid out over ``module.parameters()`` before growth, laid out over them after it.

    Old entries keep their values. Entries of new rows take the module's new values
    (``new_from_module=True``: DiLoCo's theta0, which must equal the weights it restarts from) or
    zeros (outer momentum and other accumulators).
    """
    parts, offset = [], 0
    params = list(module.parameters())
    if len(params) != len(old_shapes):
        raise ValueError(f"{len(old_shapes)} shapes for {len(params)} parameters: pass the shapes from before growth")
    for shape, p in zip(old_shapes, params):
        n = shape.numel()
        chunk = flat[offset:offset + n].view(shape)
        offset += n
        if p.shape != shape:
            tail = p.detach()[shape[0]:] if new_from_module else None
            chunk = grow_rows(chunk, p.shape[0], tail)
        parts.append(chunk.reshape(-1))
    if offset != flat.numel():
        raise ValueError(f"the flat vector has {flat.numel()} entries, the shapes account for {offset}")
    return torch.cat(parts)


def grow_flat(flat: torch.Tensor, layout: list[tuple[str, tuple[int, ...]]], vocab_size: int, *,
              seed: int | None = None, fill: Mapping[str, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, list[tuple[str, tuple[int, ...]]]]:
    """A range's flat vector laid out as ``layout`` ((name, shape) in flat order), its embedding and LM
    head grown to ``vocab_size`` rows; returns the vector and its new layout.

    The new rows are ``fill[name]`` if given, else with ``seed`` :func:`new_rows` around the vector's own
    old rows (theta0: the holders and the outer step run this same code on the same float32 values, so
    they grow bit-identically), else zeros (momentum, error feedback, other accumulators).
    """
    parts, at, grown = [], 0, []
    for name, shape in layout:
        n = math.prod(shape)
        chunk = flat[at:at + n].view(shape)
        at += n
        if name in VOCAB_PARAMS and shape[0] != vocab_size:
            if shape[0] > vocab_size:
                raise ValueError(f"{name} has {shape[0]} rows, more than vocab_size={vocab_size}: a vocabulary only grows")
            rows = (fill[name] if fill is not None else
                    new_rows(chunk, vocab_size - shape[0], seed, name) if seed is not None else None)
            chunk = grow_rows(chunk, vocab_size, rows)
        parts.append(chunk.reshape(-1))
        grown.append((name, tuple(chunk.shape)))
    if at != flat.numel():
        raise ValueError(f"the flat vector has {flat.numel()} entries, the layout accounts for {at}")
    return torch.cat(parts), grown


def rows_of(flat: torch.Tensor, layout: list[tuple[str, tuple[int, ...]]], start: int) -> dict[str, torch.Tensor]:
    """The rows from ``start`` on of every vocabulary parameter in ``flat`` (laid out as ``layout``)."""
    out, at = {}, 0
    for name, shape in layout:
        n = math.prod(shape)
        if name in VOCAB_PARAMS:
            out[name] = flat[at:at + n].view(shape)[start:]
        at += n
    return out
