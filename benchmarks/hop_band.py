"""The honest spread of hop norms, which ``swarm.hop_check_factor`` must leave room for (docs/hops.md, "The band").

Three in-process stage holders of a small model (d_model 128, one layer each, vocabulary 512) train on Zipf tokens
with a learnable bigram: 4 microbatches a step, the inner learning-rate schedule, and every 10 steps an outer step
of one replica (theta0 - 0.7 x delta). Every activation and gradient a holder receives is recorded. Printed per
holder and direction: the norm at the start and the end, and the largest ratio between a hop's norm and the median
of the ``history`` hops before it, above and below. The band is the same median, so these ratios are what the
factor must exceed.

    python benchmarks/hop_band.py [scheme=none] [steps=100] [lr=1e-3] [schedule=cosine] [history=64]
"""

from __future__ import annotations

import collections
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from neuroray.config import DilocoConfig, ModelConfig
    from neuroray.diloco.lr import inner_lr_at
    from neuroray.swarm import hop_guard
    from neuroray.swarm.holder import HolderSpec, StageHolder

    a = {"scheme": "none", "steps": "100", "lr": "1e-3", "schedule": "cosine", "history": "64"}
    a.update(arg.split("=", 1) for arg in sys.argv[1:])
    scheme, steps, lr, history = a["scheme"], int(a["steps"]), float(a["lr"]), int(a["history"])
    seen = collections.defaultdict(list)
    check = hop_guard.HopGuard.check

    def recording(self, x, direction, mb=None, band=True):
        check(self, x, direction, mb, band)
        seen[self.receiver, direction].append(float(torch.linalg.vector_norm(x, dtype=torch.float32)))

    hop_guard.HopGuard.check = recording
    cfg, vocab, batch, seq, micro = ModelConfig(d_model=128, n_layers=3, n_heads=4, n_kv_heads=4, max_seq_len=64), 512, 4, 64, 4
    with tempfile.TemporaryDirectory() as tmp:
        hs = [StageHolder(HolderSpec(replica=0, stage=s, ranges=[(0, 1), (1, 2), (2, 3)], model=cfg, vocab_size=vocab,
                                     diloco=DilocoConfig(inner_lr=lr), seed=0, key_path=f"{tmp}/k{s}.pem",
                                     hop_compression=scheme, seq_len=seq, microbatch_size=batch,
                                     hop_check_factor=1e30)) for s in range(3)]  # record, never reject
        g = torch.Generator().manual_seed(0)
        zipf = 1.0 / torch.arange(1, vocab + 1).float()
        mb, losses = 0, []
        for step in range(steps):
            for _ in range(micro):
                x = torch.multinomial(zipf, batch * (seq + 1), replacement=True, generator=g).view(batch, seq + 1)
                bigram = torch.rand(batch, seq, generator=g) < 0.5
                x[:, 1:][bigram] = (x[:, :-1][bigram] * 7 + 3) % vocab
                act = hs[1].forward(mb, hs[0].forward(mb, x[:, :-1]))
                loss, grad = hs[2].forward_backward(mb, act, x[:, 1:], 1.0 / micro)
                hs[0].backward(mb, hs[1].backward(mb, grad))
                losses.append(loss)
                mb += 1
            for h in hs:
                h.step(lr=inner_lr_at(step, steps, lr, a["schedule"], steps // 10, 0.1))
            if (step + 1) % 10 == 0:
                for h in hs:
                    h.load_theta0(h.theta0 - 0.7 * (h.theta0 - h.flat_params()))
    print(f"{scheme} inner_lr {lr:g} {a['schedule']}, {steps} steps: loss {statistics.mean(losses[:micro]):.3f} -> "
          f"{statistics.mean(losses[-5 * micro:]):.3f}")
    for (receiver, direction), norms in seen.items():
        above = below = 1.0
        for i in range(16, len(norms)):
            median = statistics.median(norms[max(0, i - history):i])
            above, below = max(above, norms[i] / median), max(below, median / norms[i])
        print(f"  {receiver} {direction}: {len(norms)} hops, norm {norms[0]:.3g} -> {norms[-1]:.3g}; "
              f"most above the median x{above:.2f}, below /{below:.2f}")


if __name__ == "__main__":
    main()
