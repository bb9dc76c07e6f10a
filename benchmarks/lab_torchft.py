"""neuroray's DiLoCo side by side with torchft 0.2.0's DiLoCo across 3 lab hosts (issue 20, goal 6), wire bytes
from the lab's veth counters.

The setup of benchmarks/torchft_side_by_side.py (its docstring: neuroray's tiny model, the embedded genesis data,
M=2 replicas of one stage, H inner AdamW steps between outer Nesterov steps, ``mb`` x ``seq_len`` tokens per
replica and step, the same seed, weights and data streams, one torch thread per replica), with the processes on
their own emulated hosts instead of one. One lab of its own (prefix `nt`, subnet 10.231.40.0/24, M+1 hosts),
removed at the end whatever happens.

- torchft: the Lighthouse (``torchft_lighthouse``) on h0, replica r's process on host h<r+1>, each advertising its
  host's address; Gloo's pairs bound to the host's eth0 (``GLOO_SOCKET_IFNAME``), so the allreduce and a healing
  replica's checkpoint fetch cross the shaped links.
- neuroray: the driver on h0 (benchmarks/_lab_sbs_driver.py: benchmarks/_lab_driver.py plus an idle actor that
  takes h0's CPUs), each holder asking a whole host's CPUs (``cluster.cpus_per_holder`` = the lab's
  ``num_cpus``), so replica r's holder sits on h1 or h2 (the placement column says where it was).
  ``cluster.local_stores=shared``: the data, keys and run directory lie on the machine's disk, which every host
  sees, as torchft's replicas read their data: neither arm moves data over a link.

Per link rate (every host's link shaped to it in both directions) and arm (torchft; neuroray with
``diloco.compression`` none, int8, sparse): eval loss (the same 16 held-out batches, the final weights), veth bytes
(sum over hosts of (tx + rx) / 2: every byte between two hosts leaves one veth and enters another, headers
included) for the whole run and per outer step in the steady window (from the first inner step's end to the
last's; the outer steps inside it: torchft's sync runs inside its H-th step, so all of them; neuroray's last one
follows the last step, so one fewer), the sync bytes each arm counts itself, the median inner step and the
loop's wall time. Unshaped, with ``recovery=1``: one more run per arm (torchft; neuroray fp32) in which replica 1
is killed mid-round, timed as benchmarks/torchft_side_by_side.py defines it (neuroray: kill -> the first step
submitted after the kill completes; torchft: kill -> the first outer step all M replicas commit again; the
restarted torchft process runs on the same host and heals from the live replica over the link).

    flock /tmp/neuroray-cpu.lock python benchmarks/lab_torchft.py [rounds=6] [h=20] [m=2] [mb=4] [seq_len=64]
        [seed=0] [rates=unshaped,100mbit] [compressions=none,int8,sparse] [bare=sparse] [recovery=1] [write=1]

``bare``: compressions also run with the driver's per-round theta0 reads off (``ponw.replay_check=false``,
``ponw.spot_check_rate=0``): under sparse Ray runs the outer-step task on a holder's host, and those reads then
pull a dense theta0 over its link every round (docs/lab.md).

Appends the rows to docs/benchmarks.md ("Side by side with torchft DiLoCo across lab hosts").
"""

from __future__ import annotations

import json
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._lab_run import Run, lab_session  # noqa: E402
from benchmarks._report import append_row, machine  # noqa: E402
from benchmarks.lab_train import _shape_all  # noqa: E402
from benchmarks.torchft_side_by_side import eval_loss, overrides, torchft_arm  # noqa: E402
from neuroray.configure import load_config  # noqa: E402

SECTION = "Side by side with torchft DiLoCo across lab hosts"
SBS_DRIVER = ROOT / "benchmarks" / "_lab_sbs_driver.py"
# The driver's per-round reads of theta0 (the PoNW replay check and spot checks): where the outer-step task ran on
# a holder's host (Ray places it by its inputs' locality), each read pulls a dense theta0 over that host's link
NO_THETA0_READS = ("ponw.replay_check=false", "ponw.spot_check_rate=0")
LIGHTHOUSE_PORT = 29510  # torchft_lighthouse's default; ports are per network namespace


