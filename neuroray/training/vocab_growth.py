"""Live vocabulary growth: the dataset is extended with a grown tokenizer, the running model grows between rounds.

With ``data.watch_rounds=N`` the trainer asks a :class:`VocabWatch` after every N-th outer round (after
the outer step, nothing in flight, every holder at theta0) to re-read the dataset's manifest. When the
store holds the dataset extended in place with a grown tokenizer (``python -m neuroray.genesis build --force
dataset=<url> base_tokenizer=<url> vocab_size=<more>``: every old id kept, new ones appended;
neuroray/genesis/extend.py checks it), :func:`grow_swarm_vocab` grows the running swarm:

* every holder (``StageHolder.grow_vocab``): the first range's embedding, the last range's LM head, their
  AdamW moments, theta0, the error-feedback residual, by seeded rows that every holder of a range draws
  alike (neuroray/swarm/vocab_growth.py); the Drivers read the new manifest's shards from the position
  they had reached;
* OuterSync's theta0 (the same seeded rows, so it equals the holders' bit for bit) and outer momentum
  (zero rows), in one Ray task per grown range; the aggregation memory of those ranges restarts empty;
* the held-out evaluation moves to the new dataset's eval shards; spot checks of later rounds rebuild
  batches from the new manifest at the new size (``swarm.data``, ``swarm.vocab_size``).

Old rows are never touched, so the logits of the old ids are exactly what they were (new ids get new
logits; the softmax over the grown vocabulary moves, as it must). The trainer snapshots at once after a
growth; a resume from a snapshot taken before it grows the restored state the same way
(:func:`grow_restored_outer` for the outer state, ``RangeLifecycle.restore`` for the holders).
A manifest that changed with the same tokenizer (more text) only switches the Drivers' shards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import ray
import torch

from neuroray.config import TrainConfig
from neuroray.errors import PipelineError
from neuroray.model.vocab import VOCAB_PARAMS, grow_flat


@ray.remote(num_cpus=0, num_returns=2)  # like the outer step: holders may occupy every CPU
def _grow_outer_task(theta0: torch.Tensor, momentum: torch.Tensor | None, layout, vocab_size: int, seed: int):
    grown, _ = grow_flat(theta0, layout, vocab_size, seed=seed)
    return grown, None if momentum is None else grow_flat(momentum, layout, vocab_size)[0]


def _grow_outer(outer, s: int, layout, vocab_size: int, seed: int):
    """Grow range ``s``'s theta0 and momentum in ``outer`` (laid out as ``layout``); returns the theta0 ref."""
    theta0, momentum = _grow_outer_task.remote(outer.theta0[s], outer.momentum[s], layout, vocab_size, seed)
    outer.theta0[s] = theta0
    outer.momentum[s] = None if outer.momentum[s] is None else momentum
    outer.memory[s] = None  # centered clipping's centre and replay buffers are range-sized: restart, as on round 1
    return theta0


def _has_vocab(layout) -> bool:
    return any(name in VOCAB_PARAMS for name, _ in layout)


def grow_swarm_vocab(swarm, outer, vocab_size: int, seed: int, manifest: str | None, timeout_s: float) -> list[int]:
    """Grow every holder of ``swarm`` and the outer state of every range with a row per token to ``vocab_size``;
    a Driver reads ``manifest`` (JSON) from now on. Call between rounds with nothing in flight. Returns the
    ranges whose tensors grew."""
    layouts = swarm.get([hs[0].param_layout.remote() for hs in swarm.by_range], timeout_s, "reading the ranges")
    stages = len(swarm.ranges)
    holders = [h for p in swarm.replicas for h in p]
    infos = swarm.get([h.grow_vocab.remote(vocab_size, seed, manifest if k % stages == 0 else None)
                       for k, h in enumerate(holders)], timeout_s, "growing the holders' vocabulary")
    grown = [s for s, layout in enumerate(layouts) if _has_vocab(layout)
             and any(shape[0] != vocab_size for name, shape in layout if name in VOCAB_PARAMS)]
    refs = [_grow_outer(outer, s, layouts[s], vocab_size, seed) for s in grown]
    ray.get(refs, timeout=timeout_s)  # surface a failed growth here, not at the next outer step
    if grown:
        outer.slices = None  # streaming: grown ranges are cut into fragments anew
    swarm.infos, swarm.vocab_size = infos, vocab_size
    swarm.numels = [infos[s]["numel"] for s in range(stages)]
    if manifest is not None and swarm.data is not None:  # holders started later (recovery, added replicas) read it
        swarm.data = type(swarm.data)(swarm.data.root, manifest)
    return grown


