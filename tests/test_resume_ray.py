"""Recovery and resume against older snapshots: a holder restored from before the last outer step rejoins
at its range's current theta0 (#21 item 8); resuming a finished or crashed run continues its logs and
ledger without duplicates or gaps, and a resume that changes the model's shape is refused (#19 item 7)."""

import json

import pytest
import torch

from neuroray.training.plots import metric_rows
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
    # and its proof of the round commits to that theta0, so the ledger credits it like every other
    assert not [line for line in lines if line.startswith("ledger:") and "refused" in line], lines


def _steps(run_dir) -> list[int]:
    """The training rows' steps (eval rows, one per evaluation, carry no training loss)."""
    return [r["step"] for r in metric_rows(run_dir / "metrics.jsonl")[0]]


def _rounds(run_dir) -> list[int]:
    return [c["round"] for c in json.loads((run_dir / "comm.json").read_text())]


def test_resuming_a_finished_run_continues_its_logs_and_ledger(ray_cluster, tmp_path):
    from neuroray.training.run import run

    no_snaps = ["checkpoint.every_round=false", "checkpoint.interval_s=0"]  # the run's final set is its only one
    first = run(_cfg(tmp_path, "done", 2, *no_snaps), log=lambda *a, **k: None)
    assert first.snapshots == [8]
    lines = []
    more = run(_cfg(tmp_path, "done", 3, "resume=true", *no_snaps), log=_lines(lines))
    assert more.start_step == 8 and len(more.losses) == 4  # from the end: no logged step trained again
    run_dir = tmp_path / "done"
    assert _steps(run_dir) == list(range(1, 13)) and _rounds(run_dir) == [1, 2, 3]
    assert (run_dir / "loss.png").is_file()
    assert not [line for line in lines if "duplicate_round" in line]
    assert any("round 3: 4/4 proofs credited" in line for line in lines)
    bytes_logged = [r["sync_bytes"] for r in metric_rows(run_dir / "metrics.jsonl")[0]]
    assert bytes_logged == sorted(bytes_logged)  # the running total goes on from the first run's rounds

    # A crash after the last snapshot: here the newest set (step 12) is torn, so the resume starts at
    # step 8 while the logs reach step 12. The rows and rounds after step 8 are dropped, then re-logged.
    part = run_dir / "snapshots" / "r1-s1" / "step-00000012" / "tensors.safetensors"
    part.write_bytes(part.read_bytes()[:-7])
    again = run(_cfg(tmp_path, "done", 4, "resume=true", *no_snaps), log=lambda *a, **k: None)
    assert again.start_step == 8 and len(again.losses) == 8
    assert _steps(run_dir) == list(range(1, 17)) and _rounds(run_dir) == [1, 2, 3, 4]


def test_resume_refuses_a_config_that_changes_the_model(tmp_path):
    """Checked against the run dir's config.yaml before anything starts (and against the snapshots)."""
    from neuroray.config import to_yaml
    from neuroray.errors import ConfigError
    from neuroray.training.run import run

    (tmp_path / "shape").mkdir()
    (tmp_path / "shape" / "config.yaml").write_text(to_yaml(_cfg(tmp_path, "shape", 2)))
    with pytest.raises(ConfigError, match=r"model\.d_model \(64 in .*config\.yaml, 32 now\)"):
        run(_cfg(tmp_path, "shape", 3, "resume=true", "model.d_model=32"), log=lambda *a, **k: None)
    with pytest.raises(ConfigError, match=r"data\.vocab_size"):
        run(_cfg(tmp_path, "shape", 3, "resume=true", "data.vocab_size=256"), log=lambda *a, **k: None)
