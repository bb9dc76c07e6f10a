"""Generation in one process: sampling options, sessions, the CLI, and each bad input's one-line error."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neuroray.checkpoint import CheckpointError, save_checkpoint
from neuroray.config import ModelConfig, to_dict
from neuroray.errors import ConfigError, GenerationError
from neuroray.cli.generate import main, parse_overrides
from neuroray.inference.loading import TextStream, load_for_inference
from neuroray.inference.sampling import Sampler, filter_logits
from neuroray.inference.sessions import LocalEngine, Session, run_sessions, sample
from neuroray.genesis import train_tokenizer
from neuroray.genesis.tokenizer import tokenizer_hash
from neuroray.model import build_monolith

CFG = ModelConfig(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=48)
WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing near old river stones".split()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matmuls: a second OpenMP thread only adds sync cost, and on a busy 2-core box it can stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_docs(n: int = 60, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (12,), generator=g)) for _ in range(n)]


def make_checkpoint(path: Path, cfg: ModelConfig = CFG, seed: int = 0, tokenizer_seed: int = 0) -> Path:
    """A checkpoint without training: a seeded monolith and a tokenizer trained on synthetic text."""
    tok = train_tokenizer(synthetic_docs(seed=tokenizer_seed), vocab_size=300)
    tok_file = path.parent / f"{path.name}-tokenizer.json"
    tok.save(str(tok_file))
    model = build_monolith(cfg, tok.get_vocab_size(), seed=seed)
    meta = {"model": to_dict(cfg), "vocab_size": tok.get_vocab_size(), "tokenizer_sha256": tokenizer_hash(tok)}
    return save_checkpoint(path, model.state_dict(), meta, tok_file)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("gen") / "checkpoint")


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_for_inference(ckpt)


# ----- sampling -------------------------------------------------------------------------------


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [True, True, False, False, False]
    # top_p=0.6: 0.5 alone is not enough, 0.5 + 0.2 is: keep two
    assert torch.isfinite(filter_logits(logits, top_p=0.6)).tolist() == [True, True, False, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [True, False, False, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).sum() == 1  # the best token always survives
    assert torch.equal(filter_logits(logits, top_k=0, top_p=1.0), logits)
    shuffled = logits[torch.tensor([3, 0, 4, 1, 2])]  # order of the vocabulary does not matter
    assert torch.isfinite(filter_logits(shuffled, top_p=0.6)).tolist() == [False, True, False, True, False]


def test_sampler_greedy_seeded_and_filtered():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5])
    assert Sampler(temperature=0)(logits) == 1
    a, b, c = (Sampler(1.0, 0, 1.0, seed=s) for s in (5, 5, 6))
    draws_a, draws_b, draws_c = ([x(logits) for _ in range(50)] for x in (a, b, c))
    assert draws_a == draws_b and draws_a != draws_c
    top2 = Sampler(1.0, top_k=2, seed=0)
    assert set(top2(logits) for _ in range(200)) == {1, 3}
    nucleus = Sampler(1.0, top_k=0, top_p=0.5, seed=0)
    assert set(nucleus(logits) for _ in range(100)) == {1}  # p(1) = 0.53 already reaches 0.5


def test_temperature_flattens_the_distribution():
    logits = torch.tensor([0.0, 2.0, 1.0])
    cold, hot = Sampler(0.3, 0, seed=0), Sampler(3.0, 0, seed=0)
    c = Counter(cold(logits) for _ in range(400))
    h = Counter(hot(logits) for _ in range(400))
    assert c[1] > h[1] and h[0] > c[0]


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
])
def test_sampler_rejects_bad_options(kwargs, match):
    with pytest.raises(GenerationError, match=match):
        Sampler(**kwargs)


# ----- in-process generation ------------------------------------------------------------------


def test_sample_matches_full_recompute(loaded):
    """Greedy decoding with the cache picks the argmax of a full forward over the whole prefix each step."""
    model = loaded.monolith()
    prompt = [0, 5, 9, 20, 7]
    out = sample(model, prompt, 20, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_sample_options_are_reproducible(loaded):
    model = loaded.monolith()
    a = sample(model, [0, 4], 15, temperature=1.0, top_k=10, top_p=0.9, seed=3)
    assert a == sample(model, [0, 4], 15, temperature=1.0, top_k=10, top_p=0.9, seed=3)
    assert a != sample(model, [0, 4], 15, temperature=1.0, top_k=10, top_p=0.9, seed=4)
    assert len(a) == 15


def test_stop_token_and_context_limit(loaded):
    model = loaded.monolith()
    greedy = sample(model, [0, 4, 8], 6, temperature=0)
    assert sample(model, [0, 4, 8], 6, temperature=0, stop_id=greedy[2]) == greedy[:2]
    # A prompt that fills the context can still produce one token; then the context is full.
    full = Session(list(range(3, 3 + CFG.max_seq_len)), 10, Sampler(0))
    run_sessions(LocalEngine(model), [full])
    assert len(full.new_ids) == 1 and full.stop_reason == "context"


def test_batched_sessions_equal_each_alone(loaded):
    model = loaded.monolith()
    prompts = [[0, 3], [0, 9, 14, 2, 30, 7], [0], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
    alone = [sample(model, p, 12, temperature=0.9, top_k=20, seed=i) for i, p in enumerate(prompts)]
    sessions = [Session(p, 12, Sampler(0.9, 20, seed=i)) for i, p in enumerate(prompts)]
    engine = LocalEngine(model)
    run_sessions(engine, sessions)
    assert [s.new_ids for s in sessions] == alone
    assert len(engine.cache) == 0  # finished sessions are closed


def test_extend_continues_a_conversation(loaded):
    model = loaded.monolith()
    s = Session([0, 4, 8], 5, Sampler(0))
    engine = LocalEngine(model)
    run_sessions(engine, [s], close_done=False)
    s.extend([11, 12], 5)
    run_sessions(engine, [s])
    assert s.ids[-5:] == sample(model, s.ids[:-5], 5, temperature=0)
    stopped = Session([0, 4, 8], 5, Sampler(0), stop_id=sample(model, [0, 4, 8], 1, temperature=0)[0])
    run_sessions(engine, [stopped])
    assert stopped.new_ids == [] and stopped.stop_reason == "stop"
    with pytest.raises(GenerationError, match="nothing to continue from"):
        stopped.extend([], 3)


def test_text_stream_holds_back_split_characters(loaded):
    from neuroray.genesis import encode

    tok = loaded.tokenizer
    text = "fox é 🦊 birds"
    out = []
    stream = TextStream(tok, out.append)
    for t in encode(tok, text):
        stream.push(t)
    assert "".join(out) == text and not any("\ufffd" in piece for piece in out)


# ----- CLI and bad input ----------------------------------------------------------------------


def test_cli_streams_tokens(ckpt, capsys):
    rc = main([f"checkpoint={ckpt}", "prompt=the quick", "max_new_tokens=8", "temperature=0", "stages=0",
               "stop_at_eos=false"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith("the quick") and len(out) > len("the quick\n")
    assert "generate: 8 tokens (length)" in err


def test_parse_overrides():
    cfg = parse_overrides(["checkpoint=x", 'prompt="two words"', "top_p=0.9", "top_k=5", "bos=false", "stages=3"])
    assert (cfg.prompt, cfg.top_p, cfg.top_k, cfg.bos, cfg.stages) == ("two words", 0.9, 5, False, 3)
    with pytest.raises(ConfigError, match="unknown key 'temprature'"):
        parse_overrides(["temprature=1"])
    with pytest.raises(ConfigError, match="top_k='many' is not a valid int"):
        parse_overrides(["top_k=many"])
    with pytest.raises(ConfigError, match="top_p=2.0 must be in"):
        parse_overrides(["top_p=2"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["prompt"])
    with pytest.raises(ConfigError, match="keep_swarm"):
        parse_overrides(["keep_swarm=true"])


def _error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("neuroray: error: ")  # one line naming cause and fix
    return err[0]


def test_empty_prompt(ckpt, capsys):
    assert "empty prompt" in _error_line(capsys, [f"checkpoint={ckpt}", "prompt=", "stages=0"])
    assert "empty prompt" in _error_line(capsys, [f"checkpoint={ckpt}", 'prompt=""', "stages=0"])
    with pytest.raises(GenerationError, match="empty prompt"):
        sample(build_monolith(CFG, 300), [], 5)


def test_prompt_longer_than_context(ckpt, capsys):
    line = _error_line(capsys, [f"checkpoint={ckpt}", "prompt=" + "fox " * 60, "stages=0"])
    assert "longer than the model's context of 48 tokens" in line and "shorten" in line


def test_unknown_checkpoint(tmp_path, capsys):
    line = _error_line(capsys, [f"checkpoint={tmp_path / 'nope'}", "prompt=hi", "stages=0"])
    assert "no checkpoint at" in line
    assert "checkpoint= is required" in _error_line(capsys, ["prompt=hi", "stages=0"])


def test_tokenizer_that_does_not_match(ckpt, tmp_path, capsys):
    other = train_tokenizer(synthetic_docs(seed=1) + ["zebra quartz vortex"], vocab_size=300)
    other.save(str(tmp_path / "other.json"))
    line = _error_line(capsys, [f"checkpoint={ckpt}", f"tokenizer={tmp_path / 'other.json'}", "prompt=hi", "stages=0"])
    assert "does not match the checkpoint's tokenizer" in line
    # The same mismatch inside the checkpoint directory itself (tokenizer.json swapped).
    bad = make_checkpoint(tmp_path / "swapped")
    (bad / "tokenizer.json").write_text(other.to_str())
    with pytest.raises(CheckpointError, match="does not match"):
        load_for_inference(bad)


def test_checkpoint_that_does_not_fit_its_config(ckpt, tmp_path):
    bad = make_checkpoint(tmp_path / "bad")
    meta = json.loads((bad / "meta.json").read_text())
    meta["model"]["d_model"] = 64
    # written through the checkpoint writer, so its manifest vouches for the mismatched meta.json
    save_checkpoint(bad, load_file(str(bad / "model.safetensors")), meta, bad / "tokenizer.json")
    with pytest.raises(CheckpointError, match="does not fit its own meta.json"):
        load_for_inference(bad).monolith()
