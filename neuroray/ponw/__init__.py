"""Proof of Neural Work: holder identities, signed proofs, the NEURO ledger."""
