"""Compose ``conf/config.yaml`` with Hydra overrides into a checked :class:`TrainConfig`.

The only module that knows Hydra exists. ``load_config`` is what every entry point, notebook and
test calls; errors come out as one :class:`ConfigError` line naming the bad override and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from neuroray.config import SCHEMA_NAME, TrainConfig
from neuroray.config_checks import resolve_batch, resolve_init_from, validate
from neuroray.errors import ConfigError


def conf_dir() -> Path:
    """The ``conf/`` directory: $NEURORAY_CONF_DIR, else the package's own ``neuroray/conf`` (in a checkout
    a link to the repo's ``conf/``; in an installed wheel a copy, shipped as package data)."""
    env = os.environ.get("NEURORAY_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent / "conf"
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {path}; reinstall neuroray (pip install .) or set NEURORAY_CONF_DIR "
                          "to a directory like the repo's conf/")
    return path.resolve()


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


def _quote_nan_choice(override: str) -> str:
    """``attack=nan`` -> ``attack='nan'``: Hydra's grammar reads a bare ``nan`` as a float, and a group
    choice must be a string, so the NaN attack could not be chosen as documented."""
    key, sep, value = override.partition("=")
    if sep and value.lower() == "nan" and (conf_dir() / key).is_dir():
        return f"{key}='{value}'"
    return override


def load_config(overrides: list[str] | tuple[str, ...] = (), derive: bool = True) -> TrainConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides into a validated :class:`TrainConfig`.

    ``derive``: set the batch shape's 0 (derived) values (docs/schedule.md); False keeps them as written.

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
            cfg = compose(config_name="config", overrides=[_quote_nan_choice(o) for o in overrides])
        _reject_unknown_keys(OmegaConf.to_container(cfg, resolve=False), TrainConfig, "")
        obj = OmegaConf.to_object(cfg)
    except Exception as exc:  # Hydra and OmegaConf raise a zoo of types; all mean "bad config"
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(
            f"bad config: {_one_line(exc)} (see conf/ and neuroray/config.py for keys and types)"
        ) from None
    assert isinstance(obj, TrainConfig)
    # init_from=: the checkpoint sets the model unless the command line chose one (then it must fit)
    keys = [o.partition("=")[0].lstrip("+~") for o in overrides]
    obj = resolve_init_from(obj, model_given=any(k == "model" or k.startswith("model.") for k in keys))
    # data.num_microbatches=0 / data.microbatch_size=0: derived here, so every reader sees the numbers
    if derive:
        obj = resolve_batch(obj, batch_given="data.batch_size" in keys)
    validate(obj)
    return obj