class Wire:
    """The lab's veth counters, sampled every ``every_s`` in a thread; bytes = sum over hosts of (tx + rx) / 2."""

    def __init__(self, cfg, every_s: float = 0.05):
        from neuroray.lab import counters

        self.read = lambda: counters(cfg)
        self.samples: list[tuple[float, dict]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, args=(every_s,), daemon=True)

    def _loop(self, every_s: float) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), self.read()))
            self.stop.wait(every_s)

    def __enter__(self):
        self.samples.append((time.time(), self.read()))
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.samples.append((time.time(), self.read()))

    @staticmethod
    def _bytes(c: dict) -> float:
        return sum(h["tx_bytes"] + h["rx_bytes"] for h in c.values()) / 2

    def total(self) -> float:
        return self._bytes(self.samples[-1][1]) - self._bytes(self.samples[0][1])

    def _window(self, a: float, b: float) -> tuple[dict, dict]:
        """The last sample at or before ``a`` and the first at or after ``b``: a sync is a burst, so
        interpolating between samples would miss part of one; this errs by at most a sample's traffic."""
        start = max((s for s in self.samples if s[0] <= a), default=self.samples[0], key=lambda s: s[0])
        end = min((s for s in self.samples if s[0] >= b), default=self.samples[-1], key=lambda s: s[0])
        return start[1], end[1]

    def between(self, a: float, b: float) -> float:
        start, end = self._window(a, b)
        return self._bytes(end) - self._bytes(start)

    def hosts_between(self, a: float, b: float) -> dict[str, tuple[int, int]]:
        """Per host, (tx, rx) bytes between ``a`` and ``b``: which links carried the window's traffic."""
        start, end = self._window(a, b)
        return {h: (end[h]["tx_bytes"] - start[h]["tx_bytes"], end[h]["rx_bytes"] - start[h]["rx_bytes"]) for h in end}


class LabPlace:
    """torchft's processes on lab hosts: the Lighthouse on h0, replica r on h<r+1> (see OnePlace)."""

    def __init__(self, cfg, ov: list[str]):
        self.cfg, self.ov = cfg, ov

    def lighthouse(self):
        from neuroray.lab import command

        binary = str(Path(sys.executable).parent / "torchft_lighthouse")
        # as torchft_side_by_side starts its in-process one: min_replicas 1, join timeout 10 s, tick 100 ms
        argv, env = command(self.ov, "h0", [binary, "--bind", f"[::]:{LIGHTHOUSE_PORT}", "--min_replicas", "1",
                                            "--join_timeout_ms", "10000", "--quorum_tick_ms", "100"])
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ip, deadline = self.cfg.host_ip(0), time.monotonic() + 60
        while True:  # the machine reaches every host over the lab's bridge
            try:
                socket.create_connection((ip, LIGHTHOUSE_PORT), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"torchft_lighthouse on h0 did not listen (rc {proc.poll()})") from None
                time.sleep(0.1)

        def stop() -> None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        return f"http://{ip}:{LIGHTHOUSE_PORT}", stop

    def replica(self, r: int, argv: list[str], env: dict) -> tuple[list[str], dict, str]:
        from neuroray.lab import command

        host_argv, host_env = command(self.ov, f"h{r + 1}", argv, cwd=str(ROOT))
        host_env.update(PYTHONPATH=env["PYTHONPATH"], OMP_NUM_THREADS=env["OMP_NUM_THREADS"], GLOO_SOCKET_IFNAME="eth0")
        return host_argv, host_env, self.cfg.host_ip(r + 1)


def run_torchft(cfg, ov, args: dict, tmp: Path, rate: str, kill_at: int | None) -> dict:
    with Wire(cfg) as wire:
        out = torchft_arm(args, tmp / f"torchft-{rate}{'-kill' if kill_at is not None else ''}", kill_at,
                          deadline_s=900, place=LabPlace(cfg, ov))
    syncs = int(args["rounds"])  # every sync runs inside a step, all of them inside the window
    out.update(arm="torchft", wire=wire.total(), window=wire.between(out["first_step_t"], out["last_step_t"]),
               window_syncs=syncs, window_hosts=wire.hosts_between(out["first_step_t"], out["last_step_t"]),
               placement=", ".join(f"r{r}: h{r + 1}" for r in range(int(args["m"]))))
    return out


