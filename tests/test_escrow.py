"""Escrow (neuroray/ponw/escrow.py): a reward held until the coordinator's settlement pays it or not.

Real SQLite ledgers and real secp256k1 signatures, as in tests/test_ponw_authority.py.
"""

import json

import pytest

from neuroray.cli import ledger as cli
from neuroray.ponw.authority import AuthorityError, Coordinator
from neuroray.ponw.escrow import sign_settlement
from tests._ponw import COORD, Clock, evidence, identity, make_ledger, node, receipt, registration, signed


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    ledger = make_ledger(tmp_path / "ledger.sqlite", clock)
    (a, ra), (b, rb), (v, rv) = node(0), node(0), node(1)
    ledger.register(registration([ra, rb, rv], validators=[rv.node_id]))
    clock.t += 60
    yield ledger, clock, (a, ra), (b, rb), (v, rv)
    ledger.close()


def test_an_escrowed_reward_is_not_minted_until_released_and_then_credited_once(env):
    ledger, clock, (a, ra), _, _ = env
    out = ledger.submit(signed(a, ra, clock.ms, 1), receipt(ra, 1, escrow=True))
    assert (out.accepted, out.reward, out.escrowed) == (True, 0, 24_000)
    assert ledger.account(ra.node_id).balance == 0 and ledger.supply().minted == 0 and ledger.supply().consistent
    assert [e["proof_id"] for e in ledger.escrowed()] == [out.proof_id]
    settlement = sign_settlement(COORD, release=[out.proof_id])
    done = ledger.settle_escrow(settlement)
    assert (done["released"], done["released_amount"], done["unknown"]) == (1, 24_000, 0)
    assert ledger.account(ra.node_id).balance == 24_000 and ledger.supply().minted == 24_000
    assert ledger.supply().consistent and ledger.escrowed() == []
    assert ledger.proofs(ra.node_id)[0]["reward"] == 24_000
    again = ledger.settle_escrow(settlement)  # the same settlement again: nothing left to pay
    assert (again["released"], again["unknown"]) == (0, 1) and ledger.account(ra.node_id).balance == 24_000


def test_a_forfeited_reward_is_never_minted_and_cannot_be_released_after(env):
    ledger, clock, (a, ra), (b, rb), _ = env
    held = ledger.submit(signed(a, ra, clock.ms, 1), receipt(ra, 1, escrow=True))
    paid = ledger.submit(signed(b, rb, clock.ms, 1), receipt(rb, 1))  # the same work, not held
    assert paid.reward == 24_000
    done = ledger.settle_escrow(sign_settlement(COORD, forfeit=[held.proof_id]))
    assert (done["forfeited"], done["forfeited_amount"]) == (1, 24_000)
    assert ledger.settle_escrow(sign_settlement(COORD, release=[held.proof_id]))["unknown"] == 1
    assert ledger.account(ra.node_id).balance == 0 and ledger.supply().minted == 24_000
    assert ledger.supply().consistent


def test_only_the_coordinator_settles_and_a_bad_settlement_changes_nothing(env):
    ledger, clock, (a, ra), (b, rb), _ = env
    held = ledger.submit(signed(a, ra, clock.ms, 1), receipt(ra, 1, escrow=True))
    for bad, code in [
        (sign_settlement(Coordinator(a), release=[held.proof_id]), "settlement_signature"),  # the holder itself
        (sign_settlement(Coordinator(identity()), [held.proof_id]), "settlement_signature"),  # a stranger
        (b"", "settlement"),
        (b'{"payload":{},"signature":"00"}', "settlement"),
        (sign_settlement(COORD, release=["not a proof id"]), "settlement"),
        (sign_settlement(COORD, release=[held.proof_id], forfeit=[held.proof_id]), "settlement"),
    ]:
        with pytest.raises(AuthorityError) as err:
            ledger.settle_escrow(bad)
        assert err.value.code == code, (code, err.value)
    assert [e["proof_id"] for e in ledger.escrowed()] == [held.proof_id]
    assert ledger.account(ra.node_id).balance == 0 and ledger.supply().minted == 0


def test_a_proof_invalidated_in_escrow_is_never_paid(env):
    ledger, clock, (a, ra), _, (v, _) = env
    held = ledger.submit(signed(a, ra, clock.ms, 1), receipt(ra, 1, escrow=True))
    out = ledger.invalidate(evidence(v, ledger.wire(held.proof_id), recomputed=9.0))
    assert out.reason == "invalidated" and ledger.escrowed() == []
    assert ledger.settle_escrow(sign_settlement(COORD, release=[held.proof_id]))["unknown"] == 1
    assert ledger.account(ra.node_id).balance == 0 and ledger.supply().consistent


def test_a_released_reward_keeps_to_the_daily_cap(tmp_path):
    clock = Clock()
    ledger = make_ledger(tmp_path / "ledger.sqlite", clock, max_reward_per_day=0.03)  # 30_000 micro-NEURO
    (a, ra) = node(0)
    ledger.register(registration([ra]))
    clock.t += 60
    held = ledger.submit(signed(a, ra, clock.ms, 1), receipt(ra, 1, escrow=True))
    clock.t += 60
    assert ledger.submit(signed(a, ra, clock.ms, 2), receipt(ra, 2)).reward == 24_000
    done = ledger.settle_escrow(sign_settlement(COORD, release=[held.proof_id]))
    assert done["released_amount"] == 6_000 and ledger.account(ra.node_id).balance == 30_000
    assert ledger.supply().consistent
    ledger.close()


def test_the_ledger_cli_shows_pay_in_escrow_apart_from_the_balance(env, capsys):
    ledger, clock, (a, ra), _, _ = env
    ledger.submit(signed(a, ra, clock.ms, 1), receipt(ra, 1, escrow=True))
    ledger.checkpoint()
    assert cli.main(["--ledger", str(ledger.path), "--json", "balance", ra.node_id[:12]]) == 0
    (acct,) = json.loads(capsys.readouterr().out)["accounts"]
    assert (acct["balance"], acct["escrow"]) == ("0.000000", "0.024000")
