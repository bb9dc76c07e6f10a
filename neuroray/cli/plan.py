"""``python -m neuroray.plan [hydra overrides]``: print the plan for the current Ray cluster or a memory list.

    python -m neuroray.plan cluster.nodes=[8GB,8GB,24GB]          # a hypothetical cluster
    python -m neuroray.plan cluster.nodes=[4x64GB+8x80GB]         # four nodes with 8 GPUs of 80 GB
    python -m neuroray.plan cluster.address=auto                  # the running Ray cluster
    python -m neuroray.plan model=tiny cluster.nodes=[2GB,2GB]    # place a fixed model instead

Architecture from the scaling law (``model=auto``, the default here) or from ``model=...``, then
the layer ranges with their memory per holder, and where every holder of every replica goes.
"""

from __future__ import annotations

import os
import sys

from neuroray.errors import NeurorayError
from neuroray.planner.report import format_plan

USAGE = __doc__.split("\n\n", 2)[1] if __doc__ else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m neuroray.plan [key=value ...]\n\n" + USAGE)
        return 0
    started = False
    try:
        from neuroray.configure import load_config
        from neuroray.planner.cluster import plan_for_cluster

        overrides = list(argv)
        if not any(a.startswith("model=") for a in overrides):
            overrides.insert(0, "model=auto")  # planning means sizing, unless a model is named
        cfg = load_config(overrides)
        if not cfg.cluster.nodes:
            import ray

            address = cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(address="local", num_cpus=cfg.cluster.num_cpus or None, include_dashboard=False,
                         log_to_driver=False)
            started = True
        print(format_plan(plan_for_cluster(cfg)))
    except NeurorayError as exc:
        print(f"neuroray: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started:
            import ray

            ray.shutdown()
    return 0
