"""The ledger's SQLite schema, its hot-path query, and the values it returns (split from ledger.py)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from neuroray.errors import NeurorayError

log = logging.getLogger("neuroray.ponw")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, public_key BLOB NOT NULL, layer_start INTEGER NOT NULL,
    layer_end INTEGER NOT NULL, has_embedding INTEGER NOT NULL, has_lm_head INTEGER NOT NULL,
    max_batches_per_s REAL NOT NULL, registered_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    node_id TEXT PRIMARY KEY REFERENCES nodes(node_id),
    balance INTEGER NOT NULL CHECK (balance >= 0), stake INTEGER NOT NULL CHECK (stake >= 0),
    last_credit_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS proofs (
    seq INTEGER PRIMARY KEY, proof_id TEXT NOT NULL UNIQUE, node_id TEXT NOT NULL, nonce TEXT NOT NULL,
    proof_type TEXT NOT NULL,
    outer_round INTEGER NOT NULL, timestamp_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('credited', 'rejected', 'invalidated')),
    reason TEXT NOT NULL, reward INTEGER NOT NULL, slashed INTEGER NOT NULL, wire BLOB NOT NULL,
    UNIQUE (node_id, nonce));
CREATE INDEX IF NOT EXISTS proofs_by_time ON proofs (node_id, received_ms);
CREATE UNIQUE INDEX IF NOT EXISTS proofs_one_per_round ON proofs (node_id, proof_type, outer_round)
    WHERE status != 'rejected';
CREATE TABLE IF NOT EXISTS daily (
    node_id TEXT NOT NULL, day INTEGER NOT NULL, earned INTEGER NOT NULL,
    PRIMARY KEY (node_id, day)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS supply (
    id INTEGER PRIMARY KEY CHECK (id = 1), minted INTEGER NOT NULL, burned INTEGER NOT NULL);
INSERT OR IGNORE INTO supply VALUES (1, 0, 0);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, node_id TEXT NOT NULL,
    kind TEXT NOT NULL, amount INTEGER NOT NULL, proof_id TEXT NOT NULL, note TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_node ON events (node_id, seq);
CREATE TABLE IF NOT EXISTS escrow (
    proof_id TEXT PRIMARY KEY REFERENCES proofs(proof_id), node_id TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount >= 0), outer_round INTEGER NOT NULL, booked_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS validators (node_id TEXT PRIMARY KEY REFERENCES nodes(node_id));
CREATE TABLE IF NOT EXISTS authorizations (
    auth_id TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('registration', 'evidence')),
    signer TEXT NOT NULL, received_ms INTEGER NOT NULL, wire BLOB NOT NULL);
"""


# The replay key (proof id or node+nonce), the rate-limit window count, the one-credit-per-round rule,
# the account and today's earnings: one statement instead of six.
FACTS_SQL = """
SELECT EXISTS (SELECT 1 FROM proofs WHERE proof_id = :pid)
           OR EXISTS (SELECT 1 FROM proofs WHERE node_id = :node AND nonce = :nonce),
       (SELECT COUNT(*) FROM proofs WHERE node_id = :node AND received_ms > :since),
       EXISTS (SELECT 1 FROM proofs WHERE node_id = :node AND proof_type = :ptype AND outer_round = :rnd
               AND status != 'rejected'),
       a.last_credit_ms, a.balance, a.stake,
       COALESCE((SELECT earned FROM daily WHERE node_id = :node AND day = :day), 0)
FROM accounts AS a WHERE a.node_id = :node
"""


class LedgerError(NeurorayError, ValueError):
    """A ledger operation that cannot be done (unknown node, bad amount, not enough stake...)."""


@dataclass
class Outcome:
    """What happened to one submitted proof. Amounts in micro-NEURO."""

    proof_id: str  # "" when the bytes did not parse
    node_id: str
    accepted: bool
    reason: str  # "ok" or the failed check (see verifier.py)
    detail: str = ""
    reward: int = 0
    slashed: int = 0
    escrowed: int = 0  # held by the ledger until a settlement (neuroray/ponw/escrow.py), not yet minted

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Account:
    node_id: str
    balance: int
    stake: int


@dataclass(frozen=True)
class Supply:
    minted: int
    burned: int
    held: int  # sum of balances and stakes

    @property
    def total(self) -> int:
        return self.minted - self.burned

    @property
    def consistent(self) -> bool:
        return self.total == self.held


def refused(what: str, out: Outcome, by: str = "") -> Outcome:
    """Log a refusal, attributed to the node it names (and the validator who filed it), and return it."""
    filed = f" filed by {by[:12]}…" if by else ""
    log.warning("ledger: refused %s %s… of node %s…%s: %s: %s", what, out.proof_id[:12] or "(unparsed)",
                out.node_id[:12] or "(unknown)", filed, out.reason, out.detail)
    return out
