"""Typed configuration: dataclass sections registered in Hydra's ConfigStore.

This is the only module that knows Hydra exists. Config flows one way:
YAML in ``conf/`` + overrides -> Hydra compose (type-checked against these dataclasses) ->
``OmegaConf.to_object`` -> plain dataclasses. Actors only ever receive the plain dataclasses.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from neuroray.errors import ConfigError

SCHEMA_NAME = "neuroray_schema"


@dataclass
class ModelConfig:
    """Decoder-only transformer shape. The vocabulary size comes from the tokenizer at run time."""

    name: str = "tiny"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_hidden: int = 0  # 0: SwiGLU default, 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02


@dataclass
class DataConfig:
    """Genesis data: where the text comes from, how it is tokenized and sharded, how it is batched."""

    name: str = "embedded"
    source: str = "embedded"  # "embedded" (text that ships with Python) or a local text file / directory
    store: str = "~/.cache/neuroray/genesis"  # built datasets are cached here, keyed by their settings
    vocab_size: int = 4096
    shard_tokens: int = 2_500_000
    eval_shards: int = 1
    seq_len: int = 128
    microbatch_size: int = 8
    num_microbatches: int = 2  # gradient accumulation: microbatches per inner step


@dataclass
class DilocoConfig:
    """R data-parallel pipeline replicas, H inner AdamW steps, then an outer Nesterov step on theta0."""

    name: str = "default"
    replicas: int = 2
    inner_steps: int = 20
    inner_lr: float = 1e-3
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables; clipped per stage holder, on its own parameters
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True


@dataclass
class AggregatorConfig:
    """How the pseudo-gradients of one layer range are reduced into one."""

    name: str = "mean"


@dataclass
class SwarmConfig:
    """How the model is split into stage holders."""

    name: str = "default"
    num_stages: int = 2
    key_dir: str = "~/.cache/neuroray/keys"  # one persistent secp256k1 key per holder name


@dataclass
class ClusterConfig:
    """Where to run and what each stage holder asks of Ray."""

    name: str = "local"
    address: str = ""  # "": RAY_ADDRESS if set, else start a local Ray; "auto" or "ray://..." to connect
    num_cpus: int = 0  # CPUs of a locally started Ray; 0 means all of this machine's
    cpus_per_holder: float = 0.5
    gpus_per_holder: float = 0.0
    torch_threads: int = 1  # intra-op threads inside each holder
    actor_start_timeout_s: float = 180.0
    step_timeout_s: float = 600.0


@dataclass
class CheckpointConfig:
    """Where the final checkpoint goes."""

    name: str = "local"
    dir: str = ""  # "": <run_dir>/checkpoint
    interval_s: float = 120.0
    keep: int = 5


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diloco: DilocoConfig = field(default_factory=DilocoConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 0
    rounds: int = 10  # outer DiLoCo rounds
    run_dir: str = ""  # "": outputs/<timestamp> under the current directory
    log_every: int = 5  # inner steps between progress lines
    sample_prompt: str = "The"
    sample_tokens: int = 40


def conf_dir() -> Path:
    """The ``conf/`` directory: $NEURORAY_CONF_DIR, else the one beside the package (repo checkout)."""
    env = os.environ.get("NEURORAY_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {path}; run from the neuroray checkout or set NEURORAY_CONF_DIR")
    return path


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def _valid_keys(full_key: str) -> str:
    """Field names of the dataclass section that ``full_key`` (e.g. ``diloco.foo``) points into."""
    node = TrainConfig
    for part in full_key.split(".")[:-1]:
        types = {f.name: f.default_factory for f in dataclasses.fields(node) if f.default_factory is not dataclasses.MISSING}
        if part not in types:
            break
        node = types[part]
    return ", ".join(f.name for f in dataclasses.fields(node))


def _one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf errors span several lines and nest their cause; keep the informative parts."""
    parts, full_key = [], ""
    while exc is not None:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        for line in lines[1:]:
            if line.strip().startswith("full_key:"):
                full_key = line.split(":", 1)[1].strip()
        first = lines[0].rstrip(".")
        if "$VALUE" not in first and first not in parts and not (parts and type(exc).__module__ == "builtins"):
            parts.append(first)
        if "Available options in" in str(exc):  # unknown config group option: list the valid ones
            text = str(exc).split("Available options in", 1)[1].split("Config search path")[0]
            parts.append("available: " + ", ".join(t.strip() for t in text.splitlines()[1:] if t.strip()))
        exc = exc.__cause__ or exc.__context__
    if full_key and "not in" in " ".join(parts):
        parts.append(f"valid keys here: {_valid_keys(full_key)}")
    return "; ".join(parts)


