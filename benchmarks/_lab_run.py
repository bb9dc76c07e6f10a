"""Shared by benchmarks/lab_train.py and tests/test_lab_ops.py: a lab of their own, a training run on h0
streamed line by line (so a caller can cut a host mid-round), and the clocks read from its output.

Definitions (docs/lab.md, "Training across hosts: measured"):

* a step's *submit* time is when the driver first submitted it, its *done* time when the driver recorded it
  complete (benchmarks/_lab_driver.py);
* **cut -> next completed step**: from the `cut` to the done time of the first step whose submit time is
  after the cut. A step submitted before the cut may complete after it without any recovery (the fixed
  loop submits step s before it collects step s-1), so it does not count;
* **heal -> first accepted contribution**: from the `heal` to the first ledger proof, received after the
  heal, credited with a reward > 0 (the outer step used its pseudo-gradient), of a holder slot that ran on
  the cut host when the cut came.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "benchmarks" / "_lab_driver.py"

# The default config (2 stages x 2 replicas, model=tiny), sized down for 2 shared CPUs: a smaller vocabulary,
# shards and batch; one replica fills one lab host (2 CPUs each), so the two replicas sit on two hosts.
SMALL = ["data.vocab_size=512", "data.shard_tokens=20000", "data.seq_len=64", "data.microbatch_size=4",
         "data.num_microbatches=2",
         "progress_bar=false", "sample_tokens=4", "log_every=1", "cluster.cpus_per_holder=1",
         "checkpoint.interval_s=0", "checkpoint.every_round=true"]


@contextlib.contextmanager
def lab_session(prefix: str, subnet: str, host_root: str, lab_dir: str, hosts: int = 3):
    """A lab of its own (prefix, subnet, host_root), removed on the way out whatever happened."""
    from neuroray.lab import down, load_lab_config, up

    cfg = load_lab_config([f"prefix={prefix}", f"hosts={hosts}", f"subnet={subnet}", f"lab_dir={lab_dir}",
                           f"host_root={host_root}"])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{old}" if old else str(REPO)  # the Ray nodes import this checkout
    try:
        up(cfg)
        yield cfg, [f"lab_dir={lab_dir}"]
    finally:
        down(cfg)
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


class Run:
    """``python benchmarks/_lab_driver.py OVERRIDES`` on h0 (or ``driver`` with its own arguments first), its
    output read as it comes."""

    def __init__(self, ov: list[str], overrides: list[str], on_event=None, timeout_s: float = 900,
                 driver: Path = DRIVER, driver_args: tuple[str, ...] = ()):
        from neuroray.lab import command

        argv, env = command(ov, "h0", [sys.executable, str(driver), *driver_args, *overrides], cwd=str(REPO))
        self.events: list[dict] = []
        self.logs: list[tuple[float, str]] = []
        self.result: dict | None = None
        self.placement: dict[str, str] = {}  # holder slot -> node ip, before the first step
        self.node_ids: dict[str, str] = {}  # holder slot -> its PoNW node id, before the first step
        self.stderr = ""
        self.on_event = on_event
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._err.start()
        self.deadline = time.monotonic() + timeout_s

    def _read_err(self):
        self.stderr = self.proc.stderr.read()

    def wait(self) -> dict:
        timer = threading.Timer(max(self.deadline - time.monotonic(), 1), self.proc.kill)
        timer.start()
        try:
            for line in self.proc.stdout:
                if line.startswith("EV "):
                    ev = json.loads(line[3:])
                    self.events.append(ev)
                    if self.on_event:
                        self.on_event(self, ev)
                elif line.startswith("LOG "):
                    t, _, msg = line[4:].rstrip("\n").partition(" ")
                    self.logs.append((float(t), msg))
                elif line.startswith("PLACE "):
                    self.placement = json.loads(line[6:])
                elif line.startswith("IDS "):
                    self.node_ids = json.loads(line[4:])
                elif line.startswith("RESULT "):
                    self.result = json.loads(line[7:])
            self.proc.wait()
        finally:
            timer.cancel()
        self._err.join(timeout=10)
        if self.proc.returncode != 0 or self.result is None:
            tail = "\n".join(m for _, m in self.logs[-30:])
            raise RuntimeError(f"the run on h0 failed (rc {self.proc.returncode}):\n{tail}\n{self.stderr[-4000:]}")
        return self.result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    # ----- clocks ---------------------------------------------------------------------------------------
    def submits(self) -> dict[int, float]:
        return {e["step"]: e["t"] for e in self.events if e["kind"] == "submit"}

    def dones(self) -> dict[int, float]:
        return {e["step"]: e["t"] for e in self.events if e["kind"] == "done"}

    def first_step_submitted_after(self, t: float) -> tuple[int, float] | None:
        """(step, done time) of the first step submitted after ``t`` that completed; None if none did."""
        subs, dones = self.submits(), self.dones()
        later = sorted(s for s, ts in subs.items() if ts > t and s in dones)
        return (later[0], dones[later[0]]) if later else None


def holders_on(result: dict, ip: str, prefix: str) -> list[str]:
    """Holder slots (``r1-s0``, ...) whose actor lived on ``ip`` (Ray keeps dead actors in its state API)."""
    return sorted({a["name"][len(prefix):] for a in result["actors"]
                   if (a["name"] or "").startswith(prefix) and a["ip"] == ip})


def ledger_rows(ledger_file: Path) -> list[dict]:
    with sqlite3.connect(f"file:{ledger_file}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(
            "SELECT node_id, proof_type, outer_round, received_ms, status, reward FROM proofs ORDER BY seq")]


def first_accepted_after(rows: list[dict], node_ids: set[str], t: float) -> float | None:
    """Unix time of the first credited proof with a reward > 0 of one of ``node_ids`` received after ``t``."""
    times = [r["received_ms"] / 1000 for r in rows if r["node_id"] in node_ids and r["status"] == "credited"
             and r["reward"] > 0 and r["received_ms"] / 1000 > t]
    return min(times) if times else None
