"""Tokens/s of the Ray pipeline (2 stages, 1 replica) / tokens/s of the same model in one process.

Both sides train the same model on the same Genesis microbatches with the same total number of
threads (each of the S holders gets 1 thread; the single process gets S threads), measured in
the same run. Appends a row to docs/benchmarks.md.

    python benchmarks/pipeline_throughput.py [steps=30] [hydra overrides...]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from neuroray.configure import load_config  # noqa: E402
from neuroray.genesis import Manifest, TokenStream, ensure_dataset, load_tokenizer  # noqa: E402
from neuroray.model import build_monolith  # noqa: E402
from benchmarks._report import append_row, machine  # noqa: E402


def single_process(cfg, vocab, root, manifest, node_id, steps, warmup, threads) -> float:
    torch.set_num_threads(threads)
    model = build_monolith(cfg.model, vocab, seed=cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.diloco.inner_lr, weight_decay=cfg.diloco.weight_decay,
                            betas=(0.9, 0.95))
    stream = TokenStream(root, manifest, node_id, cfg.data.seq_len, cfg.data.microbatch_size)
    n = cfg.data.num_microbatches
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        for _ in range(n):
            x, y = stream.next_microbatch()
            (model.loss(model(x), y) / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.diloco.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * n * x.numel() / (time.perf_counter() - t0)


def ray_pipeline(cfg, vocab, root, manifest, steps, warmup) -> tuple[float, str]:
    import ray

    from neuroray.training.schedule import submit_inner_step
    from neuroray.swarm.swarm import DataPlan, Swarm

    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "300000")
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    try:
        swarm = Swarm(cfg, vocab, DataPlan(str(root), manifest.to_json()), log=lambda *a, **k: None)
        node_id = swarm.infos[0]["node_id"]
        pipeline, n = swarm.replicas[0], cfg.data.num_microbatches
        refs = [submit_inner_step(pipeline, n, i * n) for i in range(warmup)]
        ray.get([r for s in refs for r in s.losses + s.steps])
        t0 = time.perf_counter()
        refs = [submit_inner_step(pipeline, n, (warmup + i) * n) for i in range(steps)]
        ray.get([r for s in refs for r in s.losses + s.steps])
        tps = steps * n * cfg.data.microbatch_size * cfg.data.seq_len / (time.perf_counter() - t0)
        swarm.shutdown()
    finally:
        ray.shutdown()
    return tps, node_id


def main(argv: list[str]) -> None:
    steps = int(next((a.split("=", 1)[1] for a in argv if a.startswith("steps=")), 30))
    overrides = [a for a in argv if not a.startswith("steps=")]
    stages = 2
    cfg = load_config(["diloco.replicas=1", f"swarm.num_stages={stages}", "cluster.cpus_per_holder=1",
                       "cluster.torch_threads=1", *overrides])
    root, manifest = ensure_dataset(cfg.data, log=lambda *a, **k: None)
    vocab = load_tokenizer(Path(root) / manifest.tokenizer_file).get_vocab_size()
    warmup = 3
    ray_tps, node_id = ray_pipeline(cfg, vocab, root, manifest, steps, warmup)
    local_tps = single_process(cfg, vocab, root, Manifest.load(root), node_id, steps, warmup,
                               threads=stages * cfg.cluster.torch_threads)
    ratio = ray_tps / local_tps
    print(f"ray pipeline ({stages} stages x 1 thread): {ray_tps:,.0f} tok/s")
    print(f"single process ({stages * cfg.cluster.torch_threads} threads): {local_tps:,.0f} tok/s")
    print(f"ratio: {ratio:.3f}")
    cmd = " ".join(["python benchmarks/pipeline_throughput.py", *argv])
    append_row(
        "Pipeline throughput vs one process",
        ["setup", "Ray pipeline tok/s", "one process tok/s", "ratio", "machine", "command"],
        [f"{stages} stages x 1 replica, model={cfg.model.name}, {steps} steps", f"{ray_tps:,.0f}", f"{local_tps:,.0f}",
         f"**{ratio:.2f}**", machine(), f"`{cmd}`"],
        note=("Tokens/s of the Ray pipeline (each holder 1 torch thread) / tokens/s of the same model, data and "
              "optimizer in one process with the same total threads. The swarm issue's goal is >= 0.9."),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
