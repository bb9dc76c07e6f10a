"""Which strong hop codec: candidates from the literature on the tiny model, in one process (docs/hops.md).

The tiny model split 2 + 2 layers trains ``steps`` AdamW steps on the Genesis data (4 x 64 tokens a step)
with one codec applied to the activation going forward and to its gradient coming back (the receiving side
gets ``decode(encode(x))``, as on the wire). Reported per codec: bytes (scales included) x fewer than float32,
the gradient's relative error and cosine against the uncompressed split at the weights the uncompressed run
reached, and the eval loss after its own run. No Ray: it compares codecs, not the transport.
``seeds=0,1,2`` repeats every run at each seed (weights and data order) and adds the mean gap; ``codecs=`` picks
rows by name, ``;`` between them. ``control`` multiplies every hop by ``1 + 1e-6 N(0, 1)``: no compression at
all, it measures how far two runs drift apart from any difference (the noise floor a codec's gap has to clear).

    flock /tmp/neuroray-cpu.lock python benchmarks/hop_codec_choice.py [steps=300] [seeds=0]
        [codecs=<names, ; between them>]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neuroray.configure import load_config  # noqa: E402
from neuroray.diloco import compress  # noqa: E402
from neuroray.genesis import TokenStream, ensure_dataset, eval_batches, load_tokenizer  # noqa: E402
from neuroray.model import build_stage  # noqa: E402
from neuroray.swarm.hop_codec import HopCodec  # noqa: E402

RANGES = [(0, 2), (2, 4)]


def _int8(x):
    return compress.decode(compress.encode(x.reshape(-1), "int8", 64)).view_as(x), x.numel() * (1 + 4 / 64)


def _int8_stochastic(x, b=256):
    """int8 per block of ``b`` (absmax scale) with stochastic rounding: unbiased, noisier than nearest."""
    f = x.reshape(-1, b)
    s = f.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
    q = torch.floor(f / s + torch.rand_like(f)).clamp(-127, 127)
    return (q * s).view_as(x), x.numel() * (1 + 4 / b)


def _control(x):
    return x * (1 + 1e-6 * torch.randn_like(x)), 4 * x.numel()


def _ternary(x, b=128):
    """Ternary weight networks' code: 0 below 0.7 mean|x|, else sign x the mean kept magnitude (fp16)."""
    f = x.reshape(-1, b)
    keep = f.abs() > 0.7 * f.abs().mean(1, keepdim=True)
    s = (f.abs() * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
    return (torch.sign(f) * keep * s).view_as(x), x.numel() * (1.6 / 8 + 2 / b)  # 5 trits a byte


def _hadamard(d):
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / math.sqrt(d)


def _ternary_rotated(x):
    h = _hadamard(x.shape[-1])
    y, n = _ternary(x @ h)
    return y @ h.T, n


def _sign(x, b=64):
    f = x.reshape(-1, b)
    return (torch.sign(f) * f.abs().mean(1, keepdim=True)).view_as(x), x.numel() * (1 / 8 + 2 / b)


def _topk(x, frac=0.1):
    f = x.reshape(-1, x.shape[-1])
    k = max(1, int(frac * f.shape[1]))
    i = f.abs().topk(k, 1).indices
    # a uint8 index and an int8 value per kept entry, an fp16 scale per token (values kept exact: a lower bound)
    return torch.zeros_like(f).scatter_(1, i, f.gather(1, i)).view_as(x), f.shape[0] * (2 * k + 2)


def _svd_fp16(x, r=10):
    f = x.reshape(-1, x.shape[-1])
    u, s, vh = torch.linalg.svd(f, full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).view_as(x), 2 * r * sum(f.shape)


def _codec(scheme, **kw):
    def run(x):
        codec = HopCodec(scheme, **kw)
        p = codec.encode(x, "bench")
        return codec.decode(p, "bench"), p.nbytes
    return run


def _none(x):
    return x, 4 * x.numel()


# a name: one function for both directions, or (forward, backward)
CODECS = {"none": _none, "control": _control, "int8 (block 64)": _int8, "int8 (block 256)": _codec("int8"),
          "int8 (block 256, stochastic)": _int8_stochastic, "ternary (128, fp16 scale)": _ternary,
          "ternary + Hadamard": _ternary_rotated, "1-bit sign (64, fp16 scale)": _sign,
          "top-10 % per token": _topk, "rank-10 SVD, fp16": _svd_fp16, "lowrank (int8 factors)": _codec("lowrank"),
          "lowrank, forward only": (_codec("lowrank"), _none), "lowrank, backward only": (_none, _codec("lowrank")),
          "lowrank_mixed": _codec("lowrank_mixed")}


def _grads(stages, x, y, codec):
    """One microbatch through the split with ``codec`` on both hops: the flat parameter gradient, bytes."""
    s0, s1 = stages
    for m in stages:
        m.zero_grad()
    fwd, bwd = CODECS[codec] if isinstance(CODECS[codec], tuple) else (CODECS[codec],) * 2
    a = s0(x)
    sent, nbytes = fwd(a.detach())
    inp = sent.clone().requires_grad_(True)
    s1.loss(s1(inp), y).backward()
    back, back_bytes = bwd(inp.grad)
    a.backward(back)
    return torch.cat([p.grad.reshape(-1) for m in stages for p in m.parameters()]), max(nbytes, back_bytes)


def main(argv):
    args = {"steps": "300", "seeds": "0", "codecs": ";".join(CODECS)}
    args.update(a.split("=", 1) for a in argv)
    steps = int(args["steps"])
    seeds = [int(v) for v in args["seeds"].split(",")]
    names = [c for c in args["codecs"].split(";") if c != "none"]
    torch.set_num_threads(1)
    cfg = load_config(["data.seq_len=64", "data.microbatch_size=4", "data.num_microbatches=2"])
    root, manifest = ensure_dataset(cfg.data, log=lambda s: None)
    vocab = load_tokenizer(Path(root) / manifest.tokenizer_file).get_vocab_size()
    evals = eval_batches(root, manifest, 64, 4, 16)

    def train(codec, seed):
        torch.manual_seed(seed)  # the stochastic codecs' draws
        stages = [build_stage(cfg.model, vocab, i, RANGES, seed=seed) for i in range(2)]
        opt = torch.optim.AdamW([p for m in stages for p in m.parameters()], lr=1e-3, betas=(0.9, 0.95),
                                weight_decay=0.1)
        stream = TokenStream(root, manifest, f"bench{seed or ''}", 64, 4, prefetch=False, _start=0)
        for _ in range(steps):
            _grads(stages, *stream.next_microbatch(), codec)
            opt.step()
        with torch.no_grad():
            return stages, sum(float(stages[1].loss(stages[1](stages[0](x)), y)) for x, y in evals) / len(evals)

    rows = {c: [] for c in names}
    for seed in seeds:
        base, base_eval = train("none", seed)
        init = [build_stage(cfg.model, vocab, i, RANGES, seed=seed) for i in range(2)]
        ref, fp32 = _grads(base, *evals[0], "none")
        ref0, _ = _grads(init, *evals[0], "none")
        for codec in names:
            g, nbytes = _grads(base, *evals[0], codec)
            g0, _ = _grads(init, *evals[0], codec)
            rel = float((g - ref).norm() / ref.norm())
            rel0 = float((g0 - ref0).norm() / ref0.norm())
            cos = float(torch.nn.functional.cosine_similarity(g, ref, dim=0))
            _, ev = train(codec, seed)
            rows[codec].append((fp32 / nbytes, rel, cos, rel0, ev, 100 * (ev / base_eval - 1), base_eval))
            print(f"seed {seed} {codec}: {rows[codec][-1]}", flush=True)
    print(f"\n{steps} steps, seeds {args['seeds']}")
    print("| scheme | x fewer bytes | gradient rel. error (trained) | cosine | rel. error at init | eval loss vs none, "
          "per seed | mean |")
    print("|---|---|---|---|---|---|---|")
    for codec, r in rows.items():
        mean = [sum(v[i] for v in r) / len(r) for i in range(4)]
        gaps = ", ".join(f"{v[4]:.3f} ({v[5]:+.2f} %)" for v in r)
        print(f"| {codec} | {mean[0]:.1f} | {mean[1]:.3f} | {mean[2]:.3f} | {mean[3]:.3f} | {gaps} | "
              f"{sum(v[5] for v in r) / len(r):+.2f} % |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
