"""Live vocabulary growth in a real run: the dataset is extended in place with a grown tokenizer after round 1,
the running holders grow between rounds with the old ids' logits exactly unchanged, the ledger and the
spot checks follow, and resumes on either side of the growth continue."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neuroray.configure import load_config
from neuroray.genesis import Manifest, build_dataset, load_tokenizer
from neuroray.snapshot import SnapshotStore
from neuroray.swarm.transport import as_tensor
from tests.test_genesis_corpus import paragraphs
from tests.test_pipeline_ray import _write_corpus

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _cfg(tmp_path: Path, run: str, rounds: int, *extra):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        _write_corpus(corpus)
    cfg = load_config([
        f"data.source={corpus}", f"data.dataset={tmp_path / 'ds'}", f"data.cache_dir={tmp_path / 'cache'}",
        "data.vocab_size=320", "data.shard_tokens=4096", "data.seq_len=32", "data.microbatch_size=4", "data.num_microbatches=2",
        "data.watch_rounds=1", "model.d_model=64", "model.n_layers=2", "model.max_seq_len=64",
        f"swarm.key_dir={tmp_path / 'keys'}", "diloco.replicas=2", "diloco.inner_steps=2", "diloco.inner_lr=0.01",
        f"rounds={rounds}", f"run_dir={tmp_path / run}", "cluster.cpus_per_holder=0.25", "sample_tokens=4",
        "checkpoint.every_round=true", "checkpoint.interval_s=0", "ponw.spot_check_rate=1.0", "eval.batches=2",
        *extra,
    ])
    if not (tmp_path / "ds" / "manifest.json").exists():  # data.dataset names a dataset that exists
        build_dataset(cfg.data, cfg.data.dataset, log=lambda _: None)
    return cfg


def _extend(tmp_path: Path, vocab: int) -> Manifest:
    """Extend the run's dataset in place: more text, the tokenizer grown from the dataset's own."""
    from dataclasses import replace

    bigger = tmp_path / f"bigger-{vocab}.txt"
    bigger.write_text((tmp_path / "corpus.txt").read_text() + "\n\n" + "\n\n".join(paragraphs(300, seed=vocab)))
    data = _cfg(tmp_path, "x", 1).data
    url = data.dataset
    return build_dataset(replace(data, source=str(bigger), vocab_size=vocab, base_tokenizer=url), url, log=lambda _: None)


def _logits(ray, run: str, x: torch.Tensor) -> list[torch.Tensor]:
    """Every replica's logits at theta0 through its running holders (forward only), found by their actor names."""
    out = []
    for r in range(2):
        first, last = (ray.get_actor(f"neuroray-{run}-r{r}-s{s}") for s in range(2))
        out.append(as_tensor(ray.get(last.evaluate.remote(first.evaluate.remote(x)))))  # a hop's wire form
    return out


def _inner_step(ray, holder, mb: int) -> torch.Tensor:
    """One inner step of a one-stage replica (embedding and head on one holder) on its own next microbatch;
    returns the microbatch's ids."""
    x, y = ray.get(holder.next_batch.remote())
    ray.get(holder.forward_backward.options(num_returns=2).remote(mb, x, y, 1.0)[0])
    ray.get(holder.step.remote())
    return x


