"""The NEURO ledger: rewards, caps, stake, slashing, the supply invariant, crash safety, CLI, Ray actor."""

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuroray.cli import ledger as cli
from neuroray.config import PonwConfig
from neuroray.ponw.ledger import Ledger, LedgerError
from neuroray.ponw.proof import canonical_json
from neuroray.ponw.rules import UNIT, Rules, format_units, parse_amount
from neuroray.ponw.verifier import Receipt
from tests._ponw import (
    COORD, LAYERS, TPB, Clock, evidence, identity, make_ledger, node, receipt, registration, signed,
)

ROOT = Path(__file__).resolve().parent.parent


def dump(ledger: Ledger) -> list[str]:
    return list(ledger._db.iterdump())


def credit(ledger, clock, ident, rec, rnd, batches=10, **rc):
    out = ledger.submit(signed(ident, rec, clock.ms, rnd, batches), receipt(rec, rnd, batches, **rc))
    assert out.accepted, out
    return out


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    ledger = make_ledger(tmp_path / "ledger.sqlite", clock)
    (a, ra), (b, rb) = node(0), node(1)
    ledger.register(registration([ra, rb]))
    clock.t += 60
    yield ledger, clock, (a, ra), (b, rb)
    ledger.close()


# ----- rewards ---------------------------------------------------------------------------------
def test_training_reward_per_batch_and_layer_with_role_bonus(env):
    ledger, clock, (a, ra), (b, rb) = env
    # 10 batches x 2 layers x 0.001 NEURO x (1 + 0.2 role bonus) = 0.024 NEURO
    assert credit(ledger, clock, a, ra, 1).reward == 24_000
    assert credit(ledger, clock, b, rb, 1).reward == 24_000
    assert ledger.account(ra.node_id).balance == 24_000
    assert ledger.supply().minted == 48_000 and ledger.supply().consistent
    plain = Rules.from_config(PonwConfig(embedding_bonus=0, lm_head_bonus=0))
    assert plain.base_reward("training", 10, 10 * TPB, 2, True, True, 0) == 20_000


def test_inference_and_validation_rewards(env):
    ledger, clock, (a, ra), (b, rb) = env
    inf = signed(b, rb, clock.ms, batches=0, proof_type="inference", tokens_processed=5000, theta0_before="",
                 theta0_after="", pseudo_gradient="")
    out = ledger.submit(inf, COORD.sign_receipt(Receipt(rb.node_id, 1, "inference", tokens=5000)))
    assert out.accepted and out.reward == 50_000  # 5000 tokens x 0.00001 NEURO
    val = signed(b, rb, clock.ms, batches=3, proof_type="validation")
    out = ledger.submit(val, COORD.sign_receipt(Receipt(rb.node_id, 1, "validation", batches=3)))
    assert out.accepted and out.reward == 6_000  # 3 recomputed batches x 0.002 NEURO
    over = signed(b, rb, clock.ms, rnd=2, batches=0, proof_type="inference", tokens_processed=5001,
                  theta0_before="", theta0_after="", pseudo_gradient="")
    assert ledger.submit(over, COORD.sign_receipt(Receipt(rb.node_id, 2, "inference", tokens=5000))).reason == "implausible"


def test_stake_multiplier_is_bounded():
    rules = Rules.from_config(PonwConfig(stake_multiplier_max=1.5, stake_for_max_multiplier=100))
    assert rules.stake_multiplier_bp(0) == 10_000
    assert rules.stake_multiplier_bp(50 * UNIT) == 12_500
    assert rules.stake_multiplier_bp(100 * UNIT) == rules.stake_multiplier_bp(10**9 * UNIT) == 15_000


def test_staked_node_earns_the_bonus(env):
    ledger, clock, (a, ra), _ = env
    ledger.stake(ra.node_id, credit(ledger, clock, a, ra, 1).reward)  # 0.024 NEURO staked: tiny bonus
    r2 = credit(ledger, clock, a, ra, 2).reward
    assert 24_000 < r2 <= 36_000


