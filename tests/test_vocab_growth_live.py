"""Live vocabulary growth without Ray: a dataset extended in place and checked, holders of a range growing alike
with the logits of the old ids unchanged, snapshots and resumes across the growth, and the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neuroray.config import DataConfig, DilocoConfig, ModelConfig
from neuroray.errors import DataError, VocabularyShrankError
from neuroray.genesis import Manifest, TokenStream, build_dataset, load_tokenizer
from neuroray.genesis.extend import read_extension
from neuroray.model.vocab import grow_flat
from neuroray.swarm.holder import HolderSpec, StageHolder
from neuroray.swarm.transport import as_tensor
from tests.test_genesis_corpus import paragraphs, quiet, write_corpus

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16)
OLD, NEW = 64, 80
SEED = 3


def _data(tmp: Path, corpus: Path, url: str, **kw) -> DataConfig:
    return DataConfig(source=str(corpus), store=str(tmp / "store"), cache_dir=str(tmp / "cache"), dataset=url,
                      shard_tokens=512, eval_shards=1, **kw)


def _tok(url: str, manifest: Manifest):
    return load_tokenizer(Path(url) / manifest.tokenizer_file, manifest.tokenizer_sha256)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab")
    small = write_corpus(tmp / "small.txt")
    bigger = tmp / "bigger.txt"
    bigger.write_text(small.read_text() + "\n\n" + "\n\n".join(paragraphs(200, seed=7)))
    return tmp, small, bigger


def _extendable(tmp: Path, small: Path, name: str) -> tuple[str, Manifest]:
    url = str(tmp / name)
    return url, build_dataset(_data(tmp, small, url, vocab_size=320), url, log=quiet)


# ---------------------------------------------------------------- the dataset, extended in place


def test_extension_in_place_keeps_the_files_being_read_and_is_accepted(corpora):
    tmp, small, bigger = corpora
    url, old = _extendable(tmp, small, "ds")
    old_tok = _tok(url, old)
    assert read_extension(url, old, old_tok) is None  # nothing changed
    reader = TokenStream(url, old, "node-a", 16, 2)  # a Driver still on the old manifest
    first = reader.next_microbatch()

    grown = build_dataset(_data(tmp, bigger, url, vocab_size=360, base_tokenizer=url), url, log=quiet)
    assert grown.parent_tokenizer_sha256 == old.tokenizer_sha256 and grown.vocab_size == 360 > old.vocab_size
    new_files = {grown.tokenizer_file, *(s["file"] for s in grown.shards)}
    assert not new_files & {old.tokenizer_file, *(s["file"] for s in old.shards)}  # nothing overwritten
    reader.seek(0)
    for _ in range(3 * len(old.shards)):  # every old shard still reads and verifies
        reader.next_microbatch()
    reader.seek(0)
    assert torch.equal(reader.next_microbatch()[0], first[0])

    ext = read_extension(url, old, old_tok)
    assert ext is not None and ext.vocab_size == 360 and ext.manifest == grown == Manifest.load(url)
    assert read_extension(url, grown, ext.tokenizer) is None
    ids = torch.cat([TokenStream(url, grown, "node-a", 16, 2).next_microbatch()[0] for _ in range(20)])
    assert ids.max() >= old.vocab_size  # the new tokens are in the new shards

    # a publisher-pinned run trains on an extension once the publisher has signed it, not before
    from neuroray.genesis.manifest import ManifestPinError, sign_manifest
    from neuroray.genesis.store import Store
    from neuroray.ponw.identity import Identity

    publisher = Identity.from_secret(b"\x07" * 32)
    sign_manifest(Store(url), publisher)  # signs the manifest of the 360-token extension
    pinned = publisher.public_key.hex()
    assert read_extension(url, old, old_tok, manifest_publisher=pinned).manifest == grown
    again = build_dataset(_data(tmp, bigger, url, vocab_size=380, base_tokenizer=url), url, log=quiet)
    with pytest.raises(ManifestPinError, match="signs another manifest"):
        read_extension(url, grown, ext.tokenizer, manifest_publisher=pinned)
    sign_manifest(Store(url), publisher)
    assert read_extension(url, grown, ext.tokenizer, manifest_publisher=pinned).manifest == again
    on_disk = {p.name for p in Path(url).iterdir()}
    assert new_files <= on_disk  # the previous generation stays for runs still reading it ...
    assert not {old.tokenizer_file, *(s["file"] for s in old.shards)} & on_disk  # ... the one before is gone
    assert read_extension(url, grown, ext.tokenizer).manifest == again


def test_a_shrunk_vocabulary_and_a_tokenizer_that_disagrees_with_the_manifest_are_refused(corpora):
    tmp, small, bigger = corpora
    url, old = _extendable(tmp, small, "bad")
    old_tok = _tok(url, old)
    grown = build_dataset(_data(tmp, bigger, url, vocab_size=360, base_tokenizer=url), url, log=quiet)
    grown_tok = _tok(url, grown)

    def one_line(exc) -> str:
        assert "\n" not in str(exc.value)
        return str(exc.value)

    # the store went back to a smaller vocabulary than the running model's
    small_url, _ = _extendable(tmp, small, "smaller")
    with pytest.raises(VocabularyShrankError) as exc:
        read_extension(small_url, grown, grown_tok)
    assert "vocabulary shrank" in one_line(exc) and "360" in str(exc.value) and "data.base_tokenizer" in str(exc.value)

    # a bigger tokenizer trained afresh: same size or more, but old ids now mean other tokens
    fresh_url = str(tmp / "fresh")
    build_dataset(_data(tmp, bigger, fresh_url, vocab_size=400), fresh_url, log=quiet)
    with pytest.raises(DataError, match="moved token") as exc:
        read_extension(fresh_url, old, old_tok)
    assert "data.base_tokenizer" in one_line(exc)

    # the tokenizer file is not the one the manifest names (replaced after the build)
    (Path(url) / grown.tokenizer_file).write_text(old_tok.to_str())
    with pytest.raises(DataError, match="sha256") as exc:
        read_extension(url, old, old_tok)
    one_line(exc)
    (Path(url) / grown.tokenizer_file).write_text(grown_tok.to_str())

    # the manifest's vocab_size is not the tokenizer's size: its ids were counted against another vocabulary
    raw = json.loads((Path(url) / "manifest.json").read_text())
    (Path(url) / "manifest.json").write_text(json.dumps({**raw, "vocab_size": 370}))
    with pytest.raises(DataError, match="ids disagree with the shards") as exc:
        read_extension(url, old, old_tok)
    one_line(exc)
    # ... and a run refuses it at start, before Ray (ids up to 369 would index past a 360-row embedding)
    from neuroray.configure import load_config
    from neuroray.training.run import run

    cfg = load_config([f"data.dataset={url}", f"data.cache_dir={tmp / 'cache'}", f"run_dir={tmp / 'run-bad'}"])
    with pytest.raises(DataError, match="370") as exc:
        run(cfg, log=quiet)
    assert "ids disagree with the shards" in one_line(exc)


# ---------------------------------------------------------------- holders


def _holder(tmp: Path, stage: int, ranges, replica: int = 0, vocab: int = OLD, **kw) -> StageHolder:
    spec = HolderSpec(replica=replica, stage=stage, ranges=ranges, model=CFG, vocab_size=vocab,
                      diloco=DilocoConfig(inner_lr=1e-2), seed=SEED, key_path=str(tmp / f"k{replica}{stage}.pem"), **kw)
    return StageHolder(spec)


def _step(pipeline, g, vocab=OLD):
    x = torch.randint(0, vocab, (2, 8), generator=g)
    act = pipeline[0].forward(0, x)
    _, grad = pipeline[1].forward_backward(0, act, torch.roll(x, -1, 1), 1.0)
    pipeline[0].backward(0, grad)
    for h in pipeline:
        h.step()


def _logits(pipeline, x, at_theta0: bool):
    if at_theta0:
        return as_tensor(pipeline[1].evaluate(pipeline[0].evaluate(x)))
    with torch.no_grad():
        return pipeline[1].module(pipeline[0].module(x))


def test_holders_of_a_range_grow_alike_and_the_old_ids_logits_do_not_move(tmp_path):
    ranges = [(0, 1), (1, 2)]
    replicas = [[_holder(tmp_path, s, ranges, r) for s in range(2)] for r in range(2)]
    g = torch.Generator().manual_seed(0)
    for pipeline in replicas:
        _step(pipeline, g)
    for s in range(2):  # an outer step: both replicas at one theta0, then apart again by their own steps
        theta0 = (replicas[0][s].flat_params() + replicas[1][s].flat_params()) / 2
        for pipeline in replicas:
            pipeline[s].load_theta0(theta0.clone())
    for pipeline in replicas:
        _step(pipeline, g)
    x = torch.randint(0, OLD, (3, 8), generator=torch.Generator().manual_seed(9))
    before = [(_logits(p, x, True), _logits(p, x, False)) for p in replicas]
    outer_theta0 = [replicas[0][s].theta0.clone() for s in range(2)]
    layouts = [replicas[0][s].param_layout() for s in range(2)]
    moments = {name: {k: v.clone() for k, v in replicas[0][0].compute.optimizer.state[p].items()}
               for name, p in replicas[0][0].module.named_parameters() if name == "embed.weight"}

    for pipeline in replicas:
        for h in pipeline:
            assert h.grow_vocab(NEW, SEED)["numel"] == h.theta0.numel()

    for (at0, own), pipeline in zip(before, replicas):
        grown_at0, grown_own = _logits(pipeline, x, True), _logits(pipeline, x, False)
        assert grown_at0.shape[-1] == grown_own.shape[-1] == NEW
        torch.testing.assert_close(grown_at0[..., :OLD], at0, rtol=0, atol=0)  # exactly the old ids' logits
        torch.testing.assert_close(grown_own[..., :OLD], own, rtol=0, atol=0)
    for s in range(2):
        # the outer step grows its theta0 with the same code: equal to every holder's, bit for bit
        outer, _ = grow_flat(outer_theta0[s], layouts[s], NEW, seed=SEED)
        for pipeline in replicas:
            assert torch.equal(pipeline[s].theta0, outer)
            delta = pipeline[s].outer.delta()[0]
            assert delta.numel() == outer.numel()
    first, last = replicas[0][0].module.embed.weight, replicas[0][1].module.lm_head.weight
    assert torch.equal(first[OLD:], replicas[1][0].module.embed.weight[OLD:])  # new rows alike on both replicas
    assert torch.equal(last[OLD:], replicas[1][1].module.lm_head.weight[OLD:])
    assert not torch.equal(first[OLD], first[OLD + 1])
    state = replicas[0][0].compute.optimizer.state[first]
    assert torch.equal(state["step"], moments["embed.weight"]["step"])
    assert torch.equal(state["exp_avg"][:OLD], moments["embed.weight"]["exp_avg"]) and not state["exp_avg"][OLD:].any()
    assert replicas[0][0].spec.vocab_size == NEW and replicas[0][1].module.vocab_size == NEW
    head_rows = last[OLD:].detach().clone()
    for pipeline in replicas:  # training goes on with the new ids, the new rows move
        _step(pipeline, g, NEW)
    assert not torch.equal(replicas[0][1].module.lm_head.weight[OLD:].detach(), head_rows)
    with pytest.raises(VocabularyShrankError, match="vocabulary shrank"):
        replicas[0][0].grow_vocab(OLD, SEED)


def _state(h: StageHolder) -> dict:
    return {k: v for k, v in h.capture(-1).tensors.items() if k != "rng.torch"}


def test_snapshots_across_a_growth_restore_whichever_side_of_it_they_were_taken(tmp_path):
    snaps = str(tmp_path / "snaps")
    a = _holder(tmp_path, 0, [(0, 2)], snapshot_root=snaps)
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        x = torch.randint(0, OLD, (2, 8), generator=g)
        a.forward_backward(i, x, torch.roll(x, -1, 1), 1.0)
        a.step()
    a.load_theta0(a.flat_params())
    a.snapshots.write(a.capture(3))  # taken before the dataset grew
    a.grow_vocab(NEW, SEED)
    a.snapshots.write(a.capture(4))  # and after
    grown = _state(a)

    def restored(vocab: int, step: int) -> dict:
        b = _holder(tmp_path, 0, [(0, 2)], vocab=vocab, snapshot_root=snaps, resume_step=step)
        assert b.module.vocab_size == NEW and b.spec.vocab_size == NEW
        return _state(b)

    # recovery of a holder Ray restarted from the snapshot before the growth: grown first, then it rejoins
    c = _holder(tmp_path, 0, [(0, 2)], snapshot_root=snaps, resume_step=3)
    assert c.module.vocab_size == OLD
    c.grow_vocab(NEW, SEED)
    c.rejoin(a.theta0.clone(), a.outer_rounds)
    assert torch.equal(c.flat_params(), a.theta0) and torch.equal(c.theta0, a.theta0)

    for vocab, step in ((OLD, 4),  # Ray restarts an actor on its creation spec: the snapshot's grown shapes win
                        (NEW, 4),  # resume=true after the growth: the dataset's vocabulary, the snapshot's shapes
                        (NEW, 3)):  # resume=true from before the growth: restored, then grown by the same seeded rows
        state = restored(vocab, step)
        assert state.keys() == grown.keys()
        for k, v in grown.items():
            assert torch.equal(state[k], v), (vocab, step, k)


def test_a_driver_switches_to_the_new_shards_at_its_position(corpora, tmp_path):
    tmp, small, bigger = corpora
    url, old = _extendable(tmp, small, "driver")
    h = _holder(tmp_path, 0, [(0, 1), (1, 2)], vocab=old.vocab_size, data_root=url, manifest=old.to_json(),
                seq_len=8, microbatch_size=2)
    for _ in range(3):
        h.next_batch()
    grown = build_dataset(_data(tmp, bigger, url, vocab_size=360, base_tokenizer=url), url, log=quiet)
    h.grow_vocab(grown.vocab_size, SEED, grown.to_json())
    expected = TokenStream(url, grown, h.node_id, 8, 2)
    expected.seek(3)
    assert all(torch.equal(a, b) for a, b in zip(h.next_batch(), expected.next_microbatch()))
    assert h.module.embed.weight.shape[0] == grown.vocab_size
    snap = h.capture(5)
    assert Manifest.from_json(snap.meta["data_manifest"]) == grown
    # a Ray restart starts the actor on its creation spec (old vocabulary, old manifest) and restores this
    restarted = _holder(tmp_path, 0, [(0, 1), (1, 2)], vocab=old.vocab_size, data_root=url,  # the same key
                        manifest=old.to_json(), seq_len=8, microbatch_size=2)
    restarted.restore(snap)
    assert restarted.module.embed.weight.shape[0] == grown.vocab_size
    assert Manifest.from_json(restarted.spec.manifest) == grown
    assert all(torch.equal(a, b) for a, b in zip(restarted.next_batch(), h.next_batch()))  # same shards, same place
