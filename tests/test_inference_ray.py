"""Inference through Ray stage holders: equals one process, batches sessions, expires, fails over, proves."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch

from neuroray.cli.generate import main
from neuroray.config import PonwConfig
from neuroray.errors import GenerationError, PipelineError
from neuroray.inference.discovery import start_holders
from neuroray.inference.engine import PipelineEngine
from neuroray.inference.holder import InferenceHolder, InferenceSpec
from neuroray.inference.loading import load_for_inference
from neuroray.inference.proofs import credit_proofs
from neuroray.inference.sampling import Sampler
from neuroray.inference.sessions import Session, run_sessions, sample
from neuroray.model import build_stage, split_layers
from neuroray.ponw import crypto
from neuroray.ponw.ledger import Ledger
from neuroray.ponw.proof import SignedProof
from tests.test_generate import make_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

PROMPTS = ["the quick brown fox", "seven", "a lazy dog while seven small birds sing near", "old river", "jumps"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matmuls: a second OpenMP thread only adds sync cost, and on a busy 2-core box it can stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_for_inference(make_checkpoint(tmp_path_factory.mktemp("inf") / "checkpoint"))


@pytest.fixture(scope="module")
def reference(loaded):
    return loaded.monolith()


@pytest.fixture(scope="module")
def holders(ray_cluster, loaded, tmp_path_factory):
    """Two layer ranges, two holders each (so a session can fail over); shared by the module."""
    return start_holders(loaded, stages=2, replicas=2, key_dir=tmp_path_factory.mktemp("keys"))


def encode(holders, ray, text: str) -> list[int]:
    return ray.get(holders[0][0].encode.remote(text))  # the Driver tokenizes


def stats(ray, holders) -> list[list[dict]]:
    return [ray.get([h.stats.remote() for h in row]) for row in holders]


def test_pipeline_equals_one_process(ray_cluster, holders, loaded, reference):
    ray = ray_cluster
    ids = encode(holders, ray, PROMPTS[0])
    for opts in ({"temperature": 0}, {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 4}):
        session = Session(ids, 20, Sampler(**{"top_k": 0, **opts}))
        run_sessions(PipelineEngine(holders, loaded.model.max_seq_len), [session])
        assert session.new_ids == sample(reference, ids, 20, **{"top_k": 0, **opts}), opts


def test_driver_rejects_bad_prompts(ray_cluster, holders):
    ray = ray_cluster
    with pytest.raises(GenerationError, match="empty prompt"):
        ray.get(holders[0][0].encode.remote(""))
    with pytest.raises(GenerationError, match="longer than the model's context"):
        ray.get(holders[0][0].encode.remote("fox " * 100))


def test_several_sessions_are_batched(ray_cluster, holders, loaded, reference):
    ray = ray_cluster
    prompts = [encode(holders, ray, p) for p in PROMPTS + PROMPTS[:3]]  # 8: 4 per route, 2 per microbatch
    expected = [sample(reference, p, 12, temperature=0.8, top_k=30, seed=i) for i, p in enumerate(prompts)]
    before = stats(ray, holders)
    sessions = [Session(p, 12, Sampler(0.8, 30, seed=i)) for i, p in enumerate(prompts)]
    engine = PipelineEngine(holders, loaded.model.max_seq_len)
    run_sessions(engine, sessions)
    assert [s.new_ids for s in sessions] == expected
    after = stats(ray, holders)
    for row_before, row_after in zip(before, after):
        for b, a in zip(row_before, row_after):
            assert a["tokens_processed"] > b["tokens_processed"]  # sessions were spread over both replicas
            assert a["max_batch_sessions"] >= 2  # ... and several rode in one call
            assert a["sessions"] == 0  # finished sessions were freed
    # 8 sessions x 12 steps would be 96 calls per stage unbatched; batches of 2 need half.
    calls = sum(a["batches"] - b["batches"] for a, b in zip(before[0], after[0]))
    assert calls <= 8 * 12 // 2


def test_expired_session_frees_memory_and_replays(ray_cluster, holders, loaded, reference):
    ray = ray_cluster
    session = Session(encode(holders, ray, PROMPTS[2]), 6, Sampler(0))
    engine = PipelineEngine(holders, loaded.model.max_seq_len)
    run_sessions(engine, [session], close_done=False)  # keep the cache: the conversation goes on
    route = engine.routes[session.sid]
    held = [ray.get(h.stats.remote()) for h in route]
    assert all(session.sid in st["session_ids"] and st["cache_bytes"] > 0 for st in held)

    gone = ray.get([h.expire.remote(idle_s=0) for h in route])  # as if the TTL had passed
    assert all(session.sid in g for g in gone)
    after = [ray.get(h.stats.remote()) for h in route]
    assert all(st["cache_bytes"] < h["cache_bytes"] for st, h in zip(after, held))
    assert all(session.sid not in st["session_ids"] for st in after)

    # The user comes back: the holders miss the cache, the engine replays the prefix and goes on.
    session.extend(encode(holders, ray, " old")[1:], 6)
    history = list(session.ids)
    run_sessions(engine, [session])
    assert session.new_ids == sample(reference, history, 6, temperature=0)
    assert engine.replays == 1 and engine.failovers == 0


def test_reaper_frees_idle_sessions_without_requests(loaded, tmp_path):
    """In process (no Ray needed): the holder's reaper thread frees a session nobody touches any more."""
    ranges = split_layers(loaded.model.n_layers, 2)
    keys = build_stage(loaded.model, loaded.vocab_size, 1, ranges).state_dict().keys()
    spec = InferenceSpec(stage=1, ranges=ranges, model=loaded.model, vocab_size=loaded.vocab_size,
                         key_path=str(tmp_path / "k.pem"), session_ttl_s=0.2)
    holder = InferenceHolder(spec, {k: loaded.state[k] for k in keys})
    try:
        logits = holder.forward([("s1", 0, 3)], torch.zeros(1, 3, loaded.model.d_model))
        assert logits.shape == (1, loaded.vocab_size)  # the Validator returns the last position's logits
        assert holder.stats()["cache_bytes"] > 0
        deadline = time.monotonic() + 20  # generous: the reaper runs every 0.05 s, the machine may be busy
        while holder.stats()["sessions"] and time.monotonic() < deadline:
            time.sleep(0.05)
        st = holder.stats()
        assert (st["sessions"], st["cache_bytes"], st["expired"]) == (0, 0, 1)
    finally:
        holder.stop()


