"""benchmarks/_lab_driver.py on lab host h0 for benchmarks/lab_torchft.py, with two additions:

* ``--hold``: before the run, an idle actor pinned to this node takes every CPU it advertises, so that Ray
  places the holders (``cluster.cpus_per_holder`` = a whole host) on the other hosts: the driver and the
  Lighthouse's host h0 holds no replica, as in the torchft arm. The outer-step tasks ask for no CPU, so they
  still run wherever Ray puts them.
* ``--kill-at N``: once the driver has recorded inner step N (0-based), replica 1's holder (``r1-s0``) is
  ``ray.kill``ed with restart allowed (Ray restarts it in its placement group, from its snapshot), and
  ``EV {"kind": "kill", "t": ...}`` is printed when the kill call has returned: the recovery clock's start.

    python benchmarks/_lab_sbs_driver.py [--hold] [--kill-at N] OVERRIDES...
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _lab_driver  # noqa: E402


@ray.remote
class _Hold:
    def ready(self) -> bool:
        return True


def hold_this_node() -> object:
    """An actor on this node holding all its CPUs; the caller keeps the handle alive for the run."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    cpus = next(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node)
    actor = _Hold.options(num_cpus=cpus, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
    ray.get(actor.ready.remote(), timeout=120)
    return actor


def main(argv: list[str]) -> None:
    hold, kill_at = "--hold" in argv, None
    argv = [a for a in argv if a != "--hold"]
    if "--kill-at" in argv:
        i = argv.index("--kill-at")
        kill_at = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    overrides = dict(a.split("=", 1) for a in argv)
    prefix = f"neuroray-{Path(overrides['run_dir']).name}-"  # the holders' actor names (neuroray/training/run.py)
    ray.init()
    keep = hold_this_node() if hold else None
    killed = []

    def emit(kind: str, step: int) -> None:
        _lab_driver._emit(kind, step)
        if kind == "done" and step == kill_at and not killed:
            ray.kill(ray.get_actor(f"{prefix}r1-s0"), no_restart=False)
            killed.append(time.time())
            print("EV " + json.dumps({"t": killed[0], "kind": "kill", "step": step}), flush=True)

    _lab_driver.main(argv, emit)
    del keep


if __name__ == "__main__":
    main(sys.argv[1:])
