"""The lab's verbs: up, down, status, cut, heal, shape, and running a command on a host.

Every verb but `up` works from the state file that `up` keeps (so it runs in any process, after a crash
too); `down` also discovers namespaces and links by name prefix, because a crash can precede a save.
"""

from __future__ import annotations

import os
import sys

from neuroray.errors import LabError
from neuroray.lab import disks, hosts, links, preflight, ray_nodes, state as st
from neuroray.lab.config import LabConfig, load_lab_config
from neuroray.lab.proc import identity, kill, netns_pids


def _record_pids(cfg: LabConfig, state: dict) -> None:
    """Remember (pid, start time) of everything in the lab's namespaces, for a `down` after a crash."""
    known = {tuple(p) for p in state["pids"]}
    for i in range(cfg.hosts):
        for pid in netns_pids(cfg.netns(i), cfg.command_timeout_s):
            ident = identity(pid)
            if ident and tuple(ident) not in known:
                state["pids"].append(ident)
                known.add(tuple(ident))
    st.save(cfg.lab_dir, state)


def up(cfg: LabConfig) -> dict:
    """Create ``cfg.hosts`` emulated hosts; on any failure (Ctrl-C included) remove what was made, then raise."""
    preflight.check_all(cfg)
    state = {"config": cfg.to_dict(), "phase": "starting", "holders": {}, "pids": []}
    st.save(cfg.lab_dir, state)
    try:
        hosts.create_bridge(cfg)
        for i, name in enumerate(cfg.host_names()):
            hosts.create_netns(cfg, i)
            disks.create_disk(cfg, i)
            hosts.create_link(cfg, i)
            state["holders"][name] = disks.start_holder(cfg, i)
            st.save(cfg.lab_dir, state)
            disks.mount_disk(cfg, i, state["holders"][name][0])
            links.shape(cfg, i, cfg.upload_rate(), cfg.download_rate())
        if cfg.ray:
            ray_nodes.write_token(cfg)
            for i, name in enumerate(cfg.host_names()):
                ray_nodes.start_node(cfg, i, state["holders"][name][0])
                _record_pids(cfg, state)
            ray_nodes.wait_alive(cfg, state["holders"]["h0"][0])
            _record_pids(cfg, state)
        state["phase"] = "up"
        st.save(cfg.lab_dir, state)
        return state
    except BaseException as exc:
        down(cfg)
        if isinstance(exc, (LabError, OSError)):  # OSError: a path the lab could not create or mount
            raise LabError(f"lab up failed and was cleaned up: {exc}") from exc
        raise


def down(cfg: LabConfig) -> list[str]:
    """Remove every process, namespace, link and disk of the lab; idempotent; returns what it removed."""
    saved = st.load_quiet(cfg.lab_dir)
    if saved:
        cfg = load_lab_config(base=saved["config"])
    t = cfg.command_timeout_s
    saved = saved or {}
    names = set(hosts.namespaces(cfg.prefix, t)) | ({cfg.netns(i) for i in range(cfg.hosts)} if saved else set())
    names = sorted(names)
    removed = []
    recorded = [list(p) for p in saved.get("pids", [])] + [list(p) for p in saved.get("holders", {}).values()]
    # kill by PID only: recorded ones whose start time still matches, then whatever each namespace still
    # holds; repeat, because a dying raylet's children can appear between two listings
    for _ in range(5):
        live = [ident for ns in names for p in netns_pids(ns, t) if (ident := identity(p))]
        idents = recorded + live
        recorded = []
        if not idents:
            break
        kill(idents, cfg.kill_grace_s)
        removed += [f"pid {p}" for p, _ in live]
    for ns in names:
        if ns in hosts.namespaces(cfg.prefix, t):
            hosts.delete_netns(ns, t)
            removed.append(ns)
    for link in hosts.links(cfg.prefix, t):
        hosts.delete_link(link, t)
        removed.append(link)
    disks.remove_disks(cfg)
    st.remove(cfg.lab_dir)
    try:
        os.rmdir(cfg.lab_dir)  # only if empty: the lab never deletes what it did not create
    except OSError:
        pass
    return removed


