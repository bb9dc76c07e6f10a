"""Pipeline hops across lab hosts (issue 20): hop compression none / int8 / lowrank measured over a real link.

One lab of its own (prefix `nk`, subnet 10.231.32.0/24), removed at the end whatever happens. The driver runs
on h0 (benchmarks/_lab_driver.py). `planner.within_replica=STRICT_SPREAD` puts each replica's two holders on
two different hosts, so every activation and every gradient crosses a veth (checked from the run's placement;
a run where they did not is marked so in its row). The config is the default 2 stages x 2 replicas, sized
down for 2 CPUs (benchmarks/_lab_run.py `SMALL`), with the final held-out evaluation only.

Per run: hop bytes per hop from the payload counters (and x fewer than the float32 they stand for); the veth
bytes per step inside a round (read at every step's end, the gaps holding an outer step left out, when only
hops and Ray's own traffic cross) against the payload bytes across hosts, raw and counted once per crossing as
Ray moves them (`as_ray_moves_it`); the final held-out eval loss (theta0, forward without the codec); steady
tok/s (first step's end to last step's). Every run uses one key directory that all hosts see, so a slot's data
(its shard follows its key, docs/genesis.md) does not depend on where Ray placed it.
Runs: every codec at every seed unshaped (the loss comparison, paired by seed), then every codec at seed 0 at
each shaped rate (tok/s against the unshaped run of the same codec and seed; the loss there repeats seed 0's).
At the end: one summary row per codec against the goals, and docs/lab_hops_loss_wall.png (loss against wall
time, one line per codec and link, seed 0).

    flock /tmp/neuroray-cpu.lock python benchmarks/lab_hops.py [codecs=none,int8,lowrank] [seeds=0,1,2]
        [rates=100mbit] [rounds=5] [inner_steps=20] [plot=docs/lab_hops_loss_wall.png|none] [inline=0,1024]
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._lab_run import SMALL, Run, lab_session  # noqa: E402
from benchmarks._report import DOC, append_row, machine  # noqa: E402
from benchmarks.lab_train import LAB_DOC, _hop_bytes, _shape_all, _store_bytes, _wire  # noqa: E402

PLOT = ROOT / "docs" / "lab_hops_loss_wall.png"
# Ray's max_direct_call_object_size (100 KiB): a smaller result is returned to its owner (the driver, on h0) and
# inlined into the call that uses it, so a small hop crosses A -> h0 -> B; a larger one waits in A's object store
# and B's node pulls it directly. Holders run with the limit swarm.hop_inline_max_bytes (0: Ray's)
RAY_INLINE_BYTES = 100 * 1024
DEFAULT_INLINE = 0  # swarm.hop_inline_max_bytes's default; rows at another value say so
# x fewer bytes at least, eval loss at most + this %
GOALS = {"int8": (4.0, 0.5), "lowrank": (16.0, 2.0), "lowrank_mixed": (16.0, 2.0)}


def as_ray_moves_it(r: dict, driver_ip: str) -> float:
    """Hop bytes per step the wire should carry, from the placement and the payload size: each activation and
    gradient crosses A -> B when it goes through the object store, A -> driver -> B (each leg off the driver's
    host a crossing) when it is small enough to be inlined. Headers and Ray's own traffic not included."""
    hops = r["hops"] / r["per_hop"]
    boundaries = sum(len(hosts) - 1 for hosts in r["placement"].values())
    per_boundary = hops / boundaries  # fixed routing: every replica sends as many hops over each stage boundary
    crossings = 0
    limit = r["inline"] or RAY_INLINE_BYTES
    for hosts in r["placement"].values():
        for a, b in zip(hosts, hosts[1:]):
            crossings += (a != b) if r["per_hop"] > limit else (a != driver_ip) + (b != driver_ip)
    return crossings * per_boundary * r["per_hop"] / r["steps"]


