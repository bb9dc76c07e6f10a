"""Training across 3 lab hosts (issue #18 item 4): throughput and wire bytes per link rate, and a partition.

One lab of its own (prefix `nb`, subnet 10.231.16.0/24), removed at the end whatever happens. The driver
runs on h0 (benchmarks/_lab_driver.py); Ray places the holders (one replica fills one 2-CPU host).

* For each setup (`fixed`: the default 2 stages x 2 replicas; `router`: the same with `swarm=router`) and
  each rate (every host's link shaped to it in both directions): one run. Reported: tokens/s and its ratio
  to the unshaped run of the same setup; wire bytes per token from the veth counters (sum over hosts of
  (tx + rx) / 2 during the run), split into DiLoCo sync (the run's own `comm` sync bytes), what the
  driver-hosted store moved (shards, snapshots) and control bytes (all counted by the project), and the
  rest, which is attributed to pipeline hops (activations and gradients between stages) plus Ray's own
  traffic; wire / counted for the project's counters.
* For each setup, unshaped: `lab cut` on a host holding a replica (not h0, where the driver and the
  head live) after a mid-round step, `lab heal` once a step submitted after the cut has completed (or
  after `heal_after_s`). Reported: cut -> next completed step and heal -> the holder's first accepted
  contribution, as defined in benchmarks/_lab_run.py and docs/lab.md.

    flock /tmp/neuroray-cpu.lock python benchmarks/lab_train.py [setups=fixed,router]
        [rates=unshaped,1gbit,100mbit,20mbit] [partition=true] [rounds=3] [inner_steps=4] [heal_after_s=120]
        [hydra overrides for every run, e.g. model=small]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._lab_run import SMALL, Run, first_accepted_after, lab_session, ledger_rows  # noqa: E402
from benchmarks._report import DOC, append_row, machine  # noqa: E402

LAB_DOC = ROOT / "docs" / "lab.md"
# wan: the slow-link preset; wan-blocking: the same with a blocking outer step; wan-nosync: the same steps in one
# round, whose only outer step follows the last step (outside the steady clock): what training costs without syncs
# -tau<N>: the preset with its outer step landing N inner steps after each round's end (diloco.overlap_steps)
# -noeval: no held-out evaluation inside the run (eval.every=0; the nosync run never has one inside its steady
# clock, so with it the sync runs carried an evaluation the nosync run did not); -noponw: no proofs or ledger;
# -spread: each replica's two holders on two hosts (planner.within_replica=STRICT_SPREAD), so every pipeline hop
# crosses a link and the preset's hop compression is on the wire (packed, a replica fills one host: no hop crosses)
SETUPS = {"fixed": [], "router": ["swarm=router"], "wan": ["preset=wan"],
          "wan-blocking": ["preset=wan", "diloco.overlap=none"], "wan-nosync": ["preset=wan"],
          "wan-tau1": ["preset=wan", "diloco.overlap_steps=1"], "wan-tau3": ["preset=wan", "diloco.overlap_steps=3"],
          "wan-tau5": ["preset=wan", "diloco.overlap_steps=5"],
          "wan-tau5-noponw": ["preset=wan", "diloco.overlap_steps=5", "ponw.enabled=false"],
          "wan-noponw-nosync": ["preset=wan", "ponw.enabled=false"],
          "wan-noeval": ["preset=wan", "eval.every=0"],
          "wan-blocking-noeval": ["preset=wan", "diloco.overlap=none", "eval.every=0"],
          "wan-noeval-noponw": ["preset=wan", "eval.every=0", "ponw.enabled=false"],
          "wan-noeval-nosync": ["preset=wan", "eval.every=0"],
          "fixed-spread": ["eval.every=0", "planner.within_replica=STRICT_SPREAD"],
          "wan-spread": ["preset=wan", "eval.every=0", "planner.within_replica=STRICT_SPREAD"]}


def _wire(before: dict, after: dict) -> float:
    tx = sum(after[h]["tx_bytes"] - before[h]["tx_bytes"] for h in after)
    rx = sum(after[h]["rx_bytes"] - before[h]["rx_bytes"] for h in after)
    return (tx + rx) / 2  # every byte between two hosts leaves one veth and enters another


def _store_bytes(run: Run) -> int:
    line = next((m for _, m in run.logs if m.startswith("stores: the driver's node served")), "")
    return sum(int(w.replace(",", "")) for w in line.split() if w.replace(",", "").isdigit())


def _shape_all(cfg, ov, rate: str | None) -> None:
    from neuroray.lab import shape

    for i in range(cfg.hosts):
        shape(ov, f"h{i}", rate)


def throughput(cfg, ov, setup: str, rate: str, rounds: int, inner: int, extra: tuple[str, ...] = ()) -> dict:
    from neuroray.lab import counters

    _shape_all(cfg, ov, None if rate == "unshaped" else rate)
    name = f"tp-{setup}-{rate}"
    if setup.endswith("-nosync"):
        rounds, inner = 1, rounds * inner
    before = counters(cfg)
    run = Run(ov, [*SMALL, *SETUPS[setup], *extra, f"rounds={rounds}", f"diloco.inner_steps={inner}",
                   "checkpoint.every_round=false", f"run_dir={cfg.host_root}/home/runs/{name}"])
    res = run.wait()
    for t, m in run.logs:  # what moved bytes besides training: failovers and the stores
        if m.startswith(("liveness", "recovery", "router: holder", "stores:")):
            print(f"  {setup} {rate} {t - run.logs[0][0]:.1f}s {m[:200]}", flush=True)
    wire = _wire(before, counters(cfg))
    _shape_all(cfg, ov, None)
    store, sync, control = _store_bytes(run), res["sync_bytes"], res["control_bytes"]
    hops, cross = _hop_bytes(res.get("hops", []), run.placement)
    counted = sync + store + control + (hops if cross is None else cross)  # hops within a host never hit a wire
    # Steady training: from the first step's end to the last one's, without the start and the final snapshot set
    # (which a short run's whole-run tok/s carries: every holder's range crosses to the driver-hosted store).
    dones = sorted(run.dones().values())
    steady = res["tokens"] / len(dones) * (len(dones) - 1) / (dones[-1] - dones[0]) if len(dones) > 1 else 0.0
    print(f"  {setup} {rate} {_boundaries(dones, inner)}", flush=True)
    return {"tps": res["tokens_per_s"], "steady": steady, "tokens": res["tokens"], "wire": wire, "sync": sync, "store": store,
            "control": control, "hops": hops, "hops_cross": cross, "rest": wire - counted, "counted": counted,
            "hosts": sorted(set(run.placement.values()))}


def _boundaries(dones: list[float], inner: int) -> str:
    """Where a run's steady time goes: the median gap between two steps' ends inside a round, and what the gaps
    around each round's end (the one ending the round's first step, the next two) take beyond it, summed."""
    gaps = [b - a for a, b in zip(dones, dones[1:])]  # gaps[i]: from step i's end to step i+1's (0-based)
    near = {i for i in range(len(gaps)) if (i + 1) % inner in (0, 1, 2) and i + 1 >= inner}
    if len(gaps) < 3 or len(near) == len(gaps):
        return "too few steps to split"
    median = statistics.median(g for i, g in enumerate(gaps) if i not in near)
    extra = sum(gaps[i] - median for i in near)
    by = {k: [f"{gaps[i] * 1e3:.0f}" for i in sorted(near) if (i + 1) % inner == k] for k in (0, 1, 2)}
    return (f"step gaps: median {median * 1e3:.0f} ms inside rounds; after a round's last step {','.join(by[0])} ms, "
            f"then {','.join(by[1])} and {','.join(by[2])}; {extra:.2f} s beyond the median in all, "
            f"{extra / (dones[-1] - dones[0]):.1%} of the steady time")


def _hop_bytes(hops: list[dict], placement: dict[str, str]) -> tuple[int, int | None]:
    """Hop bytes the holders sent (counted from the payloads), and of those the ones whose two ends sat on
    different hosts: under fixed routing r<i>-s<j> sends forward to r<i>-s<j+1> and back to r<i>-s<j-1>
    (None when a holder is not at its slot's place, as under the router, where the neighbour varies)."""
    total = sum(h["fwd_bytes"] + h["bwd_bytes"] for h in hops)
    cross = 0
    for h in hops:
        rep, stage = h["replica"], h["stage"]
        here = placement.get(f"r{rep}-s{stage}")
        if here is None:
            return total, None
        for other, sent in ((stage + 1, h["fwd_bytes"]), (stage - 1, h["bwd_bytes"])):
            there = placement.get(f"r{rep}-s{other}")
            if sent and there is None:
                return total, None
            cross += sent if sent and there != here else 0
    return total, cross


def partition(cfg, ov, setup: str, rounds: int, inner: int, heal_after_s: float) -> dict:
    from neuroray.lab import cut, heal

    ips = [cfg.host_ip(i) for i in range(cfg.hosts)]
    marks: dict = {}
    cut_after = inner + inner // 2 - 1  # 0-based step in the middle of round 2

    lock = threading.Lock()

    def heal_once() -> None:
        with lock:
            if "cut" in marks and "heal" not in marks:
                heal(ov, marks["host"])
                marks["heal"] = time.time()

    def on_event(run: Run, ev: dict) -> None:
        if "cut" not in marks and ev["kind"] == "done" and ev["step"] == cut_after:
            host_ip = sorted(ip for ip in set(run.placement.values()) if ip != ips[0])[0]
            marks["host"] = f"h{ips.index(host_ip)}"
            marks["slots"] = sorted(s for s, ip in run.placement.items() if ip == host_ip)
            marks["cut"] = time.time()
            cut(ov, marks["host"])
            threading.Timer(heal_after_s, heal_once).start()  # heal even if no step completes meanwhile
        elif "cut" in marks and run.first_step_submitted_after(marks["cut"]):
            heal_once()

    name = f"part-{setup}"
    run = Run(ov, [*SMALL, *SETUPS[setup], f"rounds={rounds}", f"diloco.inner_steps={inner}",
                   f"run_dir={cfg.host_root}/home/runs/{name}"], on_event=on_event)
    try:
        res = run.wait()
    finally:
        heal_once()  # never leave a host cut
    nxt = run.first_step_submitted_after(marks["cut"])
    rows = ledger_rows(Path(cfg.lab_dir) / "disks" / "h0" / "home" / "runs" / name / "ledger.sqlite")
    ids = {run.node_ids[s] for s in marks["slots"]} | {res["holders"][s]["node_id"] for s in marks["slots"]
                                                        if "node_id" in res["holders"].get(s, {})}
    accepted = first_accepted_after(rows, ids, marks["heal"])
    refused = sorted({r["status"] for r in rows if r["node_id"] not in set(run.node_ids.values())})
    unknown = [m for _, m in run.logs if "unknown_node" in m]
    return {"host": marks["host"], "slots": marks["slots"],
            "cut_to_step": None if nxt is None else nxt[1] - marks["cut"],
            "heal_to_accepted": None if accepted is None else accepted - marks["heal"],
            "cut_to_heal": marks["heal"] - marks["cut"], "recoveries": res["recoveries"],
            "routing": res["routing"], "unknown_node_lines": len(unknown), "refused": refused,
            # what the driver said about the partition, in seconds from the cut
            "events": [(round(t - marks["cut"], 1), m[:160]) for t, m in run.logs if t >= marks["cut"] - 1
                       and m.startswith(("liveness", "recovery", "router: holder", "ledger: proof"))]}


NOTE_TP = ("3 lab hosts, driver on h0, every host's link shaped in both directions; the default config (2 stages x 2 "
           "replicas, model=tiny) with `" + " ".join(SMALL) + "` (these runs: `checkpoint.every_round=false`); `router` adds `swarm=router`. Wire bytes: veth "
           "counters, sum over hosts of (tx + rx) / 2. Counted: the run's DiLoCo sync bytes + what the driver-hosted "
           "store moved + control bytes + the hop bytes across hosts (the hop bytes the holders sent, counted from "
           "the payloads, whose two holders sat on different hosts; all of them where that is unknown, as under the "
           "router). Ray = wire - counted (Ray's own traffic; negative "
           "where counted bytes never crossed a wire, see docs/lab.md). Per token: divided by the tokens the run "
           "trained. One run per row: single runs on 2 shared CPUs are noisy. `wan` adds `preset=wan` (the slow-link "
           "preset: lowrank hops, int8 sync, delayed overlap).")


NOTE_STEADY = ("The runs of the table above, read by step: steady tok/s counts the tokens from the end of the first "
               "inner step to the end of the last, over that time, so it leaves out the start (holders, shards) and the "
               "final snapshot set, which whole-run tok/s (the trainer's) includes: in a run of a few seconds every "
               "holder's range crossing to the driver-hosted store at the end weighs as much as the training on a "
               "shaped link. The slow-link goals (issue 20) are about training throughput, so this is the ratio they "
               "are read against; both are reported.")


def throughput_row(setup: str, rate: str, r: dict, base: dict | None, cmd: str) -> None:
    ratio = f"{r['tps'] / base['tps']:.2f}" if base else "n/a"
    per = lambda b: f"{b / r['tokens']:,.0f}"  # noqa: E731
    for doc in (DOC, LAB_DOC):
        append_row("Training across lab hosts: throughput and wire bytes, hops counted",
                   ["setup", "link", "tok/s", "ratio to unshaped", "wire B/token", "sync B/token",
                    "hops B/token (across hosts)", "store + control B/token", "Ray B/token", "wire / counted",
                    "holder hosts", "machine", "command"],
                   [setup, rate, f"{r['tps']:,.0f}", f"**{ratio}**", per(r["wire"]), per(r["sync"]),
                    f"{per(r['hops'])} ({'n/a' if r['hops_cross'] is None else per(r['hops_cross'])})",
                    per(r["store"] + r["control"]), per(r["rest"]), f"{r['wire'] / r['counted']:.3f}",
                    str(len(r["hosts"])), machine(), f"`{cmd}`"], note=NOTE_TP, path=doc)


def steady_row(setup: str, rate: str, r: dict, base: dict | None, cmd: str) -> None:
    ratio = f"{r['steady'] / base['steady']:.2f}" if base and base["steady"] else "n/a"
    whole = f"{r['tps'] / base['tps']:.2f}" if base else "n/a"
    for doc in (DOC, LAB_DOC):
        append_row("Training across lab hosts: steady throughput per link rate",
                   ["setup", "link", "steady tok/s", "steady ratio to unshaped", "whole-run tok/s", "whole-run ratio",
                    "sync B/token", "holder hosts", "machine", "command"],
                   [setup, rate, f"{r['steady']:,.0f}", f"**{ratio}**", f"{r['tps']:,.0f}", whole,
                    f"{r['sync'] / r['tokens']:,.0f}", str(len(r["hosts"])), machine(), f"`{cmd}`"],
                   note=NOTE_STEADY, path=doc)


def partition_row(setup: str, p: dict, cmd: str) -> None:
    if "error" in p:
        cut_s = heal_s = f"run failed: {p['error']}"
        cut_heal, n = "n/a", "n/a"
    else:
        cut_s = "no step after the cut" if p["cut_to_step"] is None else f"{p['cut_to_step']:.1f} s"
        heal_s = ("none in the run" + (f" ({p['unknown_node_lines']} ledger lines: unknown_node)"
                                       if p["unknown_node_lines"] else "")
                  if p["heal_to_accepted"] is None else f"{p['heal_to_accepted']:.1f} s")
        cut_heal, n = f"{p['cut_to_heal']:.1f} s", str(len(p["recoveries"]))
    for doc in (DOC, LAB_DOC):
        append_row("Partition of a holder's host",
                   ["setup", "cut host (slots)", "cut -> next completed step", "goal", "cut -> heal",
                    "heal -> first accepted contribution", "recoveries", "machine", "command"],
                   [setup, f"{p.get('host', '?')} ({', '.join(p.get('slots', []))})", f"**{cut_s}**", "<= 10 s",
                    cut_heal, heal_s, n, machine(), f"`{cmd}`"],
                   note="`lab cut` after a mid-round step on the host of one replica, unshaped; `lab heal` once a "
                        "step submitted after the cut has completed. Definitions in docs/lab.md (\"Training "
                        "across hosts: measured\").", path=doc)


def main(argv: list[str]) -> None:
    known = ("setups", "rates", "rounds", "inner_steps", "heal_after_s", "partition")
    opts = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in known)
    extra = tuple(a for a in argv if a.split("=", 1)[0] not in known)  # Hydra overrides for every run, e.g. model=small
    setups = opts.get("setups", "fixed,router").split(",")
    rates = [r for r in opts.get("rates", "unshaped,1gbit,100mbit,20mbit").split(",") if r]  # "rates=": none
    rounds, inner = int(opts.get("rounds", 3)), int(opts.get("inner_steps", 4))
    heal_after_s = float(opts.get("heal_after_s", 120))
    do_partition = opts.get("partition", "true").lower() not in ("false", "0", "no")
    cmd = ("flock /tmp/neuroray-cpu.lock python benchmarks/lab_train.py " + " ".join(argv)).strip()
    with tempfile.TemporaryDirectory(prefix="nb-lab-") as tmp, \
            lab_session("nb", "10.231.16.0/24", "/run/neuroray-bench-host", f"{tmp}/lab") as (cfg, ov):
        for setup in setups:
            base = None
            for rate in rates:  # each row is appended as soon as it is measured
                r = throughput(cfg, ov, setup, rate, rounds, inner, extra)
                base = r if rate == "unshaped" else base
                print(f"{setup} {rate}: {r}", flush=True)
                label = " ".join([setup, *extra])
                throughput_row(label, rate, r, base, cmd)
                steady_row(label, rate, r, base, cmd)
            if do_partition:
                try:
                    p = partition(cfg, ov, setup, max(rounds, 4), inner, heal_after_s)
                except RuntimeError as exc:  # the run failed: that is the result
                    print(exc, flush=True)
                    p = {"error": str(exc).strip().splitlines()[-1][:200]}
                print(f"{setup} partition: {p}", flush=True)
                partition_row(setup, p, cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
