"""Holders that misbehave inside their own processes (neuroray/swarm/attacks_in_holder.py), without Ray: each
attack changes what the holder sends, against an honest holder built the same way; and attack.where=holder
picks the slots the reduce-task attacks pick and leaves the reduce task nothing to simulate."""

import math

import pytest
import torch

from neuroray.config import AttackConfig, DilocoConfig, ModelConfig
from neuroray.diloco.attacks import HOLDER_SIDE, attack_problem, byzantine_count, reduce_side
from neuroray.diloco.compress import decode
from neuroray.swarm.attacks_in_holder import FROM_CONFIG, HOLDER_ATTACKS, holder_attack_class, misbehaving
from neuroray.swarm.holder import HolderSpec, StageHolder
from neuroray.swarm.transport import as_tensor

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16)
V = 64


def _pair(tmp_path, stage: int, attack: tuple, replica: int = 0, tag: str = "", **spec):
    """An honest holder and one whose slot runs ``attack``, alike in everything else (same seed and key)."""
    cls = misbehaving({f"r{replica}-s{stage}": attack})
    key = str(tmp_path / f"k{stage}{tag}.pem")

    def make(c):
        return c(HolderSpec(replica=replica, stage=stage, ranges=[(0, 1), (1, 2)], model=CFG, vocab_size=V,
                            diloco=DilocoConfig(inner_lr=1e-2), seed=0, key_path=key, **spec))
    return make(StageHolder), make(cls)


def _x(seed: int) -> torch.Tensor:
    return torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(seed))


def _act(seed: int) -> torch.Tensor:
    return torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(seed))


def test_tampered_activations_are_scaled_and_noised_on_the_way_out(tmp_path):
    honest, flip = _pair(tmp_path, 0, ("tamper_activations", -1.0))
    out = as_tensor(honest.forward(1, _x(0)))
    assert torch.equal(as_tensor(flip.forward(1, _x(0))), -out)
    _, noisy = _pair(tmp_path, 0, ("tamper_activations", 1.0, 1, 0.5))
    diff = as_tensor(noisy.forward(1, _x(0))) - out
    rel = float(diff.pow(2).mean().sqrt() / out.pow(2).mean().sqrt())
    assert 0.4 < rel < 0.6, rel  # noise at half the activation's RMS
    # its own graph is honest: the gradient it applies is the honest one
    g = torch.randn_like(out)
    honest.backward(1, g), noisy.backward(1, g)
    assert all(torch.equal(a, b) for a, b in zip(honest.grads().values(), noisy.grads().values()))


def test_tampered_gradients_are_what_it_sends_back(tmp_path):
    honest, bad = _pair(tmp_path, 1, ("tamper_gradients", 3.0))
    labels = torch.randint(0, V, (2, 8))
    loss, g = honest.forward_backward(1, _act(0), labels, 1.0)
    loss2, g2 = bad.forward_backward(1, _act(0), labels, 1.0)
    assert loss == loss2 and torch.allclose(as_tensor(g2), 3 * as_tensor(g))
    # a middle range's backward too (stage 1 of 3 sends its input's gradient back)
    cls = misbehaving({"r0-s1": ("tamper_gradients", -1.0)})
    model = ModelConfig(d_model=32, n_layers=3, n_heads=2, n_kv_heads=2, max_seq_len=16)
    pair = [c(HolderSpec(replica=0, stage=1, ranges=[(0, 1), (1, 2), (2, 3)], model=model, vocab_size=V,
                         diloco=DilocoConfig(), seed=0, key_path=str(tmp_path / "m.pem"))) for c in (StageHolder, cls)]
    grad = _act(2)
    sent = []
    for h in pair:
        h.forward(1, _act(1))
        sent.append(as_tensor(h.backward(1, grad)))
    assert torch.equal(sent[1], -sent[0]) and sent[0].abs().sum() > 0


def test_a_lazy_zero_holder_sends_zeros_counts_the_work_and_learns_nothing(tmp_path):
    honest, lazy = _pair(tmp_path, 0, ("lazy_zero", 0))
    out = as_tensor(lazy.forward(1, _x(0)))
    assert out.shape == as_tensor(honest.forward(1, _x(0))).shape and not out.any()
    assert lazy.backward(1, torch.ones_like(out)) is None and lazy._step_microbatches == 1  # claimed as done
    before = lazy.flat_params()
    lazy.step()
    assert torch.equal(lazy.flat_params(), before)  # nothing computed, nothing learned: a zero pseudo-gradient
    _, last = _pair(tmp_path, 1, ("lazy_zero", 0))
    loss, g = last.forward_backward(1, _act(0), torch.randint(0, V, (2, 8)), 1.0)
    assert loss == pytest.approx(math.log(V)) and not as_tensor(g).any() and last._step_microbatches == 1


def test_a_lazy_stale_holder_resends_its_previous_output(tmp_path):
    honest, lazy = _pair(tmp_path, 0, ("lazy_stale", 0))
    first = as_tensor(lazy.forward(1, _x(0)))  # nothing to resend yet: computed
    assert torch.equal(first, as_tensor(honest.forward(1, _x(0))))
    second = as_tensor(lazy.forward(2, _x(1)))
    assert torch.equal(second, first) and not torch.equal(second, as_tensor(honest.forward(2, _x(1))))
    _, last = _pair(tmp_path, 1, ("lazy_stale", 0))
    labels = torch.randint(0, V, (2, 8))
    loss1, g1 = last.forward_backward(1, _act(0), labels, 1.0)
    loss2, g2 = last.forward_backward(2, _act(1), labels, 1.0)
    assert loss2 == loss1 and torch.equal(as_tensor(g2), as_tensor(g1)) and last._step_microbatches == 2


