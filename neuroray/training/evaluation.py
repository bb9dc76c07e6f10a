"""Held-out evaluation while training: the dataset's eval shards, run forward through the stage holders.

The held-out split is chosen by shard: the eval shards of the Genesis build (``data.eval_shards``, its
last shards), which no training stream ever reads (neuroray/genesis/shards.py serves train shards only).
``eval.batches`` microbatches are spread evenly over them, the same for every run on the same data.

An evaluation runs at theta0, the weights every holder of a range agrees on and the checkpoint holds,
through one replica's holders: forward only, each holder on its own range (``StageHolder.evaluate``),
so the model is never gathered to the driver and no gradient, optimizer state, data position or work
counter changes; the ledger's receipts count the executor's training microbatches, never these.
Periodic evaluations run right after an outer step, when nothing is in flight and theta0 has just
changed: the first at or past each multiple of ``eval.every`` inner steps. The final evaluation, after
the last step, is the run's ``eval_loss``. Rows go to metrics.jsonl (``eval_loss``, ``eval_perplexity``;
no ``loss`` key, so readers of the training rows tell them apart), the dashboard and TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import ray
import torch

from neuroray.config import EvalConfig
from neuroray.genesis import Manifest, TokenSpan, TokenStream
from neuroray.swarm.ray_errors import holder_died


def _eval_stream(root, manifest: Manifest, seq_len: int, microbatch_size: int) -> TokenStream:
    return TokenStream(root, manifest, "eval", seq_len, microbatch_size, split="eval", prefetch=False, _start=0)


def _positions(stream: TokenStream, count: int) -> list[int]:
    """``count`` microbatch positions spread evenly over the eval ring (at least one: a split smaller
    than a microbatch wraps around)."""
    available = max(1, stream.ring_tokens // stream.tokens_per_microbatch)
    n = min(count, available)
    return [i * available // n for i in range(n)]


def held_out_spans(root: str | os.PathLike, manifest: Manifest, seq_len: int, microbatch_size: int,
                   count: int) -> list[list[TokenSpan]]:
    """The shard ranges each held-out microbatch reads (no shard is read); [] without eval shards."""
    if not manifest.eval_shards or count <= 0:
        return []
    stream = _eval_stream(root, manifest, seq_len, microbatch_size)
    return [stream.spans(p, 1) for p in _positions(stream, count)]


def held_out_batches(root: str | os.PathLike, manifest: Manifest, seq_len: int, microbatch_size: int,
                     count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``count`` ``(inputs, labels)`` microbatches of the eval shards, spread evenly over them."""
    if not manifest.eval_shards or count <= 0:
        return []
    stream = _eval_stream(root, manifest, seq_len, microbatch_size)
    batches = []
    for p in _positions(stream, count):
        stream.seek(p)
        batches.append(stream.next_microbatch())
    return batches


def due(every: int, last: int, step: int) -> bool:
    """Whether an outer step at ``step`` inner steps has passed a multiple of ``every`` since ``last``
    (the previous evaluation, or the step the run started from); ``every`` 0: never."""
    return every > 0 and step // every > last // every


@dataclass
class EvalResult:
    step: int  # inner steps trained when theta0 was evaluated
    loss: float  # mean cross-entropy per token over the held-out microbatches
    batches: int
    tokens: int
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf  # exp overflows a float past ~709

    def row(self) -> dict:
        """The metrics.jsonl row: no ``loss`` key, so it is never read as a training step."""
        return {"step": self.step, "eval_loss": self.loss, "eval_perplexity": self.perplexity,
                "eval_tokens": self.tokens, "eval_seconds": self.seconds}


class HeldOutEval:
    """The held-out microbatches (in the object store once) and when to evaluate them."""

    def __init__(self, cfg: EvalConfig, batches: list[tuple[torch.Tensor, torch.Tensor]], timeout_s: float,
                 start_step: int = 0):
        self.every, self.timeout_s = cfg.every, timeout_s
        self.use_batches(batches)
        self._last = start_step  # evaluations are due at multiples of `every` passed since this step

    def use_batches(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Evaluate these microbatches from now on (the dataset was extended: neuroray/training/vocab_growth.py)."""
        self.inputs = [ray.put(x) for x, _ in batches]
        self.labels = [ray.put(y) for _, y in batches]
        self.tokens = sum(y.numel() for _, y in batches)

    def due(self, step: int) -> bool:
        return bool(self.inputs) and due(self.every, self._last, step)

    def evaluate(self, replicas: list[list], step: int) -> EvalResult:
        """Run every held-out microbatch through the first replica whose holders answer; a holder that
        died moves the evaluation to the next replica (the error of the last one if none answered)."""
        t0, error = time.monotonic(), None
        for pipeline in replicas:
            refs = []
            for x, y in zip(self.inputs, self.labels):
                act = x
                for holder in pipeline[:-1]:  # chained by ref: each hop starts when its input is ready
                    act = holder.evaluate.remote(act)
                refs.append(pipeline[-1].evaluate.remote(act, y))
            try:
                losses = ray.get(refs, timeout=self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - only a dead holder moves on; the rest is raised
                if not holder_died(exc):
                    raise
                error = exc
                continue
            return EvalResult(step, sum(losses) / len(losses), len(losses), self.tokens, time.monotonic() - t0)
        raise error if error is not None else RuntimeError("no replica to evaluate on")

    def record(self, result: EvalResult, metrics_file, metrics=None, say=print) -> None:
        metrics_file.write(json.dumps(result.row()) + "\n")
        metrics_file.flush()
        if metrics is not None:
            metrics.evaluation(result.loss, result.perplexity)
        say(f"eval step {result.step}: loss {result.loss:.4f} perplexity {result.perplexity:,.2f} "
            f"({result.batches} held-out microbatches, {result.seconds:.2f}s)")

    def after_outer_step(self, trainer, step: int) -> None:
        """The loop's hook after an outer step at ``step`` inner steps: evaluate if one is due (the final
        evaluation covers the last step). A holder that died skips it; the next inner step recovers it."""
        if step >= trainer.total_steps or not self.due(step):
            return
        self._last = step
        try:
            result = self.evaluate(trainer.swarm.replicas, step)
        except Exception as exc:  # noqa: BLE001
            if not holder_died(exc):
                raise
            trainer.log(f"eval at step {step} skipped: a holder died ({type(exc).__name__})")
            return
        self.record(result, trainer._metrics_file, trainer.metrics, trainer._say)

    def final(self, replicas: list[list], step: int, metrics_file, metrics=None, say=print) -> float:
        """The evaluation after the last step: recorded like the others; its loss (NaN without eval shards)."""
        if not self.inputs:
            return float("nan")
        result = self.evaluate(replicas, step)
        self.record(result, metrics_file, metrics, say)
        return result.loss

