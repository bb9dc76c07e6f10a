"""A holder that copies another's pseudo-gradient, in a real run (``attack=copy attack.where=holder``): the
outer step counts the update once, the coordinator names the copier by the loss the update removes on each
claimant's own batches, and the ledger pays the copier 0 while its victim is paid. The rule itself, on
honest deltas too: tests/test_copies.py."""

import sqlite3

import pytest

from neuroray.configure import load_config
from tests.test_copies import SMALL

# slow: ray.init and a 3-replica run take longer than the non-slow budget on the 2-core machine
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def _keys_on_distinct_shards(cfg, key_dir, replicas: int) -> dict[int, str]:
    """Drivers' keys whose shard rings start on different shards: two that share one read the same stream
    and compute the same update honestly, which the copy check pays both for (and cannot name a copier in)."""
    from neuroray.genesis import ensure_dataset
    from neuroray.genesis.shards import _split_shards, shard_for
    from neuroray.ponw.identity import Identity

    _, manifest = ensure_dataset(cfg.data, log=lambda *a, **k: None)
    shards = len(_split_shards(manifest, "train"))
    key_dir.mkdir(parents=True, exist_ok=True)
    node, starts = {}, set()
    for r in range(replicas):
        path = key_dir / f"holder-r{r}-s0.pem"
        while True:
            path.unlink(missing_ok=True)
            ident = Identity.load_or_create(path)
            if shard_for(ident.node_id, shards) not in starts:
                break
        starts.add(shard_for(ident.node_id, shards))
        node[r] = ident.node_id
    return node


@pytest.mark.parametrize("routing", ["fixed", "router"])
def test_the_copier_earns_nothing_and_its_victim_is_paid(ray_cluster, tmp_path, routing):
    from neuroray.training.run import run

    # replica 0 copies replica 1 in its one range (holder_attack_class: the first third of the replicas)
    cfg = load_config([*SMALL, "swarm.num_stages=1", "diloco.replicas=3", "diloco.inner_steps=4", "rounds=2",
                       "attack=copy", "attack.where=holder", "attack.fraction=0.34", f"run_dir={tmp_path / 'run'}",
                       f"swarm.key_dir={tmp_path / 'keys'}", "cluster.cpus_per_holder=0.25", "sample_tokens=1",
                       "checkpoint.interval_s=0", "checkpoint.every_round=false", "ponw.spot_check_rate=0",
                       f"swarm.routing={routing}"])
    node = _keys_on_distinct_shards(cfg, tmp_path / "keys", 3)
    lines = []
    result = run(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    text = "\n".join(lines)
    db = sqlite3.connect(tmp_path / "run" / "ledger.sqlite")
    paid = {}
    for who, rnd, st, reward in db.execute("SELECT node_id, outer_round, status, reward FROM proofs"):
        paid.setdefault(who, []).append((rnd, st, reward))
    assert text.count("range 0: replica(s) [0] copied replica 1's pseudo-gradient") == 2, text
    assert [(rnd, st, reward) for rnd, st, reward in sorted(paid[node[0]])] == [(1, "credited", 0), (2, "credited", 0)]
    for r in (1, 2):  # the victim and the honest replica: paid every round
        assert [rnd for rnd, st, reward in sorted(paid[node[r]]) if st == "credited" and reward > 0] == [1, 2]
    assert result.ledger["supply_consistent"]