def attach(overrides: list[str] | tuple[str, ...] = ()) -> tuple[LabConfig, dict]:
    """The config and state of the lab that is up (its lab_dir from the overrides or the default)."""
    cfg = load_lab_config(overrides)
    saved = st.load(cfg.lab_dir)
    if saved is None:
        raise LabError(f"no lab is up under {cfg.lab_dir}; start one with `python -m neuroray.lab up`")
    return load_lab_config(overrides, base=saved["config"]), saved


def host_index(cfg: LabConfig, host: str) -> int:
    """``h1``, ``1`` or the namespace name ``nrh1`` -> 1; anything else is a LabError naming the hosts."""
    key = str(host).strip()
    for i, name in enumerate(cfg.host_names()):
        if key in (name, str(i), cfg.netns(i)):
            return i
    raise LabError(f"unknown host {host!r}; this lab has {', '.join(cfg.host_names())}")


def cut(overrides, host: str) -> str:
    cfg, _ = attach(overrides)
    links.cut(cfg, host_index(cfg, host))
    return cfg.host_names()[host_index(cfg, host)]


def heal(overrides, host: str) -> str:
    cfg, _ = attach(overrides)
    links.heal(cfg, host_index(cfg, host))
    return cfg.host_names()[host_index(cfg, host)]


def shape(overrides, host: str, rate: str | None, upload: str | None = None, download: str | None = None) -> dict:
    """Change host's link rate now (a running job keeps its connections); returns what the kernel enforces."""
    cfg, _ = attach(overrides)
    i = host_index(cfg, host)
    links.shape(cfg, i, upload if upload is not None else rate, download if download is not None else rate)
    return links.rates(cfg, i)


def status(overrides=()) -> dict:
    """What exists now, read from the kernel (not only the state file)."""
    cfg = load_lab_config(overrides)
    saved = st.load_quiet(cfg.lab_dir)
    if saved:
        cfg = load_lab_config(overrides, base=saved["config"])
    t = cfg.command_timeout_s
    present = set(hosts.namespaces(cfg.prefix, t))
    counts = links.counters(cfg)
    rows = []
    for i, name in enumerate(cfg.host_names()):
        pids = netns_pids(cfg.netns(i), t)
        comms = [_comm(p) for p in pids]
        rows.append({"host": name, "netns": cfg.netns(i), "ip": cfg.host_ip(i), "exists": cfg.netns(i) in present,
                     "link": "up" if links.is_up(cfg, i) else ("cut" if cfg.netns(i) in present else "missing"),
                     **{f"{k}_bits": v for k, v in links.rates(cfg, i).items()}, **counts[name],
                     "processes": len(pids), "raylet": "raylet" in comms})
    return {"phase": saved["phase"] if saved else "down", "lab_dir": cfg.lab_dir, "head": cfg.head_address,
            "bridge": cfg.bridge if cfg.bridge in hosts.links(cfg.prefix, t) else None,
            "hosts": rows if (saved or present) else [],
            "leftovers": sorted(present | set(hosts.links(cfg.prefix, t))) if not saved else []}


def _comm(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return ""


def command(overrides, host: str, argv: list[str], cwd: str | None = None) -> tuple[list[str], dict]:
    """``(argv, env)`` that run ``argv`` on ``host``: inside its network and mount namespaces, with its HOME,
    cache, TMPDIR, Ray token and RAY_ADDRESS. Pass them to subprocess, or exec them."""
    cfg, saved = attach(overrides)
    i = host_index(cfg, host)
    holder = saved["holders"].get(cfg.host_names()[i])
    if not holder or identity(holder[0]) != list(holder):
        raise LabError(f"{cfg.host_names()[i]}'s namespaces are gone (its holder process died); "
                       "run `python -m neuroray.lab down` and `up` again")
    env = disks.host_env(cfg, i)
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env.get('PATH', '')}"
    return disks.enter_argv(cfg, i, holder[0], cwd) + list(argv), env
