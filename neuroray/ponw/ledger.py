"""The NEURO ledger: balances, stakes, slashes and proof history in SQLite (WAL mode).

Every change is one SQLite transaction (``BEGIN IMMEDIATE ... COMMIT``): a proof's row, the reward
it earns, the supply counter and the history event are written together or not at all. A process
killed anywhere in between leaves the previous state; the proof is then simply not credited yet, and
resubmitting it credits it once. A credited proof's id is in ``proofs``, so resubmitting it after a
commit is a replay. Hence: never lost, never credited twice.

Invariant (checked by :meth:`Ledger.supply` and the property tests after every transaction)::

    minted - burned == sum(balance) + sum(stake)

Money is integer micro-NEURO (see :mod:`neuroray.ponw.rules`).
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable

from neuroray.config import PonwConfig
from neuroray.errors import NeurorayError
from neuroray.ponw import crypto
from neuroray.ponw.proof import Proof
from neuroray.ponw.rules import Rules, format_units
from neuroray.ponw.verifier import (
    HOUR_MS, NodeFacts, NodeRecord, Receipt, RegistrationError, Verdict, Verifier, spot_check,
)

SCHEMA_VERSION = 1
DAY_MS = 86_400_000

_SCHEMA = """
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
"""


# The replay key (proof id or node+nonce), the rate-limit window count, the one-credit-per-round rule,
# the account and today's earnings: one statement instead of six.
_FACTS_SQL = """
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


