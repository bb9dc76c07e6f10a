"""Run the lab's system commands and stop its processes by PID, never by name.

A PID alone can be reused once its process dies (a crashed `up` leaves PIDs in the state file that may
belong to someone else by the time `down` runs), so every PID the lab records travels with its kernel
start time, and a signal is only sent when both still match.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from neuroray.errors import LabError


def sh(argv: list[str], timeout: float, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``argv``; on failure raise LabError with the command and the last line of its stderr."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                             stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise LabError(f"{argv[0]} is not installed; the lab needs iproute2 (ip, tc) and util-linux (unshare, "
                       "nsenter)") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"`{' '.join(argv[:6])}` did not finish in {timeout:g}s; raise the lab's "
                       "*_timeout_s or look at the machine's load") from None
    if check and res.returncode != 0:
        raise LabError(f"`{' '.join(argv[:8])}` failed: {last_line(res.stderr or res.stdout)}")
    return res


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after its closing ')'
    rest = stat.rsplit(")", 1)[1].split()
    # a zombie has exited (its parent has not collected it yet): it holds no namespace, treat it as gone
    return None if rest[0] == "Z" else int(rest[19])


def identity(pid: int) -> list[int] | None:
    st = start_time(pid)
    return None if st is None else [pid, st]


def netns_pids(ns: str, timeout: float) -> list[int]:
    """Every process whose network namespace is ``ns`` (``ip netns pids``); empty if the namespace is gone."""
    res = sh(["ip", "netns", "pids", ns], timeout, check=False)
    return [int(p) for p in res.stdout.split() if p.isdigit()] if res.returncode == 0 else []


def kill(idents: list[list[int]], grace_s: float) -> int:
    """SIGTERM each (pid, start time) that still matches, SIGKILL survivors after ``grace_s``. Returns the count."""
    alive = [(p, st) for p, st in idents if p != os.getpid() and start_time(p) == st]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p, st in alive:
            if start_time(p) == st:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 10.0)
        while time.monotonic() < deadline and any(start_time(p) == st for p, st in alive):
            time.sleep(0.05)
        alive = [(p, st) for p, st in alive if start_time(p) == st]
        if not alive:
            break
    return len(idents)

