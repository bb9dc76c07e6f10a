"""``python -m neuroray.train [hydra overrides]``: compose the config, train, print one line on a user error."""

from __future__ import annotations

import sys

from neuroray.configure import load_config
from neuroray.errors import run_cli
from neuroray.training.run import run

USAGE = """usage: python -m neuroray.train [key=value ...]

Hydra overrides, type-checked against neuroray/config.py, e.g.
  python -m neuroray.train rounds=5 diloco.inner_steps=50 swarm.num_stages=3 model=small
Groups (conf/): model, data, diloco, aggregator, swarm, cluster, checkpoint.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    return run_cli(lambda: run(load_config(argv)) and None)
