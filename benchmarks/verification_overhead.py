"""What every verification check costs the training at the defaults (issue 21: overhead <= 10 % of step time at
the default spot-check rate): the honest verification run (3 replicas x 2 stages, tiny model, fixed routing or the
command's, ``diloco.inner_steps=h``) with every check at its default (spot checks and hop rechecks at rate 0.1,
the replay check, the straggler rule with the driver's call clock) and with all of them off, alternating, in one
Ray session after an untimed warm-up run. The training seconds are the run's tokens over its tokens/s, so the
ratio is the step-time overhead. Appends one row to docs/benchmarks.md.

    flock /tmp/neuroray-cpu.lock python benchmarks/verification_overhead.py [pairs=3] [rounds=5] [h=20]
        [routing=fixed] [write=1]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

import benchmarks.verification as v  # noqa: E402
from benchmarks._report import append_row, machine  # noqa: E402
from neuroray.config import PonwConfig  # noqa: E402

OFF = ["ponw.replay_check=false", "ponw.straggler_factor=0"]  # with rates 0: no check runs
DEFAULT = PonwConfig()


def timed(tmp: str, label: str, on: bool, rounds: int, h: int, routing: str) -> float:
    base = v.load_config
    v.load_config = lambda args: base([*args, f"diloco.inner_steps={h}", *([] if on else OFF)])
    try:
        rate, hop_rate = (DEFAULT.spot_check_rate, DEFAULT.hop_recheck_rate) if on else (0.0, 0.0)
        return v.real_run(Path(tmp), label, None, None, rounds, rate, 3, routing, hop_rate)["train_s"]
    finally:
        v.load_config = base


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    pairs, rounds, h = int(opts.get("pairs", 3)), int(opts.get("rounds", 5)), int(opts.get("h", 20))
    routing = opts.get("routing", "fixed")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            timed(tmp, "warm", True, 1, h, routing)
            seconds = {"defaults": [], "off": []}
            for i in range(pairs):
                for mode in ("defaults", "off") if i % 2 == 0 else ("off", "defaults"):
                    seconds[mode].append(timed(tmp, f"{mode}{i}", mode == "defaults", rounds, h, routing))
                    print(mode, i, f"{seconds[mode][-1]:.2f}s", flush=True)
    finally:
        ray.shutdown()
    on, off = sum(seconds["defaults"]), sum(seconds["off"])
    ratio = on / off - 1
    print(f"training seconds, checks at their defaults {on:.2f} / all off {off:.2f} ({ratio:+.1%})")
    if opts.get("write", "1") != "0":
        cmd = " ".join(["python benchmarks/verification_overhead.py", *argv])
        append_row("Verification: every check at its default vs none (Ray)",
                   ["routing", "training s, checks at defaults (per run)", "training s, no checks (per run)",
                    "step-time overhead", "goal <= 10 %", "setup", "command"],
                   [routing, " / ".join(f"{x:.2f}" for x in seconds["defaults"]),
                    " / ".join(f"{x:.2f}" for x in seconds["off"]), f"{ratio:+.1%}",
                    "met" if ratio <= 0.10 else "not met",
                    f"3 replicas x 2 stages, tiny d64 L2, robust rule, {rounds} rounds x H={h}, {pairs} pairs "
                    f"alternating, {machine()}", f"`flock /tmp/neuroray-cpu.lock {cmd}`"],
                   note="benchmarks/verification_overhead.py: the honest run with spot checks and hop rechecks at "
                        "their default rates, the replay check and the straggler rule (the driver's call clock) "
                        "on, against the same run with all of them off; training seconds are tokens over "
                        "tokens/s.")


if __name__ == "__main__":
    main(sys.argv[1:])
