"""Emulated hosts' networks: one bridge, one network namespace per host, a veth pair from each to the bridge.

Host i lives in namespace ``<prefix>h<i>`` with address ``.i+1`` on ``eth0``; the machine itself holds the
bridge's address, so a driver outside the lab can reach it. No host gets a default route, so a host can
reach only the lab's own addresses.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

from neuroray.lab.config import LabConfig
from neuroray.lab.proc import sh


def create_bridge(cfg: LabConfig) -> None:
    t = cfg.command_timeout_s
    sh(["ip", "link", "add", cfg.bridge, "type", "bridge"], t)
    _no_ipv6(cfg.bridge)
    sh(["ip", "addr", "add", f"{cfg.bridge_ip}/{cfg.network.prefixlen}", "dev", cfg.bridge], t)
    sh(["ip", "link", "set", cfg.bridge, "up"], t)


def _no_ipv6(dev: str) -> None:
    knob = Path(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6")
    if knob.exists():
        knob.write_text("1")


def create_netns(cfg: LabConfig, i: int) -> None:
    sh(["ip", "netns", "add", cfg.netns(i)], cfg.command_timeout_s)


def create_link(cfg: LabConfig, i: int) -> None:
    """The veth pair: ``<prefix>v<i>`` on the bridge, its peer ``eth0`` inside the host with the host's address."""
    t, ns, veth = cfg.command_timeout_s, cfg.netns(i), cfg.veth(i)
    sh(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns], t)
    _no_ipv6(veth)
    # IPv6 would chatter (router solicitations, MLD) on every link: off, so the counters show only real traffic
    sh(["ip", "netns", "exec", ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6 || true"], t)
    sh(["ip", "link", "set", veth, "master", cfg.bridge, "up"], t)
    sh(["ip", "-n", ns, "addr", "add", f"{cfg.host_ip(i)}/{cfg.network.prefixlen}", "dev", "eth0"], t)
    sh(["ip", "-n", ns, "link", "set", "eth0", "up"], t)
    sh(["ip", "-n", ns, "link", "set", "lo", "up"], t)


def namespaces(prefix: str, timeout: float) -> list[str]:
    """The lab's namespaces that exist now, found by name: ``<prefix>h<digits>``."""
    res = sh(["ip", "netns", "list"], timeout, check=False)
    names = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
    return sorted(n for n in names if re.fullmatch(rf"{prefix}h\d+", n))


def links(prefix: str, timeout: float) -> list[str]:
    """The lab's links in this (the machine's) namespace: ``<prefix>v<digits>`` and ``<prefix>br0``."""
    res = sh(["ip", "-j", "link", "show"], timeout, check=False)
    names = [d["ifname"] for d in json.loads(res.stdout or "[]")]
    return sorted(n for n in names if re.fullmatch(rf"{prefix}v\d+|{prefix}br0", n))


def addresses_in(network, timeout: float) -> list[str]:
    """``dev addr/len`` for every address on this machine that overlaps ``network`` (a clash for the lab)."""
    res = sh(["ip", "-j", "-4", "addr", "show"], timeout, check=False)
    hits = []
    for dev in json.loads(res.stdout or "[]"):
        for a in dev.get("addr_info", []):
            iface = ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
            if iface.network.overlaps(network):
                hits.append(f"{dev['ifname']} {iface}")
    routes = sh(["ip", "-j", "-4", "route", "show"], timeout, check=False)
    for r in json.loads(routes.stdout or "[]"):
        if r.get("dst", "default") != "default" and ipaddress.ip_network(r["dst"], strict=False).overlaps(network):
            hits.append(f"route {r['dst']} dev {r.get('dev', '?')}")
    return sorted(set(hits))


def delete_netns(ns: str, timeout: float) -> None:
    sh(["ip", "netns", "delete", ns], timeout, check=False)


def delete_link(name: str, timeout: float) -> None:
    """Deleting one end of a veth deletes both; a link already gone is not an error (down is idempotent)."""
    sh(["ip", "link", "delete", name], timeout, check=False)
