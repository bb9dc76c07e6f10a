"""What the coordinator's clock of fixed pipelines' calls (neuroray/training/call_clock.py) costs the training:
the honest verification run (3 replicas x 2 stages, tiny model, no spot checks or hop rechecks) with the clock on
(``ponw.straggler_factor=2.5``) and off (``0``: no clock, no straggler rule), alternating, in one Ray session after
an untimed warm-up run. Prints each run's training seconds (tokens over tokens/s) and the sums.

    flock /tmp/neuroray-cpu.lock python benchmarks/call_clock_cost.py [pairs=3] [rounds=20]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

import benchmarks.verification as v  # noqa: E402


def timed(tmp: str, label: str, factor: float, rounds: int) -> float:
    base = v.load_config
    v.load_config = lambda args: base([*args, f"ponw.straggler_factor={factor}"])
    try:
        return v.real_run(Path(tmp), label, None, None, rounds, 0.0, 3, "fixed", 0.0)["train_s"]
    finally:
        v.load_config = base


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    pairs, rounds = int(opts.get("pairs", 3)), int(opts.get("rounds", 20))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            timed(tmp, "warm", 2.5, 1)
            seconds = {"on": [], "off": []}
            for i in range(pairs):
                for mode, factor in (("on", 2.5), ("off", 0.0)):
                    seconds[mode].append(timed(tmp, f"{mode}{i}", factor, rounds))
                    print(mode, i, f"{seconds[mode][-1]:.2f}s", flush=True)
    finally:
        ray.shutdown()
    on, off = sum(seconds["on"]), sum(seconds["off"])
    print(f"training seconds, clock on {on:.2f} / off {off:.2f} ({on / off - 1:+.1%})")


if __name__ == "__main__":
    main(sys.argv[1:])