def one_run(cfg, ov, codec: str, rate: str, seed: int, rounds: int, inner: int, keep: Path, keys: Path,
            inline: int | None = None) -> dict:
    from neuroray.lab import counters

    _shape_all(cfg, ov, None if rate == "unshaped" else rate)
    name = f"hops-{codec}-{rate}-s{seed}" + ("" if inline is None else f"-i{inline}")
    if inline is None:
        from neuroray.config import SwarmConfig

        inline = SwarmConfig().hop_inline_max_bytes
    load = [os.getloadavg()[0]]
    before = counters(cfg)
    at_done: dict[int, float] = {}  # inner step -> wire bytes since the run began, when the driver recorded it

    def on_event(_run, ev):
        if ev["kind"] == "done":
            at_done[ev["step"]] = _wire(before, counters(cfg))

    run = Run(ov, [*SMALL, "planner.within_replica=STRICT_SPREAD", f"swarm.hop_compression={codec}", f"seed={seed}",
                   f"swarm.key_dir={keys}",
                   f"swarm.hop_inline_max_bytes={inline}",
                   f"rounds={rounds}", f"diloco.inner_steps={inner}", "checkpoint.every_round=false", "eval.every=0",
                   "eval.batches=16", f"run_dir={cfg.host_root}/home/runs/{name}"], on_event=on_event)
    try:
        res = run.wait()
    finally:
        _shape_all(cfg, ov, None)
    wire = _wire(before, counters(cfg))
    load.append(os.getloadavg()[0])
    shutil.copy(Path(cfg.lab_dir) / "disks" / "h0" / "home" / "runs" / name / "metrics.jsonl", keep / f"{name}.jsonl")
    hops, cross = _hop_bytes(res["hops"], run.placement)
    sent = sum(h["fwd_sent"] + h["bwd_sent"] for h in res["hops"])
    fp32 = sum(h["fwd_fp32_bytes"] + h["bwd_fp32_bytes"] for h in res["hops"])
    stages = 1 + max(int(slot.split("-s")[1]) for slot in run.placement)
    replicas = sorted({slot.split("-")[0] for slot in run.placement})
    spread = all(len({run.placement.get(f"{r}-s{s}") for s in range(stages)}) == stages for r in replicas)
    dones = sorted(run.dones().values())
    steady = res["tokens"] / len(dones) * (len(dones) - 1) / (dones[-1] - dones[0]) if len(dones) > 1 else 0.0
    # Inside a round only hops (and Ray's own chatter) cross: wire bytes per step between two steps' ends, leaving
    # out the interval that holds an outer step, against the payload's hops across hosts per step
    gaps = [at_done[s + 1] - at_done[s] for s in sorted(at_done) if s + 1 in at_done and (s + 1) % inner]
    in_round = sum(gaps) / len(gaps) if gaps else float("nan")
    other = res["sync_bytes"] + _store_bytes(run) + res["control_bytes"]
    return {"codec": codec, "rate": rate, "seed": seed, "tokens": res["tokens"], "wire": wire, "other": other,
            "hops": hops, "cross": cross, "per_hop": hops / max(sent, 1), "ratio": fp32 / max(hops, 1),
            "eval": res["eval_loss"], "in_round": in_round, "inline": inline, "driver": cfg.host_ip(0), "steps": len(dones),
            "steady": steady, "tps": res["tokens_per_s"], "spread": spread, "load": load,
            "rejected": len(res.get("hop_rejections", [])),
            "placement": {r: [run.placement.get(f"{r}-s{s}") for s in range(stages)] for r in replicas},
            "metrics": keep / f"{name}.jsonl"}


NOTE_RUNS = ("3 lab hosts, driver on h0; the default config (2 stages x 2 replicas, model=tiny) with `" + " ".join(SMALL)
             + " planner.within_replica=STRICT_SPREAD checkpoint.every_round=false eval.every=0 eval.batches=16 "
             "swarm.key_dir=<one directory every host sees>` and "
             "`swarm.hop_compression=<codec> seed=<seed>`: each replica's two holders on two hosts, so every hop crosses "
             "a veth (a run in which a holder rejected a hop, docs/hops.md, says so beside the placement). Payload: the hop bytes the holders counted; B/hop: per activation or gradient sent; x fewer: the "
             "float32 bytes they stand for / the bytes sent; B/step across hosts: the payload bytes whose two holders sat on "
             "different hosts, per inner step. Wire B/step inside a round: veth bytes (sum over hosts of (tx + rx) / 2) "
             "read when the driver recorded each step, per step, over the gaps between two steps of one round (the gap "
             "holding an outer step left out): what crossed while only hops (and Ray's own traffic: calls, results, "
             "heartbeats) did, TCP/IP/Ethernet headers included. As Ray moves it: the payload counted once per crossing, where "
             "a payload at or under the holders' inline limit (`swarm.hop_inline_max_bytes`; 0, the default: Ray's "
             "max_direct_call_object_size, 100 KiB) is returned to the driver on h0 and inlined "
             "into the next holder's call (A -> h0 -> B: two crossings when neither holder is on h0), a larger one pulled "
             "from A's node by B's (one crossing). Eval loss: the final held-out "
             "evaluation (16 microbatches, theta0, forward without the codec). Steady tok/s: from the first step's end to "
             "the last's. The machine has 2 CPUs shared with other work: the load average (1 min, at the run's start "
             "and end) says how loaded; tok/s is timing and moves with it, bytes and loss do not.")