def test_inference_proofs_are_signed_and_credited(ray_cluster, holders, loaded, tmp_path):
    ray = ray_cluster
    engine = PipelineEngine(holders, loaded.model.max_seq_len)
    engine.collect_proofs()  # drain the work earlier tests did
    sessions = [Session(encode(holders, ray, p), 5, Sampler(0)) for p in PROMPTS[:3]]
    run_sessions(engine, sessions)
    observed = dict(engine.observed_tokens)
    infos = {i["node_id"]: i for row in holders for i in ray.get([h.info.remote() for h in row])}
    items = engine.collect_proofs()
    assert {SignedProof.from_bytes(b).proof.node_id for b, _ in items} == set(observed) == set(infos)
    for data, receipt in items:
        signed = SignedProof.from_bytes(data)
        p, info = signed.proof, infos[signed.proof.node_id]
        pub = bytes.fromhex(info["public_key"])
        assert hashlib.sha256(pub).hexdigest() == p.node_id
        backend = crypto.backend()
        assert backend.verify(backend.load_public_key(pub), p.digest(), signed.signature)
        assert p.proof_type == "inference" and p.tokens_processed == observed[p.node_id] == receipt["tokens"]
        lo, hi = info["layers"]
        assert (p.layer_start, p.layers_held) == (lo, hi - lo)
        assert (p.has_embedding, p.has_lm_head) == (info["role"] == "driver", info["role"] == "validator")
    assert engine.collect_proofs() == []  # each token is proven once

    # The ledger verifies and credits them; a claim above what the swarm observed is refused and slashed.
    ledger_file = tmp_path / "ledger.sqlite"
    Ledger(ledger_file, PonwConfig(synchronous="OFF"), model_layers=loaded.model.n_layers, tokens_per_batch=64).close()
    (lie_data, lie_receipt), honest = items[0], items[1:]
    lie_receipt = {**lie_receipt, "tokens": lie_receipt["tokens"] - 1}
    outcomes = credit_proofs(str(ledger_file), engine.registrations(), [*honest, (lie_data, lie_receipt)], print)
    assert [o["accepted"] for o in outcomes] == [True] * len(honest) + [False]
    assert all(o["reward"] > 0 for o in outcomes[:-1]) and outcomes[-1]["reason"] == "implausible"
    again = credit_proofs(str(ledger_file), engine.registrations(), honest, print)
    assert {o["reason"] for o in again} == {"replay"}  # never credited twice
    ledger = Ledger(ledger_file, create=False)
    balances = {a.node_id: a.balance for a in ledger.accounts()}
    assert all(balances[SignedProof.from_bytes(b).proof.node_id] > 0 for b, _ in honest)
    assert ledger.supply().consistent
    ledger.close()


