"""The microbatch schedule (swarm.schedule) and the derived microbatch count (data.num_microbatches=0), without Ray.

The per-holder orders are checked as plans; then the real submission code drives real stage holders in
this process, each call run as it is submitted. That is one serialisation Ray may choose too (Ray runs
one caller's calls to an actor in submission order), so each holder sees exactly its schedule's order:
1F1B must give GPipe's gradients and losses bit for bit, equal the monolith's, and keep fewer graphs.
tests/test_pipeline_ray.py checks the same through Ray actors.
"""

from __future__ import annotations

import pytest
import torch

from neuroray.config import MAX_BUBBLE, DilocoConfig, ModelConfig
from neuroray.config_checks import auto_microbatches, pipeline_bubble, resolve_batch
from neuroray.configure import load_config
from neuroray.errors import ConfigError
from neuroray.genesis import TokenStream, ensure_dataset
from neuroray.model import build_monolith, split_layers
from neuroray.swarm.holder import HolderSpec, StageHolder
from neuroray.training.schedule import BACKWARD, FORWARD, FORWARD_BACKWARD, peak_kept, stage_orders, submit_microbatches
from tests.test_genesis_corpus import corpus_file, quiet, small_cfg

__all__ = ["corpus_file"]  # a fixture, used by name

CFG = ModelConfig(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 3, 6])
def test_every_holder_runs_each_microbatch_once_forward_first(schedule, stages, m):
    orders = stage_orders(schedule, stages, m)
    assert len(orders) == stages and orders[-1] == [(FORWARD_BACKWARD, j) for j in range(m)]
    for order in orders[:-1]:
        assert sorted(order) == sorted([(FORWARD, j) for j in range(m)] + [(BACKWARD, j) for j in range(m)])
        assert [j for k, j in order if k == FORWARD] == list(range(m))  # microbatch order kept both ways
        assert [j for k, j in order if k == BACKWARD] == list(range(m))
        assert all(order.index((FORWARD, j)) < order.index((BACKWARD, j)) for j in range(m))


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_1f1b_keeps_at_most_stages_graphs_where_gpipe_keeps_all(stages):
    m = 12
    one_f = [peak_kept(o) for o in stage_orders("1f1b", stages, m)]
    gpipe = [peak_kept(o) for o in stage_orders("gpipe", stages, m)]
    assert one_f == [stages - s for s in range(stages - 1)] + [0]  # the Validator keeps none: it fuses F and B
    assert gpipe == [m] * (stages - 1) + [0]


def test_auto_microbatches_keep_the_bubble_and_the_batch():
    assert pipeline_bubble(2, 4) == pytest.approx(0.2) and pipeline_bubble(4, 12) == pytest.approx(0.2)
    shapes = {}
    for stages in (1, 2, 3, 4):
        d = load_config([f"swarm.num_stages={stages}"]).data
        shapes[stages] = (d.num_microbatches, d.microbatch_size)
        assert d.batch_size == 16 == d.num_microbatches * d.microbatch_size  # the optimizer's batch never moves
        assert pipeline_bubble(stages, d.num_microbatches) <= MAX_BUBBLE
    assert shapes == {1: (1, 16), 2: (4, 4), 3: (8, 2), 4: (16, 1)}  # the fewest microbatches that do it
    assert auto_microbatches(8, 4) == 8  # no divisor of 8 reaches 20 % on 4 stages: one sequence each
    assert auto_microbatches(48, 4) == 12
    d = load_config(["data.batch_size=64", "swarm.num_stages=4"]).data
    assert (d.num_microbatches, d.microbatch_size) == (16, 4)
    d = load_config(["data.microbatch_size=4", "data.num_microbatches=2"]).data  # both set: their product
    assert (d.batch_size, d.microbatch_size, d.num_microbatches) == (8, 4, 2)
    d = load_config(["data.microbatch_size=8"]).data
    assert (d.batch_size, d.num_microbatches) == (16, 2)
    cfg = load_config([])
    assert resolve_batch(cfg) is cfg  # resolved once: idempotent
    with pytest.raises(ConfigError, match="data.batch_size=16 does not divide by data.num_microbatches=3"):
        load_config(["data.num_microbatches=3"])
    with pytest.raises(ConfigError, match="set two of the three"):
        load_config(["data.batch_size=32", "data.microbatch_size=4", "data.num_microbatches=2"])
    with pytest.raises(ConfigError, match="swarm.schedule=zb is unknown"):
        load_config(["swarm.schedule=zb"])


class _Inline:
    """A holder whose calls run as they are submitted (``h.f.options(...).remote(*a)`` = ``h.f(*a)``)."""

    def __init__(self, holder):
        self.holder = holder

    def __getattr__(self, name):
        call = getattr(self.holder, name)

        class _Method:
            def options(self, **_):
                return self

            def remote(self, *args, **kwargs):
                return call(*args, **kwargs)

        return _Method()


@pytest.fixture(scope="module")
def dataset(corpus_file, tmp_path_factory):
    return ensure_dataset(small_cfg(tmp_path_factory.mktemp("schedule"), corpus_file), log=quiet)


def _holders(dataset, tmp_path, stages):
    root, manifest = dataset
    ranges = split_layers(CFG.n_layers, stages)
    return [StageHolder(HolderSpec(replica=0, stage=s, ranges=ranges, model=CFG, vocab_size=manifest.vocab_size,
                                   diloco=DilocoConfig(), seed=5, key_path=str(tmp_path / f"k{s}.pem"),
                                   data_root=str(root), manifest=manifest.to_json(), seq_len=16, microbatch_size=2))
            for s in range(stages)]


def test_1f1b_gives_gpipes_gradients_exactly_and_keeps_fewer_graphs(dataset, tmp_path):
    stages, m = 3, 5
    runs = {}
    for schedule in ("gpipe", "1f1b"):
        holders = _holders(dataset, tmp_path, stages)  # the same keys: the Driver reads the same microbatches
        losses, tails = submit_microbatches([_Inline(h) for h in holders], m, 0, schedule)
        grads = {n: g for h in holders for n, g in h.grads().items()}
        peaks = [h.utilisation()["peak_in_flight"] for h in holders]
        assert tails == [None] * m and all(not h.compute.pending for h in holders)
        runs[schedule] = losses, grads, peaks
    (gl, gg, gpeak), (fl, fg, fpeak) = runs["gpipe"], runs["1f1b"]
    assert gpeak == [5, 5, 0] and fpeak == [3, 2, 0]  # the activation stash: m graphs, or S - stage
    assert fl == gl and gg.keys() == fg.keys()
    for name in gg:
        assert torch.equal(gg[name], fg[name]), name  # bit for bit: the same sums in the same order

    root, manifest = dataset  # and both equal the monolith on the same microbatches (float32)
    node_id = holders[0].node_id
    stream = TokenStream(root, manifest, node_id, 16, 2)
    ref = build_monolith(CFG, manifest.vocab_size, seed=5)
    ref_losses = []
    for _ in range(m):
        x, y = stream.next_microbatch()
        loss = ref.loss(ref(x), y)
        ref_losses.append(float(loss.detach()))
        (loss / m).backward()
    assert fl == pytest.approx(ref_losses, rel=1e-5)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(fg[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
