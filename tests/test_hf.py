"""Hugging Face interop checked against the real peer: transformers' LlamaForCausalLM and AutoTokenizer.

Export: a random neuroray model saved as a checkpoint, exported, loaded by transformers: same logits
(float32, within 1e-4) and the same greedy tokens. Import: a random transformers Llama, loaded by
neuroray whole and split over 2 and 3 stages: same logits. Weights are drawn at std 0.1, so attention
is peaked and a wrong RoPE layout, eps or theta moves logits by far more than the tolerance
(test_export_detects_a_wrong_rope_layout shows it). Ray-free.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")  # a dev dependency: the peer the export is checked against

import neuroray  # noqa: E402
from neuroray.checkpoint import save_checkpoint  # noqa: E402
from neuroray.cli.export import main as export_main  # noqa: E402
from neuroray.config import ModelConfig  # noqa: E402
from neuroray.errors import DataError, InteropError  # noqa: E402
from neuroray.inference.loading import encode_prompt  # noqa: E402
from neuroray.inference.sessions import sample  # noqa: E402
from neuroray.genesis.manifest import Manifest  # noqa: E402
from neuroray.genesis.own_tokenizer import check_tokenizer_matches_manifest, load_user_tokenizer  # noqa: E402
from neuroray.genesis.tokenizer import EOS_ID, decode, encode, tokenizer_hash, train_tokenizer  # noqa: E402
from neuroray.model import build_monolith, build_stage, ffn_hidden_size, split_layers  # noqa: E402
from neuroray.model.hf import export_hf, load_hf_llama, model_config_from_hf, model_config_to_hf  # noqa: E402

PROMPTS = ["Return the value of the", "A pipeline stage holds", "def f(x):\n    return x * 2", "é ∑ 😀 unicode"]
# rope_theta and norm_eps differ from both libraries' defaults, so a dropped field shows in the logits.
CFG = ModelConfig(name="t", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, rope_theta=1000.0,
                  norm_eps=1e-5, init_std=0.1)


def _docs() -> list[str]:
    """neuroray's own docstrings: real English and code words, the same on every machine."""
    docs = []
    for path in sorted(Path(neuroray.__file__).parent.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docs += [d for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
                 if (d := ast.get_docstring(n))]
    return docs


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_docs(), 300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok):
    """(neuroray monolith, checkpoint dir, export dir) for a random 2-layer GQA model."""
    root = tmp_path_factory.mktemp("export")
    (root / "tokenizer.json").write_text(tok.to_str())
    vocab = tok.get_vocab_size()
    model = build_monolith(CFG, vocab, seed=3).eval()
    meta = {"model": dataclasses.asdict(CFG), "vocab_size": vocab, "tokenizer_sha256": tokenizer_hash(tok)}
    ckpt = save_checkpoint(root / "checkpoint", model.state_dict(), meta, root / "tokenizer.json")
    return model, ckpt, export_hf(ckpt, root / "hf")


@pytest.fixture(scope="module")
def hf_model(exported):
    return transformers.AutoModelForCausalLM.from_pretrained(exported[2]).eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ----- export ----------------------------------------------------------------------------------------


def test_export_writes_a_llama_directory(exported, tok):
    _, _, out = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
         "tokenizer.json", "tokenizer_config.json"])
    assert not list(out.parent.glob(".hf.*")), "no temporary directory left behind"
    config = transformers.AutoConfig.from_pretrained(out)
    assert (config.model_type, config.tie_word_embeddings, config.rms_norm_eps) == ("llama", False, 1e-5)
    assert config.rope_parameters["rope_theta"] == 1000.0
    assert (config.intermediate_size, config.num_key_value_heads, config.vocab_size) == (
        ffn_hidden_size(CFG), 2, tok.get_vocab_size())


def test_export_logits_match_transformers(exported, hf_model, tok):
    model = exported[0]
    for prompt in PROMPTS:
        ids = torch.tensor([encode_prompt(tok, prompt, bos=True, max_seq_len=CFG.max_seq_len)])
        with torch.no_grad():
            ours, theirs = model(ids), hf_model(ids).logits
        assert ours.abs().max() > 1.0, "logits too small for the tolerance to mean anything"
        assert _max_diff(ours, theirs) < 1e-4, prompt


def test_export_greedy_generation_matches(exported, hf_model, tok):
    model = exported[0]
    for prompt in PROMPTS[:3]:
        ids = encode_prompt(tok, prompt, bos=True, max_seq_len=CFG.max_seq_len)
        ours = sample(model, ids, 24, temperature=0, stop_id=EOS_ID)
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=24, do_sample=False)
        theirs = out[0, len(ids):].tolist()
        if EOS_ID in theirs:  # transformers emits the stop token; neuroray's sample() does not
            theirs = theirs[:theirs.index(EOS_ID)]
        assert ours and ours == theirs, prompt


