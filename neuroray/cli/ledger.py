"""``python -m neuroray.ledger balance|history|stake|unstake|verify``: the NEURO ledger from a shell.

    python -m neuroray.ledger balance                      every node (and its pay in escrow), plus the supply check
    python -m neuroray.ledger balance 3fa2c1               one node (a unique id prefix or its key file)
    python -m neuroray.ledger history [NODE] [--proofs]    newest events (or proofs) first
    python -m neuroray.ledger stake NODE 2.5               move 2.5 NEURO from balance to stake
    python -m neuroray.ledger unstake NODE 1
    python -m neuroray.ledger verify                       audit: supply invariant, every stored proof
    python -m neuroray.ledger verify --proof FILE          check one proof (checks 1-6, books nothing)

``--ledger PATH`` picks the file (default: $NEURORAY_LEDGER, else the newest outputs/*/ledger.sqlite).
Exit codes: 0 ok; 1 verification found something invalid; 2 bad input (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from neuroray.errors import NeurorayError
from neuroray.ponw.ledger import Ledger
from neuroray.ponw.rules import format_units, parse_amount


class UsageError(NeurorayError):
    """Bad command-line input: reported as one ``error:`` line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage block too: keep it to one line
        raise UsageError(f"{message} (see python -m neuroray.ledger --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m neuroray.ledger", description="The NEURO ledger of a neuroray run.")
    p.add_argument("--ledger", help="ledger.sqlite path (default: $NEURORAY_LEDGER, else newest outputs/*/ledger.sqlite)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    b = sub.add_parser("balance", help="balances and stakes")
    b.add_argument("node", nargs="?", help="node id prefix or key file (default: all nodes)")
    h = sub.add_parser("history", help="rewards, stakes, slashes, burns, newest first")
    h.add_argument("node", nargs="?")
    h.add_argument("--limit", type=int, default=20)
    h.add_argument("--proofs", action="store_true", help="list proofs instead of money events")
    for name, what in (("stake", "balance to stake"), ("unstake", "stake back to balance")):
        s = sub.add_parser(name, help=f"move NEURO from {what}")
        s.add_argument("node", help="node id prefix or key file")
        s.add_argument("amount", help="NEURO, up to 6 decimals")
    v = sub.add_parser("verify", help="audit the ledger, or check one proof file")
    v.add_argument("--proof", help="a proof file ('-' for stdin) to check without booking it")
    return p


def _default_ledger() -> Path:
    env = os.environ.get("NEURORAY_LEDGER")
    if env:
        return Path(env)
    found = sorted(Path("outputs").glob("*/ledger.sqlite"), key=lambda q: q.stat().st_mtime)
    if not found:
        raise UsageError("no ledger found under outputs/; pass --ledger PATH or set NEURORAY_LEDGER")
    return found[-1]


def _node(ledger: Ledger, text: str) -> str:
    path = Path(text).expanduser()
    if path.is_file():  # a holder's key file names its node
        from neuroray.ponw.identity import Identity

        try:
            node_id = Identity.load_or_create(path).node_id
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if ledger.node(node_id) is None:
            raise UsageError(f"the key in {path} (node {node_id[:12]}…) is not registered with this ledger")
        return node_id
    return ledger.resolve(text)


def _amount(text: str) -> int:
    try:
        return parse_amount(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _show(args, data, lines) -> None:
    print(json.dumps(data, indent=1, sort_keys=True) if args.json else "\n".join(lines))


def _balance(ledger: Ledger, args) -> int:
    accounts = [ledger.account(_node(ledger, args.node))] if args.node else ledger.accounts()
    s = ledger.supply()
    escrow: dict[str, int] = {}  # rewards held until a settlement (neuroray/ponw/escrow.py): not minted, not in supply
    for e in ledger.escrowed():
        escrow[e["node_id"]] = escrow.get(e["node_id"], 0) + e["amount"]
    data = {"accounts": [{"node_id": a.node_id, "balance": format_units(a.balance), "stake": format_units(a.stake),
                          "escrow": format_units(escrow.get(a.node_id, 0))} for a in accounts],
            "supply": format_units(s.total), "minted": format_units(s.minted), "burned": format_units(s.burned),
            "consistent": s.consistent}
    lines = [f"{'node':16s} {'balance':>16s} {'stake':>16s} {'in escrow':>16s}"]
    lines += [f"{a.node_id[:16]} {format_units(a.balance):>16s} {format_units(a.stake):>16s} "
              f"{format_units(escrow.get(a.node_id, 0)):>16s}" for a in accounts]
    lines.append(f"supply {format_units(s.total)} NEURO = minted {format_units(s.minted)} - burned "
                 f"{format_units(s.burned)} ({'consistent' if s.consistent else 'INCONSISTENT'})")
    _show(args, data, lines)
    return 0 if s.consistent else 1


def _history(ledger: Ledger, args) -> int:
    if args.limit <= 0:
        raise UsageError(f"--limit {args.limit} must be positive")
    node = _node(ledger, args.node) if args.node else None
    if args.proofs:
        rows = ledger.proofs(node, args.limit)
        lines = [f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['received_ms'] / 1000))} {r['node_id'][:12]} "
                 f"{r['proof_type']:10s} round {r['outer_round']:<5d} {r['status']:11s} {r['reason']:14s} "
                 f"+{format_units(r['reward'])} -{format_units(r['slashed'])}  {r['proof_id'][:16]}" for r in rows]
    else:
        rows = ledger.history(node, args.limit)
        lines = [f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['ts_ms'] / 1000))} {r['node_id'][:12]} "
                 f"{r['kind']:9s} {format_units(r['amount']):>14s}  {r['note']}" for r in rows]
    _show(args, rows, lines or ["(no entries)"])
    return 0


