"""Hugging Face Llama interop: a neuroray checkpoint as a ``transformers`` Llama directory, and back.

neuroray's decoder is Llama's: pre-norm RMSNorm (gain only, normalised in float32), RoPE in the
"rotate half" layout (channel j pairs with j + head_dim/2, HF's ``rotate_half``), GQA whose query heads
are grouped contiguously per key/value head, SwiGLU ``w2(silu(w1 x) * w3 x)``, separate embedding and
LM head, no biases. The tensors therefore map one to one under new names, with no q/k permutation:
the permutation in transformers' ``convert_llama_weights_to_hf.py`` turns Meta's *interleaved* pairs
into rotate-half, and neuroray already rotates halves. ``tests/test_hf.py`` checks it by logits.

Pure library: no Ray, nothing unpickled (weights are read only from safetensors), and an export is
written into a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import uuid
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from neuroray.config import ModelConfig
from neuroray.errors import InteropError
from neuroray.model.layers import Block, ffn_hidden_size

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
_TOP_INV = {v: k for k, v in _TOP.items()}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# ModelConfig fields with a LlamaConfig counterpart (name and init_std only describe the run).
# activation_checkpointing is how a model was trained, not what it computes: nothing to export
_MAPPED = {"name", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len", "rope_theta",
           "norm_eps", "init_std", "activation_checkpointing"}


def hf_key(key: str) -> str:
    """The transformers ``LlamaForCausalLM`` name of neuroray's monolith parameter ``key``."""
    if key in _TOP:
        return _TOP[key]
    _, layer, rest = key.split(".", 2)
    if rest not in _LAYER:
        raise InteropError(f"neuroray parameter {key} has no counterpart in transformers' Llama; "
                           "export a model without it")
    return f"model.layers.{layer}.{_LAYER[rest]}"


def neuroray_key(name: str) -> str | None:
    """neuroray's monolith key for the HF Llama tensor ``name``; None if neuroray has no such tensor."""
    if name in _TOP_INV:
        return _TOP_INV[name]
    m = _HF_LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_INV:
        return f"layers.{m.group(1)}.{_LAYER_INV[m.group(2)]}"
    return None


def expected_shapes(cfg: ModelConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Every monolith parameter's shape. Layer shapes come from a meta-device Block (no memory, one truth)."""
    with torch.device("meta"):
        block = Block(cfg)
    shapes = {"embed.weight": (vocab_size, cfg.d_model), "norm.weight": (cfg.d_model,),
              "lm_head.weight": (vocab_size, cfg.d_model)}
    for i in range(cfg.n_layers):
        shapes.update({f"layers.{i}.{k}": tuple(p.shape) for k, p in block.state_dict().items()})
    return shapes


# ----- configs ---------------------------------------------------------------------------------------


def model_config_to_hf(cfg: ModelConfig, vocab_size: int, bos_id: int = 0, eos_id: int = 1,
                       pad_id: int = 2) -> dict:
    """The ``config.json`` of a transformers ``LlamaForCausalLM`` computing exactly ``cfg``'s function."""
    for f in dataclasses.fields(cfg):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if f.name not in _MAPPED and getattr(cfg, f.name) != default:
            raise InteropError(f"model.{f.name}={getattr(cfg, f.name)!r} has no equivalent in transformers' "
                               "LlamaConfig; only a model trained without it can be exported")
    theta = float(cfg.rope_theta)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": ffn_hidden_size(cfg),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,  # HF's default is 1e-6, neuroray's 1e-5: always written out
        # rope_parameters is transformers >= 5; rope_theta is what 4.x reads (5.x folds it in).
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",
    }


def _require(config: dict, key: str, where: str):
    if key not in config:
        raise InteropError(f"{where} has no {key!r}; it is not a complete Llama config.json")
    return config[key]


