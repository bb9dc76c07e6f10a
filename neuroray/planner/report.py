"""A plan as text: architecture, parameter formula, stages, holders, nodes and notes (``neuroray.plan``, ``train``)."""

from __future__ import annotations

from neuroray.planner.links import format_rate, link_loads
from neuroray.planner.memory import format_bytes
from neuroray.planner.plan_types import Plan
from neuroray.planner.scaling import PARAM_FORMULA, describe, kv_width, ffn_width


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(header), "  ".join("-" * w for w in widths), *[fmt(r) for r in rows]]


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_plan(plan: Plan) -> str:
    """The plan as text: architecture, parameter formula, stages, holders, nodes, notes."""
    m, pc = plan.model, plan.params
    d, dkv, f, V = m.d_model, kv_width(m), ffn_width(m), plan.vocab_size
    out = [
        f"plan: {len(plan.nodes)} node{'s' if len(plan.nodes) != 1 else ''} ({plan.device} memory "
        f"{format_bytes(plan.law_memory)}), "
        f"{plan.num_stages} stages x {plan.replicas} replicas, {plan.within_replica} within a replica, "
        f"{plan.across_replicas} across replicas",
        f"model: {describe(m)}, vocab {V}, seq {m.max_seq_len}",
        f"params: {_count(pc.total)} = {m.n_layers} x {_count(pc.per_layer)} (layer) + {_count(pc.embedding)} "
        f"(embedding) + {_count(pc.head)} (head)   [{PARAM_FORMULA}; d={d}, d_kv={dkv}, f={f}, V={V}]",
        "",
    ]
    rows = []
    for s in plan.stages:
        mem = s.memory
        role = "driver" if s.has_embedding else "validator" if s.has_head else "worker"
        if s.has_embedding and s.has_head:
            role = "driver+validator"
        rows.append([s.index, f"{s.start}-{s.end - 1}", role, _count(s.params), format_bytes(mem.weights + mem.grads),
                     format_bytes(mem.adam), format_bytes(mem.diloco), format_bytes(mem.activations),
                     format_bytes(mem.working), format_bytes(mem.outer), format_bytes(mem.snapshot),
                     format_bytes(mem.overhead),
                     format_bytes(mem.total), f"{s.flops_per_token / 1e6:.1f}M"])
    out += _table(rows, ["stage", "layers", "role", "params", "weights+grads", "adamw", "theta0", "activations",
                         "working", "outer step", "snapshot", "overhead", "holder total", "fwd flops/tok"])
    out.append("")
    rows = [[h.replica, h.stage, h.node_name, format_bytes(h.device_memory),
             ", ".join(f"{k} {format_bytes(v) if k == 'memory' else f'{v:g}'}" for k, v in h.bundle().items())]
            for rep in plan.holders for h in rep]
    out += _table(rows, ["replica", "stage", "node", "needs", "bundle"])
    out.append("")
    used = plan.node_usage()
    rows = []
    for n in plan.nodes:
        cap = n.gpus * n.gpu_memory if plan.device == "gpu" else n.memory
        holders = sum(1 for rep in plan.holders for h in rep if h.node_id == n.node_id)
        rows.append([n.name, "-" if n.cpus is None else f"{n.cpus:g}", f"{n.gpus:g}", format_bytes(cap),
                     format_bytes(cap * plan.safety_fraction), holders, format_bytes(used.get(n.node_id, 0)),
                     n.gpu_memory_source or "-"])
    out += _table(rows, ["node", "cpus", "gpus", "memory", f"usable ({plan.safety_fraction:g})", "holders", "planned",
                         "gpu memory from"])
    out.append("")
    o = plan.outer
    out.append(f"outer step: {o.node_name} keeps CPU {o.cpus:g} and {format_bytes(o.task_bytes)} of host memory free "
               "for one range's task")
    out += _links(plan)
    for line in plan.why:
        out.append(f"why: {line}")
    for name, why in plan.excluded:
        out.append(f"left out: {name}: {why}")
    for note in plan.notes:
        out.append(f"note: {note}")
    return "\n".join(out)


def _links(plan: Plan) -> list[str]:
    """Per node uplink: predicted hop bytes per step, sync bytes per round, and their seconds per step."""
    loads = [ld for ld in link_loads(plan) if ld.hop_bytes_per_step or ld.sync_bytes_per_round or ld.rate_bps]
    if not loads:
        return []
    rows = [[ld.node_name, format_rate(ld.rate_bps) if ld.rate_bps else "-", format_bytes(ld.hop_bytes_per_step),
             format_bytes(ld.sync_bytes_per_round), format_bytes(ld.bytes_per_step),
             "-" if ld.seconds_per_step is None else f"{ld.seconds_per_step:.3g}"] for ld in loads]
    head = (f"links (predicted; hops: activations + gradients of every cross-node stage boundary per step; sync: "
            f"pseudo-gradient out + update back per round of H={plan.inner_steps} steps, {plan.compression}, "
            f"{plan.sync_value_bytes:.3g} B/parameter):")
    return ["", head, *_table(rows, ["uplink", "rate", "hops/step", "sync/round", "per step", "s/step"])]
