"""What the checks at every hop cost (neuroray/swarm/hop_guard.py, docs/hops.md): the same microbatches through the
same two holders with ``swarm.hop_check`` on and off, side by side in one process.

Two in-process stage holders of the tiny model (d_model 128, 2 + 2 layers, vocabulary 4096), one microbatch of
``batch x seq`` tokens: Driver forward -> Validator forward_backward -> Driver backward, the two hops exactly as
a holder receives them (``none``: a WireTensor; ``int8`` and ``lowrank``: the encoded payload, checked after it
is decoded). Timed per scheme, the arms in turn within every repetition (a busy machine slows them alike):

* ``check``: one :meth:`HopGuard.check` of an activation-sized tensor alone (shape, dtype, one norm, the band,
  warm);
* ``step on`` / ``step off``: one microbatch's forward and backward through both holders, checks on / off.

Reported: the median of each in ms; the checks' share of a microbatch computed from the check's own time,
``2 x check / off`` (a microbatch crosses two hops: its activation and its gradient), and as the difference of
the two arms, ``(on - off) / off``, which also holds the run-to-run noise of whole microbatches.

    flock /tmp/neuroray-cpu.lock python benchmarks/hop_check.py [reps=30] [schemes=none,int8,lowrank] [seq=256]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import append_row, machine  # noqa: E402


def _args() -> dict:
    out = {"reps": "30", "schemes": "none,int8,lowrank", "seq": "256", "batch": "4"}
    for arg in sys.argv[1:]:
        key, _, value = arg.partition("=")
        out[key] = value
    return out


def _pipeline(tmp: str, scheme: str, check: bool, seq: int, batch: int):
    from neuroray.config import DilocoConfig, ModelConfig
    from neuroray.swarm.holder import HolderSpec, StageHolder

    cfg = ModelConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=seq)
    return [StageHolder(HolderSpec(replica=0, stage=s, ranges=[(0, 2), (2, 4)], model=cfg, vocab_size=4096,
                                   diloco=DilocoConfig(), seed=0, key_path=f"{tmp}/{scheme}{check}{s}.pem",
                                   hop_compression=scheme, hop_check=check, seq_len=seq, microbatch_size=batch))
            for s in range(2)]


def _microbatch(holders, mb: int, x, y) -> float:
    driver, validator = holders
    t0 = time.perf_counter()
    _, grad = validator.forward_backward(mb, driver.forward(mb, x), y, 1.0)
    driver.backward(mb, grad)
    return time.perf_counter() - t0


def main() -> None:
    a = _args()
    reps, seq, batch = int(a["reps"]), int(a["seq"]), int(a["batch"])
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 4096, (batch, seq), generator=g), torch.randint(0, 4096, (batch, seq), generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in a["schemes"].split(","):
            on, off = _pipeline(tmp, scheme, True, seq, batch), _pipeline(tmp, scheme, False, seq, batch)
            from neuroray.swarm.hop_guard import HopGuard

            shape = (batch, seq, 128)
            guard = HopGuard("bench", 1, {"fwd": shape, "bwd": shape}, {"fwd": torch.float32, "bwd": torch.float32})
            act = torch.randn(shape, generator=g)
            for mb in range(20):  # warm-up, and the bands fill
                _microbatch(on, mb, x, y), _microbatch(off, mb, x, y)
                guard.check(act, "fwd")
            times = {"check": [], "on": [], "off": []}
            for mb in range(20, 20 + reps):
                t0 = time.perf_counter()
                guard.check(act, "fwd")
                times["check"].append(time.perf_counter() - t0)
                times["on"].append(_microbatch(on, mb, x, y))
                times["off"].append(_microbatch(off, mb, x, y))
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            share, diff = 2 * ms["check"] / ms["off"], (ms["on"] - ms["off"]) / ms["off"]
            print(f"{scheme}: check {ms['check']:.3f} ms ({share:.2%} of a microbatch); microbatch on {ms['on']:.2f} ms, "
                  f"off {ms['off']:.2f} ms: {diff:+.2%}")
            command = "`flock /tmp/neuroray-cpu.lock python benchmarks/hop_check.py " + " ".join(sys.argv[1:]) + "`"
            append_row("Checks at every hop", [
                "hop_compression", "one check (activation) ms", "2 checks / microbatch", "microbatch, checks on ms",
                "checks off ms", "(on - off) / off", "goal", "batch x seq", "reps", "machine", "command"],
                [scheme, f"{ms['check']:.3f}", f"**{share:.2%}**", f"{ms['on']:.2f}", f"{ms['off']:.2f}", f"{diff:+.2%}",
                 "met (<= 1 %)" if share <= 0.01 else "not met (<= 1 %)", f"{batch} x {seq}", str(reps), machine(),
                 command.replace(" `", "`")],
                note="Two in-process holders of the tiny model (2 + 2 layers), one microbatch forward and backward "
                     "through both, with swarm.hop_check on and off, the arms in turn within each repetition; medians "
                     "(benchmarks/hop_check.py, docs/hops.md). One check: HopGuard.check of one activation "
                     "(shape, dtype, one norm, the band's median of 64), warm. A microbatch crosses two hops (an "
                     "activation and its gradient), each checked once: 2 checks / microbatch is their share of the "
                     "checks-off microbatch; (on - off) / off is the same share read from the two arms, within the "
                     "noise of whole microbatches on a shared machine. Goal (set here): the checks cost at most 1 % "
                     "of a microbatch (judged on 2 checks / microbatch).")


if __name__ == "__main__":
    main()
