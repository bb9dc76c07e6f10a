"""Tokens/s of generation through Ray stage holders / the same model generating in one process.

Both sides use the KV cache, the same weights and the same sessions (prompts, sampling, lengths),
measured in the same run. Each of the S holders gets 1 torch thread; the single process is timed
with 1 and with S threads and the faster counts. The pipeline splits the sessions into S microbatches
kept in flight at once, so every stage works while the others do; one process runs them as one batch.
Appends a row to docs/benchmarks.md.

    flock /tmp/neuroray-cpu.lock .venv/bin/python benchmarks/generation.py \\
        [model=small] [stages=2] [sessions=32] [prompt=32] [new=64] [repeats=2] [record=1]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._report import append_row, machine  # noqa: E402
from neuroray.configure import load_config  # noqa: E402
from neuroray.inference.loading import LoadedCheckpoint  # noqa: E402
from neuroray.inference.sampling import Sampler  # noqa: E402
from neuroray.inference.sessions import LocalEngine, Session, run_sessions  # noqa: E402
from neuroray.genesis import train_tokenizer  # noqa: E402
from neuroray.genesis.tokenizer import tokenizer_hash  # noqa: E402
from neuroray.model import build_monolith  # noqa: E402

DEFAULTS = {"model": "small", "stages": 2, "sessions": 32, "prompt": 32, "new": 64, "repeats": 2, "vocab": 4096,
            "record": 1}  # record=0: print only, do not append to docs/benchmarks.md


def model_in_memory(model_name: str, vocab: int) -> LoadedCheckpoint:
    """Seeded weights are as fast as trained ones; the tokenizer only has to exist (prompts are ids)."""
    cfg = load_config([f"model={model_name}"]).model
    tok = train_tokenizer(["a small text for a tokenizer the holders can load"], vocab_size=300)
    state = build_monolith(cfg, vocab, seed=0).state_dict()
    return LoadedCheckpoint(Path("<memory>"), cfg, vocab, state, tok, tokenizer_hash(tok))


def make_sessions(n: int, prompt_len: int, new: int, vocab: int) -> list[Session]:
    g = torch.Generator().manual_seed(0)
    return [Session(torch.randint(3, vocab, (prompt_len,), generator=g).tolist(), new, Sampler(0.8, 40, seed=i))
            for i in range(n)]


def timed(engine_factory, args, repeats: int) -> tuple[float, list[list[int]]]:
    """Best-of-``repeats`` generated tokens/s (the first run also warms up), and the tokens generated."""
    best, out = 0.0, []
    for _ in range(repeats + 1):
        sessions = make_sessions(*args)
        engine = engine_factory()
        t0 = time.perf_counter()
        run_sessions(engine, sessions)
        elapsed = time.perf_counter() - t0
        best = max(best, sum(len(s.new_ids) for s in sessions) / elapsed)
        out = [s.new_ids for s in sessions]
    return best, out


def main(argv: list[str]) -> None:
    opts = dict(DEFAULTS)
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in opts:
            raise SystemExit(f"unknown option {key!r}; options: {', '.join(opts)}")
        opts[key] = value if key == "model" else int(value)
    stages, repeats = opts["stages"], opts["repeats"]
    loaded = model_in_memory(opts["model"], opts["vocab"])
    args = (opts["sessions"], opts["prompt"], opts["new"], opts["vocab"])

    import ray

    from neuroray.inference.discovery import start_holders
    from neuroray.inference.engine import PipelineEngine

    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    try:
        holders = start_holders(loaded, stages, replicas=1, key_dir=tempfile.mkdtemp(), cpus_per_holder=0,
                                torch_threads=1)
        ray_tps, ray_out = timed(lambda: PipelineEngine(holders, loaded.model.max_seq_len), args, repeats)
        for row in holders:
            for h in row:
                ray.kill(h)
    finally:
        ray.shutdown()

    model = loaded.monolith()
    # The baseline is the faster of 1 and S threads: on a busy machine S OpenMP threads can be far
    # slower than one, and comparing against a crippled baseline would flatter the pipeline.
    local = {}
    for threads in sorted({1, stages}):
        torch.set_num_threads(threads)
        local[threads] = timed(lambda: LocalEngine(model), args, repeats)
        print(f"one process ({threads} thread{'s' if threads > 1 else ''}): {local[threads][0]:,.0f} tok/s")
    best_threads = max(local, key=lambda t: local[t][0])
    local_tps, local_out = local[best_threads]
    same = sum(a == b for a, b in zip(ray_out, local_out))
    ratio = ray_tps / local_tps
    print(f"ray pipeline ({stages} stages x 1 thread): {ray_tps:,.0f} tok/s")
    print(f"ratio: {ratio:.3f} (goal >= 0.8); identical outputs: {same}/{len(ray_out)} sessions")
    if not opts["record"]:
        return
    m = loaded.model
    cmd = " ".join(["python benchmarks/generation.py", *argv])
    append_row(
        "Generation through the pipeline vs one process",
        ["setup", "Ray pipeline tok/s", "one process tok/s", "ratio", "machine", "command"],
        [f"{stages} stages x 1 holder, model={opts['model']} ({m.n_layers}x{m.d_model}, vocab {opts['vocab']}), "
         f"{opts['sessions']} sessions, prompt {opts['prompt']}, {opts['new']} new tokens each; "
         f"one process best with {best_threads} thread(s)",
         f"{ray_tps:,.0f}", f"{local_tps:,.0f}", f"**{ratio:.2f}**", machine(), f"`{cmd}`"],
        note=("Generated tokens/s with the KV cache through Ray stage holders (each 1 torch thread, sessions in S "
              "microbatches in flight) / the same model, sessions and sampling in one process (one batch), with "
              "whichever of 1 or S threads was faster. Best of `repeats` runs after a warm-up. "
              "The inference issue's goal is >= 0.8."),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