def test_export_detects_a_wrong_rope_layout(exported, hf_model, tok):
    """Negative control: Meta's interleaved q/k layout (what a needless permutation would make) fails 1e-4."""
    model = exported[0]
    ids = torch.tensor([encode_prompt(tok, PROMPTS[0], bos=True, max_seq_len=CFG.max_seq_len)])
    hd = CFG.d_model // CFG.n_heads
    # rotate-half channel order -> interleaved pairs: [0, hd/2, 1, hd/2 + 1, ...] within each head
    perm = torch.arange(hd).view(2, hd // 2).t().reshape(-1)
    wrong = transformers.AutoModelForCausalLM.from_pretrained(exported[2]).eval()
    with torch.no_grad():
        for layer in wrong.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                w = proj.weight.view(-1, hd, CFG.d_model)
                proj.weight.copy_(w[:, perm].reshape(-1, CFG.d_model))
        assert _max_diff(model(ids), wrong(ids).logits) > 1e-2
        assert _max_diff(model(ids), hf_model(ids).logits) < 1e-4


def test_export_tokenizer_gives_neuroray_ids(exported, tok):
    ckpt, out = exported[1], exported[2]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 1, 2)
    for text in PROMPTS + ["  leading spaces\tand\ttabs\n\n", "<|eos|> literal"]:
        assert hf_tok(text).input_ids == encode_prompt(tok, text, bos=True, max_seq_len=10_000)
        bare = hf_tok(text, add_special_tokens=False).input_ids
        assert bare == encode(tok, text)
        assert hf_tok.decode(bare, skip_special_tokens=True) == decode(tok, bare)
    # Re-importing the export's tokenizer names the checkpoint's tokenizer: same ids, same hash.
    _, sha = load_user_tokenizer(out)
    assert sha == json.loads((ckpt / "meta.json").read_text())["tokenizer_sha256"]


