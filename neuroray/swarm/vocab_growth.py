"""A holder's range grown to a larger vocabulary between rounds (the driver's side: neuroray/training/vocab_growth.py).

Only the first range (the embedding) and the last (the LM head) have a row per token id; every other
range only records the new size. What grows, and from what:

* theta0: seeded new rows around its own old rows (:func:`neuroray.model.vocab.grow_flat`). Every holder
  of the range and the outer step run that code on the same float32 theta0, so they agree bit for bit
  and DiLoCo's theta0 stays shared;
* the weights: old rows kept, new rows equal to theta0's new rows (a holder's weights may have drifted
  from theta0, under overlap or streaming; the new rows never differ between holders);
* AdamW: the new rows' moments start at zero, ``step`` is kept (:func:`neuroray.model.vocab.follow`);
* the error-feedback residual, eager overlap's momentum estimate and last aggregate: zero rows; a round
  in flight (overlap): its base takes the new rows, its delta zeros;
* the Driver's data stream: the new manifest's ring, at the same position (microbatches served), so the
  position a proof commits to is where the spot check looks.

Old rows are untouched, so the logits of the old ids are what they were.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from neuroray.errors import VocabularyShrankError
from neuroray.model.vocab import grow_flat, grow_vocab, rows_of
from neuroray.swarm.compute import RangeCompute
from neuroray.swarm.outer_state import OuterState


def grow_range_vocab(compute: RangeCompute, outer: OuterState, vocab_size: int, seed: int,
                     manifest: str | dict | None = None) -> bool:
    """Grow this range's state to ``vocab_size`` tokens and, on a Driver, read ``manifest`` from now on.
    Returns True when a tensor grew (the first and last ranges)."""
    module, spec = compute.module, compute.spec
    current = module.vocab_size
    if vocab_size < current:
        raise VocabularyShrankError(f"{compute.name}'s new vocabulary", vocab_size, current)
    if manifest is not None:
        switch_stream(compute, manifest)
    compute.spec = replace(compute.spec, vocab_size=vocab_size,
                           manifest=spec.manifest if manifest is None else manifest)
    if vocab_size == current or not (module.has_embedding or module.has_head):
        module.vocab_size = vocab_size
        return False
    if compute.pending:  # graphs of revoked routed calls: nothing will backpropagate them (as at a snapshot)
        compute.pending.clear()
    compute.optimizer.zero_grad(set_to_none=True)
    layout, dev = compute.param_layout(), compute.device
    theta0, grown = grow_flat(outer.theta0.detach().cpu(), layout, vocab_size, seed=seed)
    fill = rows_of(theta0, grown, current)
    grow_vocab(module, vocab_size, compute.optimizer, seed, fill={k: v.to(dev) for k, v in fill.items()})
    outer.theta0 = theta0.to(dev)
    outer.feedback_round = None

    def zeros(flat: torch.Tensor | None) -> torch.Tensor | None:
        return None if flat is None else grow_flat(flat.cpu(), layout, vocab_size)[0].to(flat.device)

    outer.feedback.residual = zeros(outer.feedback.residual)
    outer.outer_buf, outer.outer_grad = zeros(outer.outer_buf), zeros(outer.outer_grad)
    if outer.pending is not None:
        p = outer.pending
        base = grow_flat(p.base.cpu(), layout, vocab_size, fill=fill)[0].to(p.base.device)
        outer.pending = replace(p, base=base, delta=zeros(p.delta))
    return True


def switch_stream(compute: RangeCompute, manifest: str | dict) -> None:
    """A Driver reads the new manifest's ring from the position it had reached (other ranges read nothing)."""
    old = compute.stream
    if old is None or manifest == compute.spec.manifest:
        return
    from neuroray.genesis import Manifest, TokenStream

    start = compute.spec.data_start  # swarm routing: the shared ring's start; fixed: this node's own shard
    stream = TokenStream(compute.spec.data_root, Manifest.from_json(manifest), old.node_id, old.seq_len,
                         old.microbatch_size, _start=start)
    stream.seek(old.position)
    compute.stream = stream
