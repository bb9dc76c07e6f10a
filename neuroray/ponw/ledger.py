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
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable, Iterable

from neuroray.config import PonwConfig
from neuroray.ponw import crypto
from neuroray.ponw.authority import Authority, AuthorityError, evidence_problem
from neuroray.ponw.identity import node_id_of
from neuroray.ponw.proof import Proof, ProofError, SignedProof
from neuroray.ponw.rules import BP, Rules, format_units
from neuroray.ponw.records import FACTS_SQL, SCHEMA, Account, LedgerError, Outcome, Supply, log, refused
from neuroray.ponw.verifier import (
    HOUR_MS, NodeFacts, NodeRecord, Receipt, RegistrationError, Verdict, Verifier, spot_check,
)

SCHEMA_VERSION = 1
DAY_MS = 86_400_000



class Ledger:
    """One SQLite ledger file. Not thread-safe: one owner (the ledger actor, or one CLI call) at a time.

    ``model_layers`` and ``tokens_per_batch`` are fixed when the file is created and checked on reopen;
    the CLI reopens without them. ``clock`` returns seconds (injectable for tests).

    ``coordinator_key`` (compressed secp256k1 public key) is stored when the file is created and checked
    on reopen: only that key signs receipts and registrations (authority.py). A ledger without one can
    be read and audited, but registers nothing, credits no receipt and takes no evidence.
    """

    def __init__(self, path: str | Path, cfg: PonwConfig | None = None, *, model_layers: int | None = None,
                 tokens_per_batch: int | None = None, clock: Callable[[], float] = time.time,
                 create: bool = True, coordinator_key: bytes | None = None):
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
                for stmt in filter(str.strip, SCHEMA.split(";")):
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
        self.authority = self._coordinator(coordinator_key)
        self._nodes: dict[str, tuple[NodeRecord, object]] = {}
        for row in self._db.execute("SELECT node_id, public_key, layer_start, layer_end, has_embedding, "
                                    "has_lm_head, max_batches_per_s FROM nodes"):
            rec = NodeRecord(row[0], bytes(row[1]), row[2], row[3], bool(row[4]), bool(row[5]), row[6])
            self._nodes[rec.node_id] = (rec, self.backend.load_public_key(rec.public_key))
        self._validators = {r[0] for r in self._db.execute("SELECT node_id FROM validators")}

    def _coordinator(self, key: bytes | None) -> Authority | None:
        """The coordinator's authority: stored at creation, the same key required on every reopen."""
        row = self._one("SELECT value FROM meta WHERE key = 'coordinator_public_key'")
        stored = bytes.fromhex(row[0]) if row else None
        if key is not None and stored is not None and bytes(key) != stored:
            raise LedgerError(f"{self.path} belongs to coordinator {node_id_of(stored)[:12]}…, not "
                              f"{node_id_of(bytes(key))[:12]}…; start the run with that ledger's coordinator key "
                              "(ponw.coordinator_key) or use a fresh ponw.ledger_path")
        if key is not None and stored is None:
            # a new ledger (or one from before coordinator keys): whoever creates it names its authority
            authority = Authority(bytes(key), self.backend)
            with self._tx():
                self._db.execute("INSERT INTO meta VALUES ('coordinator_public_key', ?)", (bytes(key).hex(),))
            return authority
        return None if stored is None else Authority(stored, self.backend)

    def _need_authority(self, what: str) -> Authority:
        if self.authority is None:
            raise LedgerError(f"{self.path} has no coordinator key, so it cannot {what}; open it with the run's "
                              "coordinator key (start_ledger_actor(..., coordinator_public_key))")
        return self.authority

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
        row = self._one(FACTS_SQL, {"pid": p.proof_id, "node": p.node_id, "nonce": p.nonce,
                                     "since": now_ms - HOUR_MS, "ptype": p.proof_type, "rnd": p.outer_round,
                                     "day": now_ms // DAY_MS})
        assert row is not None, "a registered node always has an account"
        return NodeFacts(bool(row[0]), row[1], bool(row[2]), row[3], row[4], row[5], row[6])

    # ----- nodes ----------------------------------------------------------------------------
    def grow_model(self, signed: bytes) -> int:
        """A live upgrade (neuroray.planner.upgrade): a coordinator-signed registration of the holders'
        grown ranges that names the new ``model_layers``. Same as :meth:`register`."""
        return self.register(signed)

    def _grow(self, model_layers: int, reg) -> None:
        """Store the grown layer count and register the grown ranges, checked against it."""
        if model_layers < self.model_layers:
            raise LedgerError(f"a model only grows: {self.model_layers} -> {model_layers} layers")
        old = self.model_layers
        self.model_layers = self.verifier.model_layers = model_layers
        try:
            self._register(reg)
        except BaseException:
            self.model_layers = self.verifier.model_layers = old
            raise
        with self._tx():
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'model_layers'", (str(model_layers),))

    def register(self, signed: bytes) -> int:
        """Register (or update the planner's assignment of) nodes, authorized by the coordinator's signature
        (:meth:`Coordinator.sign_registration`); one transaction for all. A registration that names a larger
        ``model_layers`` also records that the model grew (a live upgrade). Returns the number of nodes."""
        try:
            reg = self._need_authority("register nodes").registration(signed)
        except AuthorityError as exc:
            log.warning("ledger: refused a registration: %s: %s", exc.code, exc)
            raise
        if reg.model_layers is not None and reg.model_layers != self.model_layers:
            self._grow(reg.model_layers, reg)
        else:
            self._register(reg)
        return len(reg.records)

    def _register(self, reg) -> None:
        recs = list(reg.records)
        known = set(self._nodes) | {r.node_id for r in recs}
        stray = [v for v in reg.validators if v not in known]
        if stray:
            raise RegistrationError(f"validator {stray[0][:12]}… is not a registered node; register its key first")
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
            if self._one("SELECT 1 FROM authorizations WHERE auth_id = ?", (reg.auth_id,)) is not None:
                raise LedgerError(f"registration {reg.auth_id[:12]}… was already applied (a replay); sign a new one")
            self._db.execute("INSERT INTO authorizations VALUES (?, 'registration', ?, ?, ?)",
                             (reg.auth_id, self.authority.node_id, now, b""))
            for rec in recs:
                self._db.execute(
                    "INSERT INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET "
                    "layer_start = excluded.layer_start, layer_end = excluded.layer_end, "
                    "has_embedding = excluded.has_embedding, has_lm_head = excluded.has_lm_head, "
                    "max_batches_per_s = excluded.max_batches_per_s",
                    (rec.node_id, rec.public_key, rec.layer_start, rec.layer_end, int(rec.has_embedding),
                     int(rec.has_lm_head), float(rec.max_batches_per_s), now))
                self._db.execute("INSERT OR IGNORE INTO accounts VALUES (?, 0, 0, ?)", (rec.node_id, now))
            self._db.executemany("INSERT OR IGNORE INTO validators VALUES (?)", [(v,) for v in reg.validators])
        for rec in recs:  # only after the commit: a rolled-back registration leaves no trace
            self._nodes[rec.node_id] = (rec, keys[rec.node_id])
        self._validators.update(reg.validators)

    def nodes(self) -> list[NodeRecord]:
        return [rec for rec, _ in self._nodes.values()]

    # ----- proofs ---------------------------------------------------------------------------
    def submit(self, data: bytes, receipt: bytes | None = None, *,
               recompute: Callable[[Proof, int], float] | None = None, reporter: str | None = None,
               rng: random.Random | None = None) -> Outcome:
        """Verify one proof and book it in its own transaction. See :meth:`submit_many`."""
        return self.submit_many([(data, receipt)], recompute=recompute, reporter=reporter, rng=rng)[0]

    def submit_many(self, items: Iterable[tuple[bytes, bytes | None]], *,
                    recompute: Callable[[Proof, int], float] | None = None, reporter: str | None = None,
                    rng: random.Random | None = None) -> list[Outcome]:
        """Verify and book proofs in ONE transaction (a group commit: one fsync for the batch).

        Each proof comes with its receipt signed by the coordinator (:meth:`Coordinator.sign_receipts`),
        or None. A receipt that is malformed or not the coordinator's refuses its proof (reason
        ``receipt`` / ``receipt_signature``) and writes nothing for it, so it can be resubmitted with a
        good one. ``recompute``, when given, spot-checks every accepted Driver training proof (see
        :func:`verifier.spot_check`); a mismatch rejects the proof and slashes the node, paying part
        of the slash to ``reporter`` (a validator the coordinator registered). Rejections are results,
        not exceptions; an exception means nothing of the batch was written.
        """
        if reporter is not None and reporter not in self._validators:
            raise LedgerError(f"reporter {reporter[:16]}… is not a validator the coordinator registered")
        now = self.now_ms()
        with self._tx():
            return [self._book(data, receipt, now, recompute, reporter, rng) for data, receipt in items]

    def _open_receipt(self, data: bytes, receipt) -> tuple[Receipt | None, Outcome | None]:
        """The receipt opened under the coordinator's key, or the refusal of its proof."""
        if receipt is None:
            return None, None
        try:
            if self.authority is None:
                raise AuthorityError("receipt_signature", "this ledger has no coordinator key, so no receipt is "
                                                          "authentic; create it with start_ledger_actor(..., "
                                                          "coordinator_public_key)")
            return self.authority.receipt(receipt), None
        except AuthorityError as exc:
            try:  # attribute the refusal to the proof it came with, when that parses
                p = SignedProof.from_bytes(data, self.rules.max_proof_bytes).proof
                pid, node = p.proof_id, p.node_id
            except ProofError:
                pid, node = "", ""
            return None, Outcome(pid, node, False, exc.code, str(exc))

    def _book(self, data: bytes, receipt, now: int, recompute, reporter, rng) -> Outcome:
        receipt, bad_receipt = self._open_receipt(data, receipt)
        if bad_receipt is not None:
            return refused("receipt for proof", bad_receipt)
        v: Verdict = self.verifier.verify(data, self, now, receipt)
        if v.accepted and recompute is not None:
            check = spot_check(v.proof, recompute, self.rules.spot_check_tolerance, rng)
            if check is not None and not check.ok:
                v = Verdict(False, "spot_check", f"spot check failed: {check.detail}", v.signed, True, slash=True)
        p = v.proof
        out = Outcome(p.proof_id if p else "", p.node_id if p else "", v.accepted, v.reason, v.detail)
        if not v.authentic:
            return refused("proof", out)  # unauthenticated: nothing is written (the ledger is unchanged)
        if not v.accepted:
            refused("proof", out)
        if v.accepted and receipt is not None and receipt.escrow:
            out.escrowed = self._earned(p, v.facts, v.useful, v.reward_bp)
        elif v.accepted:
            out.reward = self._reward(p, v.facts, v.useful, now, v.reward_bp)
        self._db.execute("INSERT INTO proofs VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (p.proof_id, p.node_id, p.nonce, p.proof_type, p.outer_round, p.timestamp_ms, now,
                          "credited" if v.accepted else "rejected", v.reason, out.reward, 0, data))
        if v.slash:
            out.slashed = self._slash(p.node_id, reporter, p.proof_id, v.reason, now)
            self._db.execute("UPDATE proofs SET slashed = ? WHERE proof_id = ?", (out.slashed, p.proof_id))
        if out.escrowed:
            self._db.execute("INSERT INTO escrow VALUES (?, ?, ?, ?, ?)",
                             (p.proof_id, p.node_id, out.escrowed, p.outer_round, now))
            self._event(now, p.node_id, "escrow", 0, p.proof_id, f"{out.escrowed} held until the next round's verdict")
        return out

    def _earned(self, p: Proof, facts: NodeFacts, useful: bool, reward_bp: int = BP) -> int:
        """What ``p`` earns before the caps."""
        base = self.rules.base_reward(p.proof_type, p.training_batches, p.tokens_processed, p.layers_held,
                                      p.has_embedding, p.has_lm_head, facts.stake) if useful else 0
        if not 0 <= reward_bp <= BP:  # the receipt parser refuses these; a factor never inflates a reward
            raise ValueError(f"reward_bp={reward_bp} is outside [0, {BP}]")
        return base * reward_bp // BP  # the reputation factor (neuroray/ponw/reputation.py), rounded down

    def _reward(self, p: Proof, facts: NodeFacts, useful: bool, now: int, reward_bp: int = BP) -> int:
        return self._credit(p.node_id, self._earned(p, facts, useful, reward_bp), facts.earned_today, now,
                            p.proof_id, p.proof_type)

    def _credit(self, node_id: str, earned: int, earned_today: int, now: int, proof_id: str, note: str) -> int:
        reward = self.rules.capped(earned, earned_today)
        self._db.execute("UPDATE accounts SET balance = balance + ?, last_credit_ms = ? WHERE node_id = ?",
                         (reward, now, node_id))
        if reward:
            self._db.execute("INSERT INTO daily VALUES (?, ?, ?) ON CONFLICT (node_id, day) DO UPDATE "
                             "SET earned = earned + excluded.earned", (node_id, now // DAY_MS, reward))
            self._mint_pending += reward
            self._event(now, node_id, "reward", reward, proof_id, note)
        return reward

    def settle_escrow(self, signed: bytes) -> dict:
        """Release or forfeit escrowed rewards on the coordinator's signed settlement (neuroray/ponw/escrow.py).
        A released reward is credited now, under today's daily cap; a forfeited one is never minted. Ids with
        nothing in escrow (settled already, invalidated, unknown) are counted as ``unknown`` and change nothing.
        A settlement that is malformed or not the coordinator's raises AuthorityError; nothing changes."""
        from neuroray.ponw.escrow import open_settlement

        settlement = open_settlement(self._need_authority("settle escrow"), signed)
        now, done = self.now_ms(), {"released": 0, "released_amount": 0, "forfeited": 0, "forfeited_amount": 0,
                                    "unknown": 0}
        with self._tx():
            for pid, release in [(pid, True) for pid in settlement.release] + [(pid, False) for pid in settlement.forfeit]:
                row = self._one("SELECT node_id, amount FROM escrow WHERE proof_id = ?", (pid,))
                if row is None:
                    done["unknown"] += 1
                    continue
                node_id, amount = row
                self._db.execute("DELETE FROM escrow WHERE proof_id = ?", (pid,))
                if release:
                    today = self._one("SELECT earned FROM daily WHERE node_id = ? AND day = ?", (node_id, now // DAY_MS))
                    paid = self._credit(node_id, amount, today[0] if today else 0, now, pid, "released from escrow")
                    self._db.execute("UPDATE proofs SET reward = reward + ? WHERE proof_id = ?", (paid, pid))
                    done["released"], done["released_amount"] = done["released"] + 1, done["released_amount"] + paid
                else:
                    self._event(now, node_id, "forfeit", 0, pid, f"{amount} held in escrow, not paid")
                    done["forfeited"], done["forfeited_amount"] = done["forfeited"] + 1, done["forfeited_amount"] + amount
        return done

    def escrowed(self) -> list[dict]:
        """The rewards in escrow, oldest first: ``{proof_id, node_id, amount, outer_round}``."""
        rows = self._db.execute("SELECT proof_id, node_id, amount, outer_round FROM escrow ORDER BY booked_ms, proof_id")
        return [dict(zip(("proof_id", "node_id", "amount", "outer_round"), r)) for r in rows]

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

    def invalidate(self, evidence: bytes) -> Outcome:
        """Take back a credited proof's reward and slash its node, on a validator's signed evidence
        (:func:`authority.sign_evidence`). The ledger first re-verifies the evidence against the proof it
        stored (the committed loss, the tolerance, the shard); an evidence record is used once.

        The reward is clawed back from balance, then stake (as much as is there) and burned; part of the
        slash goes to the validator when it is a registered node (none when the coordinator filed it).
        A refusal (reason evidence, replay, unknown_validator, signature, conflict, no_proof,
        not_credited, unfounded) is logged and changes nothing.
        """
        authority = self._need_authority("take evidence")
        try:
            ev = authority.evidence(evidence, self._validator_key)
        except AuthorityError as exc:
            return refused("evidence", Outcome("", "", False, exc.code, str(exc)))
        now = self.now_ms()
        with self._tx():
            if self._one("SELECT 1 FROM authorizations WHERE auth_id = ?", (ev.evidence_id,)) is not None:
                return refused("evidence", Outcome(ev.proof_id, ev.node_id, False, "replay",
                                                    f"evidence {ev.evidence_id[:12]}… was already filed"), ev.validator)
            row = self._one("SELECT status, reward, wire FROM proofs WHERE proof_id = ?", (ev.proof_id,))
            stored = None if row is None else SignedProof.from_bytes(bytes(row[2]), 2**31).proof
            problem = evidence_problem(ev, stored, row[0] if row else "", self.rules.spot_check_tolerance)
            if problem is not None:
                return refused("evidence", Outcome(ev.proof_id, ev.node_id, False, *problem), ev.validator)
            node_id, reason, reward = ev.node_id, ev.reason, row[1]
            acct = self._account(node_id)
            from_balance = min(reward, acct.balance)
            from_stake = min(reward - from_balance, acct.stake)
            clawed = from_balance + from_stake
            self._db.execute("UPDATE accounts SET balance = balance - ?, stake = stake - ? WHERE node_id = ?",
                             (from_balance, from_stake, node_id))
            self._burn_pending += clawed
            self._event(now, node_id, "clawback", -clawed, ev.proof_id, reason)
            reporter = ev.validator if ev.validator in self._nodes else None
            slashed = self._slash(node_id, reporter, ev.proof_id, reason, now)
            self._db.execute("UPDATE proofs SET status = 'invalidated', reason = ?, slashed = ? WHERE proof_id = ?",
                             (reason, slashed, ev.proof_id))
            self._db.execute("DELETE FROM escrow WHERE proof_id = ?", (ev.proof_id,))  # a false proof earns nothing
            self._db.execute("INSERT INTO authorizations VALUES (?, 'evidence', ?, ?, ?)",
                             (ev.evidence_id, ev.validator, now, bytes(evidence)))
        return Outcome(ev.proof_id, node_id, False, "invalidated", reason, -clawed, slashed)

    def _validator_key(self, node_id: str):
        entry = self._nodes.get(node_id) if node_id in self._validators else None
        return None if entry is None else entry[1]

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

    def credited_by_type(self) -> dict[str, int]:
        """Credited proofs per proof type (training work, and the spot-check validator's ``validation``)."""
        return dict(self._db.execute(
            "SELECT proof_type, COUNT(*) FROM proofs WHERE status = 'credited' GROUP BY proof_type").fetchall())

    def resolve(self, prefix: str) -> str:
        """A node id from a unique prefix (at least 6 hex digits); LedgerError otherwise."""
        prefix = prefix.strip().lower()
        if len(prefix) < 6:
            raise LedgerError(f"node id {prefix!r} is too short: give at least 6 hex digits")
        hits = [n for n in self._nodes if n.startswith(prefix)]
        if len(hits) != 1:
            raise LedgerError(f"node id prefix {prefix!r} matches {len(hits)} nodes; give more digits")
        return hits[0]
