"""How far an honest committed loss can sit from the validator's float32 recompute: the spot-check tolerance.

A holder commits the losses of its round's first microbatches; the validator recomputes one in float32 on the CPU
(neuroray/training/audit.py). Under ``train.precision=fp32`` both run the same code, so the gap is float rounding
of a different reduction order; under bf16 autocast the holder's loss carries the autocast's rounding. For the
tiny and small models, split in 2 stages like a run, this measures the loss of six random batches three ways:
the chained stages in float32 (the validator), the monolith in float32 (another order of the same sums), and the
chained stages under bf16 autocast; at the initial weights and at weights perturbed by N(0, 0.02) per entry
(sharper predictions). The worst relative gap of each pair is one row; ``ponw.spot_check_tolerance=0`` (auto)
picks 0.001 for float32 holders and 0.01 for autocast ones (neuroray/ponw/rules.py).

    flock /tmp/neuroray-cpu.lock python benchmarks/spot_check_gap.py [models=tiny,small] [batches=6]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._report import append_row, machine  # noqa: E402
from neuroray.configure import load_config  # noqa: E402
from neuroray.ponw.rules import AUTOCAST_SPOT_CHECK_TOLERANCE, FP32_SPOT_CHECK_TOLERANCE  # noqa: E402
from neuroray.training.reputation import StagePipeline  # noqa: E402

VOCAB, SEQ, BATCH = 4096, 128, 4


def gaps(model: str, batches: int) -> dict[str, float]:
    from neuroray.model import build_stage

    m = load_config([f"model={model}"]).model
    ranges = [(0, m.n_layers // 2), (m.n_layers // 2, m.n_layers)]
    pipe = StagePipeline(m, VOCAB, ranges, seed=0)
    mono = build_stage(m, VOCAB, 0, [(0, m.n_layers)], seed=0).eval()
    g = torch.Generator().manual_seed(0)
    worst = {"fp32 stages vs fp32 monolith": 0.0, "bf16 autocast stages vs fp32 stages": 0.0}
    for b in range(batches):
        if b == batches // 2:  # the second half at perturbed weights, the same in both models
            with torch.no_grad():
                for p in [*(q for st in pipe.stages for q in st.parameters())]:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
                flat = torch.cat([torch.nn.utils.parameters_to_vector(st.parameters()) for st in pipe.stages])
                torch.nn.utils.vector_to_parameters(flat, mono.parameters())
        x, y = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        out, _ = pipe.run(x)
        ref = pipe.loss(out, y)
        with torch.no_grad():
            whole = float(mono.loss(mono(x), y))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16, _ = pipe.run(x)
        low = pipe.loss(out16.float(), y)
        worst["fp32 stages vs fp32 monolith"] = max(worst["fp32 stages vs fp32 monolith"], abs(whole - ref) / max(1, ref))
        worst["bf16 autocast stages vs fp32 stages"] = max(worst["bf16 autocast stages vs fp32 stages"],
                                                           abs(low - ref) / max(1, ref))
    return worst


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    models, batches = opts.get("models", "tiny,small").split(","), int(opts.get("batches", 6))
    cmd = " ".join(["python benchmarks/spot_check_gap.py", *argv])
    for model in models:
        for pair, gap in gaps(model, batches).items():
            tol = AUTOCAST_SPOT_CHECK_TOLERANCE if pair.startswith("bf16") else FP32_SPOT_CHECK_TOLERANCE
            print(f"{model}: {pair}: worst relative gap {gap:.2e} (auto tolerance {tol:g})", flush=True)
            append_row("Spot checks: honest loss gap vs the auto tolerance",
                       ["model", "pair", "worst |gap| / max(1, loss)", "auto tolerance", "margin", "batches",
                        "machine", "command"],
                       [model, pair, f"{gap:.1e}", f"{tol:g}", f"{tol / max(gap, 1e-12):,.0f}x", str(batches), machine(),
                        f"`flock /tmp/neuroray-cpu.lock {cmd}`"],
                       note=__doc__.split("\n\n")[1].replace("\n", " "))


if __name__ == "__main__":
    main(sys.argv[1:])