def test_caps_per_proof_and_per_day(tmp_path):
    clock = Clock()
    ledger = make_ledger(tmp_path / "l.sqlite", clock, max_reward_per_proof=0.02, max_reward_per_day=0.05)
    a, ra = node(0)
    ledger.register(registration([ra]))
    clock.t += 60
    assert [credit(ledger, clock, a, ra, r).reward for r in (1, 2, 3, 4)] == [20_000, 20_000, 10_000, 0]
    clock.t += 86_400  # the next day has a fresh cap
    assert credit(ledger, clock, a, ra, 5).reward == 20_000
    assert ledger.supply().consistent


def test_one_credit_per_node_and_round(env):
    ledger, clock, (a, ra), _ = env
    credit(ledger, clock, a, ra, 1)
    again = ledger.submit(signed(a, ra, clock.ms, 1), receipt(ra, 1))  # new nonce, same round
    assert (again.accepted, again.reason, again.slashed) == (False, "duplicate_round", 0)


# ----- stake and slashing ----------------------------------------------------------------------
def test_stake_unstake_and_bad_amounts_leave_the_ledger_unchanged(env):
    ledger, clock, (a, ra), (b, rb) = env
    credit(ledger, clock, a, ra, 1)
    acct = ledger.stake(ra.node_id, 10_000)
    assert (acct.balance, acct.stake) == (14_000, 10_000)
    acct = ledger.unstake(ra.node_id, 4_000)
    assert (acct.balance, acct.stake) == (18_000, 6_000)
    before = dump(ledger)
    for op, amount, match in ((ledger.stake, -5, "positive"), (ledger.stake, 0, "positive"),
                              (ledger.stake, 1.5, "positive"), (ledger.stake, 18_001, "has 0.018000 balance"),
                              (ledger.unstake, 6_001, "has 0.006000 staked"), (ledger.unstake, -1, "positive")):
        with pytest.raises(LedgerError, match=match):
            op(ra.node_id, amount)
    with pytest.raises(LedgerError, match="unknown node"):
        ledger.stake("ab" * 32, 1)
    assert dump(ledger) == before


def test_slash_takes_stake_first_then_balance_and_burns_part(env):
    ledger, clock, (a, ra), (b, rb) = env
    credit(ledger, clock, a, ra, 1)
    credit(ledger, clock, b, rb, 1)
    ledger.stake(ra.node_id, 20_000)  # stake 20000, balance 4000
    lie = ledger.submit(signed(a, ra, clock.ms, 2, batches=11), receipt(ra, 2, batches=10), reporter=rb.node_id)
    assert (lie.accepted, lie.reason) == (False, "implausible")
    assert lie.slashed == 12_000  # half of 24000, all of it from stake
    acct = ledger.account(ra.node_id)
    assert (acct.stake, acct.balance) == (8_000, 4_000)
    assert ledger.account(rb.node_id).balance == 24_000 + 6_000  # the reporter's half
    s = ledger.supply()
    assert s.burned == 6_000 and s.consistent
    ledger.unstake(ra.node_id, 8_000)  # now nothing is staked: the next slash comes out of the balance
    lie2 = ledger.submit(signed(a, ra, clock.ms, 3, batches=11), receipt(ra, 3, batches=10))
    assert lie2.slashed == 6_000 and ledger.account(ra.node_id).balance == 6_000
    assert ledger.supply().burned == 12_000 and ledger.supply().consistent
    kinds = [e["kind"] for e in ledger.history(ra.node_id)]
    assert kinds.count("slash") == 2 and "stake" in kinds


def test_invalidate_claws_back_and_slashes(env):
    ledger, clock, (a, ra), (b, rb) = env
    out = credit(ledger, clock, a, ra, 1)
    credit(ledger, clock, a, ra, 2)
    proof_wire = ledger.wire(out.proof_id)
    inv = ledger.invalidate(evidence(b, proof_wire))  # rb, a registered validator, recomputed 9.0 vs 3.0
    assert inv.reason == "invalidated" and "recomputed 9.000000" in inv.detail
    assert inv.reward == -24_000 and inv.slashed == 12_000  # half of the 24000 left
    assert ledger.account(ra.node_id).balance == 12_000
    assert ledger.account(rb.node_id).balance == 6_000  # the validator's half of the slash
    assert ledger.supply().consistent
    before = dump(ledger)
    again = ledger.invalidate(evidence(b, proof_wire, recomputed=8.0))  # new evidence, proof already invalidated
    assert (again.accepted, again.reason) == (False, "not_credited")
    nothing = ledger.invalidate(evidence(b, proof_wire, proof_id="00" * 32))
    assert nothing.reason == "no_proof" and dump(ledger) == before
    # the round stays taken: a fresh proof for it is not credited again
    assert ledger.submit(signed(a, ra, clock.ms, 1), receipt(ra, 1)).reason == "duplicate_round"


