"""Per-hop cost of an activation crossing between two actors, against a plain memcpy of the same tensor and a
Ray Compiled Graph of the same hop, side by side in one run (docs/hops.md, "Transport").

Two actors on one node: the sender makes the hop payload of a float32 activation exactly as a holder does
(``HopCodec("none").encode``), the receiver decodes it as a holder does and reads one value. Timed per size:

* ``memcpy``: ``dst.copy_(src)`` of the same tensor in one process (the floor for moving the bytes once);
* ``torch pickle``: the hop before this change: the torch tensor itself crosses (Ray pickles it through
  ``Storage.__reduce__``: torch.save into bytes, torch.load on arrival);
* ``wire``: the hop now: a :class:`~neuroray.swarm.transport.WireTensor` (a numpy buffer, out of band in the
  object store, read in place);
* ``direct (gloo)``: the hop under ``swarm.hop_transport=gloo`` (Ray Direct Transport): the sender returns the
  tensor itself (``direct_transport.outgoing``), the receiver's call pulls it over a gloo group of the two actors;
* ``shm``: the hop under ``swarm.hop_transport=shm`` (neuroray/swarm/shm_transport.py): the sender copies the
  tensor into a slot of its preallocated, pre-touched shared-memory ring and returns a handle; the receiver reads
  the slot in place and releases it when its view goes (here at the end of the call);
* ``compiled``: the wire hop as a Ray Compiled Graph (``experimental_compile``: shared-memory channels, no
  task submission per call);
* ``store put``: ``ray.put`` of the wire payload in the driver, then freed: the object store's own copy-in, one
  part of the wire hop (where its time goes, docs/hops.md);
* ``empty``: the same two calls with no tensor (the per-call floor of Ray's actor tasks on this machine).

``stores`` repeats the whole measurement on a fresh local Ray per object-store setup, all of size ``store_mib``
(``cluster.object_store_*``, neuroray/training/local_ray.py): ``default`` (/dev/shm, pages faulted in as
used), ``prefault`` (the whole store faulted in at start), ``huge`` (prefault, on a tmpfs mounted here with
``huge=always``, so 2 MiB pages; needs root; unmounted at the end).

Each is the median of ``reps`` sender -> receiver calls awaited by the driver, all taken in turn within every
repetition (a busy machine slows them alike); ``order=shuffle`` (the default) takes them in a different order in
each repetition (seeded) so that no arm always follows the same one, ``order=fixed`` in the order listed (as the
rows of the earlier table "Per-hop cost vs memcpy: shared-memory rings, ..." were taken). Inside the actors the shm
hop's two parts are timed too: ``put`` (the sender's ``ShmRing.put``: a free slot found, the copy) and ``take``
(the receiver's ``ShmReader.take``, one value read, the slot released); ``shm - empty - put - take`` is what Ray's
two calls cost more for carrying a handle after a copy than for carrying nothing; two arms split it, printed
only: ``copy only`` (the sender copies the tensor into memory of its own and returns None) and ``handle only`` (it
returns a shm handle without copying, which the receiver does not read). ``timeline=1`` also prints, from
Ray's timeline, where these four arms' time goes in each worker (arguments deserialized, method run, return
value stored) and between the two tasks. Reported: each in ms and ``hop / memcpy``; the goal is ``hop / memcpy <=
2`` (issue 22), for the wire, direct and shm hops; and ``(hop - empty) / memcpy``, the hop's cost beyond Ray's two
calls.

    flock /tmp/neuroray-cpu.lock python benchmarks/hop_overhead.py [reps=15] [sizes_mib=0.25,4,64]
        [stores=default] [store_mib=2048] [order=shuffle|fixed] [timeline=0|1]
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import append_row, key_values, machine  # noqa: E402


def _interleaved_ms(fns: dict, reps: int, shuffle: bool) -> dict[str, float]:
    """Median ms of each callable, run in turn within every repetition so that a busy machine slows them alike.

    ``shuffle``: every repetition takes the arms in its own order (seeded, the same every run), so that no arm
    always runs right after the same one (in the fixed order the shm hop always followed the Compiled Graph, whose
    actors are still at work on 2 cores when its result is back: ``order=fixed`` against ``order=shuffle``,
    docs/hops.md). A rotation would not do: it keeps every arm's predecessor."""
    for fn in fns.values():  # warm-up: worker start, first allocation in the object store
        fn()
        fn()
    names = list(fns)
    times = {k: [] for k in fns}
    for rep in range(reps):
        if shuffle:
            random.Random(rep).shuffle(names)
        for k in names:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def _local_ray(store: str, store_mib: int):
    """A fresh local Ray whose object store is set up as ``store`` says; everything undone on exit."""
    import ray

    from neuroray.config import ClusterConfig
    from neuroray.training.local_ray import PREFAULT_ENV, start_local_ray

    mount = None
    if store == "huge":
        mount = tempfile.mkdtemp(prefix="neuroray-hugeshm-")
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"huge=always,size={store_mib + 256}m", "tmpfs", mount],
                       check=True)
    elif store not in ("default", "prefault"):
        raise SystemExit(f"stores: {store} is not one of default, prefault, huge")
    cluster = ClusterConfig(object_store_mb=store_mib, object_store_dir=mount or "",
                            object_store_prefault=store != "default")
    try:
        start_local_ray(cluster, num_cpus=2, include_dashboard=False, log_to_driver=False,
                        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        yield
    finally:
        ray.shutdown()
        os.environ.pop(PREFAULT_ENV, None)
        if mount:
            subprocess.run(["umount", mount], check=False)
            os.rmdir(mount)


# the sender's and the receiver's method of each arm _task_parts breaks down
_PAIRS = {"shm_hop": "take_shm", "empty": "take_none", "copy_only": "take_after_copy", "handle_only": "take_nothing"}


def _task_parts(events: list[dict], since_us: float) -> dict[str, dict[str, float]]:
    """From Ray's timeline (``ray.timeline()``): per actor method of the arms in ``_PAIRS``, the median ms of the
    whole task and of the worker's three steps in it (arguments deserialized, the method run, the return value
    stored), over the tasks that began after ``since_us``; and the gap from the sender's task's end to the
    receiver's task's start (the return to the driver, the receiver's task pushed with the value inlined)."""
    spans = {}
    for e in events:
        if e.get("ph") == "X" and e["ts"] >= since_us:
            spans.setdefault(e["tid"], []).append(e)
    parts: dict[str, dict[str, list]] = {}
    ends: dict[str, list] = {}
    for worker in spans.values():
        steps = [e for e in worker if e["name"].startswith("task:")]
        for task in worker:
            if task["name"] not in _PAIRS and task["name"] not in _PAIRS.values():
                continue
            p = parts.setdefault(task["name"], {"task": []})
            p["task"].append(task["dur"])
            ends.setdefault(task["name"], []).append((task["ts"], task["ts"] + task["dur"]))
            for e in steps:
                if task["ts"] <= e["ts"] <= task["ts"] + task["dur"]:
                    p.setdefault(e["name"].removeprefix("task:"), []).append(e["dur"])
    out = {name: {k: statistics.median(v) / 1e3 for k, v in p.items()} for name, p in parts.items()}
    for send, take in _PAIRS.items():
        pairs = zip(sorted(ends.get(send, [])), sorted(ends.get(take, [])))
        gaps = [t0 - s1 for (_, s1), (t0, _) in pairs]
        if gaps:
            out.setdefault(send, {})["to the receiver"] = statistics.median(gaps) / 1e3
    return out


def _measure(sizes: list[float], reps: int, shuffle: bool, timeline: bool) -> list[dict]:
    """Every hop kind at every size on the Ray this process is connected to."""
    import ray
    from ray.dag import InputNode

    from ray.experimental.collective import create_collective_group, destroy_collective_group

    from neuroray.swarm.direct_transport import outgoing
    from neuroray.swarm.hop_codec import HopCodec
    from neuroray.swarm.shm_transport import ShmReader, ShmRings

    class Sender:
        def __init__(self):
            torch.set_num_threads(1)
            self.codec, self.x, self.rings = HopCodec("none"), None, ShmRings()
            self.put_ns: list[int] = []  # each shm hop's ShmRing.put, timed here

        def shm_times(self) -> list[int]:
            out, self.put_ns = self.put_ns, []
            return out

        def make(self, numel: int, ring: bool = False) -> None:
            self.x = torch.randn(numel)
            if ring:  # as a holder's ring, made once per shape (one sender per edge: the others have none)
                self.rings.open(run, 0, 0, ["fwd"], 2, numel * 4)
                self.private = self.x.clone()  # the copy alone, into memory of its own, touched
                hop = self.rings.put(self.x, "fwd", "sender")  # the handle alone: a real one's fields, never read
                self.handle = replace(hop, seq=-1)
                ShmReader().take(hop, "self")  # its slot released at once

        def close(self) -> None:
            self.rings.close()

        def shm_hop(self, _=None):
            t0 = time.perf_counter_ns()
            hop = self.rings.put(self.x, "fwd", "sender")
            self.put_ns.append(time.perf_counter_ns() - t0)
            return hop

        def sized_wire_hop(self, numel: int):
            """The compiled graph's sender: one graph for every size, the size its input."""
            if self.x is None or self.x.numel() != numel:
                self.make(numel)
            return self.wire_hop()

        def torch_hop(self, _=None):
            return self.x

        def wire_hop(self, _=None):
            return self.codec.encode(self.x, "sender")

        def direct_hop(self, _=None):
            return outgoing(self.x, "gloo")

        def empty(self, _=None):
            return None

        def copy_only(self, _=None):
            """The shm hop's copy without the handle: what the copy alone costs the two calls."""
            self.private.copy_(self.x)

        def handle_only(self, _=None):
            """The shm hop's handle without the copy: what carrying it instead of None costs the two calls."""
            return self.handle

    class Receiver:
        def __init__(self):
            torch.set_num_threads(1)
            self.codec, self.reader = HopCodec("none"), ShmReader()
            self.take_ns: list[int] = []  # each shm hop's take, its one read and the release, timed here

        def shm_times(self) -> list[int]:
            out, self.take_ns = self.take_ns, []
            return out

        def take_shm(self, hop) -> float:
            t0 = time.perf_counter_ns()
            value = float(self.reader.take(hop, "receiver")[0])  # the slot is released as the view goes
            self.take_ns.append(time.perf_counter_ns() - t0)
            return value

        def take_torch(self, x) -> float:
            return float(x[0])

        def take_wire(self, payload) -> float:
            return float(self.codec.decode(payload, "receiver")[0])

        def take_none(self, x) -> None:
            return x

        def take_nothing(self, x) -> None:
            return None

        def take_after_copy(self, x) -> None:  # take_none under its own name: the timeline tells the arms apart
            return x

    run = uuid.uuid4().hex[:12]
    plain = {"num_cpus": 0}
    direct = plain | {"enable_tensor_transport": True}  # as holder_actor makes holders under a direct transport
    torch.set_num_threads(1)  # the memcpy on one core, as each actor copies
    s, r = ray.remote(**plain)(Sender).remote(), ray.remote(**plain)(Receiver).remote()
    ds, dr = ray.remote(**direct)(Sender).remote(), ray.remote(**direct)(Receiver).remote()
    group = create_collective_group([ds, dr], backend="gloo")
    cs, cr = ray.remote(**plain)(Sender).remote(), ray.remote(**plain)(Receiver).remote()  # a compiled graph holds its actors' execution loop: its own pair
    with InputNode() as inp:
        dag = cr.take_wire.bind(cs.sized_wire_hop.bind(inp))
    # one graph for every size (a teardown between sizes can hang on this Ray version)
    compiled_dag = dag.experimental_compile(_buffer_size_bytes=int(max(sizes) * 2**20) + (1 << 20))
    rows = []
    for mib in sizes:
        since_us = time.time() * 1e6
        numel = int(mib * 2**20) // 4
        ray.get([s.make.remote(numel, True), ds.make.remote(numel)])
        src, dst = torch.randn(numel), torch.empty(numel)
        wire = HopCodec("none").encode(src, "driver")
        row = _interleaved_ms({
            "memcpy": lambda: dst.copy_(src),
            "torch pickle": lambda: ray.get(r.take_torch.remote(s.torch_hop.remote())),
            "wire": lambda: ray.get(r.take_wire.remote(s.wire_hop.remote())),
            "direct": lambda: ray.get(dr.take_wire.remote(ds.direct_hop.options(tensor_transport="gloo").remote())),
            "compiled": lambda: ray.get(compiled_dag.execute(numel)),  # noqa: B023 - called within this iteration
            "shm": lambda: ray.get(r.take_shm.remote(s.shm_hop.remote())),
            "empty": lambda: ray.get(r.take_none.remote(s.empty.remote())),
            "copy only": lambda: ray.get(r.take_after_copy.remote(s.copy_only.remote())),
            "handle only": lambda: ray.get(r.take_nothing.remote(s.handle_only.remote())),
            "put": lambda: ray.put(wire),  # noqa: B023 - called within this iteration; freed at once
        }, reps, shuffle)
        row["MiB"] = mib
        for part, actor in (("shm put", s), ("shm take", r)):  # the two warm-up calls left out
            row[part] = statistics.median(ray.get(actor.shm_times.remote())[2:]) / 1e6
        rows.append(row)
        memcpy, pickled, wire_ms, direct_ms, compiled, empty = (
            row[k] for k in ("memcpy", "torch pickle", "wire", "direct", "compiled", "empty"))
        print(f"{mib:g} MiB: memcpy {memcpy:.2f} ms, torch pickle {pickled:.2f} ms ({pickled / memcpy:.1f}x), "
              f"wire {wire_ms:.2f} ms ({wire_ms / memcpy:.1f}x), direct (gloo) {direct_ms:.2f} ms "
              f"({direct_ms / memcpy:.1f}x), compiled graph {compiled:.2f} ms ({compiled / memcpy:.1f}x), "
              f"empty calls {empty:.2f} ms, store put {row['put']:.2f} ms, shm {row['shm']:.2f} ms "
              f"({row['shm'] / memcpy:.1f}x; beyond the calls {(row['shm'] - empty) / memcpy:.2f}x; in the actors "
              f"put {row['shm put']:.2f} ms, take {row['shm take']:.2f} ms; the same two calls with the copy "
              f"alone {row['copy only']:.2f} ms, with the handle alone {row['handle only']:.2f} ms)", flush=True)
        if timeline:  # task events reach the GCS about once a second
            time.sleep(3)
            for name, p in _task_parts(ray.timeline(), since_us).items():
                print(f"  timeline {name}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in p.items()), flush=True)
    ray.get(s.close.remote())
    destroy_collective_group(group)
    return rows


def main() -> None:
    args = key_values({"reps": "15", "sizes_mib": "0.25,4,64", "stores": "default", "store_mib": "2048",
                       "order": "shuffle", "timeline": "0"})
    if args["order"] not in ("shuffle", "fixed"):
        raise SystemExit(f"order: {args['order']} is not one of shuffle, fixed")
    reps, sizes = int(args["reps"]), [float(s) for s in args["sizes_mib"].split(",")]
    rows = []
    for store in args["stores"].split(","):
        with _local_ray(store, int(args["store_mib"])):
            print(f"object store: {store}, {args['store_mib']} MiB", flush=True)
            rows += [row | {"store": store} for row in _measure(sizes, reps, args["order"] == "shuffle", args["timeline"] == "1")]
    cmd = "flock /tmp/neuroray-cpu.lock python benchmarks/hop_overhead.py " + " ".join(sys.argv[1:])
    for row in rows:
        m, e = row["memcpy"], row["empty"]
        put, take = row["shm put"], row["shm take"]
        append_row(
            "Per-hop cost vs memcpy, with the shm hop's parts timed in its actors",
            ["command", "machine", "object store", "order", "MiB", "memcpy ms", "shm ms (/memcpy)",
             "shm put / take ms (in the actors)", "shm - empty - put - take ms", "wire ms (/memcpy)",
             "direct (gloo) ms (/memcpy)", "compiled graph ms (/memcpy)", "torch pickle ms (/memcpy)",
             "empty calls ms", "store put ms", "(hop - empty) / memcpy (shm, wire)", "goal /memcpy <= 2 (shm, wire, direct)"],
            [f"`{cmd.strip()}`", machine(), row["store"], args["order"], f"{row['MiB']:g}", f"{m:.2f}",
             f"{row['shm']:.2f} ({row['shm'] / m:.1f}x)", f"{put:.2f} / {take:.2f}", f"{row['shm'] - e - put - take:.2f}",
             *(f"{row[k]:.2f} ({row[k] / m:.1f}x)" for k in ("wire", "direct", "compiled", "torch pickle")),
             f"{e:.2f}", f"{row['put']:.2f}", f"{(row['shm'] - e) / m:.2f}, {(row['wire'] - e) / m:.2f}",
             ", ".join("met" if row[k] / m <= 2 else "not met" for k in ("shm", "wire", "direct"))],
            note="Two actors on one node, one float32 activation per hop as a holder sends it (benchmarks/hop_overhead.py): "
                 "`shm` the hop under swarm.hop_transport=shm (a copy into a slot of the sender's preallocated, "
                 "pre-touched shared-memory ring, a handle in the Ray call, read in place), `wire` the object-store "
                 "hop (a numpy buffer out of band), `direct (gloo)` Ray Direct Transport over a gloo group, "
                 "`compiled graph` the wire hop as a Ray Compiled Graph, `torch pickle` the hop before the wire form, "
                 "`empty calls` the same two calls carrying nothing, `store put` a ray.put of the wire payload alone. "
                 "Medians, every arm taken in turn in every repetition (`order`: shuffle takes them in a different seeded "
                 "order each repetition, fixed in the same one); each hop includes the sender's and the receiver's actor call and the "
                 "driver's wait. `shm put / take`: the ring's two parts timed inside the actors (the copy into the "
                 "slot; the handle checked, the slot viewed, one value read, the slot released); `shm - empty - put "
                 "- take`: what Ray's two calls cost more carrying a handle after a copy than carrying nothing. "
                 "`(hop - empty) / memcpy`: what the hop costs beyond Ray's two calls, in memcpys.")


if __name__ == "__main__":
    main()
