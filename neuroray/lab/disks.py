"""Each host's own disk: a private mount namespace where the host's directory tree replaces /tmp and
``host_root`` (HOME and cache live there), so a path written on one host does not exist on another.

`ip netns exec` gives only a throwaway mount namespace per command, so each host gets a holder process
(``unshare --mount ... sleep infinity``, itself inside the host's network namespace) that keeps one mount
namespace alive; every process of the host enters both namespaces with ``nsenter``. The mounts exist only
in that namespace: they vanish when its last process exits, and the machine's own /proc/mounts never
shows them. The storage itself is ``<lab_dir>/disks/h<i>``, readable from outside for logs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from neuroray.errors import LabError
from neuroray.lab.config import LabConfig
from neuroray.lab.proc import identity, sh


def disk_dir(cfg: LabConfig, i: int) -> Path:
    return Path(cfg.lab_dir) / "disks" / f"h{i}"


def create_disk(cfg: LabConfig, i: int) -> Path:
    d = disk_dir(cfg, i)
    for sub in ("home/.ray", "cache", "tmp"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(d / "tmp", 0o1777)  # a real /tmp: world-writable, sticky
    return d


def start_holder(cfg: LabConfig, i: int) -> list[int]:
    """Start host i's mount-namespace holder; returns its (pid, start time). `ip netns exec` and `unshare`
    both exec in place, so the child's PID is the holder's."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", cfg.netns(i), "unshare", "--mount", "--propagation", "private", "--",
         "sleep", "infinity"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    own = os.readlink("/proc/self/ns/mnt")
    deadline = time.monotonic() + cfg.command_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabError(f"the mount-namespace holder of h{i} exited with {proc.returncode}; is unshare installed?")
        try:
            ns_ready = os.readlink(f"/proc/{proc.pid}/ns/mnt") != own
            comm = Path(f"/proc/{proc.pid}/comm").read_text().strip()
        except OSError:
            ns_ready, comm = False, ""
        if ns_ready and comm == "sleep":
            ident = identity(proc.pid)
            if ident:
                return ident
        time.sleep(0.02)
    raise LabError(f"the mount-namespace holder of h{i} did not start in {cfg.command_timeout_s:g}s")


def software_under_tmp() -> list[str]:
    """The code every host runs (this checkout, the Python environment, PYTHONPATH entries) where it lies
    under /tmp, which each host's own tmp hides: a real machine has its software installed, not in /tmp."""
    import neuroray

    paths = {Path(neuroray.__file__).resolve().parents[1], Path(sys.prefix).resolve()}
    paths |= {Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    under = sorted(str(p) for p in paths if p.is_dir() and p.parts[:2] == ("/", "tmp") and len(p.parts) > 2)
    return [p for p in under if not any(p != q and p.startswith(q + "/") for q in under)]  # outermost only


def mount_disk(cfg: LabConfig, i: int, holder_pid: int) -> None:
    """Bind host i's tree over host_root, then its tmp over /tmp (in that order: host_root is not under /tmp),
    then the software under /tmp back in place, staged through the host's tree before /tmp is covered."""
    d = disk_dir(cfg, i)
    Path(cfg.host_root).mkdir(parents=True, exist_ok=True)  # an empty mount point on the machine
    enter = ["nsenter", f"--mount=/proc/{holder_pid}/ns/mnt", "--"]
    sh(enter + ["mount", "--bind", str(d), cfg.host_root], cfg.command_timeout_s)
    kept = software_under_tmp()
    for k, path in enumerate(kept):
        (d / "software" / str(k)).mkdir(parents=True, exist_ok=True)
        sh(enter + ["mount", "--bind", path, f"{cfg.host_root}/software/{k}"], cfg.command_timeout_s)
    sh(enter + ["mount", "--bind", str(d / "tmp"), "/tmp"], cfg.command_timeout_s)
    for k, path in enumerate(kept):
        (d / "tmp" / path[len("/tmp/"):]).mkdir(parents=True, exist_ok=True)  # its mount point, on this host's tmp
        sh(enter + ["mount", "--bind", f"{cfg.host_root}/software/{k}", path], cfg.command_timeout_s)


def host_env(cfg: LabConfig, i: int, base: dict | None = None) -> dict:
    """The environment of every process on host i: its own HOME, cache and temp, the lab's Ray head."""
    env = dict(os.environ if base is None else base)
    home = f"{cfg.host_root}/home"
    env.update(HOME=home, XDG_CACHE_HOME=f"{cfg.host_root}/cache", TMPDIR="/tmp", RAY_AUTH_MODE="token",
               RAY_ADDRESS=cfg.head_address, RAY_USAGE_STATS_ENABLED="0", NEURORAY_LAB_HOST=f"h{i}")
    env.pop("RAY_AUTH_TOKEN", None)  # the host's own ~/.ray/auth_token is the one to use
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    return env


def enter_argv(cfg: LabConfig, i: int, holder_pid: int, cwd: str | None = None) -> list[str]:
    """The prefix that runs a command on host i: its network and mount namespaces, a directory that exists
    there (a cwd under /tmp or host_root is the machine's, not the host's: fall back to the host's HOME)."""
    cwd = cwd or os.getcwd()
    shown = any(cwd == p or cwd.startswith(p + "/") for p in software_under_tmp())
    if not shown and (cwd == "/tmp" or cwd.startswith(("/tmp/", cfg.host_root))):
        cwd = f"{cfg.host_root}/home"
    return ["nsenter", f"--net=/var/run/netns/{cfg.netns(i)}", f"--mount=/proc/{holder_pid}/ns/mnt",
            f"--wd={cwd}", "--"]


def remove_disks(cfg: LabConfig) -> None:
    shutil.rmtree(Path(cfg.lab_dir) / "disks", ignore_errors=True)
    try:
        Path(cfg.host_root).rmdir()  # only the empty mount point up made; never anything with content
    except OSError:
        pass
