"""Config composition: type-checked overrides, one-line errors, plain values for actors."""

import dataclasses
import subprocess
import sys

import pytest

from neuroray.config import TrainConfig
from neuroray.configure import load_config
from neuroray.errors import ConfigError


def _assert_plain(obj):
    """Only dataclasses, builtins and containers of them: nothing from Hydra/OmegaConf."""
    assert "omegaconf" not in type(obj).__module__ and "hydra" not in type(obj).__module__, type(obj)
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _assert_plain(getattr(obj, f.name))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _assert_plain(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            _assert_plain(v)


def test_defaults_compose_to_plain_dataclasses():
    cfg = load_config([])
    assert isinstance(cfg, TrainConfig)
    _assert_plain(cfg)
    assert cfg.diloco.outer_lr == 0.7 and cfg.diloco.outer_momentum == 0.9 and cfg.diloco.nesterov
    assert cfg.diloco.replicas == 2 and cfg.aggregator.name == "mean"


@pytest.mark.parametrize("preset, outer", [("sync", (1.0, 0.0)), ("swept", (0.4, 0.7)), ("tuned", (0.5, 0.5))])
def test_diloco_presets_compose_with_their_outer_optimizer(preset, outer):
    # the benchmarks' tables name these presets; a preset that drifts from docs/diloco.md must fail here
    d = load_config([f"diloco={preset}"]).diloco
    assert (d.outer_lr, d.outer_momentum) == outer


def test_overrides_are_applied_and_typed():
    cfg = load_config(["diloco.inner_steps=7", "swarm.num_stages=3", "model=small", "cluster.cpus_per_holder=0.25"])
    assert cfg.diloco.inner_steps == 7 and isinstance(cfg.diloco.inner_steps, int)
    assert cfg.swarm.num_stages == 3 and cfg.model.name == "small" and cfg.model.n_layers == 8
    assert cfg.cluster.cpus_per_holder == 0.25


@pytest.mark.parametrize(
    "override, expected",
    [
        ("diloco.foo=1", "Key 'foo' not in 'DilocoConfig'"),
        ("+foo=1", "unknown key 'foo'"),
        ("+diloco.bar=1", "unknown key 'diloco.bar'"),
        ("diloco.inner_steps=abc", "diloco.inner_steps=abc"),
        ("seed=1.5", "could not be converted to Integer"),
        ("model=nope", "available: auto, small, tiny"),
        ("swarm.num_stages=9", "more than model.n_layers=4"),
        ("model.d_model=130", "not divisible"),
        ("data.seq_len=1024", "exceeds model.max_seq_len"),
        ("diloco.replicas=0", "diloco.replicas=0 must be positive"),
    ],
)
def test_bad_overrides_give_one_clear_line(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config([override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="valid keys here: name, replicas, inner_steps"):
        load_config(["diloco.foo=1"])


def test_cli_prints_one_error_line_and_exits_2():
    proc = subprocess.run([sys.executable, "-m", "neuroray.train", "diloco.inner_steps=abc"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("neuroray: error: bad config"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help():
    proc = subprocess.run([sys.executable, "-m", "neuroray.train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: python -m neuroray.train" in proc.stdout


def test_the_slow_link_preset_composes_and_a_round_too_short_for_it_is_refused():
    d = load_config(["preset=wan"]).diloco
    assert (d.compression, d.overlap, d.overlap_steps, d.inner_steps) == ("int8", "delayed", 5, 20)
    with pytest.raises(ConfigError, match="must land before the next round ends") as info:
        load_config(["preset=wan", "diloco.inner_steps=4"])
    assert "\n" not in str(info.value)
    assert load_config(["preset=wan", "diloco.inner_steps=4", "diloco.overlap_steps=1"]).diloco.overlap_steps == 1