@pytest.mark.slow  # make test-slow: 20-40 s with its own Ray start; the in-process growth tests run in make test
def test_running_holders_grow_between_rounds_and_train_on(ray_cluster, tmp_path):
    """The short one: real holders (2 replicas of one stage: embedding and head on each) and the outer step grow
    in place, alike; the old ids' logits do not move; the Drivers train on with the new shards."""
    from neuroray.diloco.sync import OuterSync
    from neuroray.genesis.extend import read_extension
    from neuroray.swarm.swarm import DataPlan, Swarm
    from neuroray.training.vocab_growth import grow_swarm_vocab

    ray = ray_cluster
    cfg = _cfg(tmp_path, "direct", 1, "ponw.enabled=false", "swarm.num_stages=1")
    url = cfg.data.dataset
    manifest = Manifest.load(url)
    old = manifest.vocab_size
    swarm = Swarm(cfg, old, DataPlan(url, manifest.to_json()), log=lambda *a: None, name_prefix="neuroray-direct-")
    try:
        outer = OuterSync(swarm.by_range, cfg.diloco, cfg.aggregator, seed=cfg.seed)
        holders = [p[0] for p in swarm.replicas]
        for r, h in enumerate(holders):
            _inner_step(ray, h, r)
        ray.get(outer.submit()[1])
        assert outer.momentum[0] is not None  # the outer momentum exists and has to grow too
        x = torch.randint(3, old, (2, 16), generator=torch.Generator().manual_seed(0))
        before = [as_tensor(v) for v in ray.get([h.evaluate.remote(x) for h in holders])]  # logits at theta0

        grown = _extend(tmp_path, 360)
        ext = read_extension(url, manifest, load_tokenizer(Path(url) / manifest.tokenizer_file))
        assert ext.manifest == grown
        assert grow_swarm_vocab(swarm, outer, 360, cfg.seed, grown.to_json(), 120) == [0]

        for b, a in zip(before, map(as_tensor, ray.get([h.evaluate.remote(x) for h in holders]))):
            assert a.shape[-1] == 360
            torch.testing.assert_close(a[..., :old], b, rtol=0, atol=0)  # the old ids' logits, exactly
        theta0 = ray.get(outer.theta0[0])  # the outer step's theta0 is every holder's, bit for bit
        assert theta0.numel() == swarm.numels[0] and ray.get(outer.momentum[0]).shape == theta0.shape
        for h in holders:
            assert torch.equal(ray.get(h.flat_params.remote()), theta0)
        assert swarm.vocab_size == 360 and Manifest.from_json(swarm.data.manifest) == grown
        ids = torch.cat([_inner_step(ray, h, 10 + r) for r, h in enumerate(holders)])
        assert ids.max() >= old  # the Drivers read the new shards, new ids and all
        reports, loads = outer.submit()
        ray.get(loads)
        assert all(not rep.rejected and not rep.refused for rep in ray.get(reports))
    finally:
        swarm.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("diloco.compression=int8",)], ids=["fp32", "int8"])
def test_a_run_grows_its_vocabulary_when_its_dataset_is_extended(ray_cluster, tmp_path, extra):
    """int8: the holders rebuild theta0 from the compressed update, which needs their grown theta0 to be the
    outer step's bit for bit (else they fall back to fetching it dense, logged)."""
    from neuroray.training.run import run

    ray = ray_cluster
    seen, lines = {}, []
    x = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))

    def log(*a, **k):
        line = " ".join(map(str, a))
        lines.append(line)
        if line.startswith("ledger: round 1:"):  # after round 1's outer step, before the boundary's watch
            seen["before"] = _logits(ray, "grow", x)
            seen["grown"] = _extend(tmp_path, 360)
        if line.startswith("vocab: after round 1"):
            seen["after"] = _logits(ray, "grow", x)

    result = run(_cfg(tmp_path, "grow", 2, "log_every=1", *extra), log=log)
    grown = seen["grown"]
    old_vocab = seen["before"][0].shape[-1]
    assert old_vocab < grown.vocab_size == 360
    assert [(g["round"], g["from"], g["to"], g["ranges"]) for g in result.vocab_growths] == [(1, old_vocab, 360, [0, 1])]
    for before, after in zip(seen["before"], seen["after"]):
        assert after.shape[-1] == 360
        torch.testing.assert_close(after[..., :old_vocab], before, rtol=0, atol=0)  # the old ids' logits, exactly
    torch.testing.assert_close(seen["after"][0], seen["after"][1], rtol=0, atol=0)  # both replicas at one theta0

    # round 2 trained on the new shards at the new size: proofs credited, spot checks recomputed and passed
    assert not [line for line in lines if line.startswith("ledger:") and "refused" in line], lines
    assert [line for line in lines if line.startswith("ledger: round 2: 4/4 proofs credited")], lines
    checks = [line for line in lines if line.startswith("spot check: round 2:")]
    assert checks and all(line.endswith(", 0 failed") for line in checks), lines
    assert result.ledger["validations_credited"] >= 1
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    if extra:  # round 2's update applied to the grown theta0 on every holder: no dense fallback (4x the bytes)
        assert result.comm[1]["broadcast_bytes"] < 2 * result.comm[1]["payload_bytes"], result.comm

    # the snapshot right after the growth and the checkpoint hold the grown shapes and the grown tokenizer
    snap = SnapshotStore(str(tmp_path / "grow" / "snapshots"), "r0-s0").read(2)
    assert snap.tensors["model.embed.weight"].shape[0] == 360 and snap.meta["architecture"]["vocab_size"] == 360
    outer = SnapshotStore(str(tmp_path / "grow" / "snapshots"), "outer-s1").read(2)
    assert outer.tensors["theta0"].numel() == outer.tensors["momentum"].numel()
    from neuroray.checkpoint import load_checkpoint

    state, meta = load_checkpoint(result.checkpoint)[:2]
    assert meta["vocab_size"] == 360 and meta["tokenizer_sha256"] == grown.tokenizer_sha256
    assert state["lm_head.weight"].shape[0] == 360
    tok = load_tokenizer(result.checkpoint / "tokenizer.json", grown.tokenizer_sha256)
    assert tok.get_vocab_size() == 360