def _train(h, seed: int) -> None:
    out = as_tensor(h.forward(seed, _x(seed)))
    h.backward(seed, torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)))
    h.step()


def test_replay_sends_last_rounds_pseudo_gradient(tmp_path):
    honest, replay = _pair(tmp_path, 0, ("stale_delta", 0))
    sent = []
    for rnd in range(2):
        for h in (honest, replay):
            _train(h, rnd)
        sent.append((decode(honest.pseudo_gradient()), decode(replay.pseudo_gradient())))
        for h in (honest, replay):
            h.load_theta0(honest.theta0 - sent[-1][0])
    assert not sent[0][1].any() and sent[0][0].abs().sum() > 0  # round 1: nothing to replay yet
    assert torch.equal(sent[1][1], sent[0][0]) and not torch.equal(sent[1][1], sent[1][0])


def test_copy_sends_the_other_holders_update_as_its_own(tmp_path):
    victim, _ = _pair(tmp_path, 0, ("copy", 1), replica=1)
    _, copier = _pair(tmp_path, 0, ("copy", 1), replica=0, tag="c")
    copier.peer = victim  # in process: the holder itself (under Ray: its named actor)
    _train(victim, 1)
    _train(copier, 2)  # it trains on other data: its own delta differs from the victim's
    own = copier.outer.delta()[0]
    theirs = decode(victim.pseudo_gradient())
    sent = decode(copier.pseudo_gradient())
    assert torch.equal(sent, theirs) and not torch.allclose(own, theirs)


def test_slow_walk_stretches_compute_and_changes_nothing_else(tmp_path):
    honest, slow = _pair(tmp_path, 0, ("slow_walk", 3.0))
    assert slow.clock.factor == 3.0
    assert torch.equal(as_tensor(slow.forward(1, _x(0))), as_tensor(honest.forward(1, _x(0))))
    _, later = _pair(tmp_path, 0, ("slow_walk", 3.0, 2))
    assert later.clock.factor == 1.0  # honest pace until round 2


def test_a_hidden_slow_walk_stretches_compute_but_its_own_clock_records_only_the_real_compute(tmp_path):
    import time

    _, slow = _pair(tmp_path, 0, ("slow_walk_hidden", 3.0))
    assert slow.clock.factor == 3.0 and slow.clock.hidden
    t0 = time.perf_counter()
    slow.forward(1, _x(0))
    wall = time.perf_counter() - t0
    recorded = slow.clock.busy_s
    assert 0 < 3 * recorded <= wall  # it slept twice the compute it recorded: the stretch is in no clock of its own


def test_wrong_data_reads_another_shard_while_its_position_advances_as_assigned(tmp_path):
    from tests.test_pipeline_ray import _write_corpus
    from neuroray.configure import load_config
    from neuroray.genesis import ensure_dataset

    _write_corpus(tmp_path / "corpus.txt")
    cfg = load_config([f"data.source={tmp_path / 'corpus.txt'}", f"data.store={tmp_path / 'store'}",
                       "data.vocab_size=320", "data.shard_tokens=2048", "data.seq_len=16", "data.microbatch_size=2"])
    root, manifest = ensure_dataset(cfg.data, log=lambda *a, **k: None)
    data = {"data_root": str(root), "manifest": manifest.to_json(), "seq_len": 16, "microbatch_size": 2}
    for start in (None, 0):  # fixed routing (its own shard) and swarm routing (the shared ring)
        honest, wrong = _pair(tmp_path, 0, ("wrong_data", 1), tag=str(start), data_start=start, **data)
        if start is None:
            (x, y), (x2, y2) = honest.next_batch(), wrong.next_batch()
        else:
            (x, y), (x2, y2) = honest.compute.batch_at(5), wrong.compute.batch_at(5)
        assert not torch.equal(x, x2) and torch.equal(x2[:, 1:], y2[:, :-1])  # other tokens, consistent labels
        assert wrong.compute.stream.position == honest.compute.stream.position  # what its proof commits


def test_attack_where_holder_picks_the_first_replicas_and_the_reduce_task_simulates_nothing():
    assert set(FROM_CONFIG) == set(HOLDER_SIDE) - {"none"} and set(FROM_CONFIG.values()) <= set(HOLDER_ATTACKS)
    a = AttackConfig(name="lazy_zero", fraction=0.5, where="holder")
    cls = holder_attack_class(a, 4)
    assert sorted(cls.REPLICAS) == list(range(byzantine_count(a, 4))) == [0, 1] and not cls.ATTACKS
    assert cls.REPLICAS[0].name == "lazy_zero" and reduce_side(a).name == "none"
    assert holder_attack_class(AttackConfig(name="lazy_zero", fraction=0.5), 4) is None  # where=reduce
    copy = holder_attack_class(AttackConfig(name="copy", fraction=0.25, where="holder"), 4)
    assert copy.REPLICAS[0].value == 1  # copies the first honest replica
    assert reduce_side(AttackConfig(name="sign_flip", fraction=0.5)).name == "sign_flip"
    assert "attack.where=holder" in attack_problem(AttackConfig(name="lazy_zero", fraction=0.5))
    assert "reduce task only" in attack_problem(AttackConfig(name="alie", fraction=0.5, where="holder"))
    assert "no honest holder" in attack_problem(AttackConfig(name="copy", fraction=1.0, where="holder"), 4)
    assert "attack.where" in attack_problem(AttackConfig(where="router"))
    assert attack_problem(AttackConfig(name="replay", fraction=0.25, where="holder"), 4) is None
