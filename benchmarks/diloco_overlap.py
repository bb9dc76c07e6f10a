"""The outer step overlapped with the next inner steps (``diloco.overlap``), against the blocking outer step.

On one host, the tiny model in 2 replicas x 2 stages, every run trains the same tokens (``steps`` inner steps,
the same data and seed) through the real training path. Runs: ``no sync`` (one round of all the steps: a single
outer step at the end, the inner-step wall time every other run is measured against), ``none`` (blocking,
today's behaviour), ``delayed`` and ``eager`` (the outer step lands ``tau`` inner steps after each round's end).
Reported per run: the training loop's wall time, the fraction of it the outer steps add over ``no sync``
(blocking figure beside the overlapped ones), and the final eval loss against the blocking run's (goal: within
+1 %), at every seed given.

    flock /tmp/neuroray-cpu.lock python benchmarks/diloco_overlap.py [steps=120] [h=20] [tau=1] [seeds=0,1] [write=1]

Appends a row per run to docs/benchmarks.md.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from benchmarks._report import append_row, machine  # noqa: E402
from neuroray.configure import load_config  # noqa: E402
from neuroray.training.run import run  # noqa: E402

SECTION = "DiLoCo: the outer step overlapped with the inner steps (one host)"


def _overrides(mode: str, args: dict, seed: int, run_dir: str) -> list[str]:
    steps, h = int(args["steps"]), int(args["h"])
    h = steps if mode == "no sync" else h
    return [f"diloco.overlap={'none' if mode == 'no sync' else mode}", f"diloco.overlap_steps={args['tau']}",
            f"diloco.inner_steps={h}", f"rounds={steps // h}", f"seed={seed}", "diloco.replicas=2",
            "swarm.num_stages=2", "model.n_layers=4", "data.seq_len=64", "data.microbatch_size=4",
            "data.num_microbatches=2", "cluster.cpus_per_holder=0.5", "checkpoint.interval_s=0",
            "checkpoint.every_round=false", "ponw.enabled=false", f"run_dir={run_dir}", "sample_tokens=1",
            f"log_every={steps}", "progress_bar=false"]


def one_run(mode: str, args: dict, seed: int, tmp: str) -> dict:
    cfg = load_config(_overrides(mode, args, seed, str(Path(tmp) / f"{mode.replace(' ', '_')}-{seed}")))
    result = run(cfg, log=lambda *a, **k: None)
    wall = result.tokens / result.tokens_per_s  # the training loop alone: no start-up, eval or checkpoint
    out = {"mode": mode, "seed": seed, "wall_s": wall, "eval_loss": result.eval_loss, "rounds": len(result.comm),
           "sync_bytes": result.sync_bytes}
    print(f"seed {seed} {mode:>8}: loop {wall:.1f}s, eval {result.eval_loss:.4f}, {len(result.comm)} outer steps",
          flush=True)
    return out


def main(argv: list[str]) -> None:
    args = {"steps": "120", "h": "20", "tau": "1", "seeds": "0", "write": "1", **dict(a.split("=", 1) for a in argv)}
    seeds = [int(s) for s in args["seeds"].split(",")]
    modes = ["no sync", "none", "delayed", "eager"]
    for mode in modes:  # a bad config fails here, before any run trains
        load_config(_overrides(mode, args, seeds[0], "unused"))
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "300000")  # as neuroray.train does
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    cmd = "flock /tmp/neuroray-cpu.lock python benchmarks/diloco_overlap.py " + shlex.join(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="diloco-overlap-") as tmp:
            for seed in seeds:  # rows per seed as it finishes
                results = [one_run(mode, args, seed, tmp) for mode in modes]
                if args["write"] != "0":
                    _write(results, args, modes, cmd)
    finally:
        ray.shutdown()


def _write(results: list[dict], args: dict, modes: list[str], cmd: str) -> None:
    note = ("Tiny model (4 layers) in 2 replicas x 2 stages on one host, 2 x 2 microbatches of 4 x 64 tokens a step, "
            "every run the same tokens. `outer step adds`: the loop's wall time over the `no sync` run's (one "
            "outer step at the very end), as a fraction of it. Eval loss vs the blocking run (`none`) at the same "
            "seed; goal <= +1 %. Outer traffic crosses the local object store here, so this is the floor of what "
            "the outer step costs; the lab (docs/lab.md) shapes real links.")
    for seed in sorted({r["seed"] for r in results}):
        by = {r["mode"]: r for r in results if r["seed"] == seed}
        base, blocking = by["no sync"], by["none"]
        for mode in modes:
            r = by[mode]
            adds = r["wall_s"] / base["wall_s"] - 1
            loss = r["eval_loss"] / blocking["eval_loss"] - 1
            goal = ""
            if mode in ("delayed", "eager"):
                goal = (f"loss <= +1 %: {'met' if loss <= 0.01 else 'NOT met'}; "
                        f"adds {adds:+.1%} vs blocking {blocking['wall_s'] / base['wall_s'] - 1:+.1%}")
            append_row(SECTION, ["run", "seed", "H / tau", "outer steps", "loop wall s", "outer step adds",
                                 "eval loss", "vs blocking", "goal", "machine", "command"],
                       [mode, str(seed), f"{args['steps'] if mode == 'no sync' else args['h']} / {args['tau']}",
                        str(r["rounds"]), f"{r['wall_s']:.1f}", "-" if mode == "no sync" else f"{adds:+.1%}",
                        f"{r['eval_loss']:.4f}", "-" if mode in ("no sync", "none") else f"{loss:+.2%}", goal,
                        machine(), f"`{cmd}`"], note=note)


if __name__ == "__main__":
    main(sys.argv[1:])