def model_config_from_hf(config: dict, name: str = "hf", where: str = "config.json") -> ModelConfig:
    """The ModelConfig of a transformers Llama ``config.json``; InteropError naming what neuroray cannot run."""
    if config.get("model_type") != "llama":
        raise InteropError(f"{where} has model_type={config.get('model_type')!r}, not 'llama': neuroray's decoder "
                           "is Llama's; import a LlamaForCausalLM checkpoint")
    d, heads = int(_require(config, "hidden_size", where)), int(_require(config, "num_attention_heads", where))
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    head_dim = config.get("head_dim") or d // heads
    unsupported = []
    if config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={config['hidden_act']!r} (neuroray's SwiGLU gates with silu)")
    unsupported += [f"{b}=true (neuroray's layers have no biases)" for b in ("attention_bias", "mlp_bias")
                    if config.get(b)]
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        unsupported.append(f"rope_type={rope.get('rope_type', rope.get('type'))!r} (neuroray has plain RoPE only)")
    if float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) != 1.0:
        unsupported.append("partial_rotary_factor != 1 (neuroray rotates the whole head)")
    if head_dim * heads != d:
        unsupported.append(f"head_dim={head_dim} with hidden_size={d} and {heads} heads "
                           "(neuroray's head size is hidden_size / heads)")
    if unsupported:
        raise InteropError(f"{where}: {'; '.join(unsupported)}; neuroray cannot run this Llama variant, "
                           "import a plain Llama")
    probe = ModelConfig(d_model=d)
    ffn = int(_require(config, "intermediate_size", where))
    return ModelConfig(
        name=name,
        d_model=d,
        n_layers=int(_require(config, "num_hidden_layers", where)),
        n_heads=heads,
        n_kv_heads=int(config.get("num_key_value_heads") or heads),
        ffn_hidden=0 if ffn == ffn_hidden_size(probe) else ffn,  # 0 is neuroray's own default width
        max_seq_len=int(config.get("max_position_embeddings", 2048)),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),  # absent means HF's default, not neuroray's
        init_std=float(config.get("initializer_range", 0.02)),
    )


def _check_fits(got: ModelConfig, want: ModelConfig, where: str) -> None:
    pairs = [("d_model", "hidden_size", got.d_model, want.d_model),
             ("n_layers", "num_hidden_layers", got.n_layers, want.n_layers),
             ("n_heads", "num_attention_heads", got.n_heads, want.n_heads),
             ("n_kv_heads", "num_key_value_heads", got.n_kv_heads, want.n_kv_heads),
             ("ffn_hidden", "intermediate_size", ffn_hidden_size(got), ffn_hidden_size(want)),
             ("rope_theta", "rope_theta", got.rope_theta, want.rope_theta),
             ("norm_eps", "rms_norm_eps", got.norm_eps, want.norm_eps)]
    diff = [f"model.{ours}={w} but {theirs}={g}" for ours, theirs, g, w in pairs if g != w]
    if diff:
        raise InteropError(f"{where} does not fit the model config: {', '.join(diff)}; drop those model overrides "
                           "(the checkpoint sets the shape) or import a checkpoint of this shape")


def _check_shapes(shapes: dict[str, tuple], expected: dict[str, tuple], name, where: str, fix: str) -> None:
    """One-line InteropError for the first missing, unexpected or misshapen tensor; ``name`` spells keys."""
    for key, shape in expected.items():
        if key not in shapes:
            raise InteropError(f"{where} has no tensor {name(key)}; {fix}")
        if tuple(shapes[key]) != tuple(shape):
            raise InteropError(f"{where}: {name(key)} has shape {list(shapes[key])} but the model config needs "
                               f"{list(shape)}; {fix}")
    extra = sorted(shapes.keys() - expected.keys())
    if extra:
        raise InteropError(f"{where} has tensors the model config has no place for ({name(extra[0])}, "
                           f"{len(extra)} in all); {fix}")


# ----- export ----------------------------------------------------------------------------------------


def _check_out(out: Path, checkpoint: Path, force: bool) -> None:
    out_r, ckpt_r = out.resolve(), checkpoint.resolve()
    if out_r == ckpt_r or out_r in ckpt_r.parents or ckpt_r in out_r.parents:
        raise InteropError(f"out={out} overlaps the checkpoint {checkpoint} being exported; choose another directory")
    if out.exists() and not out.is_dir():
        raise InteropError(f"out={out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InteropError(f"out={out} exists and is not empty; pass force=true to replace it, "
                           "or choose a new directory")


