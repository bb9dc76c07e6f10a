"""Stage holders on Ray: cross-actor backward equals the monolith, and training runs end to end."""

import importlib.util
import json
import math
import time
import urllib.request

import pytest
import torch

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.model import build_monolith, split_layers
from neuroray.swarm.direct_transport import HopGroups
from neuroray.swarm.holder import HolderSpec, holder_actor
from neuroray.training.plots import metric_rows

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

CFG = ModelConfig(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=32)
VOCAB = 97
TENSORBOARD = importlib.util.find_spec("tensorboard") is not None  # the dev extra installs it


def _pipeline(tmp_path, num_stages):
    ranges = split_layers(CFG.n_layers, num_stages)
    return [
        holder_actor(HolderSpec(replica=0, stage=s, ranges=ranges, model=CFG, vocab_size=VOCAB, diloco=DilocoConfig(),
                                seed=3, key_path=str(tmp_path / f"k{s}.pem")), num_cpus=0, num_gpus=0)
        for s in range(num_stages)
    ]


@pytest.mark.parametrize("num_stages", [2, 3])
def test_cross_actor_gradients_equal_monolith(ray_cluster, tmp_path, num_stages):
    ray = ray_cluster
    gen = torch.Generator().manual_seed(num_stages)
    micro = [torch.randint(0, VOCAB, (2, 16), generator=gen) for _ in range(3)]
    labels = [torch.randint(0, VOCAB, (2, 16), generator=gen) for _ in range(3)]

    ref = build_monolith(CFG, VOCAB, seed=3)
    for x, y in zip(micro, labels):
        (ref.loss(ref(x), y) / len(micro)).backward()
    expected = {n: p.grad for n, p in ref.named_parameters()}

    holders = _pipeline(tmp_path, num_stages)
    grads_in = []
    for mb, (x, y) in enumerate(zip(micro, labels)):
        act = ray.put(x)
        for h in holders[:-1]:
            act = h.forward.remote(mb, act)
        _, g = holders[-1].forward_backward.options(num_returns=2).remote(mb, act, ray.put(y), 1 / len(micro))
        for h in reversed(holders[:-1]):
            g = h.backward.remote(mb, g)
        grads_in.append(g)
    assert ray.get(grads_in) == [None] * len(micro)  # the Driver has no upstream to send a gradient to
    got = {}
    for part in ray.get([h.grads.remote() for h in holders]):
        assert not set(part) & set(got)
        got.update(part)
    assert set(got) == set(expected)
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name  # every stage, the first included, really trained
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for h in holders:
        ray.kill(h)


@pytest.mark.slow  # make test-slow; tests/test_schedule.py checks 1F1B against GPipe and the monolith in process
def test_1f1b_through_ray_keeps_fewer_graphs_and_equals_the_monolith(ray_cluster, tmp_path):
    """Ray runs one caller's calls to an actor in submission order, so the submitted order is the schedule:
    under 1F1B the Driver's stash peaks at 2 graphs (GPipe keeps all 4), and the gradients and losses are
    the monolith's on the same microbatches (tests/test_schedule.py: bit for bit GPipe's)."""
    from neuroray.genesis import TokenStream, ensure_dataset
    from neuroray.training.schedule import submit_microbatches
    from tests.test_genesis_corpus import small_cfg, write_corpus

    ray = ray_cluster
    root, manifest = ensure_dataset(small_cfg(tmp_path, write_corpus(tmp_path / "c.txt")), log=lambda *a: None)
    ranges = split_layers(CFG.n_layers, 2)
    holders = [holder_actor(HolderSpec(
        replica=0, stage=s, ranges=ranges, model=CFG, vocab_size=manifest.vocab_size, diloco=DilocoConfig(),
        seed=3, key_path=str(tmp_path / f"k{s}.pem"), data_root=str(root), manifest=manifest.to_json(),
        seq_len=16, microbatch_size=2), num_cpus=0, num_gpus=0) for s in range(2)]
    losses, tails = submit_microbatches(holders, 4, 0, "1f1b")
    assert ray.get(tails) == [None] * 4
    peaks = [u["peak_in_flight"] for u in ray.get([h.utilisation.remote() for h in holders])]
    assert peaks == [2, 0]
    got = {n: g for part in ray.get([h.grads.remote() for h in holders]) for n, g in part.items()}
    node_id = ray.get(holders[0].info.remote())["node_id"]
    ref, ref_losses = build_monolith(CFG, manifest.vocab_size, seed=3), []
    stream = TokenStream(root, manifest, node_id, 16, 2)  # the Driver's own stream, read again here
    for _ in range(4):
        x, y = stream.next_microbatch()
        loss = ref.loss(ref(x), y)
        ref_losses.append(float(loss.detach()))
        (loss / 4).backward()
    assert ray.get(losses) == pytest.approx(ref_losses, rel=1e-5)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    for h in holders:
        ray.kill(h)


