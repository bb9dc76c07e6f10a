"""The coordinator's own clock of a fixed pipeline's calls (``swarm.routing=fixed``): each holder's pace for the
straggler rule (neuroray/ponw/stragglers.py), timed by the driver rather than reported by the holder.

The driver holds the ref of every call it submits (neuroray/training/schedule.py), and an actor with one thread
runs one caller's calls in submission order. So a call starts once three things are true: the driver submitted
it, the holder's previous call finished, and its inputs (the activation, gradient or labels it was passed) exist.
Its **service time** is when its result appeared minus the latest of those three; every one is a moment the
driver saw itself, so a holder that stretches its work cannot hide it by under-reporting a clock of its own. A
faster replica idling until its next step is submitted is not counted: the submission is one of the three.

Holders of one range make the same calls (the n-th compute call of a step on every replica is the same work
on the same layers), at about the same time. So each call is **paired** with its counterparts on the range's
other holders: its service time over the median of theirs and its own is its ratio, and a holder's **pace** for
the round is the median of its calls' ratios (1: the range's usual speed; a holder descheduled now and then on
shared CPUs has a few high ratios, a slow one has all). Pairing is what makes a stretch visible on shared cores:
the load on them moves every holder's service times by 2x and more over a round, but the holders of a range
running the same call at the same time share it. A call with no counterpart (a replica benched, or redone
apart) is not counted.

The thread wakes at every call it watches, which on shared cores takes CPU from the holders; so the executor times
only ``ponw.call_clock_steps`` inner steps of each round, drawn at random (neuroray/training/fixed.py); of the step
before each of them it records only each holder's last call, untimed (when the holder was free again), and of the
other steps nothing.

:class:`CallTimes` is the arithmetic, on any hashable keys; :class:`CallClock` feeds it from Ray: a daemon thread
in the driver waits on the refs not yet finished (``ray.wait(fetch_local=False)``: nothing is pulled to the driver,
a direct hop's tensor stays on its holders) and stamps each when it appears. Refs submitted while the thread
waits are stamped at its next wake, at most ``ponw.call_clock_poll_s`` late.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Hashable

Slot = tuple[int, int]  # (stage, replica)


@dataclass
class Call:
    key: Hashable  # what becomes ready when the call is done (its ref)
    inputs: tuple  # keys of what it was passed and waited on (refs of other holders' calls)
    submitted: float  # when the driver submitted it
    tag: int  # the inner step it belongs to
    kind: str | None  # a compute call whose time counts (F, B, FB, step); None: a read, chained but not timed
    index: int = 0  # its place among its holder's compute calls of the step: what pairs it across replicas


class CallTimes:
    """Service times of calls on holders that each run their calls one at a time, in submission order."""

    def __init__(self):
        self.chains: dict[Slot, deque[Call]] = defaultdict(deque)  # calls not yet resolved, in submission order
        self.last: dict[Slot, float] = {}  # when the holder's last resolved call finished
        self.ready: dict[Hashable, float] = {}  # key -> when it appeared
        self.tags: dict[Hashable, int] = {}  # key -> tag, to forget what a finished round no longer needs
        self.samples: dict[Slot, list[tuple[int, int, float]]] = defaultdict(list)  # (tag, index, seconds)
        self.counts: dict[tuple[Slot, int], int] = defaultdict(int)  # (holder, tag) -> compute calls submitted

    def submitted(self, slot: Slot, call: Call) -> None:
        if call.kind is not None:
            call.index = self.counts[slot, call.tag]
            self.counts[slot, call.tag] += 1
        self.chains[slot].append(call)
        self.tags[call.key] = call.tag
        for k in call.inputs:
            self.tags.setdefault(k, call.tag)

    def appeared(self, key: Hashable, at: float) -> None:
        """``key`` was seen ready at ``at`` (the first sighting counts)."""
        self.ready.setdefault(key, at)

    def advance(self) -> None:
        """Resolve every chain's leading calls whose result and inputs have appeared."""
        for slot, chain in self.chains.items():
            while chain and chain[0].key in self.ready and all(k in self.ready for k in chain[0].inputs):
                call = chain.popleft()
                done = self.ready[call.key]
                start = max([call.submitted, self.last.get(slot, call.submitted), *(self.ready[k] for k in call.inputs)])
                # negative: the call failed before it ran (an input it waited on failed): no sample
                if call.kind is not None and done >= start:
                    self.samples[slot].append((call.tag, call.index, done - start))
                self.last[slot] = max(done, self.last.get(slot, done))

    def void(self, replica: int, tags: set[int]) -> None:
        """Forget ``replica``'s calls of these steps (failed or redone: a recovery, a rejected hop)."""
        for slot, chain in self.chains.items():
            if slot[1] == replica:
                self.chains[slot] = deque(c for c in chain if c.tag not in tags)
        for slot, got in self.samples.items():
            if slot[1] == replica:
                self.samples[slot] = [x for x in got if x[0] not in tags]
        for slot, tag in [k for k in self.counts if k[0][1] == replica and k[1] in tags]:
            del self.counts[slot, tag]  # a redo numbers its calls afresh: they pair with the others' again

    def take(self, upto: int) -> dict[Slot, float]:
        """Each holder's pace over steps up to ``upto`` (then forgotten): the median, over its calls, of the call's
        service time over the median of the same call on every holder of its range (the module docstring)."""
        calls: dict[tuple[int, int, int], dict[Slot, float]] = defaultdict(dict)  # (stage, tag, index) -> times
        for slot in list(self.samples):
            for tag, index, x in self.samples[slot]:
                if tag <= upto:
                    calls[slot[0], tag, index][slot] = x
            self.samples[slot] = [x for x in self.samples[slot] if x[0] > upto]
        ratios: dict[Slot, list[float]] = defaultdict(list)
        for times in calls.values():
            usual = statistics.median(times.values())
            if len(times) > 1 and usual > 0:
                for slot, x in times.items():
                    ratios[slot].append(x / usual)
        paces = {slot: statistics.median(got) for slot, got in ratios.items()}
        self.counts = defaultdict(int, {k: n for k, n in self.counts.items() if k[1] > upto})
        waiting = {c.key for chain in self.chains.values() for c in chain} | {
            k for chain in self.chains.values() for c in chain for k in c.inputs}
        for key in [k for k, tag in self.tags.items() if tag <= upto and k not in waiting]:
            self.tags.pop(key)
            self.ready.pop(key, None)
        return paces

    def unresolved(self, upto: int) -> list:
        """Keys of steps up to ``upto`` that their chains still wait on."""
        keys = []
        for chain in self.chains.values():
            for c in chain:
                if c.tag <= upto:
                    keys += [k for k in (c.key, *c.inputs) if k not in self.ready]
        return list(dict.fromkeys(keys))


