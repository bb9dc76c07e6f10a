"""The coordinator's clock of a fixed pipeline's calls (neuroray/training/call_clock.py): the service-time
arithmetic, without Ray. Keys stand for refs; times are the moments the driver saw things happen."""

import pytest

from neuroray.training.call_clock import Call, CallTimes


def _times(calls, ready):
    """``calls``: (slot, key, inputs, submitted, tag, timed) in submission order; ``ready``: key -> time."""
    t = CallTimes()
    for slot, key, inputs, submitted, tag, timed in calls:
        t.submitted(slot, Call(key, tuple(inputs), submitted, tag, "F" if timed else None))
    for key, at in ready.items():
        t.appeared(key, at)
    t.advance()
    return t


def _secs(t, slot):
    """A holder's service times so far, (step, seconds), in the order they resolved."""
    return [(tag, x) for tag, _, x in t.samples[slot]]


def test_a_call_is_timed_from_the_latest_of_its_submission_its_predecessor_and_its_inputs():
    d, v = (0, 0), (1, 0)  # a Driver and a Validator of replica 0
    calls = [(d, "read", [], 0.0, 0, False),  # the Driver's read: chained, not timed
             (d, "fwd", ["read"], 0.0, 0, True),
             (v, "fb", ["fwd", "labels"], 0.0, 0, True),
             (d, "bwd", ["fb"], 0.0, 0, True),
             (d, "step", [], 5.0, 0, True)]  # submitted after its predecessor finished: timed from the submission
    t = _times(calls, {"read": 1.0, "labels": 1.0, "fwd": 3.0, "fb": 7.0, "bwd": 7.5, "step": 6.0 + 2.0})
    assert _secs(t, d) == [(0, 2.0), (0, 0.5), (0, 0.5)]  # fwd 3-1, bwd 7.5-7 (its input), step 8-7.5
    assert _secs(t, v) == [(0, 4.0)]  # fb waited on the activation (3.0), not on its submission (0.0)
    assert t.take(0) == {}  # one holder per range: no call has a counterpart to be paired with
    assert t.take(0) == {} and t.ready == {} and not t.counts  # taken once, and the finished round forgotten


def test_an_idle_holder_is_not_charged_for_waiting_on_the_driver():
    # the faster replica's next step is submitted late (the driver runs one step ahead): its first call is timed
    # from its submission, not from the end of its previous call
    h = (0, 1)
    t = _times([(h, "a", [], 0.0, 0, True), (h, "b", [], 10.0, 1, True)], {"a": 1.0, "b": 10.5})
    assert _secs(t, h) == [(0, 1.0), (1, 0.5)]


def test_a_call_waits_for_its_predecessor_to_be_seen_and_a_queue_of_calls_is_timed_one_after_the_other():
    h = (0, 0)
    t = _times([(h, k, [], 0.0, 0, True) for k in "abc"], {"b": 2.0, "c": 3.0})
    assert _secs(t, h) == []  # "a" not seen yet: nothing resolves behind it
    t.appeared("a", 1.0)
    t.advance()
    assert [x for _, x in _secs(t, h)] == [1.0, 1.0, 1.0]


def test_a_slow_walker_is_slower_by_its_stretch_whatever_it_reports():
    """Two replicas of a 2-stage pipeline; replica 1's Validator takes 3x as long per call. Its Driver is the one
    waiting, but the wait is charged to no one: each call is timed from when its input appeared."""
    t = CallTimes()
    for r, fb in ((0, 1.0), (1, 3.0)):
        d, v = (0, r), (1, r)
        now = 0.0
        for j in range(4):
            t.submitted(d, Call(f"f{r}{j}", (), 0.0, 0, "F"))
            t.submitted(v, Call(f"fb{r}{j}", (f"f{r}{j}",), 0.0, 0, "FB"))
            t.submitted(d, Call(f"b{r}{j}", (f"fb{r}{j}",), 0.0, 0, "B"))
        for j in range(4):  # gpipe is not needed for the arithmetic: one microbatch after the other
            now += 0.5
            t.appeared(f"f{r}{j}", now)
            now += fb
            t.appeared(f"fb{r}{j}", now)
            now += 0.5
            t.appeared(f"b{r}{j}", now)
    t.advance()
    paces = t.take(0)
    assert paces[1, 1] / paces[1, 0] == pytest.approx(3.0)  # each call 3 s against 1 s: ratios 1.5 and 0.5
    assert paces[0, 1] == pytest.approx(paces[0, 0]) == 1.0  # the slow walker's Driver is not blamed


def test_failed_and_redone_calls_leave_no_sample():
    h, mate = (0, 2), (1, 2)
    t = CallTimes()
    t.submitted(h, Call("a", (), 0.0, 3, "F"))
    t.submitted(mate, Call("b", ("a",), 0.0, 3, "F"))
    t.appeared("b", 0.5)  # failed at once: its input's failure, before its predecessor
    t.appeared("a", 1.0)
    t.advance()
    assert _secs(t, mate) == []  # negative service time: it did not run
    t.submitted(h, Call("c", (), 1.0, 4, "F"))
    t.void(2, {3, 4})  # a recovery settles and redoes steps 3 and 4 of replica 2
    assert _secs(t, h) == [] and list(t.chains[h]) == []
    redo = Call("c2", (), 2.0, 4, "F")
    t.submitted(h, redo)  # the redo, timed afresh and numbered afresh: it pairs with the other replicas' first call
    assert redo.index == 0
    other = Call("o", (), 2.0, 4, "F")
    t.submitted((0, 0), other)
    t.appeared("c", 1.5)
    t.appeared("c2", 2.25)
    t.appeared("o", 2.5)
    t.advance()
    assert t.take(4) == {h: pytest.approx(0.25 / 0.375), (0, 0): pytest.approx(0.5 / 0.375)}


def test_unresolved_names_what_the_round_still_waits_on():
    h = (0, 0)
    t = _times([(h, "a", ["x"], 0.0, 0, True), (h, "b", [], 0.0, 1, True)], {"a": 1.0})
    assert t.unresolved(0) == ["x"]  # the input was never seen: the round's last call waits on it
    assert set(t.unresolved(1)) == {"x", "b"}


def test_calls_are_paired_across_replicas_so_a_load_that_moves_every_holder_cancels_out():
    """Three replicas' holders of one range, four calls each; the machine's load makes calls 2 and 3 four times as
    slow for everyone. Replica 2 stretches every call 3x. Each call against the same call's median: 1, 1, 3."""
    t = CallTimes()
    load = [1.0, 1.0, 4.0, 4.0]
    for r, stretch in ((0, 1.0), (1, 1.0), (2, 3.0)):
        h, now = (0, r), 0.0
        for j, x in enumerate(load):
            t.submitted(h, Call(f"c{r}{j}", (), 0.0, 0, "F"))
            now += x * stretch * (1.1 if r == 1 and j == 0 else 1.0)  # replica 1 descheduled once, a little
            t.appeared(f"c{r}{j}", now)
    t.submitted((0, 0), Call("lone", (), now, 0, "F"))  # a fifth call on replica 0 alone: nothing to pair it with
    t.appeared("lone", now + 100.0)
    t.advance()
    paces = t.take(0)
    assert paces[0, 2] == pytest.approx(3.0)
    assert paces[0, 0] == pytest.approx(1.0) and paces[0, 1] == pytest.approx(1.0)
