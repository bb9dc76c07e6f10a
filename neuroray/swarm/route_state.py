"""What the swarm router tracks: holders (latency, queue, health), microbatches in flight, routed calls
and the counters it reports (neuroray/swarm/router.py drives them; docs/routing.md)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field



def claim_kind(kind: str) -> str:
    """The claim a call takes on its holder: "f" for a forward, "b" for anything applying a gradient."""
    return "f" if kind == "f" else "b"


@dataclass
class Failed:
    exc: BaseException


class HolderState:
    """What the router knows of one holder: its latency, queue, health and this step's work."""

    def __init__(self, handle, stage: int, index: int):
        self.handle, self.stage, self.index = handle, stage, index
        self.ewma: float | None = None
        self.samples: deque[float] = deque(maxlen=200)
        self.deadline_s: float | None = None
        self.inflight = 0  # calls submitted and not finished, stale ones included: the inbound queue
        self.queue: deque[Call] = deque()  # its compute thread's calls in the order they will run
        self.stuck = False  # a call overdue to start was taken back: no work until it answers again
        self.probing = False  # a start probe is on its way
        self.barrier_seen = None  # the last barrier (step, load, rejoin) known to have finished
        self.outbound = 0  # activations it produced that no downstream hop has taken yet
        self.last_done = time.monotonic()
        self.failures, self.failure_t = 0.0, 0.0
        self.down = self.gone = False
        self.benched = False  # a hop it sent was rejected: down (not probed back) until the round's outer step
        # the hop rechecks proved it faulty: never routed to again this run (it still loads each theta0, unused)
        self.barred = False
        self.down_since = 0.0
        self.up_since = 0.0  # calls sent before this (to the previous process) may still fail
        self.probe = None
        self.probe_t = 0.0
        self.barrier = None  # ref of its last step/rejoin: its next compute call runs after it
        self.applied: set[int] = set()  # microbatches whose gradient it applied this step
        self.microbatches = 0  # gradient-applying calls it finished since the last outer round
        self.total = 0  # ... and over the whole run

    @property
    def name(self) -> str:
        return f"r{self.index}-s{self.stage}"

    def observe(self, seconds: float, ewma_weight: float) -> None:
        """One more hop time: it updates the latency average and invalidates the cached deadline."""
        self.samples.append(seconds)
        self.ewma = seconds if self.ewma is None else (1 - ewma_weight) * self.ewma + ewma_weight * seconds
        self.deadline_s = None

    def forget(self) -> None:
        """A restarted holder is a new machine as far as latency goes."""
        self.samples, self.ewma, self.deadline_s = deque(maxlen=200), None, None
        self.queue.clear()
        self.stuck = self.probing = False


@dataclass(eq=False)
class Flight:
    """One microbatch on its way through the ranges and back."""

    mb: int
    inputs: list  # inputs[s]: ref of the activation entering range s (None for range 0: the Driver reads it)
    grads: list  # grads[s]: ref of the gradient of range s's output
    fwd: list  # fwd[s]: the holder that ran range s forward (it keeps the graph for the backward)
    labels: object = None
    grad_from: dict = field(default_factory=dict)  # s -> the holder whose call produced grads[s]
    trained: dict = field(default_factory=dict)  # s -> the holder whose backward of range s counted
    loss: float | None = None
    next: tuple[str, int] | None = None  # the hop waiting to be sent: (kind, stage)
    exclude: set = field(default_factory=set)  # holders not to send the next hop to (the late or dead one)
    origin: float | None = None  # set while the next hop replaces a late or lost call: when that one was due
    behind: bool = False  # ... and that call was queued behind a stuck one
    done: bool = False


@dataclass(eq=False)
class Call:
    flight: Flight
    kind: str  # f: forward | fb: last range forward+backward | b: backward | rb: forward+backward from the input
    stage: int
    holder: HolderState
    ref: object  # the call's output for the next hop (activation or input gradient)
    status: object  # a small ref ready with it: labels, loss or a ran flag (never pulls the activation)
    t_submit: float = 0.0
    stale: bool = False  # a copy elsewhere won or it was revoked: its result is ignored
    late: bool = False  # already hedged or revoked
    repair: bool = False  # re-applies a gradient a dead holder lost; does not advance the flight
    origin: float | None = None  # for a copy: when the late original was due to start
    urgent: bool = False  # replaces a late or lost call: runs on the holder's failover thread, beside its queue
    started: bool = False  # a start probe found it running
    taken_back: bool = False  # taken back before it started: it will return at once, having done nothing
    recheck_at: float = 0.0  # late, but no holder was free to hedge with: look again at this time
    steal: bool = False  # an idle holder of its range asked to take it over
    due: float | None = None  # queued behind a stuck call: when the holder got stuck
    behind: bool = False  # queued behind the stuck call (or a copy of such a call)
    attempt: int = 0  # the call's id in the holder's claims (increasing over the run)
    sent_by: dict = field(default_factory=dict)  # "fwd"/"bwd" -> the holder that produced the input it was given


@dataclass
class RouterStats:
    hedges: int = 0  # late forwards copied to another holder
    revoked: int = 0  # late gradient calls taken back and re-sent
    reroutes: int = 0  # calls re-sent because their holder died
    repairs: int = 0  # gradients re-applied after their holder died
    failovers: list[dict] = field(default_factory=list)  # one per hop finished elsewhere than first sent
    rejoins: int = 0
    stuck: int = 0  # times a holder did not start a call within swarm.start_grace_s of its due time
    taken_back: int = 0  # calls taken back from stuck holders and re-sent
    stolen: int = 0  # queued calls an idle holder took over from a slower one
