"""Is a holder's host still there? Which Ray node an actor runs on, whether that node answers, and a live
node to start a replacement on.

Ray notices a partitioned host only when the GCS health check of its raylet gives up (about a minute at
Ray's defaults, docs/lab.md); until then a call to a holder there neither returns nor fails. The trainers
cannot ask the holder itself: a fixed-routing holder runs one call at a time, and its step is what is
late. So the host is asked instead: a TCP connect to its raylet's port. The kernel answers a connect
whatever load the host's CPUs carry, so a host that is merely slow answers at once; a host cut off from
the driver does not answer at all, and one whose raylet is gone refuses.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import ray


def actor_node(handle) -> str | None:
    """The Ray node id (hex) the actor behind ``handle`` runs on, from the GCS's actor table; None when
    the GCS does not know it (not placed yet, or gone)."""
    from ray._private import state  # the GCS's actor table; Ray's public state API needs the dashboard

    try:
        info = state.actors(actor_id=handle._actor_id.hex())
    except Exception:  # noqa: BLE001 - no answer is "unknown", never a crash of the training loop
        return None
    node = (info or {}).get("Address", {}).get("NodeID") or ""
    return node if node.strip("0") else None


def nodes() -> dict[str, dict]:
    """node id (hex) -> ray.nodes()'s record of it, for every node the GCS knows (dead ones included)."""
    return {n["NodeID"]: n for n in ray.nodes()}


def answers(ip: str, port: int, timeout_s: float) -> bool:
    """Whether something at ``ip:port`` accepts a TCP connection within ``timeout_s``."""
    try:
        with socket.create_connection((ip, int(port)), timeout=timeout_s):
            return True
    except OSError:  # timed out (cut off) or refused (nothing listens any more)
        return False


def unreachable(node_ids: set[str], timeout_s: float, known: dict[str, dict] | None = None) -> set[str]:
    """The nodes of ``node_ids`` that are lost: marked dead by the GCS, unknown to it, or whose raylet does
    not accept a connection from here within ``timeout_s`` (probed in parallel). ``known``: :func:`nodes`."""
    known = nodes() if known is None else known
    lost = {n for n in node_ids if n not in known or not known[n].get("Alive")}
    probe = sorted(node_ids - lost)
    if probe:
        with ThreadPoolExecutor(len(probe)) as pool:
            ok = pool.map(lambda n: answers(known[n]["NodeManagerAddress"], known[n]["NodeManagerPort"], timeout_s),
                          probe)
            lost |= {n for n, up in zip(probe, ok) if not up}
    return lost


def lost(handles: list, timeout_s: float) -> list[bool]:
    """For each actor handle: whether its node is lost (:func:`unreachable`). An actor whose node the GCS
    cannot name is not called lost: nothing is known of it."""
    placed = [actor_node(h) for h in handles]
    down = unreachable({n for n in placed if n}, timeout_s)
    return [n is not None and n in down for n in placed]


def live_node(cpus: float, gpus: float, exclude: set[str]) -> str | None:
    """An alive node outside ``exclude`` with ``cpus`` and ``gpus`` free now (the one with most free CPUs),
    else None. The GCS's free-resource view lags a little; the caller pins softly, so Ray may still move it."""
    from ray._private import state

    alive = {n for n, rec in nodes().items() if rec.get("Alive")} - exclude
    try:
        free = state.available_resources_per_node()
    except Exception:  # noqa: BLE001
        free = {}
    fits = [(free.get(n, {}).get("CPU", 0.0), n) for n in alive
            if free.get(n, {}).get("CPU", 0.0) >= cpus and free.get(n, {}).get("GPU", 0.0) >= gpus]
    return max(fits)[1] if fits else None
