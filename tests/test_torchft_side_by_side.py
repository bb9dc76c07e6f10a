"""The torchft arm of benchmarks/torchft_side_by_side.py builds: torchft imports, its Lighthouse starts and stops,
and the replicas' DiLoCo settings are neuroray's (the arms compare like with like)."""

import pytest

pytest.importorskip("torchft", reason="torchft is a peer dev dependency (make venv installs it)")

from benchmarks.torchft_side_by_side import overrides, start_lighthouse  # noqa: E402
from neuroray.configure import load_config  # noqa: E402


def test_lighthouse_starts_and_stops():
    from torchft import Manager, ProcessGroupGloo  # noqa: F401  (what each replica process imports)
    from torchft.local_sgd import DiLoCo  # noqa: F401

    lighthouse = start_lighthouse(min_replicas=1)
    try:
        address = lighthouse.address()
        assert address.startswith("http://") and int(address.rsplit(":", 1)[1]) > 0
    finally:
        lighthouse.shutdown()


def test_both_arms_read_one_config():
    args = {"seed": "3", "m": "2", "h": "10", "rounds": "4", "seq_len": "32", "mb": "2"}
    cfg = load_config(overrides(args, "unused"))
    assert (cfg.diloco.replicas, cfg.diloco.inner_steps, cfg.rounds, cfg.seed) == (2, 10, 4, 3)
    assert (cfg.swarm.num_stages, cfg.data.microbatch_size, cfg.data.seq_len) == (1, 2, 32)
