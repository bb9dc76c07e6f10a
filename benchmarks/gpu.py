"""Tokens/s and MFU of a 1B-class model in bf16 through real stage holders, 1 and 2 stages, side by side in one run.

The holders are the training ones (``StageHolder`` actors, precision bf16: autocast with float32 master weights
and AdamW state, fused AdamW and TF32 on CUDA), each stage on its share of the node's GPUs (two stages on one GPU
share it). Every inner step runs ``microbatches`` microbatches of random token ids through forward, loss and
backward (all forwards, then all backwards) and one AdamW step on every holder. The first ``warmup`` steps are
not timed.

MFU = tokens/s x model FLOPs per token / the GPU's peak dense bf16 FLOP/s; model FLOPs per token are 3 x the
forward's (neuroray.planner.scaling: matmuls, causal attention, head and loss), recomputation not counted. The
peak comes from the GPU's name (H100 SXM/H200 989, H100 PCIe 756, A100 312 TFLOP/s) or ``peak_tflops=``. On the
CPU the script runs the same path on a small model (``model=cpu``, the default there) and reports tokens/s
with MFU n/a.

    flock /tmp/neuroray-cpu.lock python benchmarks/gpu.py [model=1b|cpu] [stages=1,2] [steps=10] [warmup=2]
        [microbatches=4] [microbatch_size=4] [seq_len=2048] [peak_tflops=]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import append_row, machine  # noqa: E402
from neuroray.config import DilocoConfig, ModelConfig  # noqa: E402
from neuroray.planner.scaling import head_flops_per_token, layer_flops_per_token, param_count  # noqa: E402

VOCAB = {"1b": 32768, "cpu": 4096}
MODELS = {  # 1b: 0.99 B parameters (18 x 2048, head dim 128, 8 KV heads); cpu: small enough for 2 shared cores
    "1b": ModelConfig(name="1b", d_model=2048, n_layers=18, n_heads=16, n_kv_heads=8, max_seq_len=2048),
    "cpu": ModelConfig(name="cpu", d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=128),
}
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("L4", 121.0))


def _args() -> dict:
    cuda = torch.cuda.is_available()
    out = {"model": "1b" if cuda else "cpu", "stages": "1,2", "steps": "10" if cuda else "3", "warmup": "2",
           "microbatches": "4" if cuda else "2", "microbatch_size": "4", "seq_len": "", "peak_tflops": ""}
    for arg in sys.argv[1:]:
        key, _, value = arg.partition("=")
        if key not in out:
            raise SystemExit(f"unknown argument {key}; expected one of {', '.join(out)}")
        out[key] = value
    return out


def peak_tflops(name: str, given: str) -> float | None:
    """Peak dense bf16 TFLOP/s of the GPU called ``name`` (``given`` overrides; None: not known)."""
    if given:
        return float(given)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def flops_per_token(cfg: ModelConfig, vocab: int, seq_len: int) -> float:
    """Training FLOPs per token: 3 x the forward (the backward costs twice the forward)."""
    return 3.0 * (cfg.n_layers * layer_flops_per_token(cfg, seq_len) + head_flops_per_token(cfg, vocab))


def _pipeline(cfg: ModelConfig, vocab: int, stages: int, keys: Path, gpus: int):
    from neuroray.swarm.holder import HolderSpec, holder_actor

    per = cfg.n_layers // stages
    ranges = [(s * per, cfg.n_layers if s == stages - 1 else (s + 1) * per) for s in range(stages)]
    num_gpus = 0.0 if gpus == 0 else min(1.0, gpus / stages)
    return [holder_actor(HolderSpec(replica=0, stage=s, ranges=ranges, model=cfg, vocab_size=vocab,
                                    diloco=DilocoConfig(inner_lr=1e-4), seed=0, key_path=str(keys / f"{stages}-{s}.pem"),
                                    torch_threads=1 if gpus else max(1, 2 // stages), use_gpu=gpus > 0,
                                    precision="bf16"), num_cpus=0, num_gpus=num_gpus) for s in range(stages)]


def _step(pipeline: list, batches: list, first_mb: int) -> list:
    """One inner step (GPipe order) through the holders' own methods; the refs to wait on."""
    scale, last = 1.0 / len(batches), pipeline[-1]
    losses, grads = [], []
    for m, (x, y) in enumerate(batches):
        act = x
        for holder in pipeline[:-1]:
            act = holder.forward.remote(first_mb + m, act)
        loss, grad = last.forward_backward.options(num_returns=2).remote(first_mb + m, act, y, scale)
        losses.append(loss)
        grads.append(grad)
    for m, grad in enumerate(grads):
        for holder in reversed(pipeline[:-1]):
            grad = holder.backward.remote(first_mb + m, grad)
        losses.append(grad)
    return losses + [h.step.remote() for h in pipeline]


