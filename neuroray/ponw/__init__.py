"""Proof of Neural Work and the NEURO ledger.

``identity`` (secp256k1 keys, node ids), ``crypto`` + ``proof`` (the canonical signed payload),
``verifier`` (cheap-first checks and spot checks), ``rules`` (rewards, stake, slashing), ``ledger``
(SQLite in WAL mode), ``service`` (the ledger actor and the round provers holders use).
"""