def _move(ledger: Ledger, args) -> int:
    node, amount = _node(ledger, args.node), _amount(args.amount)
    acct = ledger.stake(node, amount) if args.command == "stake" else ledger.unstake(node, amount)
    data = {"node_id": node, "balance": format_units(acct.balance), "stake": format_units(acct.stake)}
    _show(args, data, [f"{args.command}d {format_units(amount)} NEURO: node {node[:12]} balance "
                       f"{data['balance']}, stake {data['stake']}"])
    return 0


def _verify_proof(ledger: Ledger, args) -> int:
    try:
        data = sys.stdin.buffer.read() if args.proof == "-" else Path(args.proof).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read proof file {args.proof} ({exc.strerror})") from None
    v = ledger.verifier.verify(data.rstrip(b"\n"), ledger, ledger.now_ms(), receipt=None)
    valid = v.accepted or v.reason == "unobserved"  # a receipt only exists inside the training run
    note = "valid (signature and static plausibility; crediting also needs the orchestrator's receipt)"
    data_out = {"valid": valid, "check": v.reason, "detail": v.detail,
                "proof_id": v.proof.proof_id if v.proof else ""}
    _show(args, data_out, [note if valid else f"invalid: {v.reason}: {v.detail}"])
    return 0 if valid else 1


def _audit(ledger: Ledger, args) -> int:
    from neuroray.ponw.proof import ProofError, SignedProof

    problems = []
    s = ledger.supply()
    if not s.consistent:
        problems.append(f"supply: minted - burned = {format_units(s.total)} but accounts hold {format_units(s.held)}")
    checked = 0
    for row in ledger.proofs(limit=2**62):
        try:
            signed = SignedProof.from_bytes(ledger.wire(row["proof_id"]), 2**31)
        except ProofError as exc:
            problems.append(f"proof {row['proof_id'][:16]}: stored bytes do not parse ({exc})")
            continue
        entry = ledger.node(signed.proof.node_id)
        if signed.proof.proof_id != row["proof_id"]:
            problems.append(f"proof {row['proof_id'][:16]}: stored bytes hash to another id")
        elif entry is None or not ledger.backend.verify(entry[1], signed.proof.digest(), signed.signature):
            problems.append(f"proof {row['proof_id'][:16]}: signature does not verify")
        checked += 1
    data = {"ok": not problems, "proofs_checked": checked, "problems": problems}
    lines = problems or [f"ok: supply consistent ({format_units(s.total)} NEURO), {checked} proofs re-verified"]
    _show(args, data, lines)
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        ledger = Ledger(Path(args.ledger) if args.ledger else _default_ledger(), create=False)
        try:
            if args.command == "balance":
                return _balance(ledger, args)
            if args.command == "history":
                return _history(ledger, args)
            if args.command in ("stake", "unstake"):
                return _move(ledger, args)
            return _verify_proof(ledger, args) if args.proof else _audit(ledger, args)
        finally:
            ledger.close()
    except NeurorayError as exc:
        print(f"neuroray.ledger: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `... | head`: the reader left, nothing more to say
        sys.stderr.close()
        sys.exit(0)
