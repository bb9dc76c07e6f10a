"""Liveness without Ray's node-death detection (docs/lab.md, "What a partition does"): the host probe, the
router's control-call deadline, and the config. The real partition is tests/test_lab_ops.py (slow, lab)."""

import socket

import pytest

from neuroray.config import SwarmConfig
from neuroray.configure import load_config
from neuroray.errors import ConfigError
from neuroray.swarm.liveness import answers, unreachable
from neuroray.swarm.router import Router


@pytest.fixture
def listening():
    """A real listening socket (a raylet's port, as the probe sees it) and a port nothing listens on."""
    server = socket.create_server(("127.0.0.1", 0))
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    yield server.getsockname()[1], closed_port
    server.close()


def test_a_host_that_accepts_answers_and_one_that_refuses_does_not(listening):
    up, down = listening
    assert answers("127.0.0.1", up, 1.0)
    assert not answers("127.0.0.1", down, 1.0)


def test_unreachable_names_dead_unknown_and_silent_nodes(listening):
    up, down = listening
    table = {"a": {"Alive": True, "NodeManagerAddress": "127.0.0.1", "NodeManagerPort": up},
             "b": {"Alive": True, "NodeManagerAddress": "127.0.0.1", "NodeManagerPort": down},
             "c": {"Alive": False, "NodeManagerAddress": "127.0.0.1", "NodeManagerPort": up}}
    assert unreachable({"a", "b", "c", "gone"}, 1.0, known=table) == {"b", "c", "gone"}
    assert unreachable({"a"}, 1.0, known=table) == set()


def _router(n: int, liveness_s: float, logs: list, cut: set) -> Router:
    """A router over holders named by strings; ``cut``: the names whose host does not answer."""
    return Router([[f"holder-{i}" for i in range(n)]], SwarmConfig(routing="router"), log=logs.append,
                  liveness_timeout_s=liveness_s, hosts_lost=lambda handles: [h in cut for h in handles])


def _age(r: Router, holder, seconds: float) -> None:
    for ref in r.control_sent:
        if r.control[ref][1] is holder:
            r.control_sent[ref] -= seconds


def test_an_unanswered_control_call_on_a_cut_host_marks_its_holder_down_after_the_deadline():
    logs = []
    r = _router(3, 2.0, logs, cut={"holder-0"})
    cut, slow, healthy = r.ranges[0]
    r._send_control("revoke", cut, object())
    r._send_control("start", slow, object())
    r._send_control("start", healthy, object())
    r._check_liveness()
    assert not any(h.down for h in (cut, slow, healthy))  # within the deadline: nothing happens
    _age(r, cut, 2.5)
    _age(r, slow, 2.5)
    r._check_liveness()
    assert cut.down and not slow.down and not healthy.down  # slow's host answers: a slow thread, not a partition
    assert any("r0-s0 is down" in m and "liveness_timeout_s=2" in m for m in logs), logs
    # settled: the cut holder's calls no longer time it; slow's call is timed afresh from now
    assert sorted(r.control[ref][1].name for ref in r.control_sent) == ["r1-s0", "r2-s0"]
    r._check_liveness()
    assert not slow.down


def test_without_a_deadline_nothing_is_marked_down_and_no_ping_is_sent():
    r = _router(1, 0.0, [], cut={"holder-0"})
    h = r.ranges[0][0]
    r._send_control("revoke", h, object())
    _age(r, h, 3600)
    r._check_liveness()
    r.ping(h)  # would call the handle (a string here) if it pinged
    assert not h.down and len(r.control) == 1


def test_liveness_config_is_checked_in_one_line():
    assert load_config([]).cluster.liveness_timeout_s > 0
    for override, match in [("cluster.liveness_timeout_s=-1", "liveness_timeout_s"),
                            ("cluster.liveness_probe_s=0", "liveness_probe_s")]:
        with pytest.raises(ConfigError, match=match) as err:
            load_config([override])
        assert "\n" not in str(err.value)



def test_a_holder_with_work_and_nothing_finished_is_pinged_and_one_that_finished_is_not():
    """A cut host's holder may have no call that is due (they queue behind an optimizer step that never
    finishes): waiting work and no completion for the deadline send a ping, whose silence marks it down."""
    pinged = []

    class Handle:
        def __init__(self, name):
            self.name = name
            self.counters = self

        def options(self, **kw):
            return self

        def remote(self):
            pinged.append(self.name)
            return object()

    r = Router([[Handle("a"), Handle("b")]], SwarmConfig(routing="router"), log=lambda *a: None,
               liveness_timeout_s=1.0, hosts_lost=lambda handles: [True] * len(handles))
    busy, idle = r.ranges[0]
    busy.queue.append(object())
    busy.last_done -= 5  # nothing finished for 5 s
    r._check_liveness()
    assert pinged == ["a"]  # idle has no work: not pinged
    r._check_liveness()
    assert pinged == ["a"]  # one ping at a time
    _age(r, busy, 1.5)
    r._check_liveness()
    assert busy.down and not idle.down