class Ledger:
    """One SQLite ledger file. Not thread-safe: one owner (the ledger actor, or one CLI call) at a time.

    ``model_layers`` and ``tokens_per_batch`` are fixed when the file is created and checked on reopen;
    the CLI reopens without them. ``clock`` returns seconds (injectable for tests).
    """

    def __init__(self, path: str | Path, cfg: PonwConfig | None = None, *, model_layers: int | None = None,
                 tokens_per_batch: int | None = None, clock: Callable[[], float] = time.time,
                 create: bool = True):
        self.path = Path(path).expanduser()
        if not create and not self.path.is_file():
            raise LedgerError(f"no ledger at {self.path}; pass --ledger PATH of a run's ledger.sqlite")
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # autocommit mode: transactions are explicit (BEGIN IMMEDIATE) so none is ever implicit
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            # up to 64 MiB of pages in memory (the default is 2 MiB): the replay and rate-limit indexes of
            # a busy ledger are read on every proof, and re-reading them from the OS costs more than the SQL
            self._db.execute("PRAGMA cache_size=-65536")
            if not create and self._one("SELECT 1 FROM sqlite_master WHERE name = 'meta'") is None:
                self._db.close()
                raise LedgerError(f"{self.path} is not a neuroray ledger (no meta table); pass --ledger PATH "
                                  "of a run's ledger.sqlite")
            with self._tx():  # statement by statement: executescript() would commit on its own
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(stmt)
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path} is not a usable SQLite ledger ({exc}); move it away or pick "
                              "another ponw.ledger_path") from None
        self._explicit_cfg = cfg is not None
        self.cfg = cfg or self._stored_config()  # the CLI reuses the rules the run wrote
        self.rules = Rules.from_config(self.cfg)
        self._db.execute(f"PRAGMA synchronous={self.cfg.synchronous.upper()}")
        self.model_layers, self.tokens_per_batch = self._model_facts(model_layers, tokens_per_batch)
        self.backend = crypto.backend(self.cfg.backend)
        self.verifier = Verifier(self.rules, self.backend, self.model_layers, self.tokens_per_batch)
        self._nodes: dict[str, tuple[NodeRecord, object]] = {}
        for row in self._db.execute("SELECT node_id, public_key, layer_start, layer_end, has_embedding, "
                                    "has_lm_head, max_batches_per_s FROM nodes"):
            rec = NodeRecord(row[0], bytes(row[1]), row[2], row[3], bool(row[4]), bool(row[5]), row[6])
            self._nodes[rec.node_id] = (rec, self.backend.load_public_key(rec.public_key))

    # ----- plumbing -------------------------------------------------------------------------
    @contextmanager
    def _tx(self):
        self._db.execute("BEGIN IMMEDIATE")  # take the write lock now: no lock upgrade deadlocks
        self._mint_pending = self._burn_pending = 0
        try:
            yield
            if self._mint_pending or self._burn_pending:
                # the supply row changes once per transaction, not once per proof (hot path)
                self._db.execute("UPDATE supply SET minted = minted + ?, burned = burned + ? WHERE id = 1",
                                 (self._mint_pending, self._burn_pending))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _one(self, sql: str, args=()):
        return self._db.execute(sql, args).fetchone()

    def _stored_config(self) -> PonwConfig:
        row = self._one("SELECT value FROM meta WHERE key = 'config'")
        if row is None:
            return PonwConfig()
        known = {f.name for f in fields(PonwConfig)}
        return PonwConfig(**{k: v for k, v in json.loads(row[0]).items() if k in known})

    def _model_facts(self, model_layers, tokens_per_batch) -> tuple[int, int]:
        stored = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if "schema_version" in stored:
            if int(stored["schema_version"]) != SCHEMA_VERSION:
                raise LedgerError(f"{self.path} has ledger schema {stored['schema_version']}, this code reads "
                                  f"{SCHEMA_VERSION}")
            facts = int(stored["model_layers"]), int(stored["tokens_per_batch"])
            given = (model_layers or facts[0], tokens_per_batch or facts[1])
            if given != facts:
                raise LedgerError(f"{self.path} belongs to a model with {facts[0]} layers and {facts[1]} tokens "
                                  f"per batch, not {given[0]} and {given[1]}; use a fresh ponw.ledger_path")
            if self._explicit_cfg:  # later runs may change the rules: the CLI should read the latest
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'config'",
                                 (json.dumps(asdict(self.cfg), sort_keys=True),))
            return facts
        if not (model_layers and tokens_per_batch and model_layers > 0 and tokens_per_batch > 0):
            raise LedgerError(f"a new ledger at {self.path} needs positive model_layers and tokens_per_batch")
        with self._tx():
            for key, value in (("schema_version", SCHEMA_VERSION), ("model_layers", model_layers),
                               ("tokens_per_batch", tokens_per_batch),
                               ("config", json.dumps(asdict(self.cfg), sort_keys=True))):
                self._db.execute("INSERT INTO meta VALUES (?, ?)", (key, str(value)))
        return model_layers, tokens_per_batch

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the main file and truncate it, so that ``ledger.sqlite`` alone
        holds every committed proof: the run's ledger actor is killed, not closed, and a copied or
        archived .sqlite without its -wal would otherwise be an empty ledger."""
        busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:  # another connection (a `neuroray.ledger` CLI call) is reading: the next checkpoint catches up
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        self.checkpoint()
        self._db.close()

    def _event(self, now: int, node_id: str, kind: str, amount: int, proof_id: str = "", note: str = "") -> None:
        self._db.execute("INSERT INTO events (ts_ms, node_id, kind, amount, proof_id, note) VALUES (?, ?, ?, ?, ?, ?)",
                         (now, node_id, kind, amount, proof_id, note))

    def _account(self, node_id: str) -> Account:
        row = self._one("SELECT balance, stake FROM accounts WHERE node_id = ?", (node_id,))
        if row is None:
            raise LedgerError(f"unknown node {node_id[:16]}…; `python -m neuroray.ledger balance` lists the nodes")
        return Account(node_id, row[0], row[1])

    # ----- ProofState (read by the verifier inside the submitting transaction) --------------
    def node(self, node_id: str):
        return self._nodes.get(node_id)

    def facts(self, p: Proof, now_ms: int) -> NodeFacts:
        """Everything the checks and the booking need to know about ``p``'s node, in ONE query (hot path)."""
        row = self._one(_FACTS_SQL, {"pid": p.proof_id, "node": p.node_id, "nonce": p.nonce,
                                     "since": now_ms - HOUR_MS, "ptype": p.proof_type, "rnd": p.outer_round,
                                     "day": now_ms // DAY_MS})
        assert row is not None, "a registered node always has an account"
        return NodeFacts(bool(row[0]), row[1], bool(row[2]), row[3], row[4], row[5], row[6])

    # ----- nodes ----------------------------------------------------------------------------
    def grow_model(self, model_layers: int, records: Iterable[NodeRecord | dict]) -> None:
        """The model grew to ``model_layers`` layers (a live upgrade, neuroray.planner.upgrade): store the
        new count and register the holders' grown ranges, checked against it, so their proofs verify."""
        if model_layers < self.model_layers:
            raise LedgerError(f"a model only grows: {self.model_layers} -> {model_layers} layers")
        old = self.model_layers
        self.model_layers = self.verifier.model_layers = model_layers
        try:
            self.register(records)
        except BaseException:
            self.model_layers = self.verifier.model_layers = old
            raise
        with self._tx():
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'model_layers'", (str(model_layers),))

    def register(self, records: Iterable[NodeRecord | dict]) -> None:
        """Register (or update the planner's assignment of) nodes; one transaction for all."""
        recs = [r if isinstance(r, NodeRecord) else NodeRecord.from_dict(r) for r in records]
        keys = {}
        for rec in recs:
            if not (isinstance(rec.public_key, bytes) and isinstance(rec.node_id, str)):
                raise RegistrationError("a registration needs node_id as hex text and public_key as bytes")
            rec.check(self.model_layers)
            try:
                keys[rec.node_id] = self.backend.load_public_key(rec.public_key)
            except ValueError as exc:
                raise RegistrationError(f"node {rec.node_id[:12]}…: {exc}") from None
        now = self.now_ms()
        with self._tx():
            for rec in recs:
                self._db.execute(
                    "INSERT INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET "
                    "layer_start = excluded.layer_start, layer_end = excluded.layer_end, "
                    "has_embedding = excluded.has_embedding, has_lm_head = excluded.has_lm_head, "
                    "max_batches_per_s = excluded.max_batches_per_s",
                    (rec.node_id, rec.public_key, rec.layer_start, rec.layer_end, int(rec.has_embedding),
                     int(rec.has_lm_head), float(rec.max_batches_per_s), now))
                self._db.execute("INSERT OR IGNORE INTO accounts VALUES (?, 0, 0, ?)", (rec.node_id, now))
        for rec in recs:  # only after the commit: a rolled-back registration leaves no trace
            self._nodes[rec.node_id] = (rec, keys[rec.node_id])

    def nodes(self) -> list[NodeRecord]:
        return [rec for rec, _ in self._nodes.values()]

    # ----- proofs ---------------------------------------------------------------------------
    def submit(self, data: bytes, receipt: Receipt | dict | None = None, *,
               recompute: Callable[[Proof, int], float] | None = None, reporter: str | None = None,
               rng: random.Random | None = None) -> Outcome:
        """Verify one proof and book it in its own transaction. See :meth:`submit_many`."""
        return self.submit_many([(data, receipt)], recompute=recompute, reporter=reporter, rng=rng)[0]

    def submit_many(self, items: Iterable[tuple[bytes, Receipt | dict | None]], *,
                    recompute: Callable[[Proof, int], float] | None = None, reporter: str | None = None,
                    rng: random.Random | None = None) -> list[Outcome]:
        """Verify and book proofs in ONE transaction (a group commit: one fsync for the batch).

        ``recompute``, when given, spot-checks every accepted Driver training proof (see
        :func:`verifier.spot_check`); a mismatch rejects the proof and slashes the node, paying part
        of the slash to ``reporter`` (the validator's node id). Rejections are results, not
        exceptions; an exception means nothing of the batch was written.
        """
        items = [(d, Receipt.coerce(r)) for d, r in items]  # a bad receipt aborts before anything is written
        if reporter is not None and reporter not in self._nodes:
            raise LedgerError(f"reporter {reporter[:16]}… is not a registered node")
        now = self.now_ms()
        with self._tx():
            return [self._book(data, receipt, now, recompute, reporter, rng) for data, receipt in items]

    def _book(self, data: bytes, receipt, now: int, recompute, reporter, rng) -> Outcome:
        v: Verdict = self.verifier.verify(data, self, now, receipt)
        if v.accepted and recompute is not None:
            check = spot_check(v.proof, recompute, self.rules.spot_check_tolerance, rng)
            if check is not None and not check.ok:
                v = Verdict(False, "spot_check", f"spot check failed: {check.detail}", v.signed, True, slash=True)
        p = v.proof
        out = Outcome(p.proof_id if p else "", p.node_id if p else "", v.accepted, v.reason, v.detail)
        if not v.authentic:
            return out  # unauthenticated: nothing is written (the ledger is unchanged)
        if v.accepted:
            out.reward = self._reward(p, v.facts, v.useful, now)
        self._db.execute("INSERT INTO proofs VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (p.proof_id, p.node_id, p.nonce, p.proof_type, p.outer_round, p.timestamp_ms, now,
                          "credited" if v.accepted else "rejected", v.reason, out.reward, 0, data))
        if v.slash:
            out.slashed = self._slash(p.node_id, reporter, p.proof_id, v.reason, now)
            self._db.execute("UPDATE proofs SET slashed = ? WHERE proof_id = ?", (out.slashed, p.proof_id))
        return out

    def _reward(self, p: Proof, facts: NodeFacts, useful: bool, now: int) -> int:
        base = self.rules.base_reward(p.proof_type, p.training_batches, p.tokens_processed, p.layers_held,
                                      p.has_embedding, p.has_lm_head, facts.stake) if useful else 0
        reward = self.rules.capped(base, facts.earned_today)
        self._db.execute("UPDATE accounts SET balance = balance + ?, last_credit_ms = ? WHERE node_id = ?",
                         (reward, now, p.node_id))
        if reward:
            self._db.execute("INSERT INTO daily VALUES (?, ?, ?) ON CONFLICT (node_id, day) DO UPDATE "
                             "SET earned = earned + excluded.earned", (p.node_id, now // DAY_MS, reward))
            self._mint_pending += reward
            self._event(now, p.node_id, "reward", reward, p.proof_id, p.proof_type)
        return reward

    def _slash(self, node_id: str, reporter: str | None, proof_id: str, why: str, now: int) -> int:
        acct = self._account(node_id)
        has_reporter = reporter is not None and reporter != node_id
        from_stake, from_balance, burned, fee = self.rules.slash_split(acct.stake, acct.balance, has_reporter)
        amount = from_stake + from_balance
        if not amount:
            return 0
        self._db.execute("UPDATE accounts SET stake = stake - ?, balance = balance - ? WHERE node_id = ?",
                         (from_stake, from_balance, node_id))
        self._burn_pending += burned
        self._event(now, node_id, "slash", -amount, proof_id, f"{why}: {from_stake} from stake, {from_balance} from balance")
        self._event(now, node_id, "burn", burned, proof_id, "share of the slash burned")
        if fee:
            self._db.execute("UPDATE accounts SET balance = balance + ? WHERE node_id = ?", (fee, reporter))
            self._event(now, reporter, "fee", fee, proof_id, f"reported {node_id[:12]}…")
        return amount

    def invalidate(self, proof_id: str, reason: str, reporter: str | None = None) -> Outcome:
        """A credited proof found false later (e.g. a failed spot check): take back its reward and slash.

        The reward is clawed back from balance, then stake (as much as is there) and burned.
        """
        if reporter is not None and reporter not in self._nodes:
            raise LedgerError(f"reporter {reporter[:16]}… is not a registered node")
        now = self.now_ms()
        with self._tx():
            row = self._one("SELECT node_id, status, reward FROM proofs WHERE proof_id = ?", (proof_id,))
            if row is None:
                raise LedgerError(f"no proof {proof_id[:16]}… in this ledger")
            node_id, status, reward = row
            if status != "credited":
                raise LedgerError(f"proof {proof_id[:16]}… is {status}, only a credited proof can be invalidated")
            acct = self._account(node_id)
            from_balance = min(reward, acct.balance)
            from_stake = min(reward - from_balance, acct.stake)
            clawed = from_balance + from_stake
            self._db.execute("UPDATE accounts SET balance = balance - ?, stake = stake - ? WHERE node_id = ?",
                             (from_balance, from_stake, node_id))
            self._burn_pending += clawed
            self._event(now, node_id, "clawback", -clawed, proof_id, reason)
            slashed = self._slash(node_id, reporter, proof_id, reason, now)
            self._db.execute("UPDATE proofs SET status = 'invalidated', reason = ?, slashed = ? WHERE proof_id = ?",
                             (reason, slashed, proof_id))
        return Outcome(proof_id, node_id, False, "invalidated", reason, -clawed, slashed)

    # ----- stake ----------------------------------------------------------------------------
    def stake(self, node_id: str, amount: int) -> Account:
        """Move ``amount`` micro-NEURO from balance to stake."""
        return self._move(node_id, amount, "stake")

    def unstake(self, node_id: str, amount: int) -> Account:
        """Move ``amount`` micro-NEURO from stake back to balance."""
        return self._move(node_id, amount, "unstake")

    def _move(self, node_id: str, amount: int, kind: str) -> Account:
        if type(amount) is not int or amount <= 0:
            raise LedgerError(f"{kind} amount must be a positive number of micro-NEURO, got {amount!r}")
        now = self.now_ms()
        with self._tx():
            acct = self._account(node_id)
            have = acct.balance if kind == "stake" else acct.stake
            if amount > have:
                what = "balance" if kind == "stake" else "staked"
                raise LedgerError(f"cannot {kind} {format_units(amount)} NEURO: node {node_id[:12]}… has "
                                  f"{format_units(have)} {what}")
            sign = 1 if kind == "stake" else -1
            self._db.execute("UPDATE accounts SET balance = balance - ?, stake = stake + ? WHERE node_id = ?",
                             (sign * amount, sign * amount, node_id))
            self._event(now, node_id, kind, amount)
            return self._account(node_id)

    # ----- reading --------------------------------------------------------------------------
    def account(self, node_id: str) -> Account:
        return self._account(node_id)

    def accounts(self) -> list[Account]:
        return [Account(*r) for r in self._db.execute("SELECT node_id, balance, stake FROM accounts ORDER BY node_id")]

    def supply(self) -> Supply:
        minted, burned = self._one("SELECT minted, burned FROM supply WHERE id = 1")
        held = self._one("SELECT COALESCE(SUM(balance), 0) + COALESCE(SUM(stake), 0) FROM accounts")[0]
        return Supply(minted, burned, held)

    def history(self, node_id: str | None = None, limit: int = 50) -> list[dict]:
        """Newest events first (rewards, stakes, slashes, burns, fees, clawbacks)."""
        sql = "SELECT seq, ts_ms, node_id, kind, amount, proof_id, note FROM events"
        args: tuple = ()
        if node_id:
            sql, args = sql + " WHERE node_id = ?", (node_id,)
        rows = self._db.execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        keys = ("seq", "ts_ms", "node_id", "kind", "amount", "proof_id", "note")
        return [dict(zip(keys, r)) for r in rows]

    def proofs(self, node_id: str | None = None, limit: int = 50) -> list[dict]:
        sql = "SELECT proof_id, node_id, proof_type, outer_round, received_ms, status, reason, reward, slashed FROM proofs"
        args: tuple = ()
        if node_id:
            sql, args = sql + " WHERE node_id = ?", (node_id,)
        rows = self._db.execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        keys = ("proof_id", "node_id", "proof_type", "outer_round", "received_ms", "status", "reason", "reward", "slashed")
        return [dict(zip(keys, r)) for r in rows]

    def wire(self, proof_id: str) -> bytes:
        row = self._one("SELECT wire FROM proofs WHERE proof_id = ?", (proof_id,))
        if row is None:
            raise LedgerError(f"no proof {proof_id[:16]}… in this ledger")
        return bytes(row[0])

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT status, COUNT(*) FROM proofs GROUP BY status").fetchall())

    def resolve(self, prefix: str) -> str:
        """A node id from a unique prefix (at least 6 hex digits); LedgerError otherwise."""
        prefix = prefix.strip().lower()
        if len(prefix) < 6:
            raise LedgerError(f"node id {prefix!r} is too short: give at least 6 hex digits")
        hits = [n for n in self._nodes if n.startswith(prefix)]
        if len(hits) != 1:
            raise LedgerError(f"node id prefix {prefix!r} matches {len(hits)} nodes; give more digits")
        return hits[0]