def measure(cfg: ModelConfig, vocab: int, stages: int, a: dict, keys: Path, gpus: int) -> float:
    """Tokens/s of ``stages`` holders training ``cfg``."""
    import ray

    seq, mb, n = int(a["seq_len"] or cfg.max_seq_len), int(a["microbatch_size"]), int(a["microbatches"])
    pipeline = _pipeline(cfg, vocab, stages, keys, gpus)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (mb, seq + 1), generator=g)
        batches.append((ray.put(tokens[:, :-1].contiguous()), ray.put(tokens[:, 1:].contiguous())))
    try:
        for i in range(int(a["warmup"])):
            ray.get(_step(pipeline, batches, i * n))
        t0 = time.perf_counter()
        steps = int(a["steps"])
        for i in range(steps):  # one step in flight behind the next, as the trainer submits them
            ray.get(_step(pipeline, batches, (int(a["warmup"]) + i) * n))
        return steps * n * mb * seq / (time.perf_counter() - t0)
    finally:
        for h in pipeline:
            ray.kill(h)


def main() -> None:
    import ray

    a = _args()
    cfg, vocab = MODELS[a["model"]], VOCAB[a["model"]]
    seq = int(a["seq_len"] or cfg.max_seq_len)
    gpus = torch.cuda.device_count()
    device = torch.cuda.get_device_name(0) if gpus else "CPU"
    peak = peak_tflops(device, a["peak_tflops"]) if gpus else None
    fpt = flops_per_token(cfg, vocab, seq)
    params = param_count(cfg, vocab).total
    print(f"{cfg.name}: {params / 1e9:.2f} B parameters, {fpt / 1e9:.2f} GFLOP per token, on {device}"
          f"{f' (peak {peak:g} TFLOP/s bf16)' if peak else ''}", flush=True)
    ray.init(address="local", num_cpus=2 if not gpus else None, num_gpus=gpus, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    rows = []
    with tempfile.TemporaryDirectory() as keys:
        for stages in [int(s) for s in a["stages"].split(",")]:
            tps = measure(cfg, vocab, stages, a, Path(keys), gpus)
            mfu = tps * fpt / (peak * 1e12) if peak else None
            rows.append((stages, tps, mfu))
            print(f"{stages} stage(s): {tps:,.0f} tokens/s, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f} %'}",
                  flush=True)
    ray.shutdown()
    cmd = "flock /tmp/neuroray-cpu.lock python benchmarks/gpu.py " + " ".join(sys.argv[1:])
    for stages, tps, mfu in rows:
        append_row(
            "GPU: tokens/s and MFU, 1B-class model, bf16",
            ["command", "machine", "device", "model", "stages", "tokens/s", "MFU (goal >= 40 % on one H100)"],
            [f"`{cmd.strip()}`", machine(), device, f"{cfg.name} ({params / 1e9:.2f} B, seq {seq})", str(stages),
             f"{tps:,.0f}", "n/a (CPU)" if mfu is None else f"{100 * mfu:.1f} % ({'met' if mfu >= 0.4 else 'not met'})"],
            note="Real stage holders (bf16 autocast, float32 master weights, fused AdamW and TF32 on CUDA), random "
                 "token ids, GPipe order, every holder's AdamW step included (benchmarks/gpu.py). MFU: model FLOPs "
                 "(3 x forward, no recomputation) / the GPU's peak dense bf16. On the CPU the same path runs a small "
                 "model and MFU is n/a.")


if __name__ == "__main__":
    main()
