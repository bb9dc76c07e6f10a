"""Probes of the live cluster: each node's total host memory, and its link to the driver's node.

Both are zero-CPU tasks pinned to a node (``NodeAffinitySchedulingStrategy``, hard), so they run even
when holders hold every CPU, and both are bounded by a timeout: a node that does not answer is left
unknown (the planner then uses Ray's memory resource, or plans without its link rate) and logged.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

_totals: dict[str, int] = {}  # node id -> MemTotal; a node's memory does not change while it lives
_rates: dict[str, float] = {}  # node id -> measured bits/s; probed once per node per process


def _pinned(fn, node_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return fn.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))


def _mem_total() -> int:
    """MemTotal of the machine this runs on (psutil ships with Ray; /proc/meminfo if it does not)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    return 0


def host_memory(node_ids: list[str], timeout_s: float) -> dict[str, int]:
    """MemTotal per node id (absent: the probe failed or timed out within ``timeout_s`` overall)."""
    import ray

    todo = [n for n in node_ids if n not in _totals]
    if todo:
        probe = ray.remote(num_cpus=0, max_retries=0)(_mem_total)
        refs = {n: _pinned(probe, n).remote() for n in todo}
        ready, late = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        for node_id, ref in refs.items():
            try:
                if ref in ready:
                    _totals[node_id] = int(ray.get(ref))
                    continue
                ray.cancel(ref, force=True)
                log.warning("host memory probe on node %s took over %ss; using Ray's memory resource", node_id[:8],
                            timeout_s)
            except Exception as exc:  # a dead node or a failed worker: the memory stays Ray's resource
                log.warning("host memory probe on node %s failed: %s", node_id[:8], str(exc).splitlines()[0])
    return {n: _totals[n] for n in node_ids if _totals.get(n)}


def _payload(nbytes: int) -> bytes:
    return bytes(nbytes)


def link_rates(node_ids: list[str], nbytes: int, timeout_s: float) -> dict[str, float]:
    """Bits/s from each node to this (the driver's) node: a task there makes ``nbytes``, which stay in
    that node's object store until it is done (``fetch_local=False``); then only the ``ray.get`` that
    pulls them here is timed. The driver's own node is not probed (its transfers are local)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    make = ray.remote(num_cpus=0, max_retries=0)(_payload)
    for node_id in node_ids:
        if node_id == here or node_id in _rates:
            continue
        ref = _pinned(make, node_id).remote(nbytes)
        try:
            ready, _ = ray.wait([ref], timeout=timeout_s, fetch_local=False)
            if not ready:
                raise TimeoutError(f"not made within {timeout_s}s")
            start = time.perf_counter()
            ray.get(ref, timeout=timeout_s)
            _rates[node_id] = nbytes * 8 / max(time.perf_counter() - start, 1e-6)
        except Exception as exc:  # timeout, dead node: the link stays unknown (it does not steer placement)
            ray.cancel(ref, force=True)
            log.warning("link probe of node %s failed: %s", node_id[:8], str(exc).splitlines()[0])
    return {n: _rates[n] for n in node_ids if n in _rates}
