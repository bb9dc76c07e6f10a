"""``python -m neuroray.export checkpoint=DIR out=DIR [force=true]``: a checkpoint as a transformers Llama directory."""

from __future__ import annotations

import sys

from neuroray.errors import ConfigError, run_cli

USAGE = ("usage: python -m neuroray.export checkpoint=DIR out=DIR [force=true]\n"
         "  writes a directory transformers' AutoModelForCausalLM and AutoTokenizer load (docs/interop.md)")
_KEYS = ("checkpoint", "out", "force")
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse(argv: list[str]) -> dict:
    """``key=value`` arguments into ``{"checkpoint", "out", "force"}``; ConfigError naming a bad one."""
    args: dict = {"force": False}
    for arg in argv:
        key, sep, raw = arg.partition("=")
        if not sep or key not in _KEYS:
            raise ConfigError(f"bad argument {arg!r}: expected one of {', '.join(k + '=' for k in _KEYS)}")
        if key == "force":
            if raw.lower() not in _BOOL:
                raise ConfigError(f"force={raw!r} must be true or false")
            args[key] = _BOOL[raw.lower()]
        else:
            args[key] = raw
    missing = [k for k in ("checkpoint", "out") if not args.get(k)]
    if missing:
        raise ConfigError(f"{' and '.join(k + '=' for k in missing)} required; {USAGE.splitlines()[0]}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0

    def action() -> None:
        from neuroray.model.hf import export_hf

        args = parse(argv)
        out = export_hf(args["checkpoint"], args["out"], force=args["force"])
        print(f"export: {args['checkpoint']} -> {out} (LlamaForCausalLM + fast tokenizer, safetensors)")

    return run_cli(action)