def _write_corpus(path):
    words = ("stage holder passes activations forward and gradients back while the outer step "
             "updates theta zero every round and the ledger credits honest work in the swarm").split()
    g = torch.Generator().manual_seed(0)
    docs = []
    for i in range(400):
        n = int(torch.randint(8, 30, (1,), generator=g))
        idx = torch.randint(0, len(words), (n,), generator=g).tolist()
        docs.append(" ".join(words[j] for j in idx).capitalize() + ".")
    path.write_text("\n\n".join(docs))


def _check_held_out_eval(cfg, result, evals):
    """Evaluated through the holders every 5 steps and at the end, on the held-out shards: the final eval
    equals the monolith (the checkpoint) on the same microbatches, and each row's perplexity is exp(loss)."""
    from safetensors.torch import load_file

    from neuroray.genesis import ensure_dataset
    from neuroray.training.evaluation import held_out_batches

    assert [r["step"] for r in evals] == [5, 10, 15] and result.eval_loss == evals[-1]["eval_loss"]
    assert all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-12) for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it learns, on text it never trained on
    root, manifest = ensure_dataset(cfg.data, log=lambda *a: None)
    batches = held_out_batches(root, manifest, cfg.data.seq_len, cfg.data.microbatch_size, 4)
    assert len(batches) == 4 and evals[-1]["eval_tokens"] == 4 * 4 * 32
    model = build_monolith(cfg.model, 320, seed=cfg.seed)
    model.load_state_dict(load_file(str(result.checkpoint / "model.safetensors")))
    with torch.no_grad():
        monolith = sum(float(model.loss(model(x), y)) for x, y in batches) / len(batches)
    assert result.eval_loss == pytest.approx(monolith, abs=1e-5)
    if TENSORBOARD:  # the same rows as TensorBoard event files in the run directory
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(result.run_dir / "tensorboard"))
        acc.Reload()
        logged = acc.Scalars("eval/loss")
        assert [e.step for e in logged] == [5, 10, 15]
        assert [e.value for e in logged] == pytest.approx([r["eval_loss"] for r in evals], rel=1e-6)
        assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 16))


