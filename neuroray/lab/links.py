"""Host links: kernel-shaped bandwidth (tbf, both directions), partitions by link-down, byte counters.

Both directions are shaped on an egress queue, which is where tbf works without an ifb device:
- download (bridge -> host): the root qdisc of the host's veth ``<prefix>v<i>`` on the machine;
- upload (host -> bridge): the root qdisc of ``eth0`` inside the host's namespace.
This kernel has no netem, so the lab adds no latency and no loss beyond what a full tbf queue drops.
"""

from __future__ import annotations

import json
from pathlib import Path

from neuroray.lab.config import LabConfig, normalize_rate, rate_bits
from neuroray.lab.proc import sh

MIN_BURST = 64 * 1024  # below one 64 KiB GSO segment tbf would stall


def _tc(cfg: LabConfig, i: int, direction: str) -> tuple[list[str], str]:
    """The tc command prefix and device of host i's queue for ``direction`` (upload or download)."""
    if direction == "upload":
        return ["tc", "-n", cfg.netns(i)], "eth0"
    return ["tc"], cfg.veth(i)


def set_rate(cfg: LabConfig, i: int, direction: str, rate: str | None) -> None:
    """Shape one direction of host i's link to ``rate`` (tc syntax), or remove the shaping with None."""
    tc, dev = _tc(cfg, i, direction)
    rate = normalize_rate(rate)
    if rate is None:
        # no root qdisc is "unshaped" (veth's default is noqueue); deleting one that is not there is fine
        sh(tc + ["qdisc", "del", "dev", dev, "root"], cfg.command_timeout_s, check=False)
        return
    burst = max(MIN_BURST, int(rate_bits(rate) / 8 * cfg.burst_ms / 1000))
    sh(tc + ["qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", str(burst),
             "latency", f"{cfg.queue_latency_ms:g}ms"], cfg.command_timeout_s)


def shape(cfg: LabConfig, i: int, upload: str | None, download: str | None) -> None:
    set_rate(cfg, i, "upload", upload)
    set_rate(cfg, i, "download", download)


def rates(cfg: LabConfig, i: int) -> dict:
    """What the kernel enforces now: ``{"upload": bits/s or None, "download": ...}`` read from `tc -j`."""
    out = {}
    for direction in ("upload", "download"):
        tc, dev = _tc(cfg, i, direction)
        res = sh(tc + ["-j", "qdisc", "show", "dev", dev], cfg.command_timeout_s, check=False)
        qdiscs = json.loads(res.stdout or "[]") if res.returncode == 0 else []
        tbf = [q for q in qdiscs if q.get("kind") == "tbf" and q.get("root")]
        out[direction] = int(tbf[0]["options"]["rate"]) * 8 if tbf else None  # tc -j reports bytes/s
    return out


def cut(cfg: LabConfig, i: int) -> None:
    """A real partition: the host's bridge-side veth goes down, so no frame reaches or leaves the host.
    The qdiscs stay attached, so `heal` restores the same shaping."""
    sh(["ip", "link", "set", cfg.veth(i), "down"], cfg.command_timeout_s)


def heal(cfg: LabConfig, i: int) -> None:
    sh(["ip", "link", "set", cfg.veth(i), "up"], cfg.command_timeout_s)


def is_up(cfg: LabConfig, i: int) -> bool:
    flags = Path(f"/sys/class/net/{cfg.veth(i)}/flags")
    return flags.exists() and bool(int(flags.read_text(), 16) & 0x1)  # IFF_UP


def counters(cfg: LabConfig) -> dict[str, dict[str, int]]:
    """Bytes each host really put on and took off the wire, from its veth's kernel counters.

    Read on the bridge side: what the veth transmitted went *to* the host (the host's rx), what it received
    came *from* the host (the host's tx). Counts are Ethernet frames after shaping, headers included, since
    the veth was created (they do not reset on cut/heal). Missing hosts read as zero.
    """
    out = {}
    for i, name in enumerate(cfg.host_names()):
        stats = Path(f"/sys/class/net/{cfg.veth(i)}/statistics")
        read = (lambda f: int((stats / f).read_text()) if (stats / f).exists() else 0)
        out[name] = {"tx_bytes": read("rx_bytes"), "rx_bytes": read("tx_bytes")}
    return out
