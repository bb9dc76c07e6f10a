"""Proofs of Neural Work verified and booked per second, end to end, on one core.

End to end = wire bytes in -> size/schema/canonical parse -> timestamp -> replay -> rate limit ->
signature -> plausibility against a receipt -> reward, caps, balance, supply, history committed to
SQLite (WAL, synchronous=FULL). Measured per batch size (1 = one transaction and one fsync per proof;
larger = group commit, which is how the ledger actor books a round). Also measured side by side:
bare signature verification of each installed backend. Appends rows to docs/benchmarks.md.

    flock /tmp/neuroray-cpu.lock .venv/bin/python benchmarks/ponw_throughput.py [proofs=20000]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import append_row, machine  # noqa: E402
from neuroray.config import PonwConfig  # noqa: E402
from neuroray.ponw import crypto  # noqa: E402
from neuroray.ponw.authority import Coordinator  # noqa: E402
from neuroray.ponw.identity import Identity  # noqa: E402
from neuroray.ponw.ledger import Ledger  # noqa: E402
from neuroray.ponw.proof import Proof, new_nonce  # noqa: E402
from neuroray.ponw.verifier import NodeRecord, Receipt  # noqa: E402

LAYERS, TOKENS_PER_BATCH, BATCHES = 4, 1024, 40
COORDINATOR = Coordinator(Identity.from_secret(b"\x0c" * 32))  # signs the receipts, as the driver does
PROOFS_PER_NODE = 100  # below the 120/hour rate limit
REPEATS = 3


def make_work(n_proofs: int, seed: int = 0):
    """Registered identities and ``n_proofs`` signed proofs with their receipts, all distinct."""
    n_nodes = -(-n_proofs // PROOFS_PER_NODE)
    ids = [Identity.from_secret(seed.to_bytes(4, "big") + i.to_bytes(28, "big")) for i in range(1, n_nodes + 1)]
    records = [NodeRecord(i.node_id, i.public_key, 0, 2, True, False) for i in ids]
    now = int(time.time() * 1000)
    items = []
    for k in range(n_proofs):
        ident = ids[k % n_nodes]
        rnd = k // n_nodes
        p = Proof(node_id=ident.node_id, proof_type="training", timestamp_ms=now, nonce=new_nonce(), outer_round=rnd,
                  tokens_processed=BATCHES * TOKENS_PER_BATCH, training_batches=BATCHES, layers_held=2,
                  layer_start=0, has_embedding=True, has_lm_head=False, shard_id=k % 7, data_position=rnd * BATCHES,
                  theta0_before="1" * 64, theta0_after="2" * 64, pseudo_gradient=f"{k:064x}",
                  theta0_losses=(3_200_000, 3_100_000))
        receipt = Receipt(ident.node_id, rnd, "training", batches=BATCHES, pseudo_gradient=f"{k:064x}",
                          pseudo_gradient_norm=1.0, range_median_norm=1.0)
        items.append((p.sign(ident).to_bytes(), COORDINATOR.sign_receipt(receipt)))
    return records, items


def booked_per_s(records, items, batch: int, synchronous: str) -> tuple[float, float]:
    """``(proofs per wall-clock second, proofs per CPU second)`` of one fresh ledger."""
    with tempfile.TemporaryDirectory() as d:
        # generous bound so the benchmark's back-to-back rounds stay plausible
        cfg = PonwConfig(synchronous=synchronous, max_batches_per_s=1e9, max_reward_per_day=1e9)
        ledger = Ledger(Path(d) / "ledger.sqlite", cfg, model_layers=LAYERS, tokens_per_batch=TOKENS_PER_BATCH,
                        coordinator_key=COORDINATOR.public_key)
        ledger.register(COORDINATOR.sign_registration(records))
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(items), batch):
            outcomes = ledger.submit_many(items[i:i + batch])
            assert all(o.accepted for o in outcomes), outcomes[0]
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert ledger.supply().consistent
        ledger.close()
    return len(items) / elapsed, len(items) / cpu


def verify_per_s(backend: crypto.Backend, items, ids_keys, n: int) -> tuple[float, float]:
    from neuroray.ponw.proof import SignedProof

    signed = [SignedProof.from_bytes(data) for data, _ in items[:n]]
    keys = {nid: backend.load_public_key(pk) for nid, pk in ids_keys.items()}
    t0, c0 = time.perf_counter(), time.process_time()
    for s in signed:
        assert backend.verify(keys[s.proof.node_id], s.proof.digest(), s.signature)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main(argv: list[str]) -> int:
    n = 20_000
    for arg in argv:
        key, _, value = arg.partition("=")
        if key != "proofs" or not value.isdigit() or int(value) < PROOFS_PER_NODE:
            print(f"usage: ponw_throughput.py [proofs=N>={PROOFS_PER_NODE}]; got {arg!r}", file=sys.stderr)
            return 2
        n = int(value)
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as the goal is stated
    backend = crypto.backend("auto")
    records, items = make_work(n)
    keys = {r.node_id: r.public_key for r in records}
    results = {}
    # best of REPEATS: the machine is shared, and interference only ever makes a run slower. Proofs per
    # CPU second are reported too: they do not count time other processes took from this one.
    for b in crypto.available():
        n_verify = 2000 if b.name == "coincurve" else 200
        runs = [verify_per_s(b, items, keys, n_verify) for _ in range(REPEATS)]
        results[f"verify only ({b.name})"] = (max(r[0] for r in runs), max(r[1] for r in runs))
    for batch in (1, 100, 1000):
        sub = items if batch > 1 else items[: min(len(items), 2000)]
        runs = [booked_per_s(records, sub, batch, "FULL") for _ in range(REPEATS)]
        results[f"end to end, {batch}/commit"] = (max(r[0] for r in runs), max(r[1] for r in runs))
    for what, (wall, cpu) in results.items():
        print(f"{what:32s} {wall:10,.0f} proofs/s  {cpu:10,.0f} proofs/CPU-s")
    cmd = "flock /tmp/neuroray-cpu.lock .venv/bin/python benchmarks/ponw_throughput.py"
    best = max(v[0] for k, v in results.items() if k.startswith("end to end"))
    for what, (wall, cpu) in results.items():
        end_to_end = what.startswith("end")
        goal = ("goal 5,000/s: **met**" if wall >= 5000 else "goal 5,000/s: not met") if end_to_end else ""
        append_row("PoNW verification throughput (one core)",
                   ["what", "proofs/s", "proofs per CPU-s", "backend", "vs goal", "machine", "command"],
                   [what, f"{wall:,.0f}", f"{cpu:,.0f}", backend.name if end_to_end else what.split("(")[1][:-1],
                    goal, machine(), f"`{cmd}`"],
                   note="End to end: parse, timestamp, replay, rate limit, signature, plausibility vs receipt, "
                        "reward booked in SQLite (WAL, synchronous=FULL). N/commit = proofs per transaction. "
                        "Pinned to one core; best of 3 runs (the 2 cores are shared with other work).")
    print(f"best end-to-end: {best:,.0f} proofs/s ({backend.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
