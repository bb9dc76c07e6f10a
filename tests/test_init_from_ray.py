"""``init_from=<HF Llama directory>``: training starts from a real transformers checkpoint, split over holders.

A random ``LlamaForCausalLM`` (made and saved by transformers, safetensors) whose embedding has the Genesis
tokenizer's size. Through ``load_config`` the model becomes the checkpoint's; real Ray holders at 2 stages
each load only their own range, so before any step their merged weights are exactly the checkpoint's and
the pipeline's loss equals transformers' on the same batch. Checkpoints that do not fit are refused with
one line naming what differs, through ``load_config`` and ``run``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from neuroray.configure import load_config  # noqa: E402
from neuroray.errors import ConfigError, InteropError  # noqa: E402
from neuroray.genesis import ensure_dataset  # noqa: E402
from neuroray.model import merge_state_dicts  # noqa: E402
from neuroray.model.hf import load_hf_llama  # noqa: E402
from tests.test_pipeline_ray import _write_corpus  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tmp dir, HF model, its directory, overrides naming the dataset) with the dataset already built."""
    tmp = tmp_path_factory.mktemp("init_from")
    corpus = tmp / "corpus.txt"
    _write_corpus(corpus)
    data = [f"data.source={corpus}", f"data.store={tmp / 'store'}", f"data.cache_dir={tmp / 'cache'}",
            "data.vocab_size=320", "data.shard_tokens=4096", "data.seq_len=32", "data.microbatch_size=2",
            "data.num_microbatches=2"]
    _, manifest = ensure_dataset(load_config(data).data, log=lambda _: None)
    config = transformers.LlamaConfig(
        vocab_size=manifest.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
        initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norm gains: a norm landing in the wrong place shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf_dir = tmp / "hf"
    model.save_pretrained(hf_dir)
    assert (hf_dir / "model.safetensors").is_file()
    overrides = data + ["swarm.num_stages=2", f"swarm.key_dir={tmp / 'keys'}", "diloco.replicas=1",
                        "cluster.cpus_per_holder=0.25", "ponw.enabled=false", f"run_dir={tmp / 'run'}"]
    return tmp, model, hf_dir, overrides


def test_the_checkpoint_sets_the_model(setup):
    _, model, hf_dir, overrides = setup
    cfg = load_config(overrides + [f"init_from={hf_dir}"])
    m = cfg.model
    assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_hidden, m.max_seq_len) == (64, 3, 4, 2, 96, 64)
    assert (m.rope_theta, m.norm_eps) == (5000.0, 1e-6)
    # a model given on the command line that fits is kept; one that does not is refused, naming the keys
    assert load_config(overrides + [f"init_from={hf_dir}", "model.d_model=64", "model.n_layers=3",
                                    "model.n_kv_heads=2", "model.ffn_hidden=96", "model.rope_theta=5000",
                                    "model.norm_eps=1e-6"]).model.d_model == 64
    with pytest.raises(InteropError, match=r"model.d_model=128 but hidden_size=64.*model.n_layers=4 but "
                                           r"num_hidden_layers=3") as exc:
        load_config(overrides + [f"init_from={hf_dir}", "model=tiny"])
    assert "\n" not in str(exc.value)


def test_bad_checkpoints_and_combinations_are_refused(setup):
    tmp, _, hf_dir, overrides = setup
    with pytest.raises(ConfigError, match="drop model=auto"):
        load_config(overrides + [f"init_from={hf_dir}", "model=auto"])
    with pytest.raises(ConfigError, match="resume=true"):
        load_config(overrides + [f"init_from={hf_dir}", "resume=true"])
    with pytest.raises(InteropError, match="does not exist"):
        load_config(overrides + [f"init_from={tmp / 'nowhere'}"])
    gpt = tmp / "gpt2"  # the same tensors under a config that is not a Llama
    shutil.copytree(hf_dir, gpt)
    config = json.loads((gpt / "config.json").read_text())
    (gpt / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(InteropError, match="model_type='gpt2', not 'llama'"):
        load_config(overrides + [f"init_from={gpt}"])
    bent = tmp / "bent"  # one tensor of the wrong shape: named, from the header alone
    shutil.copytree(hf_dir, bent)
    state = load_file(str(bent / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:80].contiguous()
    save_file(state, str(bent / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InteropError, match=r"model.layers.1.mlp.up_proj.weight has shape \[80, 64\] but the model "
                                           r"config needs \[96, 64\]"):
        load_config(overrides + [f"init_from={bent}"])


def test_run_refuses_a_checkpoint_whose_embedding_is_not_the_tokenizers(setup):
    import ray

    from neuroray.training.run import run

    tmp, model, hf_dir, overrides = setup
    other = tmp / "v300"
    config = model.config.to_dict()
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, "vocab_size": 300}))
    small.save_pretrained(other)
    cfg = load_config(overrides + [f"init_from={other}"])
    vocab = model.config.vocab_size
    with pytest.raises(InteropError, match=f"embeds 300 tokens but the tokenizer has {vocab}.*data.tokenizer="):
        run(cfg, log=lambda *a, **k: None)
    assert not ray.is_initialized()  # refused before any actor started


def test_holders_start_from_the_imported_weights(setup, ray_cluster):
    """Two real holders, each loading its own range: theta0 and weights are the checkpoint's, bit for bit,
    and the pipeline's loss on a batch is transformers' on the same batch."""
    from neuroray.swarm.swarm import Swarm

    _, model, hf_dir, overrides = setup
    cfg = load_config(overrides + [f"init_from={hf_dir}"])
    vocab = model.config.vocab_size
    swarm = Swarm(cfg, vocab, None, log=lambda *a: None)
    try:
        pipeline = swarm.replicas[0]
        assert swarm.ranges == [(0, 2), (2, 3)]
        _, want = load_hf_llama(hf_dir)
        for at_theta0 in (False, True):
            parts = ray_cluster.get([h.state_dict.remote(at_theta0=at_theta0) for h in pipeline])
            assert "embed.weight" in parts[0] and "lm_head.weight" not in parts[0]  # each range its own tensors
            got = merge_state_dicts(parts)
            assert got.keys() == want.keys()
            for key, value in want.items():
                assert torch.equal(got[key], value), key
        ids = torch.randint(0, vocab, (2, 33), generator=torch.Generator().manual_seed(1))
        x, y = ids[:, :-1], ids[:, 1:]
        loss, _ = ray_cluster.get(pipeline[1].forward_backward.options(num_returns=2).remote(
            0, pipeline[0].forward.remote(0, x), y, 1.0))
        ray_cluster.get([h.abort_step.remote() for h in pipeline])
        with torch.no_grad():
            logits = model(x).logits
        hf_loss = float(torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1)))
        assert abs(float(loss) - hf_loss) < 1e-4, (float(loss), hf_loss)
    finally:
        swarm.shutdown()
