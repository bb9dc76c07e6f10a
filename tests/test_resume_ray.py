"""Recovery and resume against older snapshots: a holder restored from before the last outer step rejoins
at its range's current theta0 (#21 item 8); resuming a finished or crashed run continues its logs and
ledger without duplicates or gaps, and a resume that changes the model's shape is refused (#19 item 7)."""

import json

import pytest
import torch

from tests.test_recovery_ray import _cfg

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def _lines(into: list):
    return lambda *a, **k: into.append(" ".join(map(str, a)))


def test_a_holder_restored_from_before_the_last_outer_step_rejoins_at_the_current_theta0(ray_cluster, tmp_path):
    """Fixed routing: r1-s1 comes back from its step-4 snapshot (outer round 1) during round 3. Left at
    round 1's theta0, its next pseudo-gradient would carry round 2's learning a second time."""
    from neuroray.training.run import run

    ray = ray_cluster
    run(_cfg(tmp_path, "stale", 1), log=lambda *a, **k: None)  # the only snapshot set: step 4, after round 1
    lines, seen = [], {}

    def log(*a, **k):
        line = " ".join(map(str, a))
        lines.append(line)
        if line.startswith("round 3/3 step 10/12"):
            ray.kill(ray.get_actor("neuroray-stale-r1-s1"), no_restart=False)
        if line.startswith("recovery: replica 1 back"):  # before its lost steps re-run
            restored, peer = ray.get_actor("neuroray-stale-r1-s1"), ray.get_actor("neuroray-stale-r0-s1")
            seen["counters"] = ray.get(restored.counters.remote())
            seen["theta0"] = [ray.get(h.state_dict.remote(at_theta0=True)) for h in (restored, peer)]

    result = run(_cfg(tmp_path, "stale", 3, "resume=true", "log_every=1", "checkpoint.every_round=false"), log=log)
    assert result.start_step == 4 and len(result.losses) == 8
    assert result.recoveries[0]["replica"] == 1 and result.recoveries[0]["restored_steps"][1] == 4
    assert seen["counters"]["outer_rounds"] == 2  # the swarm's round count, not the snapshot's 1
    mine, current = seen["theta0"]
    assert mine.keys() == current.keys() and all(torch.equal(mine[k], current[k]) for k in current)
