"""Copied pseudo-gradients, measured on honest DiLoCo rounds: do honest deltas ever look like copies, and does
the attribution rule name the right author (neuroray/ponw/copies.py, neuroray/training/copies.py)?

In process, no Ray: 3 replicas of the tiny model shrunk as in benchmarks/verification.py (d64, L2, 2 ranges,
vocab 1024, seq 32, 2 microbatches of 8 per step), each with its own AdamW and its own data stream (the
Genesis shard ring of its node id, as a fixed-routing Driver reads it; node ids whose rings start on different
shards, :func:`distinct_nodes`), ``rounds`` DiLoCo rounds of H inner
steps from a shared theta0, outer step Nesterov as configured. Each round, for every range:

* detection: every honest pair's cosine (a copy: >= 0.9) and distance ``|a - b| / max(|a|, |b|)`` (a copy: 0);
* attribution: for every honest delta a and every other replica b, as if b had copied a: the loss a
  removes on a's batches and on b's (:func:`neuroray.training.copies.own_gains`), and what
  :func:`neuroray.ponw.copies.author_of` decides: a (right), b (wrong) or nobody (undecided).

    flock /tmp/neuroray-cpu.lock python benchmarks/copy_check.py [seeds=3] [rounds=10] [H=4,20] [write=1]

Appends rows to docs/benchmarks.md ("Copied pseudo-gradients: honest rounds").
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.nn.utils import parameters_to_vector, vector_to_parameters  # noqa: E402

from benchmarks._report import append_row, machine  # noqa: E402
from neuroray.configure import load_config  # noqa: E402
from neuroray.ponw.copies import author_of, distance  # noqa: E402
from neuroray.training.copies import own_gains  # noqa: E402

SMALL = ["data.vocab_size=1024", "data.seq_len=32", "data.microbatch_size=8", "data.num_microbatches=2",
         "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4", "model.max_seq_len=64"]
REPLICAS, RANGES = 3, [(0, 1), (1, 2)]


def distinct_nodes(seed: int, shards: int) -> list[str]:
    """Node ids of the replicas whose shard rings start on different shards. Two Drivers whose ids map to one
    shard read the same stream: from one theta0 they send the same update, honestly (the copy check then
    counts it once and pays both, neuroray/training/copies.py); that is not the case measured here."""
    from neuroray.genesis.shards import shard_for

    nodes, starts, k = [], set(), 0
    while len(nodes) < REPLICAS:
        node = f"copy-check-{seed}-{k}"
        k += 1
        if shard_for(node, shards) not in starts:
            starts.add(shard_for(node, shards))
            nodes.append(node)
    return nodes


def honest_rounds(H: int, seed: int, rounds: int) -> dict:
    from neuroray.genesis import TokenStream, ensure_dataset, load_tokenizer
    from neuroray.genesis.shards import _split_shards
    from neuroray.model import build_stage
    from neuroray.training.reputation import StagePipeline

    cfg = load_config(SMALL + [f"diloco.inner_steps={H}", f"seed={seed}"])
    root, manifest = ensure_dataset(cfg.data, log=lambda *a, **k: None)
    vocab = load_tokenizer(Path(root) / manifest.tokenizer_file).get_vocab_size()
    d, dl, n = cfg.data, cfg.diloco, cfg.data.num_microbatches
    S = len(RANGES)
    streams = [TokenStream(root, manifest, node, d.seq_len, d.microbatch_size, prefetch=False)
               for node in distinct_nodes(seed, len(_split_shards(manifest, "train")))]
    stages = [[build_stage(cfg.model, vocab, s, RANGES, seed=seed) for s in range(S)] for _ in range(REPLICAS)]
    opts = [[torch.optim.AdamW(m.parameters(), lr=dl.inner_lr, weight_decay=dl.weight_decay, betas=(0.9, 0.95))
             for m in rep] for rep in stages]
    theta0 = [parameters_to_vector(m.parameters()).detach().clone() for m in stages[0]]
    pipe = StagePipeline(cfg.model, vocab, RANGES, seed)
    momentum = [torch.zeros_like(t) for t in theta0]
    out = {"distances": [], "cosines": [], "right": 0, "wrong": 0, "undecided": 0, "margins": [], "seconds": 0.0}
    for _ in range(rounds):
        used = []
        for rep, rep_opts, stream in zip(stages, opts, streams):
            for m, flat in zip(rep, theta0):
                with torch.no_grad():
                    vector_to_parameters(flat.clone(), m.parameters())
            mine = []
            for _ in range(H):
                for _ in range(n):
                    x, y = stream.next_microbatch()
                    mine.append((x, y))
                    h = x
                    for m in rep:
                        h = m(h)
                    (rep[-1].loss(h, y) / n).backward()
                torch.nn.utils.clip_grad_norm_([p for m in rep for p in m.parameters()], dl.grad_clip)
                for o in rep_opts:
                    o.step()
                    o.zero_grad(set_to_none=True)
            used.append(mine)
        deltas = [[t0 - parameters_to_vector(m.parameters()).detach() for t0, m in zip(theta0, rep)] for rep in stages]
        for s in range(S):
            for a in range(REPLICAS):
                for b in range(a + 1, REPLICAS):
                    da, db = deltas[a][s], deltas[b][s]
                    out["distances"].append(distance(da, db))
                    out["cosines"].append(float(da @ db / (da.norm() * db.norm())))
            for a in range(REPLICAS):
                for b in range(REPLICAS):
                    if a == b:
                        continue
                    t0 = time.perf_counter()
                    gains = own_gains(pipe, theta0, s, deltas[a][s], {a: used[a], b: used[b]})
                    author, rel = author_of(gains)
                    out["seconds"] += time.perf_counter() - t0
                    out["margins"].append(rel)
                    out["right" if author == a else "undecided" if author is None else "wrong"] += 1
        for s in range(S):  # the outer step: mean, Nesterov momentum
            agg = sum(deltas[r][s] for r in range(REPLICAS)) / REPLICAS
            momentum[s] = dl.outer_momentum * momentum[s] + agg
            theta0[s] = theta0[s] - dl.outer_lr * (agg + dl.outer_momentum * momentum[s] if dl.nesterov else momentum[s])
    return out


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    seeds, rounds = int(opts.get("seeds", 3)), int(opts.get("rounds", 10))
    hs = [int(h) for h in opts.get("H", "4,20").split(",")]
    write = opts.get("write", "1") != "0"
    cmd = " ".join(["python benchmarks/copy_check.py", *argv])
    torch.set_num_threads(1)
    for H in hs:
        t0 = time.time()
        runs = [honest_rounds(H, seed, rounds) for seed in range(seeds)]
        agg = {k: sum((r[k] for r in runs), [] if isinstance(runs[0][k], list) else 0) for k in runs[0]}
        pairs = agg["right"] + agg["wrong"] + agg["undecided"]
        row = [str(H), str(len(agg["distances"])), f"{min(agg['distances']):.3f} (exact copy: 0)",
               f"{max(agg['cosines']):+.3f} (copy: >= 0.9)", f"{agg['right']} / {agg['undecided']} / {agg['wrong']} of {pairs}",
               f"{min(agg['margins']):+.3f} (threshold 0.1)",
               f"{agg['seconds'] / pairs * 1e3:.0f} ms"]
        print(f"H={H}: {row} ({time.time() - t0:.0f}s)", flush=True)
        if write:
            append_row("Copied pseudo-gradients: honest rounds (in process)",
                       ["H", "honest pairs", "smallest honest distance", "largest honest cosine",
                        "attribution right / undecided / wrong", "smallest relative margin", "attribution per group",
                        "setup", "command"],
                       [*row, f"3 replicas x 2 ranges, tiny d64 L2, {seeds} seeds x {rounds} rounds, {machine()}",
                        f"`flock /tmp/neuroray-cpu.lock {cmd}`"],
                       note="benchmarks/copy_check.py: honest DiLoCo rounds in process. Cosine and distance "
                            "|a - b| / max(|a|, |b|) between honest replicas' deltas of a range (a copy: cosine "
                            ">= 0.9 with norms within 2x). "
                            "Attribution: each honest delta as if another replica had copied it; right = its "
                            "author named, undecided = no claimant by the 0.1 relative margin (the group is "
                            "then unpaid), wrong = the other replica named.")


if __name__ == "__main__":
    main(sys.argv[1:])