NOTE_SUM = ("Per codec, from the runs above (same invocation): x fewer bytes per hop (payload counters); wire / payload "
            "inside a round, as Ray moves it: the veth bytes per step inside a round over the payload bytes per step "
            "counted once per crossing (small payloads through the driver, see above), lowest-highest over the codec's "
            "runs (1.0: the wire carried exactly the hop payloads; the rest is headers and Ray's own traffic); eval "
            "loss: mean over seeds, unshaped, and the per-seed difference to `none` (paired: same seed, data and init); tok/s: "
            "steady, shaped / unshaped, seed 0 (timing, under the load the runs' rows give); eval loss shaped - unshaped: "
            "the same run on a shaped link (0: the loss does not depend on the link's timing).")


def run_row(r: dict, base: dict | None, none: dict | None, cmd: str) -> None:
    cross = r["cross"] / r["steps"] if r["cross"] is not None else float("nan")
    moved = as_ray_moves_it(r, r["driver"])
    vs = f"{(r['eval'] / none['eval'] - 1) * 100:+.2f} %" if none and r is not none else "-"
    ratio = f"{r['steady'] / base['steady']:.2f}" if base and base["steady"] else "-"
    hosts = "; ".join(f"{k}: {', '.join(h.rsplit('.', 1)[-1] for h in v if h)}" for k, v in r["placement"].items())
    for doc in (DOC, LAB_DOC):
        append_row("Pipeline hops across lab hosts: bytes, loss, tok/s per codec",
                   ["codec", "seed", "link", "payload B/hop", "x fewer than fp32", "hops across hosts B/step (payload)",
                    "wire B/step inside a round (veth)", "wire / payload", "wire / payload as Ray moves it",
                    "wire - that, B/step", "eval loss", "vs none (same seed)", "steady tok/s", "ratio to unshaped",
                    "holders per replica (host .N)", "load avg", "machine", "command"],
                   [r["codec"] + ("" if r["inline"] == DEFAULT_INLINE else f", hop_inline_max_bytes={r['inline']}"),
                    str(r["seed"]), r["rate"], f"{r['per_hop']:,.0f}", f"{r['ratio']:.2f}", f"{cross:,.0f}",
                    f"{r['in_round']:,.0f}", f"{r['in_round'] / cross:.2f}",
                    f"{r['in_round'] / moved:.2f}", f"{r['in_round'] - moved:,.0f}", f"{r['eval']:.4f}", vs,
                    f"{r['steady']:,.0f}", ratio,
                    hosts + ("" if r["spread"] else " (a replica's holders shared a host)")
                    + (f" ({r['rejected']} hops rejected)" if r["rejected"] else ""),
                    f"{r['load'][0]:.1f}-{r['load'][1]:.1f}", machine(), f"`{cmd}`"], note=NOTE_RUNS, path=doc)


