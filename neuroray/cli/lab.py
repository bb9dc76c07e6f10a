"""`python -m neuroray.lab up|down|status|cut|heal|shape|counters|exec`: parse, call neuroray.lab, print.

Every subcommand takes lab overrides (``hosts=4``, ``lab.rate=100mbit``, ``lab_dir=...``) after its arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from neuroray.errors import LabError, run_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m neuroray.lab", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)
    sub.add_parser("up", help="create the hosts, links and Ray nodes").add_argument("overrides", nargs="*")
    sub.add_parser("down", help="remove everything up made (idempotent)").add_argument("overrides", nargs="*")
    s = sub.add_parser("status", help="what exists now, from the kernel")
    s.add_argument("--json", action="store_true")
    s.add_argument("overrides", nargs="*")
    sub.add_parser("counters", help="bytes each host sent and received (JSON)").add_argument("overrides", nargs="*")
    for verb, what in (("cut", "take HOST's link down (a partition)"), ("heal", "bring HOST's link back")):
        c = sub.add_parser(verb, help=what)
        c.add_argument("host")
        c.add_argument("overrides", nargs="*")
    s = sub.add_parser("shape", help="set HOST's link rate now (tc syntax, e.g. 100mbit; none = unshaped)")
    s.add_argument("host")
    s.add_argument("rate")
    s.add_argument("--upload", help="host -> network rate, if it differs from RATE")
    s.add_argument("--download", help="network -> host rate, if it differs from RATE")
    s.add_argument("overrides", nargs="*")
    e = sub.add_parser("exec", help="run CMD on HOST (its namespaces, HOME, TMPDIR, RAY_ADDRESS)")
    e.add_argument("host")
    e.add_argument("cmd", nargs=argparse.REMAINDER, help="[overrides] -- CMD ARGS...")
    return p


def _mbit(bits) -> str:
    return "unshaped" if bits is None else f"{bits / 1e6:g} Mbit/s"


def _run(argv: list[str] | None) -> int:
    import neuroray.lab as lab

    parser = _parser()
    # overrides may also follow options (shape h1 20mbit --upload 5mbit lab_dir=...): argparse leaves those over
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.verb == "up":
        cfg = lab.load_lab_config(args.overrides)
        lab.up(cfg)
        print(f"lab up: {cfg.hosts} hosts on {cfg.subnet} (bridge {cfg.bridge}), "
              f"ray head {cfg.head_address if cfg.ray else 'not started'}, state {cfg.lab_dir}/state.json")
    elif args.verb == "down":
        removed = lab.down(lab.load_lab_config(args.overrides))
        print(f"lab down: removed {len(removed)} things" + (f" ({', '.join(removed[:12])}...)" if removed else ""))
    elif args.verb == "status":
        s = lab.status(args.overrides)
        if args.json:
            print(json.dumps(s, indent=1))
            return 0
        print(f"lab {s['phase']}: {s['lab_dir']}, head {s['head']}, bridge {s['bridge'] or '-'}")
        for h in s["hosts"]:
            print(f"  {h['host']} {h['ip']:<14} link {h['link']:<7} up {_mbit(h['upload_bits']):<14} "
                  f"down {_mbit(h['download_bits']):<14} tx {h['tx_bytes']} B rx {h['rx_bytes']} B "
                  f"{h['processes']} processes{' (ray node)' if h['raylet'] else ''}")
        if s["leftovers"]:
            print(f"  leftovers without state: {', '.join(s['leftovers'])}; run down")
    elif args.verb == "counters":
        cfg, _ = lab.attach(args.overrides)
        print(json.dumps(lab.counters(cfg)))
    elif args.verb in ("cut", "heal"):
        name = getattr(lab, args.verb)(args.overrides, args.host)
        print(f"{name}: link {'down (cut)' if args.verb == 'cut' else 'up (healed)'}")
    elif args.verb == "shape":
        r = lab.shape(args.overrides, args.host, args.rate, args.upload, args.download)
        print(f"{args.host}: upload {_mbit(r['upload'])}, download {_mbit(r['download'])}")
    elif args.verb == "exec":
        overrides, sep, cmd = (args.cmd[:args.cmd.index("--")], "--", args.cmd[args.cmd.index("--") + 1:]) \
            if "--" in args.cmd else ([], "", args.cmd)
        if not cmd:
            raise LabError("exec needs a command: python -m neuroray.lab exec HOST [overrides] -- CMD ARGS...")
        full, env = lab.command(overrides, args.host, cmd)
        sys.stdout.flush()
        os.execvpe(full[0], full, env)  # the command's exit status and signals are exec's own
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_cli(lambda: _run(argv)))
