"""Raw TCP rate between two lab hosts, unshaped and under tbf at 1 Gbit/s, 100 Mbit/s and 20 Mbit/s.

    flock /tmp/neuroray-cpu.lock python benchmarks/lab_links.py [repeats=3] [seconds=2]

Brings up its own 2-host lab (no Ray, prefix "nb", so a running lab is not touched), shapes both hosts'
links in both directions, sends h0 -> h1 about `seconds` worth of bytes at the nominal rate (250 MB when
unshaped; every transfer also stops at 30 s), prints the receiver's rate (median of the repeats), and takes
the lab down. Needs root; elsewhere it prints one line and exits 0. Traffic goes only to lab addresses.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RATES = [None, "1gbit", "100mbit", "20mbit"]
UNSHAPED_BYTES = 250_000_000


def main(argv: list[str]) -> int:
    opts = dict(a.split("=", 1) for a in argv)
    repeats, seconds = int(opts.get("repeats", 3)), float(opts.get("seconds", 2))
    if os.geteuid() != 0:
        print("lab_links: skipped, the lab needs root (network namespaces, tc)")
        return 0
    from neuroray.lab import down, load_lab_config, probe, shape, up
    from neuroray.lab.config import rate_bits

    lab_dir = tempfile.mkdtemp(prefix="neuroray-lab-bench-")
    cfg = load_lab_config(["prefix=nb", "hosts=2", "ray=false", f"lab_dir={lab_dir}",
                           "host_root=/run/neuroray-bench-host"])
    ov = [f"lab_dir={lab_dir}"]
    rows = []
    try:
        up(cfg)
        for rate in RATES:
            for host in ("h0", "h1"):
                shape(ov, host, rate)
            nbytes = UNSHAPED_BYTES if rate is None else int(rate_bits(rate) / 8 * seconds)
            got = [probe.transfer(ov, "h0", "h1", nbytes, timeout_s=30) for _ in range(repeats)]
            rates = [g["mbit_s"] for g in got]
            rows.append((rate or "unshaped", nbytes, statistics.median(rates), min(rates), max(rates)))
    finally:
        down(cfg)
    print(f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, kernel {os.uname().release}, "
          f"raw TCP h0 -> h1, median of {repeats}")
    print("| link (tbf, both directions) | bytes per transfer | Mbit/s (median) | min | max |")
    print("|---|---|---|---|---|")
    for name, nbytes, mbit, lo, hi in rows:
        print(f"| {name} | {nbytes:,} | {mbit:.0f} | {lo:.0f} | {hi:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