def summary_row(codec: str, runs: list[dict], cmd: str) -> None:
    mine = [r for r in runs if r["codec"] == codec and r["rate"] == "unshaped"]
    none = {r["seed"]: r for r in runs if r["codec"] == "none" and r["rate"] == "unshaped"}
    paired = [(r["eval"] / none[r["seed"]]["eval"] - 1) * 100 for r in mine if r["seed"] in none]
    agree = [r["in_round"] / as_ray_moves_it(r, r["driver"]) for r in runs if r["codec"] == codec and r["cross"]]
    ratio = statistics.mean(r["ratio"] for r in mine)
    seed0 = {r["rate"]: r for r in runs if r["codec"] == codec and r["seed"] == min(x["seed"] for x in mine)}
    tps = "; ".join(f"{rate} {r['steady'] / seed0['unshaped']['steady']:.2f}" for rate, r in seed0.items()
                    if rate != "unshaped" and seed0.get("unshaped") and seed0["unshaped"]["steady"])
    repeat = "; ".join(f"{rate} {r['eval'] - seed0['unshaped']['eval']:+.4f}" for rate, r in seed0.items()
                       if rate != "unshaped" and seed0.get("unshaped"))
    goal, met = "-", "-"
    if codec in GOALS:
        fewer, loss = GOALS[codec]
        goal = f">= {fewer:g}x fewer bytes, <= +{loss:g} % loss"
        worst = max(paired) if paired else float("nan")
        met = (f"bytes {'met' if ratio >= fewer else 'not met'}, "
               + (f"loss {'met' if statistics.mean(paired) <= loss else 'not met'} (mean), "
                  f"{'met' if worst <= loss else 'not met'} (worst seed)" if paired else "loss not run (no `none` runs)"))
    diffs = ", ".join(f"{d:+.2f} %" for d in paired) if codec != "none" else "-"
    for doc in (DOC, LAB_DOC):
        append_row("Pipeline hops across lab hosts: against the goals",
                   ["codec", "x fewer bytes per hop", "wire / payload inside a round, as Ray moves it", "eval loss (mean of seeds)",
                    "vs none per seed", "seeds", "tok/s shaped / unshaped",
                    "eval loss shaped - unshaped (same seed)", "goal", "result", "machine", "command"],
                   [codec, f"{ratio:.2f}", f"{min(agree):.2f}-{max(agree):.2f}" if agree else "-",
                    f"{statistics.mean(r['eval'] for r in mine):.4f}", diffs, str(len(mine)), tps or "-", repeat or "-", goal,
                    f"**{met}**", machine(), f"`{cmd}`"], note=NOTE_SUM, path=doc)


def plot(runs: list[dict], out: Path) -> None:
    from neuroray.training.plots import loss_vs_wall_time

    seed0 = min(r["seed"] for r in runs)
    lines = {f"{r['codec']} hops, {r['rate']}": r["metrics"] for r in runs if r["seed"] == seed0}
    loss_vs_wall_time(lines, out, title="tiny model, 3 lab hosts, hops across hosts (seed 0)")


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    codecs = opts.get("codecs", "none,int8,lowrank").split(",")
    seeds = [int(s) for s in opts.get("seeds", "0,1,2").split(",")]
    rates = [r for r in opts.get("rates", "100mbit").split(",") if r and r != "unshaped"]
    rounds, inner = int(opts.get("rounds", 5)), int(opts.get("inner_steps", 20))
    out = None if opts.get("plot") == "none" else Path(opts.get("plot", PLOT))  # plot=none: leave the figure as it is
    cmd = ("flock /tmp/neuroray-cpu.lock python benchmarks/lab_hops.py " + " ".join(argv)).strip()
    runs: list[dict] = []
    # One key per holder slot for every run, on a path every lab host sees (the machine's, not a host's disk): a
    # Driver's data position follows its key, so with keys on each host's own disk the data a replica trained on
    # followed where Ray placed it, and runs of one seed were not paired on data (measured: see docs/lab.md)
    with tempfile.TemporaryDirectory(prefix="nk-keys-", dir="/var/tmp") as keys, \
            tempfile.TemporaryDirectory(prefix="nk-lab-") as tmp, \
            lab_session("nk", "10.231.32.0/24", "/run/neuroray-hops-host", f"{tmp}/lab") as (cfg, ov):
        keep = Path(tmp) / "metrics"
        keep.mkdir()
        plan = [(c, "unshaped", s) for s in seeds for c in codecs] + [(c, rate, seeds[0]) for rate in rates
                                                                       for c in codecs]
        # inline=0,1024: every run at each holder inline limit in turn (side by side: small hops through the
        # driver or straight from node to node); rows and summaries then keep to the first limit's runs
        limits = [int(x) for x in opts["inline"].split(",")] if "inline" in opts else [None]
        for (codec, rate, seed), inline in ((p, n) for p in plan for n in limits):  # each row appended when measured
            r = one_run(cfg, ov, codec, rate, seed, rounds, inner, keep, Path(keys), inline)
            runs.append(r)
            print({k: v for k, v in r.items() if k != "metrics"}, flush=True)
            same = [x for x in runs if x["inline"] == r["inline"]]
            base = next((x for x in same if x["codec"] == codec and x["seed"] == seed and x["rate"] == "unshaped"), None)
            none = next((x for x in same if x["codec"] == "none" and x["seed"] == seed and x["rate"] == rate), None)
            run_row(r, base if rate != "unshaped" else None, none, cmd)
            if out is not None:
                plot(runs, out)
        for codec in codecs:
            summary_row(codec, [x for x in runs if x["inline"] == runs[0]["inline"]], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
