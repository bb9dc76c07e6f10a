"""``python -m neuroray.train [hydra overrides]``: compose the config, train, print one line on a user error.

Before anything starts it checks this Python's dependencies, resolves the run directory to a stable,
writable path (printed at the start and at the end), and, when it joins a cluster, asks every node's
Python for missing dependencies. A run that fails before it wrote anything leaves no run directory.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from neuroray.errors import ConfigError, run_cli
from neuroray.training import preflight

USAGE = """usage: python -m neuroray.train [--cfg job] [key=value ...]

Hydra overrides, type-checked against neuroray/config.py (every key: docs/config.md), e.g.
  python -m neuroray.train rounds=5 diloco.inner_steps=50 swarm.num_stages=3 model=small
  --cfg job    print the resolved config as YAML and exit
Groups (group=option picks a file of conf/<group>/):
"""


def _groups() -> str:
    from neuroray.configure import conf_dir

    root = conf_dir()
    return "".join(f"  {d.name:<11} {', '.join(sorted(p.stem for p in d.glob('*.yaml')))}\n"
                   for d in sorted(root.iterdir()) if d.is_dir())


def _cfg_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """Hydra's ``--cfg job`` (also ``--cfg=job``, ``-c job``): which config to print, and the rest."""
    for i, arg in enumerate(argv):
        if arg in ("--cfg", "-c"):
            value = argv[i + 1] if i + 1 < len(argv) else ""
            return value, argv[:i] + argv[i + 2:]
        if arg.startswith("--cfg="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def _train(argv: list[str]) -> None:
    preflight.check_python()  # before the imports below: under a bare Python they would be a traceback
    from neuroray.config import to_yaml
    from neuroray.configure import load_config

    which, overrides = _cfg_flag(argv)
    if which is not None and which != "job":
        raise ConfigError(f"--cfg {which or '(nothing)'}: only `--cfg job` (the resolved training config) exists")
    cfg = load_config(overrides)
    if which == "job":
        print(to_yaml(cfg), end="")
        return
    from neuroray.training.run import run

    run_dir = preflight.resolve_run_dir(cfg.run_dir)
    created = preflight.make_run_dir(run_dir)
    print(f"run dir: {run_dir}", flush=True)
    joined = _join_cluster(cfg)
    try:
        run(replace(cfg, run_dir=str(run_dir)))
    except BaseException:
        if created and preflight.remove_if_empty(run_dir):
            print(f"run dir: {run_dir} removed (the run failed before it wrote anything)", file=sys.stderr)
        elif run_dir.exists():
            print(f"run dir: {run_dir} (kept: holds what the run wrote before it failed)", file=sys.stderr)
        raise
    finally:
        if joined:
            import ray

            ray.shutdown()
    print(f"run dir: {run_dir}")


def _join_cluster(cfg) -> bool:
    """Connect to the cluster named by cluster.address or RAY_ADDRESS (``ray job submit`` sets it) and
    check every node's Python; run() then uses this connection. False: no cluster named, run() starts one."""
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        return False
    import ray

    ray.init(address=address)
    print(f"ray: connected to {address}", flush=True)
    try:
        preflight.check_nodes(cfg.cluster.node_check_timeout_s)
    except BaseException:
        ray.shutdown()
        raise
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE + _groups(), end="")
        return 0
    return run_cli(lambda: _train(list(argv)))

