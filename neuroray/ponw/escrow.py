"""Escrow: a round's pay held until the next round says whether the work was honest.

Some verdicts need more than one round of evidence. The straggler rule (neuroray/ponw/stragglers.py) names
a holder only after ``ponw.straggler_rounds`` slow rounds in a row, so that one loaded round does not cost an
honest holder its pay. Paid at once, a slow walker would keep what it earned in the rounds before it was
named. So the coordinator marks the receipt of a holder that was slow this round but is not named yet
``escrow=true``: the ledger verifies and records the proof as usual (it can still be spot-checked and
invalidated) but credits nothing, and keeps the reward in its ``escrow`` table. Once the verdict is in, a
coordinator-signed settlement releases it (minted and credited then, under the daily cap of that day) or
forfeits it (nothing is minted). A proof invalidated while in escrow is forfeited.

A settlement needs no replay record: it names proof ids, and a proof's escrow row is gone once settled, so a
settlement sent twice changes nothing the second time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from neuroray.ponw.authority import _HEX64, VERSION, AuthorityError, _hex, _keys, _open
from neuroray.ponw.envelope import seal
from neuroray.ponw.proof import new_nonce

ESCROW_DOMAIN = b"NEURORAY-ESCROW-v1\n"
MAX_SETTLEMENT_BYTES = 1 << 20  # ~7000 proof ids per settlement


@dataclass(frozen=True)
class Settlement:
    """An opened, coordinator-signed settlement: the escrowed proofs to pay and those to pay nothing."""

    release: tuple[str, ...]
    forfeit: tuple[str, ...]


def sign_settlement(coordinator, release: Iterable[str] = (), forfeit: Iterable[str] = ()) -> bytes:
    """The settlement of escrowed proofs, signed by ``coordinator`` (authority.Coordinator)."""
    payload = {"v": VERSION, "release": sorted(set(release)), "forfeit": sorted(set(forfeit)), "nonce": new_nonce()}
    return seal(ESCROW_DOMAIN, payload, coordinator.identity, coordinator.backend)


def open_settlement(authority, data) -> Settlement:
    """A settlement checked under the ledger's coordinator key (``authority``: authority.Authority).
    Raises AuthorityError('settlement' or 'settlement_signature')."""
    code = "settlement"
    p, sig, digest = _open(data, ESCROW_DOMAIN, MAX_SETTLEMENT_BYTES, "settlement", code)
    _keys(p, {"v", "release", "forfeit", "nonce"}, code, "settlement")
    for name in ("release", "forfeit"):
        if not isinstance(p[name], list):
            raise AuthorityError(code, f"settlement {name} must be a list of proof ids")
        for pid in p[name]:
            _hex(f"settlement {name} proof id", pid, _HEX64, code)
    if set(p["release"]) & set(p["forfeit"]):
        raise AuthorityError(code, "a settlement cannot both release and forfeit one proof")
    if not authority.verify(digest, sig):
        raise AuthorityError("settlement_signature", "the settlement is not signed by this ledger's coordinator")
    return Settlement(tuple(p["release"]), tuple(p["forfeit"]))
