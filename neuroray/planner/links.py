"""Links between nodes: rates written by people ("100mbit"), the traffic a plan puts on each node's
uplink, and the seconds per inner step those bytes cost (docs/planner.md, "Links").

Traffic model (pure; float32 on the wire unless said otherwise):

* **Hops**, every inner step: a stage boundary whose two holders sit on different nodes carries each
  microbatch's activation forward and its gradient back,
  ``2 x microbatch_size x seq_len x d_model x 4 B x num_microbatches``. Both nodes' uplinks carry it.
  (Nothing compresses activations today; a compressed hop would divide this by its ratio.)
* **Sync**, every outer round (``diloco.inner_steps`` steps): a holder not on the outer-step node sends
  its pseudo-gradient (``4 B x P_range / ratio``) and receives the update back (the same size), so
  ``2 x 4 B x P_range / ratio`` crosses its node's uplink and the outer node's. ``ratio`` is the DiLoCo
  compression's (:func:`sync_bytes_per_value`: none 4 B per value, fp16 2, int8 1 + 4/block, sparse
  about 0.035 at the defaults).
* **Seconds per step** on a link: ``(hop bytes + sync bytes / H) x 8 / rate``. In and out are added, as
  if the link were half duplex: a bound, not a measurement.

A node's rate is its uplink: traffic between two nodes is limited by the slower of the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from neuroray.planner.memory import FLOAT_BYTES, parse_quantity

_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9, "tbps": 1e12}


class RateError(ValueError):
    """A link rate without a unit, with an unknown one, or not above zero (callers wrap it in ConfigError)."""


def parse_rate(text, what: str = "link rate") -> float:
    """``"100mbit"`` -> 1e8 bits per second; units bit/kbit/mbit/gbit/tbit (or bps/kbps/...), any case."""
    return parse_quantity(text, _RATE_UNITS, RateError, what, "rate", "100mbit or 1gbit",
                          "kbit, mbit, gbit, tbit (bits per second)", ("mbit", "gbit"))


def format_rate(bps: float) -> str:
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bps >= scale:
            return f"{bps / scale:g}{unit}"
    return f"{bps:g}bit"


def sync_bytes_per_value(mode: str, block: int = 256, density: float = 0.015) -> float:
    """Bytes per parameter of one pseudo-gradient (or update) as neuroray.diloco.compress lays it out.

    none: float32; fp16: 2 B; int8: 1 B plus a float32 scale per ``block``; sparse: per chunk of ``block``,
    ``k = ceil(density x block)`` positions (uint8 up to 256, int16 up to 32768, else int32), 2 bits each,
    and two float16 levels. tests/test_planner_links.py checks each against the encoder's real payloads.
    """
    if mode == "none":
        return float(FLOAT_BYTES)
    if mode == "fp16":
        return 2.0
    if mode == "int8":
        return 1.0 + 4.0 / block
    if mode == "sparse":
        k = max(1, min(block, math.ceil(density * block)))
        index = 1 if block <= 256 else 2 if block <= 1 << 15 else 4
        return (k * index + k / 4 + 2 * 2) / block
    raise ValueError(f"unknown compression {mode!r}")


@dataclass(frozen=True)
class LinkLoad:
    """What one node's uplink carries under a plan."""

    node_id: str
    node_name: str
    rate_bps: float  # 0: unknown
    hop_bytes_per_step: float
    sync_bytes_per_round: float
    inner_steps: int

    @property
    def bytes_per_step(self) -> float:
        return self.hop_bytes_per_step + self.sync_bytes_per_round / max(self.inner_steps, 1)

    @property
    def seconds_per_step(self) -> float | None:
        return self.bytes_per_step * 8 / self.rate_bps if self.rate_bps > 0 else None


def hop_bytes(microbatch_size: int, seq_len: int, d_model: int, num_microbatches: int) -> int:
    """One cross-node stage boundary, one inner step: activations forward and their gradients back."""
    return 2 * microbatch_size * seq_len * d_model * FLOAT_BYTES * num_microbatches


def link_loads(plan) -> list[LinkLoad]:
    """Per node of ``plan`` (a :class:`~neuroray.planner.plan_types.Plan`), the traffic on its uplink."""
    b = plan.batch
    if b is None:
        return []
    per_hop = hop_bytes(b.microbatch_size, b.seq_len, plan.model.d_model, b.num_microbatches)
    hop = {n.node_id: 0.0 for n in plan.nodes}
    sync = dict(hop)
    outer = plan.outer.node_id
    sync.setdefault(outer, 0.0)
    hop.setdefault(outer, 0.0)
    for rep in plan.holders:
        for a, c in zip(rep, rep[1:]):
            if a.node_id != c.node_id:
                hop[a.node_id] += per_hop
                hop[c.node_id] += per_hop
        for h in rep:
            if h.node_id != outer:
                moved = 2 * plan.stages[h.stage].params * plan.sync_value_bytes
                sync[h.node_id] += moved
                sync[outer] += moved
    by_id = {n.node_id: n for n in plan.nodes}
    out = []
    for node_id in hop:
        n = by_id.get(node_id)
        name = n.name if n is not None else plan.outer.node_name
        rate = n.link_bps if n is not None else plan.outer.link_bps
        out.append(LinkLoad(node_id, name, rate, hop[node_id], sync[node_id], plan.inner_steps))
    return out


def link_cost(nodes) -> dict[str, float]:
    """Per node id, how much dearer a byte is on its uplink than on the fastest declared one (1 = fastest).

    All 1 when no node declares a rate (so placement is exactly what it is without links); a node
    without a rate among declared ones counts as the fastest (an undeclared link is not a constraint).
    """
    rates = [n.link_bps for n in nodes if n.link_bps > 0]
    if not rates:
        return {n.node_id: 1.0 for n in nodes}
    fastest = max(rates)
    return {n.node_id: fastest / n.link_bps if n.link_bps > 0 else 1.0 for n in nodes}