@pytest.mark.parametrize("data", [
    b'{"payload": ',  # malformed JSON
    b'{"payload":{},"payload":{},"signature":""}',  # duplicate keys
    b'{"payload":{"v":NaN},"signature":""}',  # NaN
    b'{"payload":"' + b"x" * 5000 + b'","signature":""}',  # oversized
])
def test_bad_input_is_rejected_and_leaves_the_ledger_unchanged(env, data):
    ledger, clock, (a, ra), _ = env
    credit(ledger, clock, a, ra, 1)
    before = dump(ledger)
    out = ledger.submit(data, receipt(ra, 2))
    assert not out.accepted and out.reason in ("json", "size", "schema") and out.detail
    assert dump(ledger) == before


def test_unknown_node_is_rejected_and_leaves_the_ledger_unchanged(env):
    ledger, clock, *_ = env
    stranger, rec = node(0)
    before = dump(ledger)
    assert ledger.submit(signed(stranger, rec, clock.ms), receipt(rec)).reason == "unknown_node"
    assert dump(ledger) == before


def test_reopen_keeps_everything_and_checks_the_model(tmp_path):
    clock = Clock()
    path = tmp_path / "l.sqlite"
    ledger = make_ledger(path, clock)
    a, ra = node(0)
    ledger.register(registration([ra]))
    clock.t += 60
    out = credit(ledger, clock, a, ra, 1)
    ledger.close()
    again = make_ledger(path, clock)
    assert again.account(ra.node_id).balance == out.reward
    assert again.submit(again.wire(out.proof_id), receipt(ra, 1)).reason == "replay"
    again.close()
    with pytest.raises(LedgerError, match="belongs to a model"):
        Ledger(path, PonwConfig(), model_layers=LAYERS + 1, tokens_per_batch=TPB)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="not a usable SQLite ledger"):
        make_ledger(junk)
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger(tmp_path / "absent.sqlite", create=False)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(LedgerError, match="not a neuroray ledger"):
        Ledger(other, create=False)


def test_amount_parsing_and_formatting():
    assert parse_amount("2.5") == 2_500_000 and parse_amount("0.000001") == 1
    for bad in ("-1", "0", "abc", "nan", "inf", "0.0000001", ""):
        with pytest.raises(ValueError):
            parse_amount(bad)
    assert format_units(1_234_567) == "1.234567" and format_units(-5) == "-0.000005"


# ----- the supply invariant, property-tested ---------------------------------------------------
NODES = [node(0), node(1), node(0)]

op_strategy = st.one_of(
    st.tuples(st.just("work"), st.integers(0, 2), st.integers(0, 40), st.integers(-3, 3), st.booleans()),
    st.tuples(st.just("stake"), st.integers(0, 2), st.integers(-5, 60_000)),
    st.tuples(st.just("unstake"), st.integers(0, 2), st.integers(-5, 60_000)),
    st.tuples(st.just("invalidate"), st.integers(0, 50)),
    st.tuples(st.just("spot"), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("wait"), st.integers(0, 90_000)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_strategy, min_size=1, max_size=20))
