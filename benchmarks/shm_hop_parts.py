"""Where a shared-memory hop's time goes, in one process, no Ray (docs/hops.md, "Same-node rings of shared memory").

Per size: ``memcpy`` (``dst.copy_(src)`` into a touched buffer), ``put`` (the sender's side of a hop under
``swarm.hop_transport=shm``: a free slot found and the tensor copied into the ring, ``ShmRing.put``) and
``take`` (the receiver's side: the handle checked, the slot viewed in place, one value read, the slot released as
the view goes, ``ShmReader.take``). What ``benchmarks/hop_overhead.py`` measures for the shm hop beyond these is
Ray's two actor calls. Medians of ``reps``, the three in turn in every repetition, one torch thread.

    flock /tmp/neuroray-cpu.lock python benchmarks/shm_hop_parts.py [reps=21] [sizes_mib=4,64,256]
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import append_row, key_values, machine  # noqa: E402
from neuroray.swarm.shm_transport import ShmReader, ShmRings  # noqa: E402


def main() -> None:
    args = key_values({"reps": "21", "sizes_mib": "4,64,256"})
    reps, sizes = int(args["reps"]), [float(s) for s in args["sizes_mib"].split(",")]
    torch.set_num_threads(1)
    cmd = "flock /tmp/neuroray-cpu.lock python benchmarks/shm_hop_parts.py " + " ".join(sys.argv[1:])
    for mib in sizes:
        n = int(mib * 2**20) // 4
        src, dst = torch.randn(n), torch.empty(n)
        dst.copy_(src)
        rings, reader = ShmRings(), ShmReader()
        rings.open(uuid.uuid4().hex[:12], 0, 0, ["fwd"], 2, n * 4)
        times = {"memcpy": [], "put": [], "take": []}
        try:
            for _ in range(reps + 1):  # the first round maps the ring on the reader's side: left out
                t0 = time.perf_counter()
                dst.copy_(src)
                t1 = time.perf_counter()
                hop = rings.put(src, "fwd", "sender")
                t2 = time.perf_counter()
                float(reader.take(hop, "receiver")[0])  # the view goes at once: the slot is free again
                t3 = time.perf_counter()
                for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                    times[k].append(v)
        finally:
            rings.close()
        ms = {k: 1e3 * statistics.median(v[1:]) for k, v in times.items()}
        print(f"{mib:g} MiB: memcpy {ms['memcpy']:.3f} ms, put {ms['put']:.3f} ms ({ms['put'] / ms['memcpy']:.2f}x), "
              f"take {ms['take']:.3f} ms", flush=True)
        append_row("Shared-memory hop: where its time goes (one process, no Ray)",
                   ["command", "machine", "MiB", "memcpy ms", "put ms (/memcpy)", "take ms"],
                   [f"`{cmd.strip()}`", machine(), f"{mib:g}", f"{ms['memcpy']:.3f}",
                    f"{ms['put']:.3f} ({ms['put'] / ms['memcpy']:.2f}x)", f"{ms['take']:.3f}"],
                   note="benchmarks/shm_hop_parts.py: `put` the sender's side of a hop under swarm.hop_transport=shm "
                        "(a free slot found, the tensor copied into the preallocated ring), `take` the receiver's "
                        "(the handle checked, the slot viewed in place, one value read, the slot released). Medians, "
                        "one torch thread; the rest of a hop is Ray's two actor calls (benchmarks/hop_overhead.py).")


if __name__ == "__main__":
    main()
