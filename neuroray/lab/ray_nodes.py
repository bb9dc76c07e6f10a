"""One Ray node per emulated host, started inside the host's namespaces; host 0 runs the head.

Ray 2.60 requires token authentication: `up` makes one token per lab and writes it to every host's own
``~/.ray/auth_token``, as an operator would copy it to each machine. `ray start` daemonizes, so its
processes stay in the host's network namespace and `down` finds them there with `ip netns pids`.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path

from neuroray.errors import LabError
from neuroray.lab.config import LabConfig
from neuroray.lab.disks import disk_dir, enter_argv, host_env
from neuroray.lab.proc import last_line, sh


def ray_binary() -> str:
    """The `ray` next to this Python (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise LabError("no `ray` executable next to this Python or on PATH; install ray[default]")
    return found


def write_token(cfg: LabConfig) -> None:
    token = secrets.token_hex(32)
    for i in range(cfg.hosts):
        p = disk_dir(cfg, i) / "home" / ".ray" / "auth_token"
        p.write_text(token)
        os.chmod(p, 0o600)


def start_node(cfg: LabConfig, i: int, holder_pid: int) -> None:
    """`ray start` on host i (the head when i == 0) with the host's address, its own temp dir, bounded memory."""
    argv = [ray_binary(), "start", f"--node-ip-address={cfg.host_ip(i)}", f"--num-cpus={cfg.num_cpus}",
            f"--object-store-memory={cfg.object_store_mb * 1024 * 1024}", "--temp-dir=/tmp/ray",
            "--disable-usage-stats"]
    if i == 0:
        argv += ["--head", f"--port={cfg.ray_port}", f"--dashboard-host={cfg.host_ip(0)}",
                 f"--dashboard-port={cfg.dashboard_port}"]
    else:
        argv += [f"--address={cfg.head_address}"]
    env = host_env(cfg, i)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # as the README starts a node: a raylet kills idle task workers after 1 s once actors fill its CPUs, and every
    # outer step's reduce task then starts a fresh worker (1.2-1.7 s of importing torch, measured each round)
    env["RAY_idle_worker_killing_time_threshold_ms"] = "300000"
    res = sh(enter_argv(cfg, i, holder_pid, cwd="/") + argv, cfg.ray_start_timeout_s, check=False, env=env)
    if res.returncode != 0:
        raise LabError(f"ray start on h{i} failed: {last_line(res.stderr or res.stdout)} "
                       f"(logs: {disk_dir(cfg, i)}/tmp/ray/session_latest/logs)")


def alive_nodes(cfg: LabConfig, holder0: int) -> int:
    """Alive nodes as host 0 sees them (`ray status` inside h0); 0 when the head does not answer."""
    env = host_env(cfg, 0)
    res = sh(enter_argv(cfg, 0, holder0, cwd="/") + [ray_binary(), "status", f"--address={cfg.head_address}"],
             cfg.command_timeout_s + 30, check=False, env=env)
    if res.returncode != 0:
        return 0
    active = res.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return len(re.findall(r"^\s*\d+\s+node_", active, flags=re.M))


def wait_alive(cfg: LabConfig, holder0: int) -> None:
    deadline = time.monotonic() + cfg.nodes_alive_timeout_s
    seen = 0
    while time.monotonic() < deadline:
        seen = alive_nodes(cfg, holder0)
        if seen >= cfg.hosts:
            return
        time.sleep(1.0)
    raise LabError(f"only {seen} of {cfg.hosts} Ray nodes are alive after {cfg.nodes_alive_timeout_s:g}s "
                   f"(logs under {cfg.lab_dir}/disks/h*/tmp/ray/session_latest/logs)")