def _tokenizer_files(tok, max_seq_len: int) -> dict[str, dict]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` for neuroray's ids 0, 1, 2 = BOS, EOS, PAD."""
    from neuroray.genesis.tokenizer import BOS_ID, EOS_ID, PAD_ID

    specials = {"bos_token": tok.id_to_token(BOS_ID), "eos_token": tok.id_to_token(EOS_ID),
                "pad_token": tok.id_to_token(PAD_ID)}
    config = {
        # The generic fast class loads tokenizer.json as it is; a model-specific class (LlamaTokenizerFast)
        # would rebuild the pipeline with its own pre-tokenizer and change the ids.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        # What tokenizer.json's post-processor does (transformers 4.x reads these, 5.x the file).
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # byte-level BPE decodes exactly; "cleaning" would alter text
        "model_max_length": max_seq_len,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


def _with_bos(tok):
    """``tok`` whose post-processor puts BOS first, as every training document starts.

    transformers 5 ignores ``add_bos_token`` when a tokenizer.json exists: only the file's post-processor
    adds specials. neuroray itself never runs post-processors (it frames documents itself), and
    :func:`neuroray.genesis.own_tokenizer.load_user_tokenizer` drops them, so the export still hashes
    to the model's tokenizer.
    """
    from tokenizers import Tokenizer, processors

    from neuroray.genesis.tokenizer import BOS_ID

    bos = tok.id_to_token(BOS_ID)
    out = Tokenizer.from_str(tok.to_str())
    out.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                                       special_tokens=[(bos, BOS_ID)])
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write checkpoint ``checkpoint_dir`` as a directory ``AutoModelForCausalLM``/``AutoTokenizer`` load.

    ``out_dir`` must not exist or be empty unless ``force``; it appears complete or not at all.
    """
    from neuroray.checkpoint import TOKENIZER_FILE
    from neuroray.inference.loading import load_for_inference
    from neuroray.genesis.tokenizer import BOS_ID, EOS_ID, PAD_ID

    loaded = load_for_inference(checkpoint_dir)  # also refuses a tokenizer that is not the model's
    out = Path(out_dir).expanduser()
    _check_out(out, loaded.path, force)
    cfg, vocab = loaded.model, loaded.vocab_size
    config = model_config_to_hf(cfg, vocab, BOS_ID, EOS_ID, PAD_ID)
    _check_shapes({k: tuple(v.shape) for k, v in loaded.state.items()}, expected_shapes(cfg, vocab), str,
                  f"checkpoint {loaded.path}", "it is damaged or was edited: use the directory a training run wrote")
    tensors = {hf_key(k): v.detach().cpu().contiguous() for k, v in loaded.state.items()}
    config["dtype"] = config["torch_dtype"] = str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})  # transformers checks "format"
        (tmp / TOKENIZER_FILE).write_text(_with_bos(loaded.tokenizer).to_str())
        files = {CONFIG_FILE: config, "generation_config.json": generation,
                 **_tokenizer_files(loaded.tokenizer, cfg.max_seq_len)}
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        _swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


# ----- import ----------------------------------------------------------------------------------------


def _weight_files(path: Path) -> tuple[Path, list[Path]]:
    """(directory holding config.json, the safetensors files); refuses pickles without opening them."""
    from neuroray.genesis.manifest import plain_name

    if path.is_file():
        if path.suffix != ".safetensors":
            raise InteropError(f"init_from={path} is not a safetensors file and neuroray never unpickles weights; "
                               "re-save it with transformers' save_pretrained(dir, safe_serialization=True)")
        return path.parent, [path]
    if not path.is_dir():
        raise InteropError(f"init_from={path} does not exist; pass a Hugging Face Llama directory")
    if (path / INDEX_FILE).is_file():
        try:
            names = sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise InteropError(f"{path / INDEX_FILE} is unreadable ({exc!r}); re-save the checkpoint") from None
        bad = [n for n in names if not (plain_name(n) and n.endswith(".safetensors"))]
        if bad:  # names come from the file: never follow one out of the directory
            raise InteropError(f"{path / INDEX_FILE} names {bad[0]!r}, not a safetensors file beside it; "
                               "re-save the checkpoint")
        return path, [path / n for n in names]
    if (path / WEIGHTS_FILE).is_file():
        return path, [path / WEIGHTS_FILE]
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise InteropError(f"init_from={path} holds only {pickles[0]} (a pickle, which neuroray never loads); "
                           "re-save it with transformers' save_pretrained(dir, safe_serialization=True)")
    raise InteropError(f"init_from={path} has no {WEIGHTS_FILE}; pass a Hugging Face Llama directory")


def load_hf_llama(path: str | Path, model_cfg: ModelConfig | None = None, vocab_size: int | None = None,
                  keys=None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A transformers Llama directory (or its ``.safetensors`` file) as (ModelConfig, float32 monolith state).

    ``model_cfg``: the shape the caller wants; any architectural difference is refused, naming it, and
    ``model_cfg`` itself is returned. ``vocab_size``: the embedding rows required (None: the checkpoint's).
    ``keys``: load only these monolith keys (a holder's range) after checking every tensor's shape.
    Tied embeddings (no ``lm_head.weight``) give the head a copy of the embedding.
    """
    src = Path(path).expanduser()
    root, files = _weight_files(src)
    where = f"init_from={src}"
    try:
        config = json.loads((root / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise InteropError(f"{where}: cannot read {root / CONFIG_FILE} ({exc.__class__.__name__}); "
                           "a Hugging Face checkpoint needs its config.json") from None
    cfg = model_config_from_hf(config, name=model_cfg.name if model_cfg else "hf", where=f"{root / CONFIG_FILE}")
    if model_cfg is not None:
        _check_fits(cfg, model_cfg, where)
        cfg = model_cfg
    with ExitStack() as stack:
        where_is: dict[str, tuple] = {}  # neuroray key -> (open file, HF name)
        for f in files:
            try:
                handle = stack.enter_context(safe_open(str(f), framework="pt"))
            except Exception as exc:  # safetensors raises its own error types for a bad header
                raise InteropError(f"{where}: {f.name} is not a readable safetensors file ({str(exc)[:80]}); "
                                   "re-save the checkpoint with safe_serialization=True") from None
            for name in handle.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # older exports store the RoPE table; neuroray derives it from rope_theta
                key = neuroray_key(name)
                if key is None:
                    raise InteropError(f"{where} has tensor {name}, which neuroray's Llama has no place for; "
                                       "import a plain Llama (no biases, no extra modules)")
                where_is[key] = (handle, name)
        tied = "lm_head.weight" not in where_is and bool(config.get("tie_word_embeddings"))
        if tied and "embed.weight" in where_is:
            where_is["lm_head.weight"] = where_is["embed.weight"]
        shapes = {k: tuple(h.get_slice(n).get_shape()) for k, (h, n) in where_is.items()}
        rows = shapes.get("embed.weight", (0,))[0]
        if vocab_size is not None and rows != vocab_size:
            raise InteropError(f"{where} embeds {rows} tokens but the tokenizer has {vocab_size}; "
                               "train with the checkpoint's own tokenizer (data.tokenizer=<its directory>)")
        _check_shapes(shapes, expected_shapes(cfg, vocab_size or rows), hf_key, where,
                      "the checkpoint does not match its config.json or the model config: re-export it")
        wanted = list(where_is) if keys is None else list(keys)
        unknown = [k for k in wanted if k not in where_is]
        assert not unknown, f"keys {unknown[:3]} are not monolith parameters"
        # get_tensor may hand out views of the mapped file (a tied head then aliases the embedding): copy, so
        # the state owns its memory and a tied head is its own tensor, trained apart from here on.
        state = {k: where_is[k][0].get_tensor(where_is[k][1]).to(torch.float32, copy=True) for k in wanted}
    return cfg, state