@pytest.mark.slow
def test_a_driver_killed_right_after_the_growth_comes_back_grown(ray_cluster, tmp_path):
    """Killed after the growth and before the snapshot that follows it: Ray restarts the Driver on its creation
    spec, it restores the snapshot of before the growth, and recovery grows it before it rejoins."""
    from neuroray.training.run import run

    ray = ray_cluster
    lines = []

    def log(*a, **k):
        line = " ".join(map(str, a))
        lines.append(line)
        if line.startswith("ledger: round 2:"):  # after round 1, whose snapshot set of step 2 is the old size
            _extend(tmp_path, 360)
        if line.startswith("vocab: after round 2"):
            ray.kill(ray.get_actor("neuroray-kill-r1-s0"), no_restart=False)

    # spot checks off: a Driver killed between rounds, grown or not, has its recovered round's check fail (the
    # calls queued to it while Ray restarted it run there; reported apart from the growth)
    result = run(_cfg(tmp_path, "kill", 3, "ponw.spot_check_rate=0"), log=log)
    assert [(g["round"], g["to"]) for g in result.vocab_growths] == [(2, 360)]
    assert result.recoveries and result.recoveries[0]["replica"] == 1, lines
    assert result.recoveries[0]["restored_steps"][0] == 2, result.recoveries  # the snapshot before the growth
    assert not [line for line in lines if line.startswith("ledger:") and "refused" in line], lines
    assert [line for line in lines if line.startswith("ledger: round 3: 4/4 proofs credited")], lines
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))


@pytest.mark.slow
def test_resumes_after_and_before_the_growth_continue_at_the_grown_size(ray_cluster, tmp_path):
    from neuroray.training.run import run

    quiet = lambda *a, **k: None  # noqa: E731
    run(_cfg(tmp_path, "pre", 1, "data.watch_rounds=0"), log=quiet)  # snapshots of step 2, before any growth
    seen = {}

    def log(*a, **k):
        line = " ".join(map(str, a))
        if line.startswith("ledger: round 1:") and "grown" not in seen:
            seen["grown"] = _extend(tmp_path, 360)

    run(_cfg(tmp_path, "post", 2), log=log)  # grows after round 1; its snapshot of step 4 is grown
    lines = []
    after = run(_cfg(tmp_path, "post", 3, "resume=true"), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert after.start_step == 4 and len(after.losses) == 2 and not after.vocab_growths

    # the run of only the old data resumes on the extended dataset: its snapshot of step 2 grows at restore
    before = run(_cfg(tmp_path, "pre", 3, "resume=true"), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert before.start_step == 2 and len(before.losses) == 4
    assert any("predates the dataset's vocabulary growth; grown to 360" in line for line in lines), lines
    assert not [line for line in lines if line.startswith("ledger:") and "refused" in line], lines
    from neuroray.checkpoint import load_checkpoint

    for result in (after, before):
        assert load_checkpoint(result.checkpoint)[1]["vocab_size"] == 360

    # a vocabulary that shrank under a run is one line naming the cause and the fix
    from neuroray.errors import VocabularyShrankError

    smaller = Path(tmp_path / "ds")
    for f in smaller.iterdir():
        f.unlink()
    build_dataset(_cfg(tmp_path, "x", 1).data, str(smaller), log=lambda _: None)
    with pytest.raises(VocabularyShrankError, match="vocabulary shrank") as exc:
        run(_cfg(tmp_path, "post", 4, "resume=true"), log=quiet)
    assert "\n" not in str(exc.value) and "data.base_tokenizer" in str(exc.value)
