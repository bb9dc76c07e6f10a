"""Raw TCP between two lab hosts: can one reach the other, and how fast do bytes really flow.

Both ends run on lab hosts (inside their namespaces) and the destination is always a lab host's own
address, so the traffic never leaves the lab. Every transfer is bounded in bytes and in time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager

from neuroray.errors import LabError
from neuroray.lab.control import attach, command, host_index

# accept connections on (ip, port); for each, count bytes until EOF; print one JSON line per connection
_SERVER = r"""
import json, socket, sys, time
ip, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((ip, port)); s.listen(8)
print("ready", flush=True)
while time.monotonic() < deadline:
    s.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        c, _ = s.accept()
    except OSError:
        break
    c.settimeout(max(0.1, deadline - time.monotonic()))
    n, t0, t1 = 0, None, None
    try:
        while True:
            b = c.recv(1 << 20)
            if not b:
                break
            if t0 is None:
                t0 = time.monotonic()
            n += len(b); t1 = time.monotonic()
    except OSError:
        pass
    c.close()
    print(json.dumps({"bytes": n, "seconds": (t1 - t0) if n else 0.0}), flush=True)
"""

# connect to (ip, port) once, within the timeout; send nbytes (0: just connect); exit 0 on success
_CLIENT = r"""
import socket, sys, time
ip, port, nbytes, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + timeout
try:
    c = socket.create_connection((ip, port), timeout=timeout)
    c.settimeout(max(0.1, deadline - time.monotonic()))
    chunk, sent = b"\0" * (1 << 16), 0
    while sent < nbytes and time.monotonic() < deadline:
        c.sendall(chunk[: min(len(chunk), nbytes - sent)]); sent += min(len(chunk), nbytes - sent)
    c.close()
except OSError as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr); sys.exit(1)
"""


@contextmanager
def listener(overrides, host: str, port: int = 5201, timeout_s: float = 60.0):
    """A byte-counting TCP server on ``host``'s lab address while the block runs; yields its Popen."""
    cfg, _ = attach(overrides)
    ip = cfg.host_ip(host_index(cfg, host))
    argv, env = command(overrides, host, [sys.executable, "-c", _SERVER, ip, str(port), str(timeout_s)], cwd="/")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise LabError(f"the probe listener on {host} did not start: {proc.stderr.read()[-300:]}")
        yield proc
    finally:
        proc.kill()  # our own child, by its PID
        proc.wait()


def send(overrides, src: str, dst: str, nbytes: int = 0, port: int = 5201, timeout_s: float = 5.0) -> bool:
    """Connect from ``src`` to ``dst``'s listener and send ``nbytes``; True if it connected and sent all."""
    cfg, _ = attach(overrides)
    ip = cfg.host_ip(host_index(cfg, dst))
    argv, env = command(overrides, src, [sys.executable, "-c", _CLIENT, ip, str(port), str(nbytes),
                                         str(timeout_s)], cwd="/")
    try:
        return subprocess.run(argv, env=env, capture_output=True, timeout=timeout_s + 30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def transfer(overrides, src: str, dst: str, nbytes: int, port: int = 5201, timeout_s: float = 30.0) -> dict:
    """Send ``nbytes`` from ``src`` to ``dst`` (bounded by ``timeout_s``); returns what arrived and the
    receiver's measured rate: ``{"bytes", "seconds", "mbit_s"}``."""
    with listener(overrides, dst, port, timeout_s + 5) as server:
        ok = send(overrides, src, dst, nbytes, port, timeout_s)
        line = server.stdout.readline().strip() if ok else ""
    if not ok or not line:
        raise LabError(f"transfer {src} -> {dst} failed (is {dst} cut?)")
    got = json.loads(line)
    got["mbit_s"] = got["bytes"] * 8 / got["seconds"] / 1e6 if got["seconds"] > 0 else float("inf")
    return got
