"""Where the object-store hop's time goes for a large activation (docs/hops.md, "Transport"): the parts of
putting a wire tensor into Ray's object store, against a memcpy, in one process.

* ``memcpy``: into a buffer already written once (the floor for moving the bytes);
* ``memcpy, fresh pages``: into a new ``np.empty`` (the first write faults every page in);
* ``serialize``: Ray's serializer on the wire tensor (pickle-5, the array's buffer out of band: no copy);
* ``put``: ``ray.put`` of it, each ref dropped once the next is put (as a hop's object is freed once its
  receiver is done): the median, and the slowest of the ``reps`` (a put into store memory not touched before);
* ``get``: ``ray.get`` of a stored object (mapped in place: no copy).

Medians of ``reps``; each row appended to docs/benchmarks.md.

    flock /tmp/neuroray-cpu.lock python benchmarks/object_store_put.py [reps=21] [sizes_mib=4,64]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import append_row, key_values, machine  # noqa: E402


def _times_ms(fn, reps: int) -> list[float]:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def main() -> None:
    import ray

    from neuroray.swarm.hop_codec import HopCodec

    args = key_values({"reps": "21", "sizes_mib": "4,64"})
    reps, sizes = int(args["reps"]), [float(s) for s in args["sizes_mib"].split(",")]
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    ctx = ray._private.worker.global_worker.get_serialization_context()
    cmd = "flock /tmp/neuroray-cpu.lock python benchmarks/object_store_put.py " + " ".join(sys.argv[1:])
    for mib in sizes:
        numel = int(mib * 2**20) // 4
        wire = HopCodec("none").encode(torch.randn(numel), "driver")
        touched = np.ones(numel, np.float32)
        last: list = [None]

        def put():
            last[0] = ray.put(wire)  # noqa: B023 - the previous object is freed here, once the next is stored

        med = {
            "memcpy": statistics.median(_times_ms(lambda: np.copyto(touched, wire.array), reps)),  # noqa: B023
            "fresh": statistics.median(_times_ms(lambda: np.copyto(np.empty(numel, np.float32), wire.array), reps)),  # noqa: B023
            "serialize": statistics.median(_times_ms(lambda: ctx.serialize(wire), reps)),  # noqa: B023
        }
        puts = _times_ms(put, reps)
        med["put"], med["put max"] = statistics.median(puts), max(puts)
        med["get"] = statistics.median(_times_ms(lambda: ray.get(last[0]), reps))  # noqa: B023
        last.clear()
        m = med["memcpy"]
        print(f"{mib:g} MiB: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()), flush=True)
        append_row(
            "Object-store hop: where a large activation's time goes",
            ["command", "machine", "MiB", "memcpy ms", "memcpy, fresh pages ms", "serialize ms", "put ms (/memcpy)",
             "slowest put ms", "get ms"],
            [f"`{cmd.strip()}`", machine(), f"{mib:g}", f"{m:.2f}", f"{med['fresh']:.2f}", f"{med['serialize']:.2f}",
             f"{med['put']:.2f} ({med['put'] / m:.1f}x)", f"{med['put max']:.2f}", f"{med['get']:.2f}"],
            note="One process (benchmarks/object_store_put.py): the parts of an object-store hop's copy-in for a float32 "
                 "wire tensor, medians; each put's ref is dropped once the next is stored, as a hop's object is freed "
                 "once its receiver is done. `slowest put`: the put that had to fault store memory in.")
    ray.shutdown()


if __name__ == "__main__":
    main()