def test_export_refuses_a_nonempty_out_unless_forced(exported, tmp_path, capsys):
    ckpt = exported[1]
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert export_main([f"checkpoint={ckpt}", f"out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not empty" in err and "force=true" in err
    assert (out / "notes.txt").is_file(), "a refused export changes nothing"
    assert export_main([f"checkpoint={ckpt}", f"out={out}", "force=true"]) == 0
    assert "export:" in capsys.readouterr().out
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == CFG.n_layers


def test_export_refuses_an_out_that_overlaps_the_checkpoint(exported):
    ckpt = exported[1]
    for out in (ckpt, ckpt / "hf", ckpt.parent):
        with pytest.raises(InteropError, match="overlaps the checkpoint"):
            export_hf(ckpt, out, force=True)
    assert (ckpt / "model.safetensors").is_file()


def test_export_refuses_an_option_llama_cannot_express():
    extended = dataclasses.make_dataclass("Extended", [("qk_norm", bool, dataclasses.field(default=False))],
                                          bases=(ModelConfig,))
    assert model_config_to_hf(extended(), 300)["hidden_size"] == 128  # at its default the option is absent
    with pytest.raises(InteropError, match="model.qk_norm=True"):
        model_config_to_hf(extended(qk_norm=True), 300)


def test_model_config_round_trips():
    for cfg in (CFG, dataclasses.replace(CFG, ffn_hidden=96), ModelConfig()):
        assert model_config_from_hf(model_config_to_hf(cfg, 300), name=cfg.name) == cfg


# ----- import ----------------------------------------------------------------------------------------


def _random_llama(path: Path, tie: bool = False, **save) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norm gains start at 1; random ones check each norm lands in its place
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, **save)
    return model


def _ids(n: int = 20) -> torch.Tensor:
    return torch.randint(0, 300, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return _random_llama(path), path


def test_import_gives_the_same_logits(llama):
    hf, path = llama
    cfg, state = load_hf_llama(path)
    got = (cfg.n_layers, cfg.n_kv_heads, ffn_hidden_size(cfg), cfg.rope_theta, cfg.norm_eps)
    assert got == (3, 2, 96, 5000.0, 1e-6)
    model = build_monolith(cfg, 300)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        ours, theirs = model(_ids()), hf(_ids()).logits
    assert ours.abs().max() > 1.0 and _max_diff(ours, theirs) < 1e-4


@pytest.mark.parametrize("n_stages", [2, 3])
def test_import_split_over_stages_gives_the_same_logits(tmp_path, n_stages):
    """What holders do: each builds its stage and loads only its own tensors (here from a sharded save)."""
    hf = _random_llama(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    cfg, _ = load_hf_llama(tmp_path, keys=())
    ranges = split_layers(cfg.n_layers, n_stages)
    h = _ids()
    for i in range(n_stages):
        stage = build_stage(cfg, 300, i, ranges)
        _, state = load_hf_llama(tmp_path, cfg, 300, keys=stage.state_dict().keys())
        stage.load_state_dict(state, strict=True)
        with torch.no_grad():
            h = stage(h)
    with torch.no_grad():
        assert _max_diff(h, hf(_ids()).logits) < 1e-4


def test_import_tied_embeddings(tmp_path):
    hf = _random_llama(tmp_path, tie=True)
    cfg, state = load_hf_llama(tmp_path)
    model = build_monolith(cfg, 300)
    model.load_state_dict(state, strict=True)
    assert state["lm_head.weight"].data_ptr() != state["embed.weight"].data_ptr(), "trained apart from here on"
    with torch.no_grad():
        assert _max_diff(model(_ids()), hf(_ids()).logits) < 1e-4


def test_import_refuses_pickles(llama, tmp_path):
    hf, _ = llama
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(InteropError, match=r"only pytorch_model\.bin \(a pickle.*safe_serialization") as exc:
        load_hf_llama(tmp_path)
    assert "\n" not in str(exc.value)
    with pytest.raises(InteropError, match="not a safetensors file"):
        load_hf_llama(tmp_path / "pytorch_model.bin")


def test_import_refuses_a_corrupt_safetensors(llama, tmp_path):
    llama[0].config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header....")
    with pytest.raises(InteropError, match="not a readable safetensors file"):
        load_hf_llama(tmp_path)


def test_import_refuses_a_model_that_is_not_llama(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(InteropError, match="model_type='gpt2', not 'llama'"):
        load_hf_llama(tmp_path)


def test_import_refuses_llama_variants_neuroray_cannot_run(llama):
    base = transformers.AutoConfig.from_pretrained(llama[1]).to_dict()
    for change, named in [({"attention_bias": True}, "attention_bias=true"), ({"hidden_act": "gelu"}, "hidden_act"),
                          ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "'linear'")]:
        with pytest.raises(InteropError, match=named):
            model_config_from_hf({**base, **change})


def test_import_refuses_a_config_that_does_not_fit(llama):
    path = llama[1]
    cfg, _ = load_hf_llama(path, keys=())
    both = r"model\.d_model=128 but hidden_size=64.*model\.n_layers=4 but num_hidden_layers=3"
    with pytest.raises(InteropError, match=both):
        load_hf_llama(path, dataclasses.replace(cfg, d_model=128, n_layers=4))
    with pytest.raises(InteropError, match="embeds 300 tokens but the tokenizer has 299"):
        load_hf_llama(path, cfg, vocab_size=299)
    assert load_hf_llama(path, dataclasses.replace(cfg, max_seq_len=32), keys=())[0].max_seq_len == 32


def test_import_refuses_a_tensor_of_the_wrong_shape(llama, tmp_path):
    hf, path = llama
    hf.config.save_pretrained(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:80].clone()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg, _ = load_hf_llama(path, keys=())
    named = r"model\.layers\.1\.mlp\.up_proj\.weight has shape \[80, 64\] but .* \[96, 64\]"
    with pytest.raises(InteropError, match=named):
        load_hf_llama(tmp_path, cfg)
    tensors["model.layers.1.mlp.up_proj.bias"] = torch.zeros(96)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InteropError, match=r"up_proj\.bias, which neuroray's Llama has no place for"):
        load_hf_llama(tmp_path)


# ----- a tokenizer of one's own ----------------------------------------------------------------------


def test_user_tokenizer_file_and_directory(tok, exported, tmp_path):
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    loaded, sha = load_user_tokenizer(tmp_path / "tokenizer.json")
    assert sha == tokenizer_hash(tok) and loaded.encode(PROMPTS[0]).ids == encode(tok, PROMPTS[0])
    assert load_user_tokenizer(tmp_path)[1] == sha


def test_user_tokenizer_refusals(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        load_user_tokenizer(tmp_path / "missing.json")
    with pytest.raises(DataError, match="has no tokenizer.json"):
        load_user_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot load tokenizer"):
        load_user_tokenizer(tmp_path / "tokenizer.json")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    other = Tokenizer(models.BPE(unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.ByteLevel()
    other.train_from_iterator(["some text here"] * 5, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "tokenizer.json").write_text(other.to_str())
    with pytest.raises(DataError, match=r"bos_token '<\|bos\|>' is id None, not 0.*ids 0-2 are '<unk>', '<s>', '</s>'"):
        load_user_tokenizer(tmp_path / "tokenizer.json")
    # A directory may name its own specials; they still have to sit at 0, 1, 2.
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                  "pad_token": "<unk>"}))
    with pytest.raises(DataError, match="bos_token '<s>' is id 1, not 0"):
        load_user_tokenizer(tmp_path)


def test_user_tokenizer_must_match_the_manifest(tok):
    sha = tokenizer_hash(tok)
    manifest = Manifest(format_version=2, tokenizer_file="tokenizer.json", tokenizer_sha256=sha, vocab_size=300,
                        dtype="uint16")
    check_tokenizer_matches_manifest(sha, manifest)
    other = "0" * 64
    with pytest.raises(DataError, match=f"sha256 {other[:12]}.*expects {sha[:12]}.*rebuild the dataset") as exc:
        check_tokenizer_matches_manifest(other, manifest)
    assert "\n" not in str(exc.value)
