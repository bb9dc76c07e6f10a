"""How long each round's outer step waits before it starts, read from Ray's timeline: the range's long-lived
actor (diloco.outer_step_in=actor, the default) beside a fresh Ray task per round (=task, as before), in one
benchmark run.

A short real run per arm (the tiny model, one stage, a few rounds) in a local Ray session started here.
Per round, from ``ray.timeline()``: the idle gap from the last pseudo-gradient ready (the end of the
round's last ``pseudo_gradient``/``send_pseudo_gradient`` call) to the start of the outer step, and the
step's own duration. Two Ray sessions: one with Ray's default idle-worker killing (a task worker idle 1 s
is stopped once actors fill the CPUs, as on a plain ``ray start`` node) running both arms, and one with
``RAY_idle_worker_killing_time_threshold_ms=300000`` (the lab's stopgap) running the task arm. The arms'
eval losses must be equal: the actor runs the very same step.

    flock /tmp/neuroray-cpu.lock python benchmarks/outer_step_idle.py [hydra overrides...]

With several stages (swarm.num_stages=N) each range's gap is counted from the last pseudo-gradient of any
range ready before its step started: a lower bound of its own gap.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from benchmarks._report import append_row, machine  # noqa: E402
from neuroray.configure import load_config  # noqa: E402
from neuroray.training.plots import metric_rows  # noqa: E402
from neuroray.training.run import run  # noqa: E402

DEFAULTS = ["rounds=5", "diloco.inner_steps=5", "swarm.num_stages=1", "eval.every=0", "sample_tokens=0",
            "progress_bar=false"]
STEP_EVENTS = {"task::outer_step_task", "task::OuterStepActor.step"}
DELTA_EVENTS = ("pseudo_gradient", "send_pseudo_gradient")
IDLE_ENV = "RAY_idle_worker_killing_time_threshold_ms"
FLUSH_S = 3.0  # Ray sends a worker's task events about once a second; wait a few before reading the timeline


def round_gaps(events: list[dict], t0_us: float, t1_us: float) -> list[tuple[float, float]]:
    """(idle gap, duration) in seconds of every outer step that started in [t0_us, t1_us], in order: the gap is
    from the end of the last pseudo-gradient call that ended before the step started (and after the
    previous step did)."""
    inside = [e for e in events if t0_us <= e["ts"] <= t1_us]
    steps = sorted((e for e in inside if e.get("cat") in STEP_EVENTS), key=lambda e: e["ts"])
    ends = sorted(e["ts"] + e["dur"] for e in inside if e.get("cat", "").rsplit(".", 1)[-1] in DELTA_EVENTS)
    out, previous = [], t0_us
    for step in steps:
        ready = [t for t in ends if previous <= t <= step["ts"]]
        if ready:
            out.append(((step["ts"] - ready[-1]) / 1e6, step["dur"] / 1e6))
            previous = step["ts"]
    return out


def one_arm(tmp: str, where: str, label: str, extra: list[str]) -> dict:
    cfg = load_config([f"run_dir={Path(tmp) / label}", *DEFAULTS, f"diloco.outer_step_in={where}", *extra])
    t0 = time.time() * 1e6
    result = run(cfg, log=lambda *a, **k: None)
    t1 = time.time() * 1e6
    time.sleep(FLUSH_S)
    gaps = round_gaps(ray.timeline(), t0, t1)
    train, _ = metric_rows(result.run_dir / "metrics.jsonl")
    return {"label": label, "gaps": gaps, "loop_s": train[-1]["elapsed_s"], "eval_loss": result.eval_loss,
            "recoveries": len(result.recoveries)}


def session(idle_ms: str | None, arms: list[tuple[str, str]], tmp: str, extra: list[str]) -> list[dict]:
    """One local Ray session with the given idle-worker setting (None: Ray's default), its arms in turn."""
    if idle_ms is None:
        os.environ.pop(IDLE_ENV, None)
    else:
        os.environ[IDLE_ENV] = idle_ms
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        return [one_arm(tmp, where, label, extra) for where, label in arms]
    finally:
        ray.shutdown()


def summary(arm: dict) -> str:
    later = arm["gaps"][1:]  # the first round also pays for starting the actor or a first worker
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    return (f"{mean([g for g, _ in later]):.3f} s idle, step {mean([d for _, d in later]):.3f} s "
            f"(round 1: {arm['gaps'][0][0]:.3f} s idle)" if arm["gaps"] else "no outer step in the timeline")


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        arms = session(None, [("task", "task"), ("actor", "actor")], tmp, argv)
        arms += session("300000", [("task", "task-idle300s")], tmp, argv)
    for a in arms:
        per_round = ", ".join(f"{g:.3f}/{d:.3f}" for g, d in a["gaps"])
        print(f"{a['label']:>13}: idle/step per round (s) {per_round}; later rounds: {summary(a)}; "
              f"loop {a['loop_s']:.1f} s, eval loss {a['eval_loss']:.6f}, {a['recoveries']} recoveries")
    same = len({a["eval_loss"] for a in arms}) == 1
    print(f"eval losses equal across arms: {same}")
    task, actor, kept = arms
    append_row("Outer step: idle before it starts, a long-lived actor per range vs a fresh task per round",
               ["actor (default), Ray's 1 s idle-worker kill", "task, Ray's 1 s idle-worker kill",
                "task, idle workers kept 300 s", "loop actor / task / task-300s", "eval loss equal", "machine",
                "command"],
               [summary(actor), summary(task), summary(kept),
                " / ".join(f"{a['loop_s']:.1f} s" for a in (actor, task, kept)), "yes" if same else "**no**",
                machine(), f"`flock /tmp/neuroray-cpu.lock python benchmarks/outer_step_idle.py"
                           f"{''.join(' ' + a for a in argv)}`"],
               note="Per round, from Ray's timeline: the idle gap from the last pseudo-gradient ready to the outer "
                    "step's start, and the step's duration, averaged over rounds 2 on (round 1 shown apart: it "
                    "also pays for starting the actor or a first task worker). Tiny model, one stage unless the "
                    "command sets swarm.num_stages (with several, each step's gap counts from the last "
                    "pseudo-gradient of any range: a lower bound), 5 rounds x 5 inner steps per arm, local Ray "
                    "sessions: Ray's default idle-worker killing (task and actor arms) and "
                    "RAY_idle_worker_killing_time_threshold_ms=300000 (task arm). The eval losses must be equal: "
                    "the actor runs the task's step, bit for bit.")


if __name__ == "__main__":
    main(sys.argv[1:])