def test_train_end_to_end(ray_cluster, tmp_path):
    from safetensors.torch import load_file

    from neuroray.configure import load_config
    from neuroray.training.run import run

    corpus = tmp_path / "corpus.txt"
    _write_corpus(corpus)
    cfg = load_config([
        f"data.source={corpus}", f"data.store={tmp_path / 'store'}", "data.vocab_size=320", "data.shard_tokens=4096",
        "data.seq_len=32", "data.microbatch_size=4", "data.num_microbatches=2",
        "model.d_model=64", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
        "swarm.num_stages=3", f"swarm.key_dir={tmp_path / 'keys'}", "diloco.replicas=2", "diloco.inner_steps=5",
        "diloco.inner_lr=0.01", "rounds=3", f"run_dir={tmp_path / 'run'}", "cluster.cpus_per_holder=0.3",
        "sample_tokens=8", "eval.every=5", "eval.batches=4", f"tensorboard={TENSORBOARD}",
    ])
    lines = []
    result = run(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert len(result.losses) == 15 and all(math.isfinite(v) for v in result.losses)
    assert result.losses[0] == pytest.approx(math.log(320), rel=0.15)
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 1.0  # it learns
    assert math.isfinite(result.eval_loss) and result.eval_loss < result.losses[0]
    state = load_file(str(result.checkpoint / "model.safetensors"))
    assert "embed.weight" in state and "lm_head.weight" in state and "layers.2.attn.wq.weight" in state
    assert (result.checkpoint / "meta.json").is_file() and (result.checkpoint / "tokenizer.json").is_file()
    records, evals = metric_rows(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 16))
    # counted bytes: every round, both directions (dense float32 here), control plane apart
    assert [c["round"] for c in result.comm] == [1, 2, 3] and result.tokens == 15 * 2 * 4 * 32 * 2
    assert all(c["payload_bytes"] > 0 and c["broadcast_bytes"] > 0 and 0 < c["control_bytes"] < c["sync_bytes"]
               for c in result.comm)
    assert records[10]["sync_bytes"] == result.comm[0]["sync_bytes"] + result.comm[1]["sync_bytes"]
    assert any(line.startswith("round 3/3 step 15/15") for line in lines)
    assert isinstance(result.sample, str) and result.sample.startswith(cfg.sample_prompt)
    # Proofs of Neural Work: every holder's proof of each round was verified and credited
    assert result.ledger["supply_consistent"] and result.ledger["proofs_rejected"] == 0
    # rounds x replicas x stages, plus the spot-check validator's proofs of the rounds it drew a check in
    assert result.ledger["proofs_credited"] - result.ledger["validations_credited"] == 3 * 2 * 3
    assert result.ledger["validations_credited"] <= 3
    # every holder earned; the only other account is the spot-check validator's (registered at start)
    from neuroray.ponw.identity import Identity
    from neuroray.training.audit import VALIDATOR_KEY_FILE

    balances = result.ledger["balances_neuro"]
    holder_ids = {Identity.load_or_create(tmp_path / "keys" / f"holder-r{r}-s{s}.pem").node_id
                  for r in range(2) for s in range(3)}
    assert all(balances.get(node, 0) > 0 for node in holder_ids), balances
    assert set(balances) - holder_ids <= {Identity.load_or_create(tmp_path / "keys" / VALIDATOR_KEY_FILE).node_id}
    assert any(line.startswith("ledger: round 3: 6/6 proofs credited") for line in lines)
    assert (result.run_dir / "ledger_summary.json").is_file()
    assert (result.run_dir / "loss.png").stat().st_size > 1000 and "diloco:" in (result.run_dir / "config.yaml").read_text()
    _check_held_out_eval(cfg, result, evals)

    # The dashboard's metrics: Ray's Prometheus endpoint on this node carries ours (prefixed "ray_").
    wanted = {"ray_neuroray_loss", "ray_neuroray_eval_loss", "ray_neuroray_eval_perplexity",
              "ray_neuroray_tokens_per_s", "ray_neuroray_inner_step", "ray_neuroray_outer_round",
              "ray_neuroray_holder_utilisation", "ray_neuroray_holder_queue_depth", "ray_neuroray_snapshot_age_seconds",
              "ray_neuroray_neuro_balance"}
    port = ray_cluster._private.worker.global_worker.node.metrics_export_port
    found, step_line = set(), ""
    for _ in range(90):  # the driver exports every few seconds: poll until the last values are there
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        found = {name for name in wanted if f"\n{name}{{" in text}
        step_line = next((line for line in text.splitlines()
                          if line.startswith("ray_neuroray_inner_step{") and f'run="{result.run_dir.name}"' in line), "")
        if found == wanted and step_line.endswith(" 15.0") and "\nray_neuroray_sync_bytes" in text:
            break
        time.sleep(1)
    assert found == wanted, wanted - found
    synced = [line for line in text.splitlines() if line.startswith("ray_neuroray_sync_bytes")]
    assert any('kind="payload"' in line and result.run_dir.name in line for line in synced), synced
    assert step_line.endswith(" 15.0"), step_line