def run_neuroray(cfg, ov, args: dict, tmp: Path, rate: str, compression: str, kill_at: int | None,
                 more: tuple[str, ...] = ()) -> dict:
    """One neuroray run on the lab (``more``: further overrides, e.g. to switch a feature off and see its bytes)."""
    from neuroray.checkpoint import load_checkpoint
    from neuroray.training.plots import metric_rows

    run_dir = tmp / f"neuroray-{compression}{'-bare' if more else ''}-{rate}{'-kill' if kill_at is not None else ''}"
    extra = [f"diloco.compression={compression}", f"cluster.cpus_per_holder={cfg.num_cpus}",
             "cluster.local_stores=shared", *more]
    if kill_at is not None:
        extra.append("checkpoint.every_round=true")
    ovs = overrides(args, str(run_dir), extra)
    load_config(ovs)  # a bad override fails here, not on h0
    driver_args = ("--hold",) + (("--kill-at", str(kill_at)) if kill_at is not None else ())
    with Wire(cfg) as wire:
        run = Run(ov, ovs, driver=SBS_DRIVER, driver_args=driver_args, timeout_s=900)
        res = run.wait()
    rows, h = metric_rows(run_dir / "metrics.jsonl")[0], int(args["h"])
    inner = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:]) if b["step"] % h not in (0, 1)]
    dones = run.dones()
    ips = {cfg.host_ip(i): f"h{i}" for i in range(cfg.hosts)}
    out = {"arm": "neuroray" + ("" if compression == "none" else f" {compression}"), "wall_s": res["wall_s"],
           "tokens": res["tokens"], "inner_step_s": statistics.median(inner), "sync_bytes": res["sync_bytes"],
           "outer_steps": len(res["comm"]), "wire": wire.total(),
           "window": wire.between(min(dones.values()), max(dones.values())), "window_syncs": int(args["rounds"]) - 1,
           "window_hosts": wire.hosts_between(min(dones.values()), max(dones.values())),
           "placement": ", ".join(f"{s.split('-')[0]}: {ips.get(ip, ip)}" for s, ip in sorted(run.placement.items()))}
    if kill_at is not None:
        kill_t = next(e["t"] for e in run.events if e["kind"] == "kill")
        nxt = run.first_step_submitted_after(kill_t)
        assert res["recoveries"], "the kill did not trigger a recovery"
        out.update(recovery_s=nxt[1] - kill_t if nxt else float("nan"), restored_s=res["recoveries"][0]["seconds"])
    else:
        out["eval_loss"] = eval_loss(load_config(ovs), load_checkpoint(run_dir / "checkpoint")[0])
    return out


def idle_rate(cfg, seconds: float = 10.0) -> float:
    """Bytes per second crossing the links while nothing but the lab's idle Ray nodes runs."""
    with Wire(cfg) as wire:
        time.sleep(seconds)
    return wire.total() / (wire.samples[-1][0] - wire.samples[0][0])


NOTE = ("{hosts} lab hosts on one 2-CPU machine (docs/lab.md), the setup of benchmarks/torchft_side_by_side.py: "
        "neuroray's tiny model, M={m} replicas of one stage, H={h}, {rounds} outer steps, {mb} x {seq_len} tokens "
        "per replica and step, seed {seed}, one torch thread per replica, the same initial weights and data "
        "streams. torchft: Lighthouse on h0, replica r on h<r+1>, Gloo over the lab links. neuroray: driver on h0, "
        "one holder per host (placement column), `cluster.local_stores=shared` (data, keys and snapshots on a "
        "disk every host sees; neither arm moves data over a link). Wire: the lab's veth counters, sum over hosts "
        "of (tx + rx) / 2, TCP/IP/Ethernet headers and every control message included; whole run (process start "
        "to exit; neuroray: its actors' start, the final snapshot and evaluation) and per outer step in the "
        "steady window (first inner step's end to the last's, divided by the outer steps inside it: all of "
        "torchft's, neuroray's minus its last); per host, what its link sent and received in that window. The lab's idle Ray nodes send {idle:.0f} B/s across the links "
        "in both arms' counts. Counted: the sync bytes each arm counts itself (neuroray: pseudo-gradients up + "
        "broadcast down, from the payloads; torchft: the tensors handed to `Manager.allreduce`). Recovery "
        "(unshaped only): replica 1 killed mid-round, definitions as in \"Side by side with torchft DiLoCo\". "
        "Arms `no replay/spot checks`: the same with `ponw.replay_check=false ponw.spot_check_rate=0`, the driver's "
        "per-round reads of theta0, which cross a link when Ray ran the outer-step task on a holder's host. "
        "Step and wall times move with the machine's load (2 CPUs shared with other work); bytes and losses "
        "do not.")


