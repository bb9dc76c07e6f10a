"""Tokens/s of the Ray pipeline (1 replica, GPipe and 1F1B) / tokens/s of the same model in one process.

Both sides train the same model on the same Genesis microbatches (the config's batch, microbatch size
and microbatch count; ``data.num_microbatches=0`` derives the count from the stage count) with the same
total number of threads (each of the S holders gets 1 thread; the single process gets S threads, at most
the machine's cores, or 1 thread, whichever is faster: on a busy machine 2 torch threads can be slower
than 1). The
arms run interleaved, ``repeats`` times ``steps`` inner steps each after a warm-up, on one Ray swarm and
one process-local model; the median of each arm is reported. Appends one row per schedule to
docs/benchmarks.md, with the most microbatch graphs each holder kept at once (its activation stash).
``transports=object_store,gloo,shm`` runs one swarm per hop transport (``swarm.hop_transport``), their arms
interleaved with the others (default: the config's own transport, one swarm).

    python benchmarks/pipeline_throughput.py [steps=10] [repeats=3] [schedules=gpipe,1f1b] [transports=...]
        [hydra overrides...]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from neuroray.config_checks import pipeline_bubble  # noqa: E402
from neuroray.configure import load_config  # noqa: E402
from neuroray.genesis import Manifest, TokenStream, ensure_dataset, load_tokenizer  # noqa: E402
from neuroray.model import build_monolith  # noqa: E402
from benchmarks._report import append_row, machine  # noqa: E402

WARMUP = 2


class SingleProcess:
    """The same model, optimizer and microbatches, trained in this process."""

    def __init__(self, cfg, vocab, root, node_id):
        self.cfg, self.n = cfg, cfg.data.num_microbatches
        self.model = build_monolith(cfg.model, vocab, seed=cfg.seed)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.diloco.inner_lr,
                                     weight_decay=cfg.diloco.weight_decay, betas=(0.9, 0.95))
        self.stream = TokenStream(root, Manifest.load(root), node_id, cfg.data.seq_len, cfg.data.microbatch_size)

    def run(self, steps: int, threads: int) -> float:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        for _ in range(steps):
            for _ in range(self.n):
                x, y = self.stream.next_microbatch()
                (self.model.loss(self.model(x), y) / self.n).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.diloco.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return steps * self.n * x.numel() / (time.perf_counter() - t0)


class RayPipeline:
    """One replica of stage holders; each call of :meth:`run` submits ``steps`` inner steps one ahead."""

    def __init__(self, cfg, vocab, root, manifest):
        import ray

        from neuroray.swarm.direct_transport import HopGroups, direct_or_none
        from neuroray.swarm.swarm import DataPlan, Swarm

        self.ray, self.cfg, self.mb = ray, cfg, 0
        self.swarm = Swarm(cfg, vocab, DataPlan(str(root), manifest.to_json()), log=lambda *a, **k: None)
        self.node_id = self.swarm.infos[0]["node_id"]
        self.pipeline = self.swarm.replicas[0]
        self.transport = direct_or_none(self.swarm.hop_transport)  # as FixedPipelines submits under gloo/nccl
        self.groups = None if self.transport is None else HopGroups(self.transport, f"bench-{id(self)}")
        if self.groups is not None:
            self.groups.ensure(0, self.pipeline)
        self.shm = None
        if self.swarm.hop_transport == "shm":  # as FixedPipelines makes the rings under shm
            from neuroray.swarm.shm_transport import ShmEdges

            self.shm = ShmEdges(f"bench{os.getpid()}x{id(self) % 10**6}", cfg.swarm.hop_shm_slots or
                                cfg.data.num_microbatches + 1, cfg.cluster.step_timeout_s)
            self.shm.ensure(0, self.pipeline)

    def run(self, steps: int, schedule: str) -> tuple[float, list[int]]:
        """Tokens/s over ``steps`` inner steps, and the most graphs each holder kept at once meanwhile."""
        from neuroray.training.schedule import submit_inner_step

        n, ray = self.cfg.data.num_microbatches, self.ray
        ray.get([h.utilisation.remote() for h in self.pipeline])  # starts a new peak window
        t0 = time.perf_counter()
        refs = []
        for _ in range(steps):
            refs.append(submit_inner_step(self.pipeline, n, self.mb, schedule=schedule, transport=self.transport))
            self.mb += n
        ray.get([r for s in refs for r in s.losses + s.steps])
        tps = steps * n * self.cfg.data.microbatch_size * self.cfg.data.seq_len / (time.perf_counter() - t0)
        return tps, [u["peak_in_flight"] for u in ray.get([h.utilisation.remote() for h in self.pipeline])]

    def close(self) -> None:
        if self.groups is not None:
            self.groups.close()
        if self.shm is not None:
            self.shm.close([self.pipeline])
        self.swarm.shutdown()


def main(argv: list[str]) -> None:
    import ray

    opts = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in ("steps", "repeats", "schedules", "transports"))
    steps, repeats = int(opts.get("steps", 10)), int(opts.get("repeats", 3))
    schedules = opts.get("schedules", "gpipe,1f1b").split(",")
    overrides = [a for a in argv if a.split("=", 1)[0] not in opts]
    cfg = load_config(["diloco.replicas=1", "cluster.cpus_per_holder=1", "cluster.torch_threads=1", *overrides])
    stages, d = cfg.swarm.num_stages, cfg.data
    root, manifest = ensure_dataset(cfg.data, log=lambda *a, **k: None)
    vocab = load_tokenizer(Path(root) / manifest.tokenizer_file).get_vocab_size()
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "300000")
    # one CPU per holder, even past the cores: a 4-stage pipeline on 2 cores is measured as it is
    transports = opts.get("transports", cfg.swarm.hop_transport).split(",")
    ray.init(address="local", num_cpus=max(stages * len(transports), os.cpu_count() or 2), include_dashboard=False,
             log_to_driver=False)
    # several swarms in one Ray: no placement groups (their names are per replica index, and would clash); the
    # holders reserve no CPU then, and still run 1 torch thread each
    cluster = cfg.cluster if len(transports) == 1 else replace(cfg.cluster, cpus_per_holder=0)
    pipes = {t: RayPipeline(replace(cfg, cluster=cluster, swarm=replace(cfg.swarm, hop_transport=t)), vocab, root,
                            manifest) for t in transports}
    # one arm per schedule and transport; named by the schedule alone when there is one transport (the rows before)
    arm = {(s, t): s if len(transports) == 1 else f"{s} ({t})" for s in schedules for t in transports}
    pipe = next(iter(pipes.values()))
    # as many threads as the holders together, but no more than the cores (oversubscribed threads only spin);
    # and 1 thread: on a busy machine a 2-thread process can be slower than 1 (its threads wait for each other)
    threads = sorted({1, min(stages * cfg.cluster.torch_threads, os.cpu_count() or 1)})
    local = SingleProcess(cfg, vocab, root, pipe.node_id)
    arms = [f"one process {t}" for t in threads]
    tps: dict[str, list[float]] = {s: [] for s in [*arms, *arm.values()]}
    peaks: dict[str, list[int]] = {}
    try:
        for (s, tr) in arm:
            pipes[tr].run(WARMUP, s)
        for t in threads:
            local.run(WARMUP, t)
        for _ in range(repeats):  # interleaved, so a noisy neighbour hits every arm alike
            for (s, tr), name in arm.items():
                t, peak = pipes[tr].run(steps, s)
                tps[name].append(t)
                peaks[name] = [max(a, b) for a, b in zip(peaks.get(name, peak), peak)]
            for t in threads:
                tps[f"one process {t}"].append(local.run(steps, t))
    finally:
        for p in pipes.values():
            p.close()
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in tps.items()}
    best = max(arms, key=med.get)  # the baseline: the faster of the one-process arms
    med["one process"] = med[best]
    setup = (f"{stages} stages x 1 replica (1 thread each; one process best with {best.split()[-1]} of "
             f"{'/'.join(map(str, threads))} threads), model={cfg.model.name}, "
             f"batch {d.batch_size} = {d.num_microbatches} x "
             f"{d.microbatch_size} seqs of {d.seq_len} (bubble {pipeline_bubble(stages, d.num_microbatches):.0%}), "
             f"balance={cfg.swarm.balance}")
    print(setup)
    for a in arms:
        print(f"{a} thread(s): {med[a]:,.0f} tok/s (runs: {', '.join(f'{v:,.0f}' for v in tps[a])})")
    cmd = " ".join(["python benchmarks/pipeline_throughput.py", *argv])
    for s in arm.values():
        ratio = med[s] / med["one process"]
        print(f"ray pipeline {s} ({stages} stages x 1 thread): {med[s]:,.0f} tok/s "
              f"(runs: {', '.join(f'{v:,.0f}' for v in tps[s])}), peak graphs kept per holder {peaks[s]}; "
              f"ratio {ratio:.3f}")
        append_row(
            "Pipeline throughput vs one process, by schedule",
            ["setup", "schedule", "peak graphs kept per holder", "Ray pipeline tok/s", "one process tok/s",
             "ratio", "machine", "command"],
            [f"{setup}, {repeats} x {steps} steps", s, str(peaks[s]), f"{med[s]:,.0f}", f"{med['one process']:,.0f}",
             f"**{ratio:.2f}**", machine(), f"`{cmd}`"],
        )


if __name__ == "__main__":
    main(sys.argv[1:])
