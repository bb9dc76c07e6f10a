"""What ponw.reputation costs a round: the held-out scoring of every pseudo-gradient, against the round.

One run of the default demo (2 replicas x 2 stages, H=20) with ``ponw.reputation=true``, a few rounds
(``rounds=4`` unless overridden). Every round the trainer logs how long its scoring took (building the
candidates: fetching theta0 and the pseudo-gradients to the driver, decoding, the attack replay; and the
forward passes: one of the whole model plus one of ranges s.. per pseudo-gradient of range s, on
``ponw.reputation_batch`` sequences). The scoring runs synchronously between the outer step and the
receipts, so its seconds are the time it adds; the round time is the training loop's time over its rounds
(from metrics.jsonl), both from the same run. Appends a row to docs/benchmarks.md.

    flock /tmp/neuroray-cpu.lock python benchmarks/reputation_cost.py [hydra overrides...]
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from benchmarks._report import append_row, machine  # noqa: E402
from neuroray.configure import load_config  # noqa: E402
from neuroray.training.plots import metric_rows  # noqa: E402
from neuroray.training.run import run  # noqa: E402

SCORED = re.compile(r"^reputation: round (\d+): .*\((\d+\.\d+)s\)$")


def main(argv: list[str]) -> None:
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "300000")
    overrides = ["rounds=4", *argv]
    lines: list[str] = []
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config([f"run_dir={Path(tmp) / 'rep'}", "ponw.reputation=true", "progress_bar=false",
                               "sample_tokens=0", *overrides])
            result = run(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
            train, _ = metric_rows(result.run_dir / "metrics.jsonl")
    finally:
        ray.shutdown()
    scored = [float(m.group(2)) for m in map(SCORED.match, lines) if m]
    if not scored:
        raise SystemExit("no round was scored: " + "\n".join(lines[-20:]))
    rounds = cfg.rounds
    loop_s = train[-1]["elapsed_s"]
    round_s = loop_s / rounds
    per_round = sum(scored) / len(scored)
    share = per_round / round_s * 100
    steady = scored[1:] or scored  # the first round also builds the stage modules, once per run
    steady_s = sum(steady) / len(steady)
    steady_share = steady_s / round_s * 100
    candidates = cfg.diloco.replicas * cfg.swarm.num_stages
    print(f"{len(scored)} rounds scored: {', '.join(f'{s:.3f}' for s in scored)} s; mean {per_round:.3f} s per round "
          f"({share:.2f} %), after the first {steady_s:.3f} s ({steady_share:.2f} %) of {round_s:.1f} s per round; "
          f"loop {loop_s:.1f} s, {len(result.recoveries)} recoveries")
    append_row("Reputation: held-out scoring cost per round",
               ["setup", "scoring s per round (each round)", "round s", "share of the round (all rounds)",
                "share after the first round", "machine", "command"],
               [f"{cfg.diloco.replicas} replicas x {cfg.swarm.num_stages} stages, model={cfg.model.name}, H="
                f"{cfg.diloco.inner_steps}, {rounds} rounds, {candidates} pseudo-gradients scored per round on "
                f"{cfg.ponw.reputation_batch} sequences x {cfg.data.seq_len} tokens"
                + (f", {len(result.recoveries)} holder recoveries" if result.recoveries else ""),
                f"{per_round:.3f} ({' / '.join(f'{s:.3f}' for s in scored)})", f"{round_s:.1f}", f"{share:.2f} %",
                f"**{steady_share:.2f} %**",
                machine(),
                f"`flock /tmp/neuroray-cpu.lock python benchmarks/reputation_cost.py{''.join(' ' + a for a in argv)}`"],
               note="One run with ponw.reputation=true (benchmarks/reputation_cost.py). Each round the trainer scores "
                    "every pseudo-gradient on the fixed held-out batch, synchronously between the outer step and the "
                    "receipts: the seconds it logs are the time it adds. The round time is the training loop's time "
                    "over its rounds, from the same run. The first round includes building the stage modules once.")


if __name__ == "__main__":
    main(sys.argv[1:])
