"""Held-out evaluation without Ray: the split (by shard, disjoint from training, deterministic), the holders'
forward-only evaluation at theta0 against the monolith, when evaluations are due, the loss plot, and the
TensorBoard mirror of metrics.jsonl (skipped where the tensorboard package is absent)."""

from __future__ import annotations

import importlib.util
import io
import json
import math

import pytest
import torch

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.genesis import TokenStream, ensure_dataset, load_shard
from neuroray.model import build_monolith, merge_state_dicts
from neuroray.swarm.holder import HolderSpec, StageHolder
from neuroray.training.evaluation import EvalResult, due, held_out_batches, held_out_spans
from neuroray.training.plots import loss_curve, metric_rows
from tests.test_genesis_corpus import corpus_file, quiet, small_cfg

__all__ = ["corpus_file"]  # a fixture, used by name


@pytest.fixture(scope="module")
def two_eval_shards(corpus_file, tmp_path_factory):
    return ensure_dataset(small_cfg(tmp_path_factory.mktemp("evalsplit"), corpus_file, eval_shards=2), log=quiet)


def test_held_out_split_is_the_eval_shards_spread_and_deterministic(two_eval_shards):
    root, manifest = two_eval_shards
    eval_ids = {s["id"] for s in manifest.eval_shards}
    train_ids = {s["id"] for s in manifest.train_shards}
    assert len(eval_ids) == 2 and train_ids and not eval_ids & train_ids
    spans = held_out_spans(root, manifest, seq_len=16, microbatch_size=2, count=6)
    read = {span.shard_id for batch in spans for span in batch}
    assert read == eval_ids  # spread over every held-out shard, never a training one
    # no training stream of any node ever reads a held-out shard
    for node in ("a", "b", "c"):
        stream = TokenStream(root, manifest, node, 16, 2)
        assert not {sp.shard_id for sp in stream.spans(0, 10_000)} & eval_ids
    batches = held_out_batches(root, manifest, seq_len=16, microbatch_size=2, count=6)
    assert len(batches) == 6
    tokens = {s["id"]: load_shard(root, manifest, s) for s in manifest.eval_shards}
    for (x, y), batch in zip(batches, spans):
        flat = torch.cat([torch.from_numpy(tokens[sp.shard_id][sp.start:sp.end].astype("int64")) for sp in batch])
        windows = flat.view(2, 17)
        assert torch.equal(x, windows[:, :-1]) and torch.equal(y, windows[:, 1:])
    again = held_out_batches(str(root), manifest, seq_len=16, microbatch_size=2, count=6)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches, again))
    # more batches than the split holds: each microbatch once
    assert len(held_out_batches(root, manifest, 16, 2, 10_000)) == len(held_out_spans(root, manifest, 16, 2, 10_000))


def test_no_eval_shards_means_no_held_out_batches(corpus_file, tmp_path):
    root, manifest = ensure_dataset(small_cfg(tmp_path, corpus_file, eval_shards=0), log=quiet)
    assert held_out_batches(root, manifest, 16, 2, 8) == [] and held_out_spans(root, manifest, 16, 2, 8) == []


def test_evaluations_are_due_at_the_first_outer_step_past_each_multiple():
    def schedule(every, sync_every, start, total):
        last, steps = start, []
        for step in range(start + sync_every, total + 1, sync_every):
            if due(every, last, step):
                steps.append(step)
                last = step
        return steps

    assert schedule(40, 20, 0, 200) == [40, 80, 120, 160, 200]
    assert schedule(50, 20, 0, 200) == [60, 100, 160, 200]
    assert schedule(40, 20, 40, 120) == [80, 120]  # resumed at a multiple: not again at 40
    assert schedule(0, 20, 0, 200) == []


CFG = ModelConfig(d_model=32, n_layers=3, n_heads=2, n_kv_heads=2, max_seq_len=16)
RANGES = [(0, 2), (2, 3)]