def _write(rows: list[tuple[str, dict, dict]], args: dict, idle: float, cmd: str) -> None:
    note = NOTE.format(hosts=int(args["m"]) + 1, idle=idle, **args)
    for rate, c, k in rows:
        if "error" in c:
            cells = [rate, c["arm"], "failed: " + c["error"]] + ["-"] * 9
        else:
            rec = "-"
            if k and "error" in k:
                rec = "failed: " + k["error"]
            elif k and c["arm"] == "torchft":
                rec = f"**{k['full_quorum_s']:.2f} s** (restarted process's first step after {k['recovery_s']:.2f} s)"
            elif k:
                rec = f"**{k['recovery_s']:.2f} s** (holder restored from its snapshot in {k['restored_s']:.2f} s)"
            cells = [rate, c["arm"], f"{c['eval_loss']:.4f}", f"{c['tokens']:,}",
                     f"{c['wire'] / 2**20:.2f} MiB",
                     f"**{c['window'] / c['window_syncs'] / 2**20:.2f} MiB**",
                     f"{c['sync_bytes'] / max(c['outer_steps'], 1) / 2**20:.2f} MiB",
                     f"{c['inner_step_s'] * 1e3:.1f} ms", f"{c['wall_s']:.1f}", rec, c["placement"],
                     "; ".join(f"{h} {tx / 2**20:.1f}/{rx / 2**20:.1f}" for h, (tx, rx) in c["window_hosts"].items())]
        append_row(SECTION, ["link", "arm", "eval loss", "tokens", "wire, whole run", "wire per outer step (steady)",
                             "counted sync bytes per outer step", "median inner step", "loop wall s",
                             "recovery after a replica is killed", "placement",
                             "steady window per host, tx/rx MiB", "machine", "command"],
                   cells + [machine(), f"`{cmd}`"], note=note)


def _attempt(fn, *a) -> dict:
    try:
        return fn(*a)
    except Exception as exc:  # noqa: BLE001  (one failed run is a result; the others still run)
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:160]
        print(f"FAILED {fn.__name__}: {exc}", flush=True)
        return {"error": line}


def main(argv: list[str]) -> None:
    args = {"rounds": "6", "h": "20", "m": "2", "mb": "4", "seq_len": "64", "seed": "0",
            "rates": "unshaped,100mbit", "compressions": "none,int8,sparse", "bare": "sparse", "recovery": "1",
            "write": "1",
            **dict(a.split("=", 1) for a in argv)}
    if int(args["m"]) < 2 or int(args["rounds"]) < 3:
        raise SystemExit("need m >= 2 (replica 1 is the one killed) and rounds >= 3 (the kill is in round 2)")
    load_config(overrides(args, "unused"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so lab_session's `finally` removes the lab
    kill_at = 2 * int(args["h"]) + int(args["h"]) // 2  # mid-round, in the third round (as torchft_side_by_side)
    rates = [r for r in args["rates"].split(",") if r]
    rows: list[tuple[str, dict, dict]] = []
    # the run directories must be seen by every host: /tmp is each host's own, /var/tmp the machine's
    with tempfile.TemporaryDirectory(prefix="nt-sbs-", dir="/var/tmp") as shared, \
            tempfile.TemporaryDirectory(prefix="nt-lab-") as tmp, \
            lab_session("nt", "10.231.40.0/24", "/run/neuroray-torchft-host", f"{tmp}/lab",
                        hosts=int(args["m"]) + 1) as (cfg, ov):
        idle = idle_rate(cfg)
        print(f"idle links: {idle:.0f} B/s", flush=True)
        for rate in rates:
            _shape_all(cfg, ov, None if rate == "unshaped" else rate)
            recover = args["recovery"] == "1" and rate == "unshaped"
            arms = [("torchft", lambda k: run_torchft(cfg, ov, args, Path(shared), rate, k))]
            arms += [(f"neuroray {c}", lambda k, c=c: run_neuroray(cfg, ov, args, Path(shared), rate, c, k))
                     for c in args["compressions"].split(",") if c]
            arms += [(f"neuroray {c}, no replay/spot checks",
                      lambda k, c=c: run_neuroray(cfg, ov, args, Path(shared), rate, c, k, NO_THETA0_READS))
                     for c in args["bare"].split(",") if c]
            for name, go in arms:
                clean = _attempt(go, None)
                clean["arm"] = name.replace(" none", "")
                print(f"{rate} {name}: {json.dumps(clean)}", flush=True)
                kill = {}
                if recover and name in ("torchft", "neuroray none"):
                    kill = _attempt(go, kill_at)
                    print(f"{rate} {name} kill: {json.dumps(kill)}", flush=True)
                rows.append((rate, clean, kill))
        _shape_all(cfg, ov, None)
    if args["write"] != "0":
        _write(rows, args, idle, "flock /tmp/neuroray-cpu.lock python benchmarks/lab_torchft.py " + shlex.join(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