def _proof_rewards(run_dir, key_dir, replicas: int, stages: int) -> dict[tuple[int, int, int], tuple[str, int]]:
    """``(round, range, replica) -> (status, reward)`` from the run's ledger, node ids mapped back to slots."""
    import sqlite3

    from neuroray.ponw.identity import Identity

    slot = {Identity.load_or_create(key_dir / f"holder-r{r}-s{s}.pem").node_id: (s, r)
            for r in range(replicas) for s in range(stages)}
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        rows = db.execute("SELECT node_id, outer_round, status, reward FROM proofs WHERE proof_type = 'training'")
        return {(rnd, *slot[node]): (status, reward) for node, rnd, status, reward in rows}


# krum takes minutes on 2 cores: make test-slow; the rejected-NaN case runs in make test
@pytest.mark.parametrize("rule", [pytest.param("krum", marks=pytest.mark.slow), "nan_rejected"])
def test_holders_whose_delta_the_rule_did_not_use_earn_nothing(ray_cluster, tmp_path, rule):
    """PoNW gets the outer step's verdict: a proof for a delta that screening rejected, or that the rule
    gave weight 0 (not Krum's pick), is accepted (valid work, no slash) and credited 0 NEURO."""
    from neuroray.configure import load_config
    from neuroray.training.run import run

    corpus = tmp_path / "corpus.txt"
    _write_corpus(corpus)
    extra = (["aggregator=krum", "aggregator.f=0"] if rule == "krum" else  # n >= 2f+3 = 3; keeps one delta
             ["aggregator=trimmed_mean", "aggregator.f=1", "attack=nan", "attack.fraction=0.34"])  # replica 0 sends NaN
    cfg = load_config([
        f"data.source={corpus}", f"data.store={tmp_path / 'store'}", "data.vocab_size=320", "data.shard_tokens=4096",
        "data.seq_len=32", "data.microbatch_size=4", "data.num_microbatches=2", "model.d_model=64", "model.n_layers=2",
        "model.max_seq_len=64",
        f"swarm.key_dir={tmp_path / 'keys'}", "diloco.replicas=3", "diloco.inner_steps=2", "rounds=2",
        f"run_dir={tmp_path / 'run'}", "cluster.cpus_per_holder=0.2", "sample_tokens=2", *extra,
    ])
    lines = []
    result = run(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    proofs = _proof_rewards(result.run_dir, tmp_path / "keys", replicas=3, stages=2)
    assert len(proofs) == 2 * 2 * 3 and all(status == "credited" for status, _ in proofs.values())  # none refused
    assert result.ledger["supply_consistent"]
    for rnd in (1, 2):
        for s in range(2):
            paid = [r for r in range(3) if proofs[(rnd, s, r)][1] > 0]
            if rule == "krum":
                assert len(paid) == 1  # Krum keeps one holder's delta per range: only that holder earns
            else:
                assert paid == [1, 2]  # replica 0's NaN deltas were rejected every round
    assert any("rejected holder #0" in line for line in lines) == (rule != "krum")
    assert any(line.startswith("ledger: round 2: 6/6 proofs credited") and "; 4 earned 0" in line for line in lines) \
        == (rule == "krum")


@pytest.mark.slow  # a whole run: over the budget of make test on 2 shared cores
def test_int8_hops_train(ray_cluster, tmp_path):
    """swarm.hop_compression=int8: activations and gradients cross as int8 payloads, the run learns, and the
    holders' counted hop bytes reach the result (about 4x fewer than float32)."""
    from neuroray.configure import load_config
    from neuroray.training.run import run

    corpus = tmp_path / "corpus.txt"
    _write_corpus(corpus)
    cfg = load_config([
        f"data.source={corpus}", f"data.store={tmp_path / 'store'}", "data.vocab_size=320", "data.shard_tokens=4096",
        "data.seq_len=32", "data.microbatch_size=4", "data.num_microbatches=2", "model.d_model=64", "model.n_layers=2",
        "model.max_seq_len=64",
        f"swarm.key_dir={tmp_path / 'keys'}", "swarm.hop_compression=int8", "diloco.replicas=1",
        "diloco.inner_steps=6", "diloco.inner_lr=0.01", "rounds=2", "ponw.enabled=false", f"run_dir={tmp_path / 'run'}",
        "cluster.cpus_per_holder=0.3", "sample_tokens=2",
    ])
    result = run(cfg, log=lambda *a, **k: None)
    assert len(result.losses) == 12 and all(math.isfinite(v) for v in result.losses)
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 0.5 and math.isfinite(result.eval_loss)
    driver, validator = sorted(result.hops, key=lambda h: h["stage"])
    assert driver["fwd_sent"] == validator["bwd_sent"] == validator["received"] == 24  # 12 steps x 2 microbatches
    assert driver["fwd_bytes"] == validator["received_bytes"] and validator["bwd_bytes"] == driver["received_bytes"]
    assert 3.5 < driver["fwd_fp32_bytes"] / driver["fwd_bytes"] < 4
    assert json.loads((result.run_dir / "hops.json").read_text()) == result.hops


@pytest.mark.slow  # a whole run (about a minute on 2 shared cores): over the budget of make test
def test_attack_where_holder_runs_the_attack_inside_the_holders(ray_cluster, tmp_path):
    """attack.where=holder (fixed routing): replica 0's holders are lazy inside their own processes (they send
    zeros and learn nothing), so their pseudo-gradients are zero and they earn 0; replica 1 is paid."""
    from neuroray.configure import load_config
    from neuroray.training.run import run

    corpus = tmp_path / "corpus.txt"
    _write_corpus(corpus)
    cfg = load_config([
        f"data.source={corpus}", f"data.store={tmp_path / 'store'}", "data.vocab_size=320", "data.shard_tokens=4096",
        "data.seq_len=16", "data.microbatch_size=2", "data.num_microbatches=2", "model.d_model=32", "model.n_layers=2",
        "model.n_heads=2", "model.n_kv_heads=2", "model.max_seq_len=32", f"swarm.key_dir={tmp_path / 'keys'}",
        "diloco.replicas=2", "diloco.inner_steps=2", "rounds=1", f"run_dir={tmp_path / 'run'}",
        "cluster.cpus_per_holder=0.25", "sample_tokens=1", "checkpoint.every_round=false", "checkpoint.interval_s=0",
        "attack=lazy_zero", "attack.fraction=0.5",
    ])
    result = run(cfg, log=lambda *a, **k: None)
    proofs = _proof_rewards(result.run_dir, tmp_path / "keys", replicas=2, stages=2)
    assert all(proofs[(1, s, 0)] == ("credited", 0) for s in range(2)), proofs  # valid claims, nothing learned
    assert all(proofs[(1, s, 1)][0] == "credited" and proofs[(1, s, 1)][1] > 0 for s in range(2)), proofs
    assert result.ledger["supply_consistent"]


def test_a_fixed_config_places_each_replica_with_planner_within_replica(ray_cluster, tmp_path):
    """Without model=auto the replica groups take ``planner.within_replica``: STRICT_SPREAD needs one node per
    stage, so on this one-node cluster two stages cannot be placed (in the lab each hop then crosses a link,
    docs/lab.md); the refusal names the group and frees what it reserved. PACK places the same swarm."""
    from ray.util import placement_group_table

    from neuroray.configure import load_config
    from neuroray.planner.placement import PlacementError, release
    from neuroray.swarm.swarm import Swarm

    base = ["model.d_model=64", "model.n_layers=2", "model.max_seq_len=32", "data.seq_len=32", "swarm.num_stages=2", "diloco.replicas=1",
            "cluster.cpus_per_holder=0.25", "cluster.actor_start_timeout_s=1", "ponw.enabled=false",
            f"swarm.key_dir={tmp_path / 'keys'}"]
    with pytest.raises(PlacementError, match="placement group of replica 0 .* not ready after 1s"):
        Swarm(load_config([*base, "planner.within_replica=STRICT_SPREAD"]), VOCAB, None, log=lambda *a: None)
    assert all(g["state"] == "REMOVED" for g in placement_group_table().values())
    swarm = Swarm(load_config([*base, "planner.within_replica=PACK", "cluster.actor_start_timeout_s=120"]), VOCAB,
                  None, log=lambda *a: None)
    try:
        assert [g["strategy"] for g in placement_group_table().values() if g["state"] == "CREATED"] == ["PACK"]
    finally:
        for h in swarm.replicas[0]:
            ray_cluster.kill(h)
        release(swarm.groups)


@pytest.mark.slow  # ~25 s on the shared machine; tests/test_direct_transport.py runs gloo hops in process
def test_gloo_hops_give_the_monoliths_gradients_and_survive_a_new_group(ray_cluster, tmp_path):
    """Two holders in one gloo group: activations forward and gradients back cross directly (the calls the
    fixed schedule submits under hop_transport=gloo), the losses and every parameter's gradient equal the
    monolith's; the group is then destroyed and made anew (what a recovery does) and hops cross again."""
    ray = ray_cluster
    gen = torch.Generator().manual_seed(5)
    micro = [torch.randint(0, VOCAB, (2, 16), generator=gen) for _ in range(3)]
    labels = [torch.randint(0, VOCAB, (2, 16), generator=gen) for _ in range(3)]
    ref, ref_losses = build_monolith(CFG, VOCAB, seed=3), []
    for x, y in zip(micro, labels):
        loss = ref.loss(ref(x), y)
        ref_losses.append(float(loss.detach()))
        (loss / len(micro)).backward()

    ranges = split_layers(CFG.n_layers, 2)
    holders = [holder_actor(HolderSpec(replica=0, stage=s, ranges=ranges, model=CFG, vocab_size=VOCAB,
                                       diloco=DilocoConfig(), seed=3, key_path=str(tmp_path / f"k{s}.pem"),
                                       seq_len=16, microbatch_size=2, hop_transport="gloo"), num_cpus=0, num_gpus=0)
               for s in range(2)]
    groups = HopGroups("gloo", prefix="test-hops")
    groups.ensure(0, holders)
    direct = {"tensor_transport": "gloo"}

    def hop(mb, x, y, scale):
        act = holders[0].forward.options(**direct).remote(mb, ray.put(x))
        grad = holders[1].forward_backward_direct.options(**direct).remote(mb, act, ray.put(y), scale)
        return holders[1].take_loss.remote(mb), holders[0].backward.remote(mb, grad)

    refs = [hop(mb, x, y, 1 / len(micro)) for mb, (x, y) in enumerate(zip(micro, labels))]
    assert ray.get([r[1] for r in refs]) == [None] * 3  # the Driver has no upstream to send a gradient to
    assert ray.get([r[0] for r in refs]) == pytest.approx(ref_losses, rel=1e-5)
    got = {n: g for part in ray.get([h.grads.remote() for h in holders]) for n, g in part.items()}
    assert set(got) == {n for n, _ in ref.named_parameters()}
    for name, p in ref.named_parameters():
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    counts = ray.get(holders[1].hop_bytes.remote())
    assert counts["received"] == 3 and counts["received_bytes"] == 3 * 2 * 16 * 64 * 4

    first = groups.groups[0].name
    groups.remake(0, holders)
    assert groups.groups[0].name != first
    ray.get([h.abort_step.remote() for h in holders])
    loss, tail = hop(7, micro[0], labels[0], 1.0)
    assert ray.get(tail) is None and ray.get(loss) == pytest.approx(ref_losses[0], rel=1e-5)
    groups.close()
    assert groups.groups == {}
    for h in holders:
        ray.kill(h)


@pytest.mark.slow  # two whole runs (about a minute each on 2 shared cores)
def _runs_per_transport(tmp_path, transports) -> dict:
    """One short fixed run per hop transport, on the same corpus, seed and settings (2 stages x 2 replicas)."""
    from neuroray.configure import load_config
    from neuroray.training.run import run

    corpus = tmp_path / "corpus.txt"
    _write_corpus(corpus)
    results = {}
    for transport in transports:
        cfg = load_config([
            f"data.source={corpus}", f"data.store={tmp_path / 'store'}", "data.vocab_size=320",
            "data.shard_tokens=4096", "data.seq_len=32", "data.microbatch_size=4", "data.num_microbatches=2",
            "model.d_model=64", "model.n_layers=2", "model.max_seq_len=64", f"swarm.key_dir={tmp_path / 'keys'}",
            f"swarm.hop_transport={transport}", "diloco.replicas=2", "diloco.inner_steps=4", "diloco.inner_lr=0.01",
            "rounds=2", "ponw.enabled=false", f"run_dir={tmp_path / transport}", "cluster.cpus_per_holder=0.3",
            "sample_tokens=2",
        ])
        results[transport] = run(cfg, log=lambda *a, **k: None)
    return results


@pytest.mark.slow  # two whole runs (22.6 s in a clean-clone make test at 14:48 of its 15 minutes);
# tests/test_direct_transport.py runs gloo hops in process
def test_a_fixed_run_over_gloo_trains_exactly_as_over_the_object_store(ray_cluster, tmp_path):
    """run() with swarm.hop_transport=gloo (2 stages, 2 replicas: one group each) against the default: the
    same seed and data give the same losses step by step and the same eval loss; hops are counted alike."""
    results = _runs_per_transport(tmp_path, ("object_store", "gloo"))
    store, gloo = results["object_store"], results["gloo"]
    assert len(gloo.losses) == 8 and all(math.isfinite(v) for v in gloo.losses)
    assert gloo.losses == pytest.approx(store.losses, rel=1e-6)
    assert gloo.eval_loss == pytest.approx(store.eval_loss, rel=1e-6)
    key = lambda h: (h["replica"], h["stage"])  # noqa: E731
    for a, b in zip(sorted(store.hops, key=key), sorted(gloo.hops, key=key)):
        assert {k: v for k, v in a.items() if k != "holder"} == {k: v for k, v in b.items() if k != "holder"}


def _shm_files() -> set[str]:
    import glob

    return set(glob.glob("/dev/shm/nrshm-*"))


@pytest.mark.slow  # ~20 s on the shared machine; tests/test_shm_transport.py runs shm hops in process
def test_shm_hops_give_the_monoliths_gradients_and_rings_come_back_after_a_restart(ray_cluster, tmp_path):
    """Two holders with shared-memory rings (what FixedPipelines makes under hop_transport=shm): activations forward
    and gradients back cross as slot handles; the losses and every parameter's gradient equal the object-store
    path's bit for bit and the monolith's within float tolerance. Then the Validator is killed and restarted by
    Ray: until the rings are remade it sends through the object store, after that through a new ring; at the end
    every ring file is unlinked."""
    from neuroray.swarm.shm_transport import ShmEdges, ShmHop

    ray = ray_cluster
    before = _shm_files()
    gen = torch.Generator().manual_seed(5)
    micro = [torch.randint(0, VOCAB, (2, 16), generator=gen) for _ in range(3)]
    labels = [torch.randint(0, VOCAB, (2, 16), generator=gen) for _ in range(3)]
    ref = build_monolith(CFG, VOCAB, seed=3)
    for x, y in zip(micro, labels):
        (ref.loss(ref(x), y) / len(micro)).backward()
    ranges = split_layers(CFG.n_layers, 2)

    def pipeline(transport):
        return [holder_actor(HolderSpec(replica=0, stage=s, ranges=ranges, model=CFG, vocab_size=VOCAB,
                                        diloco=DilocoConfig(), seed=3, key_path=str(tmp_path / f"{transport}{s}.pem"),
                                        seq_len=16, microbatch_size=2, hop_transport=transport),
                             num_cpus=0, num_gpus=0, max_restarts=1) for s in range(2)]

    def step(holders):  # GPipe's order: the activations of every microbatch are held at once
        acts = [holders[0].forward.remote(mb, ray.put(x)) for mb, x in enumerate(micro)]
        outs = [holders[1].forward_backward.options(num_returns=2).remote(mb, a, ray.put(y), 1 / 3)
                for mb, (a, y) in enumerate(zip(acts, labels))]
        tails = [holders[0].backward.remote(mb, g) for mb, (_, g) in enumerate(outs)]
        assert ray.get(tails) == [None] * 3
        return ray.get([loss for loss, _ in outs]), {n: g for p in ray.get([h.grads.remote() for h in holders])
                                                      for n, g in p.items()}

    store = pipeline("object_store")
    want_losses, want = step(store)
    holders = pipeline("shm")
    edges = ShmEdges("t" + tmp_path.name[-10:].replace("_", ""), 3, 60)
    edges.ensure(0, holders)
    assert [len(names) for names in edges.made[0]] == [1, 1]  # one node: fwd from the Driver, bwd from the Validator
    assert isinstance(ray.get(holders[0].forward.remote(99, ray.put(micro[0]))), ShmHop)  # read by no one: held
    ray.get([h.abort_step.remote() for h in holders])
    losses, got = step(holders)
    assert losses == want_losses and got.keys() == want.keys() == {n for n, _ in ref.named_parameters()}
    for name, p in ref.named_parameters():
        assert torch.equal(got[name], want[name]), name  # the object-store path's bit for bit
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    rings = ray.get([h.hop_rings.remote() for h in holders])
    # the handle nobody read keeps its slot until the rings are remade: of the step's 3 activations, the last went
    # through the object store unless the Validator had consumed (and so released) the first by then
    assert rings[0]["fwd"]["sent"] + rings[0]["fwd"]["fallbacks"] == 4 and rings[0]["fwd"]["sent"] >= 3
    assert rings[1]["bwd"]["sent"] == 3 and rings[1]["bwd"]["fallbacks"] == 0
    assert rings[0]["fwd"]["in_use"] == 1 and rings[1]["bwd"]["in_use"] == 0  # every slot read was released

    ray.kill(holders[1], no_restart=False)  # Ray restarts it: a new process with no ring
    for _ in range(600):  # ray.kill is asynchronous: poll until the restarted process (no ring yet) answers
        try:
            if ray.get(holders[1].hop_rings.remote(), timeout=60) == {}:
                break
        except ray.exceptions.RayActorError:
            pass
        time.sleep(0.1)
    ray.get([h.abort_step.remote() for h in holders])
    assert len(_shm_files() - before) == 2  # the dead Validator's ring is still there until its edge is remade
    losses, _ = step(holders)  # its gradients go through the object store meanwhile
    assert losses == want_losses
    edges.remake(0, holders)
    assert len(_shm_files() - before) == 2 and rings[1]["bwd"]["name"] not in edges.made[0][1]
    ray.get([h.abort_step.remote() for h in holders])  # microbatch ids are claimed once per step: a new step
    losses, got = step(holders)
    assert losses == want_losses and all(torch.equal(got[n], want[n]) for n in want)
    assert [ray.get(h.hop_rings.remote())[d]["sent"] for h, d in zip(holders, ("fwd", "bwd"))] == [3, 3]  # new rings
    edges.close([holders])
    assert _shm_files() - before == set()
    for h in holders + store:
        ray.kill(h)


@pytest.mark.slow  # two whole runs (about a minute each on 2 shared cores)
def test_a_fixed_run_over_shm_trains_exactly_as_over_the_object_store_and_leaves_no_ring(ray_cluster, tmp_path):
    """run() with swarm.hop_transport=shm (2 stages, 2 replicas, every holder on this node) against the default:
    the same losses step by step, the same eval loss, hops counted alike; no ring file is left after the run."""
    before = _shm_files()
    results = _runs_per_transport(tmp_path, ("object_store", "shm"))
    store, shm = results["object_store"], results["shm"]
    assert len(shm.losses) == 8 and shm.losses == store.losses and shm.eval_loss == store.eval_loss
    key = lambda h: (h["replica"], h["stage"])  # noqa: E731
    for a, b in zip(sorted(store.hops, key=key), sorted(shm.hops, key=key)):
        assert {k: v for k, v in a.items() if k != "holder"} == {k: v for k, v in b.items() if k != "holder"}
    assert _shm_files() - before == set()