def test_supply_invariant_holds_after_every_transaction(ops):
    with tempfile.TemporaryDirectory() as d:
        clock = Clock()
        ledger = make_ledger(Path(d) / "l.sqlite", clock, max_reward_per_day=0.2, stake_for_max_multiplier=0.05)
        ledger.register(registration([rec for _, rec in NODES]))
        rounds = [0, 0, 0]
        credited = []
        for op in ops:
            kind = op[0]
            try:
                if kind == "work":  # honest when extra <= 0, an inflated claim otherwise
                    _, i, observed, extra, reuse_round = op
                    ident, rec = NODES[i]
                    rounds[i] += 0 if reuse_round and rounds[i] else 1
                    claimed = max(0, observed + extra)
                    out = ledger.submit(signed(ident, rec, clock.ms, rounds[i], claimed),
                                        receipt(rec, rounds[i], observed), reporter=NODES[(i + 1) % 3][1].node_id)
                    assert out.accepted == (extra <= 0 and not (reuse_round and out.reason == "duplicate_round"))
                    if out.accepted:
                        credited.append(out.proof_id)
                elif kind == "stake":
                    ledger.stake(NODES[op[1]][1].node_id, op[2])
                elif kind == "unstake":
                    ledger.unstake(NODES[op[1]][1].node_id, op[2])
                elif kind == "invalidate" and credited:
                    # NODES[1] validates: its own proofs (conflict) and Worker proofs (no committed batch) are
                    # refused, which must change nothing; Driver proofs are invalidated
                    out = ledger.invalidate(evidence(NODES[1][0], ledger.wire(credited.pop(op[1] % len(credited)))))
                    assert out.reason in ("invalidated", "conflict", "unfounded"), out
                elif kind == "spot":
                    ident, rec = NODES[op[1]]
                    rounds[op[1]] += 1
                    ledger.submit(signed(ident, rec, clock.ms, rounds[op[1]]), receipt(rec, rounds[op[1]]),
                                  recompute=lambda p, pos, ok=op[2]: 3.0 if ok else 9.0)
                elif kind == "wait":
                    clock.t += op[1]
            except LedgerError:
                pass  # a refused operation must leave the ledger consistent too
            s = ledger.supply()
            assert s.consistent, (op, s)
            events = ledger.history(limit=10**9)
            assert s.minted == sum(e["amount"] for e in events if e["kind"] == "reward")
            assert s.burned == sum(e["amount"] for e in events if e["kind"] == "burn") - sum(
                e["amount"] for e in events if e["kind"] == "clawback")
            for acct in ledger.accounts():
                assert acct.balance >= 0 and acct.stake >= 0
        ledger.close()


# ----- crash safety: kill a writer between its writes -------------------------------------------
CHILD = r"""
import os, signal, sys, json
from neuroray.config import PonwConfig
from neuroray.ponw.ledger import Ledger

path, proof_file, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
ledger = Ledger(path, PonwConfig(synchronous="FULL"))

class KillAfterWrites:
    # forwards to the real connection and SIGKILLs this process right after its n-th write statement
    def __init__(self, db, n):
        self.db, self.n, self.writes = db, n, 0
    def execute(self, sql, *args):
        result = self.db.execute(sql, *args)
        if sql.lstrip().split()[0].upper() in ("INSERT", "UPDATE", "DELETE", "COMMIT"):
            self.writes += 1
            if self.writes == self.n:
                os.kill(os.getpid(), signal.SIGKILL)
        return result
    def __getattr__(self, name):
        return getattr(self.db, name)

ledger._db = KillAfterWrites(ledger._db, kill_after)
item = json.loads(open(proof_file).read())
out = ledger.submit(item["proof"].encode(), item["receipt"].encode())
print("credited" if out.accepted else out.reason, flush=True)
"""


def test_a_credited_proof_is_never_lost_or_credited_twice_across_a_kill(tmp_path):
    a, ra = node(0)
    outcomes = {}
    for kill_after in range(1, 8):  # the credit writes 6 statements (the 6th is COMMIT); 7 = not killed
        path = tmp_path / f"l{kill_after}.sqlite"
        setup = Ledger(path, PonwConfig(synchronous="FULL"), model_layers=LAYERS, tokens_per_batch=TPB,
                       coordinator_key=COORD.public_key)
        setup.register(registration([ra]))
        now = setup.now_ms()
        setup.close()
        item = {"proof": signed(a, ra, now, 1).decode(), "receipt": receipt(ra, 1).decode()}
        (tmp_path / "proof.json").write_text(json.dumps(item))
        child = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tmp_path / "proof.json"), str(kill_after)],
                               capture_output=True, text=True, cwd=ROOT, timeout=60)
        killed = child.returncode == -signal.SIGKILL
        assert killed or (child.returncode == 0 and child.stdout.strip() == "credited"), child.stderr
        ledger = Ledger(path, PonwConfig(synchronous="FULL"))
        assert ledger.supply().consistent
        booked = [p for p in ledger.proofs() if p["status"] == "credited"]
        outcomes[kill_after] = bool(booked)
        # the client retries the same bytes: credited now if the kill lost it, a replay if it was booked
        retry = ledger.submit(item["proof"].encode(), item["receipt"].encode())
        assert retry.accepted != bool(booked) and retry.reason in ("ok", "replay")
        assert len([p for p in ledger.proofs() if p["status"] == "credited"]) == 1
        assert ledger.account(ra.node_id).balance == 24_000 and ledger.supply().minted == 24_000
        ledger.close()
    # killed before COMMIT: nothing was booked; killed after COMMIT (or not at all): it was
    assert outcomes == {1: False, 2: False, 3: False, 4: False, 5: False, 6: True, 7: True}


