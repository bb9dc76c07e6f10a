"""Shared builders for the PoNW tests: a settable clock, ledgers, nodes, proofs and receipts.

Every ledger here belongs to the test coordinator ``COORD``: its registrations and receipts are real
secp256k1 signatures, as in a run.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from itertools import count

from neuroray.config import PonwConfig
from neuroray.ponw.authority import EVIDENCE_DOMAIN, Coordinator, Evidence
from neuroray.ponw.envelope import seal
from neuroray.ponw.identity import Identity
from neuroray.ponw.ledger import Ledger
from neuroray.ponw.proof import Proof, SignedProof, loss_to_micro, new_nonce
from neuroray.ponw.verifier import NodeRecord, Receipt

LAYERS = 4
TPB = 64  # tokens per batch
T0 = 1_800_000_000.0  # a fixed wall-clock start (seconds) for reproducible days and windows
_secrets = count(1)
COORD = Coordinator(Identity.from_secret(hashlib.sha256(b"ponw test coordinator").digest()))


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    @property
    def ms(self) -> int:
        return int(self.t * 1000)


def make_ledger(path, clock=None, **cfg) -> Ledger:
    cfg.setdefault("synchronous", "OFF")  # crash safety is tested separately, with FULL
    return Ledger(path, PonwConfig(**cfg), model_layers=LAYERS, tokens_per_batch=TPB, clock=clock or Clock(),
                  coordinator_key=COORD.public_key)


def registration(records, validators=None, model_layers=None) -> bytes:
    """``records`` signed by the test coordinator; every node is also a validator unless ``validators`` says."""
    records = list(records)
    validators = [r.node_id for r in records] if validators is None else validators
    return COORD.sign_registration(records, model_layers, validators)


def identity() -> Identity:
    """A fresh, reproducible identity (fixed secrets keep failures replayable)."""
    return Identity.from_secret(hashlib.sha256(b"ponw test node %d" % next(_secrets)).digest())


def node(stage: int = 0, ident: Identity | None = None) -> tuple[Identity, NodeRecord]:
    """A holder of stage 0 (layers 0-1, embedding) or stage 1 (layers 2-3, LM head)."""
    ident = ident or identity()
    lo, hi = (0, 2) if stage == 0 else (2, 4)
    return ident, NodeRecord(ident.node_id, ident.public_key, lo, hi, stage == 0, stage == 1)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def proof(rec: NodeRecord, now_ms: int, rnd: int = 1, batches: int = 10, **changes) -> Proof:
    driver = rec.has_embedding
    fields = dict(node_id=rec.node_id, proof_type="training", timestamp_ms=now_ms, nonce=new_nonce(),
                  outer_round=rnd, tokens_processed=batches * TPB, training_batches=batches,
                  layers_held=rec.layers_held, layer_start=rec.layer_start, has_embedding=driver,
                  has_lm_head=rec.has_lm_head, shard_id=0 if driver else None, data_position=0,
                  theta0_before=digest(f"theta{rnd - 1}"), theta0_after=digest(f"theta{rnd}"),
                  pseudo_gradient=digest(f"delta {rec.node_id} {rnd}"),
                  theta0_losses=(3_000_000,) if driver and batches else ())
    fields.update(changes)
    return Proof(**fields)


def signed(ident: Identity, rec: NodeRecord, now_ms: int, rnd: int = 1, batches: int = 10, **changes) -> bytes:
    return proof(rec, now_ms, rnd, batches, **changes).sign(ident).to_bytes()


def plain_receipt(rec: NodeRecord, rnd: int = 1, batches: int = 10, norm: float = 1.0, median: float = 1.0,
                  **changes) -> Receipt:
    r = Receipt(rec.node_id, rnd, "training", batches=batches, pseudo_gradient=digest(f"delta {rec.node_id} {rnd}"),
                pseudo_gradient_norm=norm, range_median_norm=median)
    return replace(r, **changes)


def receipt(rec: NodeRecord, rnd: int = 1, batches: int = 10, norm: float = 1.0, median: float = 1.0,
            **changes) -> bytes:
    """The coordinator-signed receipt (wire bytes) the ledger takes."""
    return COORD.sign_receipt(plain_receipt(rec, rnd, batches, norm, median, **changes))


def evidence(validator: Identity, wire: bytes, recomputed: float | None = 9.0, shard: int | None = None,
             **changes) -> bytes:
    """``validator``'s signed evidence that the stored proof ``wire`` is false: its first committed batch
    recomputes to ``recomputed`` nats (or, with ``recomputed=None``, lies in ``shard``)."""
    p = SignedProof.from_bytes(wire).proof
    ev = Evidence(p.proof_id, p.node_id, validator.node_id, p.data_position,
                  p.theta0_losses[0] if p.theta0_losses else 0,
                  None if recomputed is None else loss_to_micro(recomputed), shard)
    return seal(EVIDENCE_DOMAIN, replace(ev, **changes).payload(), validator)
