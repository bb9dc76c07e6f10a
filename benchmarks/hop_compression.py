"""Pipeline hop compression measured: bytes per hop and final eval loss, none vs int8 vs lowrank(_mixed).

Every run goes through the real training path (``neuroray.training.run``: two Ray stage-holder actors, the
driver's fixed schedule) on the tiny model, one replica (plain AdamW: an outer step of lr 1 without
momentum), with the same seed, data and token budget; only
``swarm.hop_compression`` differs. Bytes per hop are the holders' own counts of the payloads they sent
(``RunResult.hops``: the encoded bytes, scales and shape included), forward (activations) and backward
(gradients), against the float32 bytes of the same tensors. Eval loss: the final checkpoint on the run's
eval batches, and its difference from the uncompressed run. Goals (issue 20): int8 >= 4x fewer bytes and
<= +0.5 % loss; lowrank and lowrank_mixed >= 16x fewer bytes and <= +2 % loss.

    flock /tmp/neuroray-cpu.lock python benchmarks/hop_compression.py [steps=300] [seq_len=64] [mb=4]
                                                       [seed=0] [runs=none,int8,lowrank] [write=1]

Appends a row per run to docs/benchmarks.md (section "Pipeline hop compression").
"""

from __future__ import annotations

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

# (x fewer bytes than float32, max eval loss % vs none)
GOALS = {"int8": (4.0, 0.5), "lowrank": (16.0, 2.0), "lowrank_mixed": (16.0, 2.0)}
H = 50  # inner steps per outer round; with one replica and the outer step below, theta0 = the weights


def _per_hop(hops: list[dict], direction: str) -> tuple[float, float]:
    """(bytes per hop, float32 bytes per hop) over every holder's hops sent in ``direction``."""
    sent = sum(h[f"{direction}_sent"] for h in hops)
    return (sum(h[f"{direction}_bytes"] for h in hops) / max(sent, 1),
            sum(h[f"{direction}_fp32_bytes"] for h in hops) / max(sent, 1))


def main(argv: list[str]) -> None:
    args = {"steps": "300", "seq_len": "64", "mb": "4", "seed": "0", "runs": "none,int8,lowrank", "write": "1"}
    args.update(a.split("=", 1) for a in argv)
    steps = int(args["steps"])
    assert steps % H == 0, f"steps={steps} must be a multiple of {H}"
    rows = {}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # one Ray for every run
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args["runs"].split(","):
            cfg = load_config([
                f"swarm.hop_compression={scheme}", "swarm.num_stages=2", "diloco.replicas=1",
                f"diloco.inner_steps={H}", f"rounds={steps // H}", f"seed={args['seed']}",
                # outer lr 1 without momentum: theta0 becomes the replica's weights, so the runs differ in
                # their hops only, not in how a Nesterov outer step amplifies a small difference
                "diloco.outer_lr=1.0", "diloco.outer_momentum=0.0", "diloco.nesterov=false",
                f"data.seq_len={args['seq_len']}", f"data.microbatch_size={args['mb']}", "data.num_microbatches=1",
                "ponw.enabled=false", "checkpoint.interval_s=0", "cluster.cpus_per_holder=1.0",
                f"swarm.key_dir={tmp}/keys", f"run_dir={tmp}/{scheme}", "sample_tokens=1", "progress_bar=false",
                f"log_every={steps}",
            ])
            t0 = time.perf_counter()
            result = run(cfg, log=lambda *a, **k: None)
            fwd, fwd32 = _per_hop(result.hops, "fwd")
            bwd, bwd32 = _per_hop(result.hops, "bwd")
            rows[scheme] = {"fwd": fwd, "bwd": bwd, "fwd_x": fwd32 / fwd, "bwd_x": bwd32 / bwd,
                            "eval": result.eval_loss, "wall": time.perf_counter() - t0}
            print(f"{scheme}: {rows[scheme]}", flush=True)
    ray.shutdown()
    base = rows.get("none", {}).get("eval")
    cmd = "flock /tmp/neuroray-cpu.lock python benchmarks/hop_compression.py " + shlex.join(argv)
    for scheme, r in rows.items():
        gap = float("nan") if base is None else 100 * (r["eval"] / base - 1)
        ratio = min(r["fwd_x"], r["bwd_x"])
        goal = GOALS.get(scheme)
        verdict = "reference" if goal is None else (
            f"{'met' if ratio >= goal[0] else 'not met'} ({goal[0]:g}x), "
            f"{'met' if gap <= goal[1] else 'not met'} (+{goal[1]:g} %)")
        print(f"{scheme:8s} fwd {r['fwd']:,.0f} B/hop ({r['fwd_x']:.2f}x)  "
              f"bwd {r['bwd']:,.0f} B/hop ({r['bwd_x']:.2f}x)  "
              f"eval {r['eval']:.4f} ({gap:+.2f} %)  {r['wall']:.0f}s  {verdict}")
        if args["write"] == "1":
            append_row("Pipeline hop compression",
                       ["hop_compression", "fwd bytes/hop (x fewer than fp32)", "bwd bytes/hop (x fewer)",
                        "eval loss", "vs none", "goal (bytes, loss)", "steps x tokens/step", "seed", "machine",
                        "command"],
                       [scheme, f"{r['fwd']:,.0f} ({r['fwd_x']:.2f}x)", f"{r['bwd']:,.0f} ({r['bwd_x']:.2f}x)",
                        f"{r['eval']:.4f}", f"{gap:+.2f} %", verdict,
                        f"{steps} x {int(args['seq_len']) * int(args['mb'])}", args["seed"], machine(), f"`{cmd}`"],
                       note="Tiny model, 2 stage holders, 1 replica, equal tokens and seed; bytes per hop from the "
                            "holders' counts of the real payloads (benchmarks/hop_compression.py, docs/hops.md).")


if __name__ == "__main__":
    main(sys.argv[1:])