# ----- CLI -------------------------------------------------------------------------------------
@pytest.fixture
def cli_ledger(tmp_path):
    clock = Clock(time.time() - 60)  # the CLI reads the real clock
    path = tmp_path / "ledger.sqlite"
    ledger = make_ledger(path, clock)
    (a, ra), (b, rb) = node(0), node(1)
    ledger.register(registration([ra, rb]))
    clock.t += 60
    out = credit(ledger, clock, a, ra, 1)
    proof_file = tmp_path / "proof.json"
    proof_file.write_bytes(ledger.wire(out.proof_id))
    ledger.close()
    return path, ra.node_id, rb.node_id, proof_file


def run_cli(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_balance_history_stake_unstake(cli_ledger, capsys):
    path, na, nb, _ = cli_ledger
    code, out, _ = run_cli(capsys, "--ledger", str(path), "balance")
    assert code == 0 and na[:16] in out and "0.024000" in out and "consistent" in out
    code, out, _ = run_cli(capsys, "--ledger", str(path), "stake", na[:10], "0.02")
    assert code == 0 and "stake 0.020000" in out
    code, out, _ = run_cli(capsys, "--ledger", str(path), "--json", "unstake", na[:10], "0.005")
    assert code == 0 and json.loads(out)["stake"] == "0.015000"
    code, out, _ = run_cli(capsys, "--ledger", str(path), "history", na[:8])
    assert code == 0 and "reward" in out and "unstake" in out
    code, out, _ = run_cli(capsys, "--ledger", str(path), "history", "--proofs")
    assert code == 0 and "credited" in out


@pytest.mark.parametrize("args, message", [
    (["stake", "NODE", "-1"], "must be positive"),
    (["stake", "NODE", "abc"], "not a number"),
    (["stake", "NODE", "0.0000001"], "6 decimals"),
    (["stake", "NODE", "5"], "has 0.024000 balance"),
    (["unstake", "NODE", "0.1"], "has 0.000000 staked"),
    (["balance", "ffffffff"], "matches 0 nodes"),
    (["balance", "ab"], "too short"),
    (["history", "--limit", "0"], "must be positive"),
    (["verify", "--proof", "/nonexistent/proof"], "cannot read"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_bad_input_is_one_line_and_exit_2(cli_ledger, capsys, args, message):
    path, na, _, _ = cli_ledger
    before = path.read_bytes()
    args = [na[:12] if a == "NODE" else a for a in args]
    code, out, err = run_cli(capsys, "--ledger", str(path), *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("neuroray.ledger: error:")
    assert path.read_bytes() == before


def test_cli_verify_ledger_and_proof(cli_ledger, capsys, tmp_path):
    path, _, _, proof_file = cli_ledger
    code, out, _ = run_cli(capsys, "--ledger", str(path), "verify")
    assert code == 0 and "1 proofs re-verified" in out
    code, out, _ = run_cli(capsys, "--ledger", str(path), "verify", "--proof", str(proof_file))
    assert code == 1 and "replay" in out  # it is already booked
    env = json.loads(proof_file.read_bytes())
    env["payload"]["training_batches"] += 1
    env["payload"]["nonce"] = "ff" * 16  # a fresh nonce, or it is caught as a replay first
    tampered = tmp_path / "tampered.json"
    tampered.write_bytes(canonical_json(env))
    code, out, _ = run_cli(capsys, "--ledger", str(path), "verify", "--proof", str(tampered))
    assert code == 1 and "invalid: signature" in out


def test_cli_missing_ledger_and_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "neuroray.ledger", "--ledger", str(tmp_path / "none.sqlite"), "balance"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "no ledger at" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ----- the named Ray actor ---------------------------------------------------------------------
@pytest.mark.ray
def test_ledger_actor_round_trip(ray_cluster, tmp_path, capsys):
    import torch

    from neuroray.ponw.service import RoundProver, observe_delta, round_receipts, start_ledger_actor

    cfg = PonwConfig(actor_name="test-ledger", synchronous="NORMAL")
    actor = start_ledger_actor(cfg, tmp_path / "ledger.sqlite", LAYERS, TPB, COORD.public_key)
    ids = [identity(), identity()]
    provers = [RoundProver(ids[0], 0, 2, True, False, TPB), RoundProver(ids[1], 2, 4, False, True, TPB)]
    assert ray_cluster.get(actor.register.remote(COORD.sign_registration([p.registration() for p in provers]))) == 2
    thetas, deltas = [torch.randn(8), torch.randn(6)], [torch.randn(8), torch.randn(6)]
    items = []
    for p, theta, delta in zip(provers, thetas, deltas):
        p.start_round(theta, microbatches_done=0, data_position=0, shard_id=0 if p.has_embedding else None)
        p.note_pseudo_gradient(delta)
        proof = p.finish_round(1, theta - delta, microbatches_done=10, theta0_losses=[3.0] * 2)
        rc = round_receipts([p.identity.node_id], 1, 10, [observe_delta(delta)])[0]
        items.append((proof, COORD.sign_receipts([rc])[0]))
    outcomes = ray_cluster.get(actor.submit_round.remote(items))
    assert [o["accepted"] for o in outcomes] == [True, True] and all(o["reward"] == 24_000 for o in outcomes)
    same = ray_cluster.get_actor("test-ledger")
    summary = ray_cluster.get(same.summary.remote())
    assert summary["supply_consistent"] and summary["proofs_credited"] == 2 and summary["minted_neuro"] == 0.048
    assert ray_cluster.get(same.balances.remote())[ids[0].node_id]["balance"] == 24_000
    with pytest.raises(LedgerError, match="already runs on"):  # a second run must pick its own name
        start_ledger_actor(cfg, tmp_path / "other.sqlite", LAYERS, TPB, COORD.public_key)
    ray_cluster.kill(actor)  # as a run ends: killed, never closed
    # the .sqlite alone is the ledger: copy it without its -wal/-shm and audit the copy
    alone = tmp_path / "copy" / "ledger.sqlite"
    alone.parent.mkdir()
    shutil.copyfile(tmp_path / "ledger.sqlite", alone)
    assert cli.main(["--ledger", str(alone), "verify"]) == 0
    assert "2 proofs re-verified" in capsys.readouterr().out
    with pytest.raises(LedgerError, match="could not start"):
        start_ledger_actor(cfg, tmp_path / "ledger.sqlite", LAYERS + 1, TPB, COORD.public_key)  # another model


def test_a_grown_model_takes_proofs_of_its_grown_ranges(tmp_path):
    """A live upgrade deepens the model 4 -> 8 layers: the ledger learns the new count with the holders'
    grown ranges, then credits their proofs; the count is stored, and a model never shrinks."""
    from dataclasses import replace

    from neuroray.ponw.verifier import RegistrationError

    clock, path = Clock(), tmp_path / "ledger.sqlite"
    ledger = make_ledger(path, clock)
    (a, ra), (b, rb) = node(0), node(1)
    ledger.register(registration([ra, rb]))
    grown_a, grown_b = replace(ra, layer_end=4), replace(rb, layer_start=4, layer_end=8)
    with pytest.raises(RegistrationError, match="4 layers"):
        ledger.register(registration([grown_b]))  # the ledger's model has 4 layers until it is told it grew
    clock.t += 60
    ledger.grow_model(registration([grown_a, grown_b], model_layers=2 * LAYERS))
    assert credit(ledger, clock, b, grown_b, 1).accepted and credit(ledger, clock, a, grown_a, 1).accepted
    with pytest.raises(LedgerError, match="only grows"):
        ledger.grow_model(registration([], model_layers=LAYERS))
    ledger.close()
    reopened = Ledger(path, PonwConfig(synchronous="OFF"), model_layers=2 * LAYERS, tokens_per_batch=TPB, clock=clock)
    assert reopened.model_layers == 2 * LAYERS
    reopened.close()
