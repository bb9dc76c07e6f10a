"""Inference proofs: signing a holder's Proof of Neural Work for the tokens it served, and crediting them
in a training run's ledger."""

from __future__ import annotations

from pathlib import Path

from neuroray.ponw.identity import Identity


def sign_inference_proof(identity: Identity, tokens: int, window: int, layer_start: int, layer_end: int,
                         has_embedding: bool, has_lm_head: bool) -> bytes:
    """The wire bytes of a signed Proof of Neural Work of type ``inference`` for ``tokens`` positions."""
    from neuroray.ponw.proof import Proof, new_nonce, now_ms

    proof = Proof(
        node_id=identity.node_id, proof_type="inference", timestamp_ms=now_ms(), nonce=new_nonce(),
        outer_round=window, tokens_processed=tokens, training_batches=0, layers_held=layer_end - layer_start,
        layer_start=layer_start, has_embedding=has_embedding, has_lm_head=has_lm_head, shard_id=None,
        data_position=0, theta0_before="", theta0_after="", pseudo_gradient="",
    )
    return proof.sign(identity).to_bytes()


def credit_proofs(ledger_file: str, registrations: list[dict], proofs: list[tuple[bytes, dict]], log,
                  key_dir: str = "~/.cache/neuroray/keys") -> list[dict]:
    """Register the holders with an existing ledger and submit their proofs with receipts; one commit.

    The ledger takes keys and receipts only under its coordinator's signature: this machine must hold the
    training run's coordinator key (``<key_dir>/coordinator.pem``, or ``ponw.coordinator_key``)."""
    from neuroray.config import PonwConfig
    from neuroray.ponw.ledger import Ledger, LedgerError
    from neuroray.ponw.rules import format_units
    from neuroray.ponw.service import load_coordinator

    path = Path(ledger_file).expanduser()
    if not path.is_file():
        raise LedgerError(f"no ledger at {path}; pass ledger=<run_dir>/ledger.sqlite of a training run, or leave "
                          "ledger= empty")
    coordinator = load_coordinator(PonwConfig(), key_dir)
    ledger = Ledger(path, create=False, coordinator_key=coordinator.public_key)
    try:
        ledger.register(coordinator.sign_registration(registrations))
        outcomes = [o.to_dict() for o in ledger.submit_many(
            [(proof, None if receipt is None else coordinator.sign_receipt(receipt)) for proof, receipt in proofs])]
    finally:
        ledger.close()
    credited = [o for o in outcomes if o["accepted"]]
    log(f"ledger: credited {len(credited)}/{len(outcomes)} inference proofs, "
        f"{format_units(sum(o['reward'] for o in credited))} NEURO"
        + "".join(f"; rejected {o['node_id'][:12]}: {o['reason']}" for o in outcomes if not o["accepted"]))
    return outcomes