def grow_restored_outer(swarm, outer, seed: int, timeout_s: float) -> list[int]:
    """After ``Trainer.restore_outer`` of a snapshot taken before the dataset grew: grow every range's theta0
    and momentum to what the restored holders hold (they grew their snapshot's theta0 by the same seeded rows).
    Returns the ranges grown."""
    layouts = swarm.get([hs[0].param_layout.remote() for hs in swarm.by_range], timeout_s, "reading the ranges")
    sizes = ray.get([ref for ref in outer.theta0], timeout=timeout_s)
    grown, refs = [], []
    for s, (layout, theta0) in enumerate(zip(layouts, sizes)):
        missing = sum(torch.Size(shape).numel() for _, shape in layout) - theta0.numel()
        if missing == 0:
            continue
        vocab_rows = [shape for name, shape in layout if name in VOCAB_PARAMS]
        per_token = sum(shape[1] for shape in vocab_rows)
        if missing < 0 or not vocab_rows or missing % per_token:
            raise PipelineError(f"range {s}: the outer snapshot's theta0 has {theta0.numel()} values, its holders "
                                f"{theta0.numel() + missing}, and no vocabulary growth explains it; resume from "
                                "another snapshot step or start a new run")
        old_vocab = vocab_rows[0][0] - missing // per_token
        old_layout = [(name, (old_vocab, *shape[1:]) if name in VOCAB_PARAMS else shape) for name, shape in layout]
        refs.append(_grow_outer(outer, s, old_layout, vocab_rows[0][0], seed))
        grown.append(s)
    ray.get(refs, timeout=timeout_s)
    if grown:
        outer.slices = None
    return grown


@dataclass
class VocabWatch:
    """The driver's view of the dataset it trains on, re-read every ``data.watch_rounds`` outer rounds."""

    cfg: TrainConfig
    root: object  # the DatasetRoot (a remote store's local mirror is refreshed on growth)
    manifest: object  # the Manifest the holders read now
    tokenizer: object  # its tokenizer (tokenizers.Tokenizer)
    log: Callable[[str], None] = print
    growths: list[dict] = field(default_factory=list)  # one record per growth (or data switch) applied

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def tokenizer_file(self):
        """The tokenizer the final checkpoint ships (the driver's local copy, checked against the manifest)."""
        from pathlib import Path

        return Path(self.root) / self.manifest.tokenizer_file

    def between_rounds(self, trainer) -> bool:
        """True when the swarm grew or switched data (the trainer then snapshots at once)."""
        from neuroray.genesis.extend import read_extension
        from neuroray.genesis.manifest import ManifestPinError

        every, d = self.cfg.data.watch_rounds, self.cfg.data
        if every <= 0 or trainer.outer.rounds % every:
            return False
        try:
            ext = read_extension(self.root.url, self.manifest, self.tokenizer, d.manifest_sha256, d.manifest_publisher)
        except ManifestPinError as exc:  # not signed (yet) by the publisher: the files being read are still there
            self.log(f"vocab: {exc}; training goes on with the current dataset")
            return False
        if ext is None:
            return False
        self.apply(trainer, ext)
        return True

    def catch_up(self, trainer, pipeline: list, timeout_s: float) -> None:
        """Recovery: the holders of a restarted replica grow to the swarm's vocabulary and data (a no-op for
        those already there). One restored from a snapshot taken before a growth would otherwise take the
        grown theta0 into its old shapes when it rejoins."""
        if not self.growths:
            return
        swarm = trainer.swarm
        manifest = None if swarm.data is None else swarm.data.manifest
        ray.get([h.grow_vocab.remote(swarm.vocab_size, self.cfg.seed, manifest if s == 0 else None)
                 for s, h in enumerate(pipeline)], timeout=timeout_s)

    def apply(self, trainer, ext) -> None:
        """Grow the running swarm to ``ext`` (a checked :class:`~neuroray.genesis.extend.Extension`)."""
        from neuroray.genesis.build import dataset_root
        from neuroray.genesis.store import Store
        from neuroray.training.evaluation import held_out_batches

        t0, old, d = time.monotonic(), self.vocab_size, self.cfg.data
        trainer.executor.settle()
        root = dataset_root(d, Store(self.root.url), ext.manifest)  # a remote store's mirror takes the new files
        grown = grow_swarm_vocab(trainer.swarm, trainer.outer, ext.vocab_size, self.cfg.seed, ext.manifest.to_json(),
                                 self.cfg.cluster.step_timeout_s)
        self.root, self.manifest, self.tokenizer = root, ext.manifest, ext.tokenizer
        if trainer.evaluator is not None:
            trainer.evaluator.use_batches(held_out_batches(root, ext.manifest, d.seq_len, d.microbatch_size,
                                                           self.cfg.eval.batches))
        record = {"round": trainer.outer.rounds, "from": old, "to": ext.vocab_size, "ranges": grown,
                  "tokenizer_sha256": ext.manifest.tokenizer_sha256, "seconds": time.monotonic() - t0}
        self.growths.append(record)
        what = (f"vocabulary {old} -> {ext.vocab_size} ({ext.vocab_size - old} new tokens; embedding, LM head, "
                "AdamW, theta0 and outer momentum grew)" if ext.vocab_size > old else "same tokenizer, more text")
        self.log(f"vocab: after round {record['round']} the dataset at {self.root.url} was extended: {what} in "
                 f"{record['seconds']:.1f}s; the Drivers read its {len(ext.manifest.train_shards)} train shards now")
