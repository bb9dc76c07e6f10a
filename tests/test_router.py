"""The router's scoring and deadlines (no Ray): load follows measured throughput, deadlines follow
observed latency within the configured floor and ceiling, a full holder gets no work."""

import heapq

import pytest

from neuroray.config import SwarmConfig
from neuroray.errors import ConfigError
from neuroray.configure import load_config
from neuroray.swarm.router import HolderState, Router


def _router(n_holders: int, **cfg) -> Router:
    return Router([[f"holder-{i}" for i in range(n_holders)]], SwarmConfig(routing="router", **cfg), log=lambda *a: None)


def test_deadline_is_k_times_p99_clamped_to_floor_and_ceiling():
    r = _router(1, failover_k=3.0, failover_floor_s=0.05, failover_ceiling_s=2.0)
    h = r.ranges[0][0]
    assert r.deadline(h) == 2.0  # too few observations: the ceiling
    for x in [0.030] * 99 + [0.050]:
        h.observe(x, 0.3)
    assert r.deadline(h) == pytest.approx(3 * (0.030 + 0.01 * 0.020), rel=1e-6)  # p99 interpolated at rank 98.01
    h.forget()
    for _ in range(10):
        h.observe(0.001, 0.3)
    assert r.deadline(h) == 0.05  # floor
    for _ in range(10):
        h.observe(5.0, 0.3)
    assert r.deadline(h) == 2.0  # ceiling


def test_load_follows_measured_throughput():
    """A holder twice as slow gets about a third of the microbatches, as a throughput-proportional split says."""
    r = _router(2, queue_depth=2)
    fast, slow = r.ranges[0]
    fast.ewma, slow.ewma = 0.01, 0.02
    service = {id(fast): 0.01, id(slow): 0.02}
    clock, events, counts, busy_until = 0.0, [], {id(fast): 0, id(slow): 0}, {id(fast): 0.0, id(slow): 0.0}
    for _ in range(3000):
        h = r.pick(0)
        while h is None:  # both full: advance to the next completion
            clock, hid = heapq.heappop(events)
            next(x for x in r.ranges[0] if id(x) == hid).inflight -= 1
            h = r.pick(0)
        h.inflight += 1
        counts[id(h)] += 1
        busy_until[id(h)] = max(busy_until[id(h)], clock) + service[id(h)]
        heapq.heappush(events, (busy_until[id(h)], id(h)))
    share = counts[id(slow)] / 3000
    assert share == pytest.approx(1 / 3, abs=0.05)


def test_a_full_or_down_holder_gets_no_work_and_failures_cost_score():
    r = _router(3, queue_depth=1, failure_penalty_s=1.0)
    a, b, c = r.ranges[0]
    for h in (a, b, c):
        h.ewma = 0.01
    a.inflight = 1  # full
    b.down = True
    assert r.pick(0) is c
    c.inflight = 1
    assert r.pick(0) is None  # backpressure: nobody has room
    assert r.pick(0, capacity=False) in (a, c)
    a.inflight = c.inflight = 0
    import time

    a.failures, a.failure_t = 3.0, time.monotonic()
    assert r.pick(0) is c  # a recently failed holder scores worse


def test_a_barred_holder_gets_no_work_for_the_rest_of_the_run():
    """A holder the hop rechecks proved faulty (Router.bar) is never picked, not even as the fastest or to fill in
    for a full range, and the outer step's release of benched holders does not bring it back."""
    said = []
    r = Router([[f"holder-{i}" for i in range(2)]], SwarmConfig(routing="router"), log=said.append)
    fast, slow = r.ranges[0]
    fast.ewma, slow.ewma = 0.001, 0.5
    assert r.pick(0) is fast
    r.bar(fast, "proved faulty")
    assert fast.barred and not fast.down and "r0-s0 is barred" in said[0]
    assert r.pick(0) is slow
    slow.inflight = 99
    assert r.pick(0) is None and r.pick(0, capacity=False) is slow  # backpressure or the slow one, never the barred
    r.release_benched()
    assert r.pick(0, capacity=False) is slow and r.live(0) == [slow]


def test_holder_state_names_and_unknown_latency_is_tried():
    r = _router(2)
    known, new = r.ranges[0]
    known.ewma = 0.5
    assert isinstance(new, HolderState) and new.name == "r1-s0"
    assert r.pick(0) is new  # never measured (new or rejoined): tried first, to measure it


@pytest.mark.parametrize("override,match", [
    ("swarm.routing=ring", "must be fixed or router"),
    ("swarm.queue_depth=0", "queue_depth"),
    ("swarm.outer_quorum=0", "outer_quorum"),
    ("swarm.outer_quorum=1.5", "outer_quorum"),
    ("swarm.failover_floor_s=20", "failover_floor_s"),
    ("swarm.latency_ewma=0", "latency_ewma"),
])
def test_bad_routing_config_is_a_one_line_error(override, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config([override])
    assert "\n" not in str(err.value)
