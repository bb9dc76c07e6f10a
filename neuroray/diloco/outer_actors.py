"""One long-lived actor per layer range to run its outer steps (diloco.outer_step_in=actor).

Why an actor: a Ray task runs in a pooled worker process, and on ``ray start`` clusters Ray kills a worker
that stays idle for 1 s once actors fill the CPUs. Between two outer steps every task worker is idle for
a whole round, so each round's step started a new Python process and imported torch first: 4.7 s idle
before every outer step with three ranges on 2 CPUs (``benchmarks/outer_step_idle.py``, docs/benchmarks.md). An actor's process lives as long as the
actor, so only the first round pays for its start, and that start overlaps the first round's inner steps
(the actors start with :class:`~neuroray.diloco.sync.OuterSync`). One actor per range keeps the ranges'
steps in parallel, as one task per range did.

Where: on the node a plan keeps free for the outer step (model=auto: the best-connected node, whose CPUs
and host memory the planner reserves for it, neuroray/planner/assign.py), else on the driver's node (as the
ledger actor). The outer state (theta0, momentum, memory) is owned by the driver and each step's results are
stored where the step ran: on the driver's node that state fails only with the driver, which the run cannot
outlive anyway. Beside a range's first holder it would be lost with that holder's host, the very failure
the holders' snapshots and recovery are there to survive. Without a plan the traffic is the task's: a fresh
task went to the driver's node too (Ray runs a task locally when it fits, and a ``num_cpus=0`` task fits).

When one dies: Ray restarts its process (``max_restarts=-1``) and re-runs the call it was in, as often as
Ray retries a task whose worker died; the step is a pure function of its arguments, so the re-run returns
the same values. One that Ray gave up on (killed for good) is replaced at its range's next step, when its
last call's report says it died; the round that found it dead is redone by the trainer like a round that
lost a holder (its outer state is rolled back first).
"""

from __future__ import annotations

import logging

import ray

log = logging.getLogger(__name__)

# As often as Ray re-runs a task whose worker died (its default max_retries): what the task path survived.
_RETRIES = 3


def _live_node(node_id: str) -> str:
    """``node_id`` when it names a live Ray node, else the driver's (a node a plan named may have left)."""
    if node_id and any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
        return node_id
    if node_id:
        log.warning("outer-step actors: node %s is not a live Ray node; they run on the driver's", node_id[:12])
    return ray.get_runtime_context().get_node_id()


class RangeActors:
    """The outer-step actors of every layer range: ``for_range(s)`` is range ``s``'s (started when a range
    is first asked for, and again when the last one died); ``called(s, report)`` records the report ref of
    its latest call, by which a dead one is recognised; ``close()`` kills them all."""

    def __init__(self, cls, ranges: int, node_id: str = "", name_prefix: str = ""):
        """``name_prefix``: actor names ``<prefix>outer-s<range>`` (as the dashboard lists them beside the holders);
        "": unnamed."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(_live_node(node_id), soft=False)
        # num_cpus=0: the holders may occupy every CPU; an outer step must still be schedulable.
        self._remote = ray.remote(cls)
        self._options = dict(num_cpus=0, max_restarts=-1, max_task_retries=_RETRIES, scheduling_strategy=here)
        self.name_prefix = name_prefix
        self.actors: list = []
        self._last: list = []
        self.replaced = 0  # actors started again after Ray gave up on one
        for s in range(ranges):
            self.for_range(s)

    def for_range(self, s: int):
        while len(self.actors) <= s:  # a live upgrade may add ranges
            self.actors.append(self._start(len(self.actors)))
            self._last.append(None)
        if self._died(s):
            log.warning("range %d: its outer-step actor died for good; starting a new one", s)
            self.actors[s], self._last[s] = self._start(s), None
            self.replaced += 1
        return self.actors[s]

    def _start(self, s: int):
        # a name is free again once Ray has given up on the actor that held it
        name = {"name": f"{self.name_prefix}outer-s{s}"} if self.name_prefix else {}
        return self._remote.options(**self._options, **name).remote()

    def died_here(self, exc: BaseException) -> bool:
        """True when ``exc`` is the death of one of these actors (not of a holder, whose death a step passes on when a
        pseudo-gradient it was given was lost)."""
        dead = getattr(exc, "actor_id", None)
        return dead is not None and any(a._actor_id.hex() == dead for a in self.actors)

    def called(self, s: int, report) -> None:
        self._last[s] = report

    def _died(self, s: int) -> bool:
        """True when the latest call's report came back as this very actor's death (not a holder's, which a
        call passes on when a pseudo-gradient it was given was lost)."""
        ref = self._last[s]
        if ref is None or not ray.wait([ref], timeout=0)[0]:
            return False
        try:
            ray.get(ref, timeout=0)  # a report: a few hundred bytes
        except ray.exceptions.ActorDiedError as exc:
            return getattr(exc, "actor_id", None) == self.actors[s]._actor_id.hex()
        except Exception:  # noqa: BLE001 - the step's own failure (or a holder's), for the trainer to handle
            return False
        return False

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self._last = [], []