def test_holders_evaluate_theta0_forward_only_and_equal_the_monolith(tmp_path):
    holders = [StageHolder(HolderSpec(replica=0, stage=s, ranges=RANGES, model=CFG, vocab_size=64,
                                      diloco=DilocoConfig(inner_lr=1e-2), seed=0, key_path=str(tmp_path / f"{s}.pem")))
               for s in range(2)]
    d, v = holders
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (4, 12), generator=g)
    # an inner step moves the weights off theta0, and a second microbatch is left with its gradient pending
    loss, grad = v.forward_backward(0, d.forward(0, x), torch.roll(x, -1, 1), 1.0)
    d.backward(0, grad)
    for h in holders:
        h.step()
    v.forward_backward(1, d.forward(1, x), torch.roll(x, -1, 1), 1.0)

    def state(h):
        opt = h.compute.optimizer.state_dict()["state"]
        return (h.flat_params().clone(), {k: {n: t.clone() for n, t in s.items()} for k, s in opt.items()},
                h.grads(), h.counters(), h.compute.step_microbatches, set(h._pending), h.theta0.clone())

    before = [state(h) for h in holders]
    evals = [torch.randint(0, 64, (3, 12), generator=g) for _ in range(3)]
    got = [v.evaluate(d.evaluate(e), torch.roll(e, -1, 1)) for e in evals]
    ref = build_monolith(CFG, 64, seed=0)
    ref.load_state_dict(merge_state_dicts([h.state_dict(at_theta0=True) for h in holders]))
    with torch.no_grad():
        want = [float(ref.loss(ref(e), torch.roll(e, -1, 1))) for e in evals]
    assert got == pytest.approx(want, abs=1e-5)
    with torch.no_grad():  # theta0, not the trained weights
        logits = v.compute.module(d.compute.module(evals[0]))
        trained = float(v.compute.module.loss(logits, torch.roll(evals[0], -1, 1)))
    assert got[0] != pytest.approx(trained, abs=1e-4)
    for b, a in zip(before, [state(h) for h in holders]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[6], b[6])
        assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k][n], b[1][k][n]) for k in b[1] for n in b[1][k])
        assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][n], b[2][n]) for n in b[2])
        assert a[3:6] == b[3:6]  # counters (work claimed), microbatches of the step, graphs in flight


def _rows():
    train = [{"step": s, "round": (s - 1) // 4 + 1, "loss": 6 - 0.2 * s, "lr": 1e-3, "tokens_per_s": 100.0,
              "elapsed_s": s * 0.1, "sync_bytes": 10 * s, "control_bytes": s} for s in range(1, 9)]
    evals = [EvalResult(s, 5.5 - 0.1 * s, 4, 256, 0.1).row() for s in (4, 8)]
    return train[:4] + [evals[0]] + train[4:] + [evals[1]]


def test_eval_rows_carry_perplexity_and_the_plot_draws_both_curves(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    train, evals = metric_rows(log)
    assert [r["step"] for r in train] == list(range(1, 9)) and [r["step"] for r in evals] == [4, 8]
    assert all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)
    png = loss_curve(log, tmp_path / "loss.png", 4, title="t")
    assert png.stat().st_size > 10_000
    log.write_text("".join(json.dumps(r) + "\n" for r in _rows() if "loss" in r))  # a log from before eval rows
    assert loss_curve(log, tmp_path / "plain.png", 4).is_file()


def test_tensorboard_refused_with_the_fix_when_the_package_is_absent(monkeypatch):
    from neuroray.training import tensorboard_log
    from neuroray.training.preflight import DependencyError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(DependencyError, match=r"pip install 'neuroray\[tensorboard\]'"):
        tensorboard_log.check_available()


def test_tensorboard_event_file_holds_every_metric(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from neuroray.training.tensorboard_log import MirroredLog, TensorBoardLog

    board, text = TensorBoardLog(tmp_path / "tb"), io.StringIO()
    log = MirroredLog(text, board)
    for row in _rows():
        line = json.dumps(row) + "\n"
        log.write(line[:7])  # rows may arrive in pieces: only whole lines are read
        log.write(line[7:])
    log.flush()
    board.close()
    assert text.getvalue() == "".join(json.dumps(r) + "\n" for r in _rows())  # metrics.jsonl unchanged
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    train, evals = metric_rows_of(_rows())
    want = {"train/loss": [(r["step"], r["loss"]) for r in train],
            "train/lr": [(r["step"], r["lr"]) for r in train],
            "train/tokens_per_s": [(r["step"], r["tokens_per_s"]) for r in train],
            "comm/sync_bytes": [(r["step"], r["sync_bytes"]) for r in train],
            "comm/control_bytes": [(r["step"], r["control_bytes"]) for r in train],
            "eval/loss": [(r["step"], r["eval_loss"]) for r in evals],
            "eval/perplexity": [(r["step"], r["eval_perplexity"]) for r in evals]}
    assert set(acc.Tags()["scalars"]) == set(want)
    for tag, points in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag


def metric_rows_of(rows):
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]
