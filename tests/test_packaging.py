"""A real wheel: conf/ ships as package data, and the installed package composes its config from
another directory (no checkout beside it)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_job_submit import _fresh_copy

pytestmark = [pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_conf_and_runs_from_elsewhere(tmp_path):
    src = _fresh_copy(tmp_path / "src")  # build from a copy: a build writes build/ and *.egg-info beside it
    # --no-build-isolation: the machine reaches no index but the venv has setuptools; --no-deps: torch is there
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, timeout=300, capture_output=True)
    wheel = next((tmp_path / "dist").glob("neuroray-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = {f"neuroray/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert len(conf) > 30 and conf <= names, sorted(conf - names)
    assert not any(n.startswith(("tests/", "conf/", "notebooks/")) for n in names)
    # a plain (non-editable) install into a target of its own, then run from a directory with no conf/
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, timeout=300, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    where = subprocess.run([sys.executable, "-c", "import neuroray; print(neuroray.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    r = subprocess.run([sys.executable, "-m", "neuroray.train", "--cfg", "job", "model=small", "swarm=router"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "routing: router" in r.stdout and "name: small" in r.stdout
