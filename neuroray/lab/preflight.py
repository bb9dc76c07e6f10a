"""Checks `up` makes before it creates anything, so a refusal leaves nothing behind and says why in one line."""

from __future__ import annotations

import os
import shutil
import subprocess

from neuroray.errors import LabError
from neuroray.lab import hosts, state
from neuroray.lab.config import LabConfig

TOOLS = ("ip", "tc", "unshare", "nsenter")
BASE_MB = 64  # a host without Ray: its holder and namespaces


def check_root() -> None:
    if os.geteuid() != 0:
        raise LabError("lab up needs root (network namespaces, veths, tc and mounts); run it as root, "
                       "e.g. `sudo -E python -m neuroray.lab up`")


def check_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise LabError(f"the lab needs {', '.join(missing)} on PATH; install iproute2 and util-linux")


def check_namespaces(cfg: LabConfig) -> None:
    """Create and drop a throwaway network + mount namespace: the one test that tells whether this kernel and
    these privileges allow the lab (an unprivileged container, a missing CAP_SYS_ADMIN, no CONFIG_NET_NS)."""
    try:
        res = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True, text=True,
                             timeout=cfg.command_timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise LabError("`unshare --net --mount true` hung; network namespaces look unusable here") from None
    if res.returncode != 0:
        why = (res.stderr.strip().splitlines() or ["exit status %d" % res.returncode])[-1]
        raise LabError(f"network namespaces are not available here (`unshare --net --mount` failed: {why}); "
                       "the lab needs a kernel with network namespaces and CAP_SYS_ADMIN")


def available_mb() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def check_memory(cfg: LabConfig) -> None:
    per_host = cfg.memory_per_host_mb if cfg.ray else BASE_MB
    need, have = cfg.hosts * per_host, available_mb()
    if need > have:
        raise LabError(f"hosts={cfg.hosts} needs about {need} MiB ({per_host} MiB per host, memory_per_host_mb) "
                       f"but {have} MiB is available; use fewer hosts")


def check_free(cfg: LabConfig) -> None:
    """Nothing of a lab with this prefix exists yet, and no address or route on the machine overlaps the subnet."""
    t = cfg.command_timeout_s
    leftovers = hosts.namespaces(cfg.prefix, t) + hosts.links(cfg.prefix, t)
    if leftovers or state.load(cfg.lab_dir) is not None:
        what = ", ".join(leftovers) or str(state.path(cfg.lab_dir))
        raise LabError(f"a lab is already up ({what}); run `python -m neuroray.lab down` first")
    clashes = hosts.addresses_in(cfg.network, t)
    if clashes:
        raise LabError(f"the lab's address range {cfg.subnet} is already in use on this machine "
                       f"({'; '.join(clashes)}); pick another with subnet=...")


def check_all(cfg: LabConfig) -> None:
    check_root()
    check_tools()
    check_namespaces(cfg)
    check_memory(cfg)
    check_free(cfg)
