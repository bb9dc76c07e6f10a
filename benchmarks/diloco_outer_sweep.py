"""Outer optimizer sweep: DiLoCo's outer learning rate and Nesterov momentum, against the synchronous baseline.

The same setup as ``benchmarks/diloco_comm.py`` (real training path, tiny model, one stage per replica,
equal tokens, ``batch=global``: 300 steps of a global batch of 16 sequences split over M replicas, eval on
the same 16 batches for every run). For each (outer lr, momentum) of the grid it trains the goal rows
(default M=4 H=50 and M=1 H=50) and reports the eval loss relative to synchronous, so the outer setting
of the main table is chosen from measured rows rather than taken from the papers' defaults.
``lr:0`` momentum means plain outer SGD without momentum (``diloco.nesterov=false``).

    flock /tmp/neuroray-cpu.lock python benchmarks/diloco_outer_sweep.py [grid=0.4:0.8,0.4:0.9,...]
                                                   [runs=M=4 H=50,M=1 H=50] [steps4=300] [lr=cosine] [seed=0] [write=1]

Appends one row per (setting, run) to docs/benchmarks.md.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from benchmarks._report import append_row, machine  # noqa: E402
from benchmarks.diloco_comm import one_run, run_of  # noqa: E402

GRID = "0.4:0.8,0.4:0.9,0.7:0.8,0.7:0.9,1.0:0.8,1.0:0.9,1.0:0"


def _setting(lr: str, momentum: str) -> list[str]:
    nesterov = float(momentum) > 0  # Nesterov needs momentum; 0 is plain (averaging at lr 1)
    return [f"diloco.outer_lr={lr}", f"diloco.outer_momentum={momentum}", f"diloco.nesterov={str(nesterov).lower()}"]


def main(argv: list[str]) -> None:
    args = {"batch": "global", "steps4": "300", "seq_len": "64", "mb": "4", "write": "1", "grid": GRID,
            "runs": "M=4 H=50,M=1 H=50", **dict(a.split("=", 1) for a in argv)}
    grid = [tuple(g.split(":")) for g in args["grid"].split(",")]
    wanted = [run_of(label) for label in args["runs"].split(",")]  # exits naming a label it does not know
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "300000")  # as neuroray.train does
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="diloco-sweep-") as tmp:
            sync = one_run(*run_of("sync"), args, tmp)
            rows = [(lr, mom, one_run(*r, args, tmp, extra=_setting(lr, mom), tag=f"lr{lr}-m{mom}"))
                    for lr, mom in grid for r in wanted]
    finally:
        ray.shutdown()
    if args["write"] == "0":
        return
    cmd = "flock /tmp/neuroray-cpu.lock python benchmarks/diloco_outer_sweep.py " + shlex.join(argv)
    for lr, mom, r in [("1.0", "0 (sync)", sync), *rows]:
        loss = r["eval_loss"] / sync["eval_loss"] - 1
        goal = ""
        if r["m"] == 4 and r["h"] == 50:
            goal = f"<= +3%: {'met' if loss <= 0.03 else 'NOT met'}"
        elif r["m"] == 1:
            goal = f"<= sync: {'met' if loss <= 0 else 'NOT met'}"
        append_row(
            "DiLoCo: outer optimizer sweep (global batch fixed" + (", cosine lr" if args.get("lr") == "cosine" else "")
            + ("" if args["steps4"] == "300" else f", {args['steps4']} steps")
            + (f", seed {args['seed']}" if "seed" in args else "") + ")",
            ["outer lr", "outer momentum", "run", "M", "H", "eval loss", "vs sync", "goal", "s", "machine", "command"],
            [lr, mom, r["label"], str(r["m"]), str(r["h"]), f"{r['eval_loss']:.4f}", f"**{loss:+.2%}**", goal,
             f"{r['seconds']:.0f}", machine(), f"`{cmd}`"],
            note=("Setup of `benchmarks/diloco_comm.py` (batch=global): tiny model, 1 stage, "
                  f"{sync['tokens']:,} tokens per run, {args['steps4']} steps of 16 x 64 tokens split over M replicas"
                  + (", cosine inner lr (10 % warmup, decay to a tenth)" if args.get("lr") == "cosine" else "")
                  + ", eval on the same 16 batches. "
                  "Outer momentum is Nesterov; momentum 0 is plain outer SGD (lr 1.0, momentum 0 = averaging). "
                  "The first row of a sweep is its synchronous baseline (`diloco=sync`)."))


if __name__ == "__main__":
    main(sys.argv[1:])
