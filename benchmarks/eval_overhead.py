"""What held-out evaluation adds to the default 200-step demo: the same run with eval.every=0 (only the
final evaluation), 40 (the default) and 20 (every outer step), side by side in one Ray session.

Reports each arm's wall time of the training loop, the seconds its periodic evaluations took (each one
runs synchronously between an outer step and the next inner step, so that is the time it adds), and the
final eval loss. Appends a row to docs/benchmarks.md.

    flock /tmp/neuroray-cpu.lock python benchmarks/eval_overhead.py [hydra overrides...]
"""

from __future__ import annotations

import os
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

ARMS = (0, 40, 20)


def one_run(tmp: str, every: int, extra: list[str]) -> dict:
    cfg = load_config([f"run_dir={Path(tmp) / f'every{every}'}", f"eval.every={every}", "progress_bar=false",
                       "sample_tokens=0", *extra])
    result = run(cfg, log=lambda *a, **k: None)
    train, evals = metric_rows(result.run_dir / "metrics.jsonl")
    periodic = evals[:-1]  # the last row is the final evaluation, which every arm runs
    return {"every": every, "steps": len(train), "loop_s": train[-1]["elapsed_s"],
            "periodic": len(periodic), "periodic_s": sum(r["eval_seconds"] for r in periodic),
            "final_s": evals[-1]["eval_seconds"], "eval_loss": result.eval_loss,
            "recoveries": len(result.recoveries)}  # a holder lost and restored: that arm's loss and time differ


def main(argv: list[str]) -> None:
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "300000")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            arms = [one_run(tmp, every, argv) for every in ARMS]
    finally:
        ray.shutdown()
    base = arms[0]
    for a in arms:
        share = a["periodic_s"] / base["loop_s"] * 100
        print(f"eval.every={a['every']}: {a['steps']} steps, loop {a['loop_s']:.1f}s, {a['periodic']} periodic evals "
              f"took {a['periodic_s']:.2f}s ({share:.2f} % of the eval.every=0 loop), final eval {a['final_s']:.2f}s, "
              f"eval loss {a['eval_loss']:.4f}, {a['recoveries']} recoveries")

    def cells(a: dict) -> str:
        share = a["periodic_s"] / base["loop_s"] * 100
        lost = f", {a['recoveries']} holder recoveries" if a["recoveries"] else ""
        return f"{a['periodic']} evals, {a['periodic_s']:.2f} s = **{share:.2f} %** (loop {a['loop_s']:.1f} s{lost})"

    append_row("Held-out evaluation while training: cost on the 200-step demo",
               ["loop, eval.every=0", "eval.every=40 (default)", "eval.every=20", "one evaluation (8 microbatches)",
                "eval loss (every=0 / 40 / 20)", "machine", "command"],
               [f"{base['loop_s']:.1f} s", cells(arms[1]), cells(arms[2]),
                f"{arms[2]['periodic_s'] / max(arms[2]['periodic'], 1):.3f} s",
                " / ".join(f"{a['eval_loss']:.4f}" for a in arms), machine(),
                f"`flock /tmp/neuroray-cpu.lock python benchmarks/eval_overhead.py{''.join(' ' + a for a in argv)}`"],
               note="The default demo (2 replicas x 2 stages, H=20, 200 steps) with eval.every=0 (only the final "
                    "evaluation), 40 and 20, in one Ray session. Each periodic evaluation runs between an outer step "
                    "and the next inner step, so its seconds (the rows' eval_seconds) are the time it adds; the "
                    "percentage is of the eval.every=0 arm's training loop. The final eval loss of each arm shows "
                    "whether evaluating changed the training (it should not: forward only, at theta0).")


if __name__ == "__main__":
    main(sys.argv[1:])