def test_cli_through_the_pipeline(ray_cluster, loaded, reference, tmp_path, capsys):
    """``python -m neuroray.generate ... stages=2`` streams the same text as one process, and credits proofs."""
    common = [f"checkpoint={loaded.path}", "prompt=the lazy dog", "max_new_tokens=10", "temperature=0",
              "stop_at_eos=false"]
    assert main([*common, "stages=0"]) == 0
    local_out = capsys.readouterr().out
    ledger_file = tmp_path / "ledger.sqlite"
    Ledger(ledger_file, PonwConfig(synchronous="OFF"), model_layers=loaded.model.n_layers, tokens_per_batch=64).close()
    assert main([*common, "stages=3", f"key_dir={tmp_path}", f"ledger={ledger_file}"]) == 0
    out, err = capsys.readouterr()
    assert out == local_out and out.startswith("the lazy dog")
    assert "ledger: credited 3/3 inference proofs" in err

    # A running named swarm is found and used instead of starting holders.
    named = start_holders(loaded, stages=2, key_dir=tmp_path, swarm="test-swarm")
    before = ray_cluster.get(named[0][0].stats.remote())["tokens_processed"]
    assert main([*common, "swarm=test-swarm", f"key_dir={tmp_path}"]) == 0
    out, err = capsys.readouterr()
    assert out == local_out and "using running swarm 'test-swarm' (2 stages)" in err
    assert ray_cluster.get(named[0][0].stats.remote())["tokens_processed"] > before
    for row in named:
        for h in row:
            ray_cluster.kill(h)


def test_failover_replays_the_prefix_on_a_new_holder(ray_cluster, holders, loaded, reference):
    """Runs last in the module: it kills holders of the shared pool."""
    ray = ray_cluster
    ids = encode(holders, ray, PROMPTS[0])
    expected = sample(reference, ids, 24, temperature=0)
    engine = PipelineEngine(holders, loaded.model.max_seq_len, step_timeout_s=30)
    session = Session(ids, 24, Sampler(0))
    engine.open(session)
    first_route = engine.routes[session.sid]
    killed = []

    def kill_mid_generation(s, _token):
        n = len(s.new_ids)
        if n in (6, 14):  # the Driver, then the Validator of whatever route the session is on
            victim = engine.routes[s.sid][0 if n == 6 else 1]
            ray.kill(victim)
            killed.append(victim)

    run_sessions(engine, [session], on_token=kill_mid_generation, close_done=False)
    assert session.new_ids == expected
    assert engine.failovers == 2
    final_route = engine.routes[session.sid]
    assert final_route[0] != first_route[0] and final_route[1] != first_route[1]
    assert not set(final_route) & set(killed)
    # The new Validator rebuilt the whole cache: it holds every position of the session.
    st = ray.get(final_route[1].stats.remote())
    assert session.sid in st["session_ids"] and st["tokens_processed"] >= len(ids) + 14

    # With no holder of a range left, the error says so and how to avoid it.
    ray.kill(final_route[1])
    session.extend([5], 3)
    with pytest.raises(PipelineError, match="every holder of layer range 1 is gone"):
        run_sessions(engine, [session])
