"""``python -m neuroray.genesis build|verify|info [options] [key=value ...]``: the data owner's tool.

``key=value`` overrides are Hydra overrides of the training config; bare data keys need no prefix
(``source=corpus.txt`` is ``data.source=corpus.txt``). The dataset is the one training with the same
overrides would use: ``data.dataset`` if set, else ``<data.store>/<name>-<settings hash>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys

from neuroray.config import DataConfig
from neuroray.configure import load_config
from neuroray.errors import NeurorayError

USAGE = """usage: python -m neuroray.genesis COMMAND [options] [key=value ...]

commands:
  build    build the dataset (reused if already built and intact); --force rebuilds it
  verify   download and SHA-256-check the tokenizer and every shard against the manifest
  info     summarise the manifest; --json prints it whole; --node ID shows that node's shard order

examples:
  python -m neuroray.genesis build source=corpus/ store=s3://bucket/genesis vocab_size=32000
  python -m neuroray.genesis verify dataset=https://cdn.example.com/genesis/corpus-1a2b3c4d5e6f7a8b
  python -m neuroray.genesis info dataset=memory://genesis/embedded-... --node 03ab...

Store options (S3 endpoint, credentials) come from the environment: AWS_* and FSSPEC_<PROTOCOL>_<OPTION>.
"""
_DATA_KEYS = {f.name for f in dataclasses.fields(DataConfig)}


def _overrides(args: list[str]) -> list[str]:
    """Prefix bare DataConfig keys with ``data.``; anything else is passed to Hydra untouched."""
    out = []
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+~")
        out.append(arg.replace(key, f"data.{key}", 1) if key in _DATA_KEYS and "=" in arg else arg)
    return out


class Bars:
    """tqdm progress bars for the build's phases: documents read by the tokenizer, tokens sharded."""

    def __init__(self):
        from tqdm import tqdm

        self._tqdm, self._bars, self._last = tqdm, {}, {}

    def __call__(self, phase: str, docs: int, tokens: int) -> None:
        if phase not in self._bars:
            for bar in self._bars.values():
                bar.close()
            unit, desc = ("doc", "tokenizer") if phase == "tokenizer" else ("tok", "shards")
            self._bars[phase] = self._tqdm(desc=desc, unit=unit, unit_scale=True, mininterval=0.5,
                                           file=sys.stderr, dynamic_ncols=True)
            self._last[phase] = 0
        value = docs if phase == "tokenizer" else tokens
        self._bars[phase].update(value - self._last[phase])
        self._last[phase] = value

    def write(self, line: str) -> None:
        """Log a line without tearing the bar that is drawing."""
        self._tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def summary(url: str, manifest) -> str:
    """Human summary of a manifest (what `info` prints)."""
    train, evals = manifest.train_shards, manifest.eval_shards
    sizes = [s["tokens"] for s in manifest.shards]
    tok_line = f"{manifest.tokenizer_file} sha256 {manifest.tokenizer_sha256}, {manifest.vocab_size} tokens"
    if manifest.parent_tokenizer_sha256:
        tok_line += f", grown from {manifest.parent_tokenizer_sha256[:16]}…"
    rows = [
        ("dataset", url),
        ("format", str(manifest.format_version)),
        ("source", manifest.source or "?"),
        ("tokenizer", tok_line),
        ("shards", f"{len(manifest.shards)} ({len(train)} train, {len(evals)} eval), {manifest.dtype}, "
                   f"target {manifest.shard_tokens:,} tokens, actual {min(sizes):,}..{max(sizes):,}"),
        ("tokens", f"{manifest.total_tokens:,} ({sum(s['tokens'] for s in train):,} train, "
                   f"{sum(s['tokens'] for s in evals):,} eval)"),
        ("bytes", f"{manifest.total_bytes:,} ({manifest.total_bytes / 2**20:.1f} MiB)"),
    ]
    return "\n".join(f"{k:<10} {v}" for k, v in rows)


def _build(cfg: DataConfig, force: bool) -> int:
    from neuroray.genesis.build import build_dataset, dataset_url, ensure_dataset
    from neuroray.genesis.manifest import MANIFEST_FILE
    from neuroray.genesis.store import Store

    bars = Bars()
    log = bars.write
    try:
        url = dataset_url(cfg)
        if force or (cfg.dataset and not Store(url).exists(MANIFEST_FILE)):
            manifest = build_dataset(cfg, url, log=log, progress=bars)
        else:
            _, manifest = ensure_dataset(cfg, log=log, progress=bars)
    finally:
        bars.close()
    print(summary(url, manifest))
    return 0


def _verify(cfg: DataConfig) -> int:
    from tqdm import tqdm

    from neuroray.genesis.build import dataset_url
    from neuroray.genesis.shards import verify_dataset

    url = dataset_url(cfg)
    bad: list[str] = []
    bar = tqdm(desc="verify", unit="shard", file=sys.stderr, mininterval=0.5)

    def progress(shard: dict, problem: str | None) -> None:
        bar.update(1)
        if problem:
            bad.append(problem)
            bar.write(f"bad: {problem}", file=sys.stderr)

    try:
        manifest = verify_dataset(url, progress=progress)
    except NeurorayError as exc:
        bar.close()
        print(f"neuroray: verify failed: {exc}", file=sys.stderr)
        return 1
    bar.close()
    print(f"ok: {url}: tokenizer and {len(manifest.shards)} shards ({manifest.total_tokens:,} tokens) match the manifest")
    return 0


def _info(cfg: DataConfig, as_json: bool, node: str | None) -> int:
    from neuroray.genesis.build import dataset_url
    from neuroray.genesis.manifest import MANIFEST_FILE, read_manifest
    from neuroray.genesis.shards import shard_order
    from neuroray.genesis.store import Store

    url = dataset_url(cfg)
    store = Store(url)
    manifest = read_manifest(store)
    print(manifest.to_json() if as_json else summary(url, manifest))
    if not as_json:  # what a run pins to refuse any other manifest (and with it, other shards)
        print(f"{'pin':<10} data.manifest_sha256={hashlib.sha256(store.read(MANIFEST_FILE)).hexdigest()}")
    if node is not None:
        order = [s["id"] for s in shard_order(manifest, node)]
        more = f" … ({len(order)} in all)" if len(order) > 8 else ""
        print(f"{'node':<10} {node}: starts on shard {order[0]}, then {order[1:8]}{more}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    flags = {"--force": False, "--json": False}
    node, overrides = None, []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in flags:
            flags[arg] = True
        elif arg == "--node" and i + 1 < len(rest):
            node, i = rest[i + 1], i + 1
        elif arg.startswith("--"):
            print(f"neuroray: error: unknown option {arg}; see python -m neuroray.genesis --help", file=sys.stderr)
            return 2
        else:
            overrides.append(arg)
        i += 1
    if command not in ("build", "verify", "info"):
        print(f"neuroray: error: unknown command {command!r}; use build, verify or info (see --help)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(_overrides(overrides)).data
        if command == "build":
            return _build(cfg, flags["--force"])
        if command == "verify":
            return _verify(cfg)
        return _info(cfg, flags["--json"], node)
    except NeurorayError as exc:
        print(f"neuroray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neuroray: interrupted; nothing half-built is visible (the manifest is written last)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
