"""Checks a run makes before it starts anything, so a mistake is one line instead of a traceback.

* this Python has the project's dependencies (``ray job submit -- python ...`` runs whatever ``python``
  the cluster's ``ray start`` had on its PATH, often the system one);
* every Ray node's Python has them too (a worker machine set up without ``make venv``);
* the run directory is a stable path the driver can write: never inside Ray's per-job copy of the
  working_dir, which Ray deletes with the session.

Standard library only at import time: it must run under a Python that lacks everything else.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from neuroray.errors import ConfigError, NeurorayError

# import name -> the requirement in pyproject.toml that provides it (tests/test_preflight.py keeps the two equal)
REQUIRED = {
    "torch": "torch", "ray": "ray[default]", "numpy": "numpy", "tokenizers": "tokenizers",
    "datasets": "datasets", "ecdsa": "ecdsa", "coincurve": "coincurve", "fsspec": "fsspec", "s3fs": "s3fs",
    "aiohttp": "aiohttp", "hydra": "hydra-core", "omegaconf": "omegaconf", "safetensors": "safetensors",
    "tqdm": "tqdm", "matplotlib": "matplotlib",
}
# where `ray job submit` outputs go when run_dir is empty or relative: $NEURORAY_OUTPUT_ROOT, else this
JOB_OUTPUT_ROOT = "~/neuroray"
FIX = ("use the project's environment: `make venv`, and start Ray from it (`source .venv/bin/activate` "
       "before `ray start`, on the head and on every worker machine)")


class DependencyError(NeurorayError):
    """A Python (the driver's, or a Ray node's) lacks packages neuroray needs."""


def missing_modules() -> list[str]:
    """The requirements (pyproject.toml spelling) this Python cannot import."""
    return [req for mod, req in REQUIRED.items() if importlib.util.find_spec(mod) is None]


def check_python() -> None:
    """Refuse to start under a Python without the dependencies (one line naming them and the fix)."""
    missing = missing_modules()
    if missing:
        raise DependencyError(f"{sys.executable} lacks {', '.join(missing)}; {FIX}")


def _node_report() -> tuple[str, str, list[str]]:
    return socket.gethostname(), sys.executable, missing_modules()


def check_nodes(timeout_s: float) -> None:
    """Ask every alive Ray node's Python which requirements it lacks; one line for all that lack some.

    Actor constructors on such a node would otherwise fail with a ModuleNotFoundError traceback.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_node_report)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if len(ready) < len(refs):
        raise DependencyError(f"{len(refs) - len(ready)} of {len(refs)} Ray nodes did not answer a dependency "
                              f"check within cluster.node_check_timeout_s={timeout_s:g}; check `ray status`, or "
                              "raise the timeout")
    bad = [f"{host} ({exe}) lacks {', '.join(miss)}" for host, exe, miss in ray.get(refs) if miss]
    if bad:
        raise DependencyError(f"Ray node {'; '.join(bad)}; {FIX}")


def in_ray_job() -> bool:
    """True when this process is the entrypoint of a ``ray job submit`` job."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or "runtime_resources" in Path.cwd().parts


def output_root() -> Path:
    return Path(os.environ.get("NEURORAY_OUTPUT_ROOT") or JOB_OUTPUT_ROOT).expanduser()


def resolve_run_dir(run_dir: str, now: float | None = None) -> Path:
    """The absolute run directory: ``run_dir`` or ``outputs/<timestamp>``, relative to the current
    directory, except under a Ray job, where it is relative to :func:`output_root` on the driver's host."""
    if "://" in run_dir:
        raise ConfigError(f"run_dir={run_dir} is a URL; run_dir must be a local or mounted directory "
                          "(checkpoint.dir takes fsspec URLs for snapshots)")
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(now))
    path = Path(run_dir or f"outputs/{stamp}").expanduser()
    if not path.is_absolute():
        path = (output_root() if in_ray_job() else Path.cwd()) / path
    return path.resolve()


def make_run_dir(path: Path) -> bool:
    """Create ``path`` and prove the driver can write there; returns whether it was created now."""
    created = not path.exists()
    probe = path / ".neuroray-write-test"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"run_dir {path} is not writable on {socket.gethostname()} "
                          f"({exc.strerror or exc}); point run_dir= at a directory this user can write") from None
    return created


def remove_if_empty(path: Path) -> bool:
    """Remove a failed run's directory when it holds nothing but its config.yaml and empty files or
    folders: an empty run directory says nothing and hides the real ones. Returns whether it did."""
    if not path.is_dir():
        return False
    for item in path.rglob("*"):
        if item.is_file() and item.name != "config.yaml" and item.stat().st_size > 0:
            return False
    shutil.rmtree(path, ignore_errors=True)
    return True
