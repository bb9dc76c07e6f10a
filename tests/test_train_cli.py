"""`python -m neuroray.train` before any training starts: --help, --cfg job, the dependency check,
the run directory (stable, writable, removed when a failed run wrote nothing), and pyproject's
dependencies as the dependency check knows them. No Ray is started here."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from neuroray.training import preflight

ROOT = Path(__file__).resolve().parent.parent


def _train(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "neuroray.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def test_help_lists_every_config_group():
    r = _train("--help")
    groups = sorted(d.name for d in (ROOT / "conf").iterdir() if d.is_dir())
    assert r.returncode == 0 and len(groups) == 11  # aggregator ... swarm, and preset
    for g in groups:
        assert f"\n  {g} " in r.stdout, f"--help does not list the {g} group:\n{r.stdout}"
    assert "router" in r.stdout and "trimmed_mean" in r.stdout  # the options of each group too


def test_cfg_job_prints_the_resolved_config():
    r = _train("--cfg", "job", "rounds=3", "swarm=router")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["rounds"] == 3 and cfg["swarm"]["routing"] == "router" and cfg["model"]["name"] == "tiny"
    assert yaml.safe_load(_train("--cfg=job", "rounds=4").stdout)["rounds"] == 4
    bad = _train("--cfg", "hydra")
    assert bad.returncode == 2 and bad.stderr.startswith("neuroray: error: --cfg hydra")


def test_unwritable_run_dir_is_refused_before_anything_starts(tmp_path):
    r = _train("run_dir=/proc/neuroray-run", cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "run_dir /proc/neuroray-run is not writable" in lines[0]
    assert "ray:" not in r.stdout and "genesis" not in r.stdout


def test_a_failed_run_leaves_no_empty_run_dir(tmp_path):
    r = _train(f"data.source={tmp_path / 'missing.txt'}", f"data.store={tmp_path / 'store'}", cwd=tmp_path)
    assert r.returncode == 2 and "neuroray: error:" in r.stderr, r.stdout + r.stderr
    assert "removed (the run failed before it wrote anything)" in r.stderr
    outputs = tmp_path / "outputs"
    assert not outputs.exists() or not any(outputs.iterdir())


def test_a_python_without_the_dependencies_is_one_line(tmp_path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(bare / "bin" / "python"), "-m", "neuroray.train", "rounds=1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "lacks torch, ray[default]" in lines[0] and "make venv" in lines[0]


def test_the_dependency_check_knows_every_requirement():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in deps}
    assert names == set(preflight.REQUIRED.values())


def test_run_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert preflight.resolve_run_dir("runs/a") == tmp_path.resolve() / "runs" / "a"
    assert preflight.resolve_run_dir("").parent == tmp_path.resolve() / "outputs"
    # what `ray job submit` sets for its entrypoint: outputs leave Ray's temporary working dir
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.setenv("NEURORAY_OUTPUT_ROOT", str(tmp_path / "root"))
    assert preflight.resolve_run_dir("").parent == tmp_path / "root" / "outputs"
    assert preflight.resolve_run_dir("runs/a") == tmp_path / "root" / "runs" / "a"
    assert preflight.resolve_run_dir(str(tmp_path / "abs")) == tmp_path / "abs"
    with pytest.raises(preflight.ConfigError, match="is a URL"):
        preflight.resolve_run_dir("s3://bucket/run")