class CallClock:
    """Stamps the calls a fixed pipeline's driver submits, from a daemon thread (see the module docstring)."""

    def __init__(self, poll_s: float):
        self.poll_s = poll_s
        self.times = CallTimes()
        self.lock = threading.Lock()
        self.watch: dict = {}  # refs not seen ready yet (a dict: ordered, no duplicates for ray.wait)
        self.wake = threading.Event()
        self.stopped = False
        self.cpu_s = 0.0  # the thread's own CPU seconds: what the clock costs the driver
        self.wakes = 0
        self.thread = threading.Thread(target=self._run, name="neuroray-call-clock", daemon=True)
        self.thread.start()

    def record(self, slot: Slot, tag: int, ref, inputs=(), kind: str | None = None) -> None:
        """The driver just submitted ``ref`` on holder ``slot``, passing it ``inputs`` (refs)."""
        inputs = tuple(x for x in inputs if x is not None)
        call = Call(ref, inputs, time.monotonic(), tag, kind)
        with self.lock:
            self.times.submitted(slot, call)
            for x in (ref, *inputs):
                if x not in self.times.ready:
                    self.watch[x] = None
        self.wake.set()

    def void(self, replica: int, tags) -> None:
        with self.lock:
            self.times.void(replica, set(tags))

    def take(self, upto: int, timeout: float) -> dict[Slot, float]:
        """Each holder's median service time over steps up to ``upto``. Those calls have finished (the loop
        collected them); the thread may not have seen the last few yet, so wait for those first."""
        import ray

        with self.lock:
            left = [x for x in self.times.unresolved(upto) if x in self.watch]
        if left:  # stamped now: at most this late, and only the round's last calls
            ray.wait(left, num_returns=len(left), timeout=timeout, fetch_local=False)
            self._stamp(left)
        with self.lock:
            return self.times.take(upto)

    def close(self) -> None:
        self.stopped = True
        self.wake.set()

    def _stamp(self, refs: list) -> None:
        import ray

        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        at = time.monotonic()
        with self.lock:
            for ref in ready:
                self.watch.pop(ref, None)
                self.times.appeared(ref, at)
            self.times.advance()

    def _run(self) -> None:
        import ray

        while not self.stopped:
            with self.lock:
                refs = list(self.watch)
            if not refs:  # nothing in flight: sleep until the driver submits
                self.wake.wait(self.poll_s * 100)
                self.wake.clear()
                continue
            t0 = time.thread_time()
            try:
                # returns as soon as one is ready: that one is stamped when it appeared; the rest within poll_s
                ready, _ = ray.wait(refs, num_returns=1, timeout=self.poll_s, fetch_local=False)
                if ready:
                    self._stamp(refs)
            except Exception:  # noqa: BLE001 - Ray shutting down under the thread: the clock just stops
                if self.stopped or not ray.is_initialized():
                    return
            self.cpu_s += time.thread_time() - t0
            self.wakes += 1