def _reject_unknown_keys(values: dict, schema, prefix: str) -> None:
    """``+key=value`` overrides bypass Hydra's struct check; refuse keys the dataclasses lack."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"bad config: unknown key '{prefix}{key}'; valid keys here: {', '.join(fields)} "
                "(see conf/ and neuroray/config.py for keys and types)"
            )
        sub = fields[key].default_factory
        if isinstance(value, dict) and sub is not dataclasses.MISSING and dataclasses.is_dataclass(sub):
            _reject_unknown_keys(value, sub, f"{prefix}{key}.")


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides into a validated :class:`TrainConfig`.

    Raises :class:`ConfigError` with one line naming the bad override and how to fix it.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    _register()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()  # a notebook may have composed before us
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="neuroray"):
            cfg = compose(config_name="config", overrides=list(overrides))
        _reject_unknown_keys(OmegaConf.to_container(cfg, resolve=False), TrainConfig, "")
        obj = OmegaConf.to_object(cfg)
    except Exception as exc:  # Hydra and OmegaConf raise a zoo of types; all mean "bad config"
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(
            f"bad config: {_one_line(exc)} (see conf/ and neuroray/config.py for keys and types)"
        ) from None
    assert isinstance(obj, TrainConfig)
    validate(obj)
    return obj


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    m, d, s, dl = cfg.model, cfg.data, cfg.swarm, cfg.diloco
    positive = {
        "model.d_model": m.d_model, "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
        "model.n_kv_heads": m.n_kv_heads, "model.max_seq_len": m.max_seq_len,
        "data.vocab_size": d.vocab_size, "data.shard_tokens": d.shard_tokens, "data.seq_len": d.seq_len,
        "data.microbatch_size": d.microbatch_size, "data.num_microbatches": d.num_microbatches,
        "swarm.num_stages": s.num_stages, "diloco.replicas": dl.replicas,
        "diloco.inner_steps": dl.inner_steps, "rounds": cfg.rounds, "log_every": cfg.log_every,
        "cluster.torch_threads": cfg.cluster.torch_threads,
        "cluster.actor_start_timeout_s": cfg.cluster.actor_start_timeout_s,
        "cluster.step_timeout_s": cfg.cluster.step_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    if s.num_stages > m.n_layers:
        raise ConfigError(
            f"swarm.num_stages={s.num_stages} is more than model.n_layers={m.n_layers}; "
            "every stage needs at least one layer: lower swarm.num_stages or raise model.n_layers"
        )
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"head size {m.d_model // m.n_heads} must be even for RoPE; change model.n_heads")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} is not a multiple of model.n_kv_heads={m.n_kv_heads}")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if d.vocab_size < 300:
        raise ConfigError(f"data.vocab_size={d.vocab_size} is below 300: byte-level BPE needs 256 bytes + specials")
    if d.vocab_size > 2**32 - 1:
        raise ConfigError(f"data.vocab_size={d.vocab_size} does not fit in uint32 shards")
    if cfg.cluster.cpus_per_holder < 0 or cfg.cluster.gpus_per_holder < 0:
        raise ConfigError("cluster.cpus_per_holder and cluster.gpus_per_holder must be >= 0")
    if not 0 <= dl.outer_momentum < 1:
        raise ConfigError(f"diloco.outer_momentum={dl.outer_momentum} must be in [0, 1)")
    from neuroray.diloco.aggregate import AGGREGATORS  # lazy: aggregate imports torch

    if cfg.aggregator.name not in AGGREGATORS:
        raise ConfigError(
            f"aggregator={cfg.aggregator.name!r} is unknown; choose one of {sorted(AGGREGATORS)}"
        )


def to_dict(cfg) -> dict:
    """Plain nested dict of a config dataclass (for JSON run records)."""
    return dataclasses.asdict(cfg)
