"""One fixed-pipeline inner step as plain Ray actor calls / as a Ray Compiled Graph (ray.dag), side by side.

Two stage actors run the real range compute (neuroray.swarm.compute.RangeCompute, the tiny model split in
2) over the same microbatches in the same 1F1B order: once submitted call by call as the fixed pipeline
does (object refs, one task per call), once as a compiled graph bound in that order (shared-memory
channels, no per-call task submission). Arms interleaved, median seconds per inner step; appends a row to
docs/benchmarks.md. The plain path is what neuroray runs; this measures what a compiled graph would save.

    python benchmarks/compiled_schedule.py [steps=20] [repeats=3] [microbatches=4] [microbatch_size=4]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._report import append_row, machine  # noqa: E402
from neuroray.config import DilocoConfig, ModelConfig  # noqa: E402
from neuroray.training.schedule import BACKWARD, FORWARD, stage_orders  # noqa: E402

VOCAB, SEQ = 4096, 128


class Stage:
    """A stage actor around the real range compute, with call signatures a compiled graph can bind."""

    def __init__(self, stage: int, stages: int):
        from neuroray.model import split_layers
        from neuroray.swarm.compute import RangeCompute
        from neuroray.swarm.spec import HolderSpec

        torch.set_num_threads(1)
        spec = HolderSpec(replica=0, stage=stage, ranges=split_layers(4, stages), model=ModelConfig(),
                          vocab_size=VOCAB, diloco=DilocoConfig(), seed=0, key_path="", precision="fp32")
        self.compute = RangeCompute(spec, torch.device("cpu"))

    def forward(self, mb: int, x):
        return self.compute.forward(mb, x)

    def forward_backward(self, mb: int, x, labels, scale: float):
        return self.compute.forward_backward(mb, x, labels, scale)[1]

    def backward(self, mb: int, grad):
        return self.compute.backward(mb, grad)[0]

    def step(self, *_done) -> float:
        return self.compute.step()


def orders(m: int) -> tuple[list, list]:
    first, last = stage_orders("1f1b", 2, m)
    return first, last


def plain_step(a, b, batch, m):
    """The fixed pipeline's way: one Ray task per call, refs passed between actors."""
    first, _ = orders(m)
    acts, done = {}, []
    for kind, j in first:
        if kind == FORWARD:
            acts[j] = a.forward.remote(j, batch[j])
        else:
            g = b.forward_backward.remote(j, acts[j], batch[m + j], 1 / m)
            done.append(a.backward.remote(j, g))
    import ray

    return ray.get([a.step.remote(*done), b.step.remote()])


def compiled_step_dag(a, b, m):
    """The same calls bound into a compiled graph, each actor's in its 1F1B order."""
    from ray.dag import InputNode, MultiOutputNode

    first, _ = orders(m)
    with InputNode() as inp:
        acts, grads, done = {}, {}, []
        for kind, j in first:
            if kind == FORWARD:
                acts[j] = a.forward.bind(j, inp[j])
                grads[j] = b.forward_backward.bind(j, acts[j], inp[m + j], 1 / m)
            else:
                done.append(a.backward.bind(j, grads[j]))
        dag = MultiOutputNode([a.step.bind(*done), b.step.bind(*grads.values())])
    return dag.experimental_compile()


def main(argv: list[str]) -> None:
    import ray

    opts = {k: int(v) for k, v in (a.split("=", 1) for a in argv)}
    steps, repeats, m, mbs = (opts.get("steps", 20), opts.get("repeats", 3), opts.get("microbatches", 4),
                              opts.get("microbatch_size", 4))
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "300000")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, VOCAB, (mbs, SEQ), generator=g) for _ in range(2 * m)]
    cls = ray.remote(num_cpus=0.5)(Stage)  # 4 actors on the 2 CPUs Ray is told of; 1 torch thread each
    plain_pair = [cls.remote(s, 2) for s in range(2)]
    dag_pair = [cls.remote(s, 2) for s in range(2)]
    cdag = compiled_step_dag(*dag_pair, m)
    times = {"plain": [], "compiled": []}
    try:
        for _ in range(3):  # warm-up
            plain_step(*plain_pair, batch, m)
            ray.get(cdag.execute(*batch))
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                plain_step(*plain_pair, batch, m)
            times["plain"].append((time.perf_counter() - t0) / steps)
            t0 = time.perf_counter()
            for _ in range(steps):
                ray.get(cdag.execute(*batch))
            times["compiled"].append((time.perf_counter() - t0) / steps)
    finally:
        cdag.teardown()
        ray.shutdown()
    plain, compiled = (statistics.median(times[k]) for k in ("plain", "compiled"))
    print(f"plain actor calls: {plain * 1e3:.1f} ms/step (runs {[round(t * 1e3, 1) for t in times['plain']]})")
    print(f"compiled graph:    {compiled * 1e3:.1f} ms/step (runs {[round(t * 1e3, 1) for t in times['compiled']]})")
    print(f"compiled / plain: {compiled / plain:.3f}")
    cmd = " ".join(["python benchmarks/compiled_schedule.py", *argv])
    append_row(
        "Fixed-pipeline step: plain Ray calls vs a Compiled Graph",
        ["setup", "plain ms/step", "compiled ms/step", "compiled / plain", "machine", "command"],
        [f"2 stages (model=tiny, 1 thread each), 1F1B, {m} x {mbs} seqs of {SEQ}, {repeats} x {steps} steps",
         f"{plain * 1e3:.1f}", f"{compiled * 1e3:.1f}", f"**{compiled / plain:.2f}**", machine(), f"`{cmd}`"],
        note=("The same microbatches through the same two stage actors (real range compute, one torch thread each), "
              "submitted call by call as `FixedPipelines` does, or bound once into a Ray Compiled Graph "
              "(`experimental_compile`). Below 1: the compiled graph is faster."),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
