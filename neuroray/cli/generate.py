"""``python -m neuroray.generate``: one prompt through a checkpoint, streamed to stdout.

CLI (Hydra-style ``key=value``; see :class:`~neuroray.inference.pipeline.GenerateConfig` for every key)::

    python -m neuroray.generate checkpoint=outputs/<run>/checkpoint prompt="Once upon" \\
        max_new_tokens=64 temperature=0.8 top_k=40 top_p=0.95 seed=0 stages=2

``stages=0`` generates in this process (:class:`~neuroray.inference.sessions.LocalEngine`); otherwise
through Ray inference holders (:func:`~neuroray.inference.pipeline.run_pipeline`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

from neuroray.errors import ConfigError, run_cli
from neuroray.inference.loading import TextStream, encode_prompt, load_for_inference
from neuroray.inference.pipeline import GenerateConfig
from neuroray.inference.sampling import Sampler
from neuroray.inference.sessions import LocalEngine, Session, run_sessions

USAGE = ("usage: python -m neuroray.generate checkpoint=DIR prompt=TEXT [key=value ...]\n  keys: "
         + ", ".join(f"{f.name} (default {f.default!r})" for f in dataclasses.fields(GenerateConfig)))

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def parse_overrides(argv: list[str]) -> GenerateConfig:
    """``key=value`` strings into a :class:`GenerateConfig`; ConfigError naming the bad one otherwise."""
    fields = {f.name: f for f in dataclasses.fields(GenerateConfig)}
    values: dict = {}
    for arg in argv:
        key, sep, raw = arg.partition("=")
        key = key.lstrip("+")
        if not sep:
            raise ConfigError(f"bad argument {arg!r}: expected key=value; valid keys: {', '.join(fields)}")
        if key not in fields:
            raise ConfigError(f"unknown key {key!r}; valid keys: {', '.join(fields)}")
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            raw = raw[1:-1]  # Hydra strips quotes that survived the shell
        kind = type(fields[key].default)
        try:
            if kind is bool:
                if raw.lower() not in _TRUE | _FALSE:
                    raise ValueError(raw)
                values[key] = raw.lower() in _TRUE
            else:
                values[key] = kind(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} is not a valid {kind.__name__}") from None
    cfg = GenerateConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: GenerateConfig) -> None:
    checks = {"max_new_tokens": cfg.max_new_tokens >= 1, "temperature": cfg.temperature >= 0,
              "top_k": cfg.top_k >= 0, "top_p": 0 < cfg.top_p <= 1, "stages": cfg.stages >= 0,
              "replicas": cfg.replicas >= 1, "torch_threads": cfg.torch_threads >= 1,
              "session_ttl_s": cfg.session_ttl_s > 0, "step_timeout_s": cfg.step_timeout_s > 0,
              "cpus_per_holder": cfg.cpus_per_holder >= 0, "gpus_per_holder": cfg.gpus_per_holder >= 0}
    rules = {"max_new_tokens": ">= 1", "temperature": ">= 0 (0 is greedy)", "top_k": ">= 0 (0 is off)",
             "top_p": "in (0, 1]", "stages": ">= 0 (0 runs in this process)", "replicas": ">= 1",
             "torch_threads": ">= 1", "session_ttl_s": "> 0", "step_timeout_s": "> 0",
             "cpus_per_holder": ">= 0", "gpus_per_holder": ">= 0"}
    for key, ok in checks.items():
        if not ok:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} must be {rules[key]}")
    if cfg.ledger and cfg.stages == 0:
        raise ConfigError("ledger= needs stages >= 1: inference proofs are signed by stage holders")
    if cfg.keep_swarm and not (cfg.swarm and (cfg.address or os.environ.get("RAY_ADDRESS"))):
        raise ConfigError("keep_swarm=true needs swarm=<name> and address=<a running Ray cluster> (or RAY_ADDRESS); "
                          "a local Ray stops when this command ends")


def generate(cfg: GenerateConfig, write: Callable[[str], None] = print, log: Callable[[str], None] = print) -> Session:
    """Run one prompt per ``cfg``; ``write`` receives the text as it streams, ``log`` progress lines."""
    from neuroray.genesis.tokenizer import EOS_ID

    loaded = load_for_inference(cfg.checkpoint, cfg.tokenizer)
    stop = EOS_ID if cfg.stop_at_eos else None
    sampler = Sampler(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    stream = TextStream(loaded.tokenizer, write)

    def on_token(_session: Session, token: int) -> None:
        stream.push(token)

    # Checked here, before any holder starts: an empty or too-long prompt fails in a second, not after Ray is up.
    ids = encode_prompt(loaded.tokenizer, cfg.prompt, cfg.bos, loaded.model.max_seq_len)
    if cfg.stages == 0:
        session = Session(ids, cfg.max_new_tokens, sampler, stop)
        write(cfg.prompt)
        run_sessions(LocalEngine(loaded.monolith()), [session], on_token)
        write("\n")
    else:
        from neuroray.inference.pipeline import run_pipeline

        session = run_pipeline(cfg, loaded, ids, sampler, stop, write, on_token, log)
    log(f"generate: {len(session.new_ids)} tokens ({session.stop_reason})")
    return session


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()  # stream: each token appears as soon as it is sampled

    return run_cli(lambda: generate(parse_overrides(argv), write, log=lambda line: print(line, file=sys.stderr)) and None)
