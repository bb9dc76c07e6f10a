"""Warm spares on Ray (checkpoint.spares, neuroray/swarm/spares.py): a holder killed mid-round has its slot taken over
by a spare that restores the slot's snapshot, training and the ledger go on; with the spare used up, a fresh holder
takes the slot. The bookkeeping and the in-process takeover are tested without Ray in tests/test_spares.py."""

import math
import time

import pytest

from tests.test_recovery_ray import _cfg

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def _dead(ray, handle) -> None:
    """Kill ``handle`` and return once it is gone (``ray.kill`` is asynchronous)."""
    ray.kill(handle, no_restart=False)
    for _ in range(600):
        try:
            ray.get(handle.counters.remote(), timeout=10)
        except ray.exceptions.ActorDiedError:
            return
        time.sleep(0.05)
    raise AssertionError("the killed holder still answers")


def _run(ray, tmp_path, name: str, also=None) -> tuple:
    """A 3-round run with one spare per range in which ``r1-s1`` is killed at round 2's step 6; ``also(line)`` may
    kill more. ``(result, log lines)``."""
    from neuroray.training.run import run

    lines = []

    def log(*a, **k):
        line = " ".join(map(str, a))
        lines.append(line)
        if line.startswith("round 2/3 step 6/12"):
            ray.kill(ray.get_actor(f"neuroray-{name}-r1-s1"), no_restart=False)
        if also is not None:
            also(line)

    result = run(_cfg(tmp_path, name, 3, "log_every=1", "checkpoint.spares=1"), log=log)
    assert len(result.losses) == 12 and all(math.isfinite(v) for v in result.losses), lines
    assert result.losses[-1] < result.losses[0]
    booked = [line for line in lines if line.startswith("ledger: round") and "proofs credited" in line]
    assert len(booked) == 3 and all("4/4 proofs credited" in line for line in booked), "\n".join(lines)
    return result, lines


def test_a_spare_takes_a_killed_holder_s_slot_over(ray_cluster, tmp_path):
    result, lines = _run(ray_cluster, tmp_path, "spare")
    assert [r["replica"] for r in result.recoveries] == [1], lines
    record = result.recoveries[0]
    # the slot's holder now is the former spare, restored from the slot's round-1 snapshot
    assert [(t["stage"], t["by"], t["actor"], t["restored_step"]) for t in record["taken_over"]] == [
        (1, "spare", "neuroray-spare-spare-s1-0", 4)], lines
    assert record["restored_steps"][1] == 4


def test_with_the_spare_used_up_a_fresh_holder_takes_the_slot(ray_cluster, tmp_path):
    """The former spare is killed the moment it took the slot over, before the range's new spare (started then) is up:
    the recovery starts over and a fresh holder, named as the slot, takes the slot from the same snapshot."""
    ray = ray_cluster

    def kill_the_former_spare(line: str) -> None:
        if line.startswith("recovery: r1-s1 taken over by a spare"):
            _dead(ray, ray.get_actor("neuroray-twice-spare-s1-0"))

    result, lines = _run(ray, tmp_path, "twice", kill_the_former_spare)
    assert [r["replica"] for r in result.recoveries] == [1], lines
    taken = [(t["by"], t["actor"], t["restored_step"]) for t in result.recoveries[0]["taken_over"]]
    assert taken == [("spare", "neuroray-twice-spare-s1-0", 4), ("fresh", "neuroray-twice-r1-s1", 4)], lines
    assert any("died again" in line for line in lines)
