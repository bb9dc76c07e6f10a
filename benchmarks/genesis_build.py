"""Genesis build throughput (tokens/s) / raw ``tokenizers`` ``encode_batch`` throughput, same corpus, same run.

The build side is the whole shard pass a build makes after training the tokenizer: read the corpus
from disk through ``datasets`` (streamed JSONL), encode, add BOS/EOS, cut 2.5M-token shards, SHA-256
them and write them (fsync'd). The raw side is ``tok.encode_batch`` over the same documents already in
memory, 1000 at a time: nothing read, nothing kept, nothing written. Both use the same tokenizer and
threads; each is run ``repeats`` times, interleaved, and the medians are compared. The issue's goal is
a ratio >= 0.8. A full build (tokenizer training included) is timed once for reference.

    python benchmarks/genesis_build.py [copies=8] [repeats=3]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import append_row, machine  # noqa: E402
from neuroray.config import DataConfig  # noqa: E402
from neuroray.genesis import build_dataset, embedded_corpus, open_source, train_tokenizer  # noqa: E402
from neuroray.genesis.build import write_shards  # noqa: E402
from neuroray.genesis.store import Store  # noqa: E402

BATCH = 1000


def raw_encode(tok, docs: list[str], method: str = "encode_batch") -> tuple[int, float]:
    encode = getattr(tok, method)
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(docs), BATCH):
        tokens += sum(len(e) for e in encode(docs[i:i + BATCH], add_special_tokens=False))
    return tokens, time.perf_counter() - t0


def build_pass(tok, cfg: DataConfig, out: Path) -> tuple[int, float]:
    store = Store(out)
    store.check_writable()
    t0 = time.perf_counter()
    shards = write_shards(tok, open_source(cfg), store, cfg.shard_tokens)
    return sum(s["tokens"] for s in shards), time.perf_counter() - t0


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    copies, repeats = int(opts.get("copies", 8)), int(opts.get("repeats", 3))
    with tempfile.TemporaryDirectory(prefix="genesis-bench-") as tmp:
        tmp = Path(tmp)
        docs = embedded_corpus(Path(DataConfig().cache_dir).expanduser() / "corpus") * copies
        corpus = tmp / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        cfg = DataConfig(source=str(corpus), store=str(tmp / "store"), cache_dir=str(tmp / "cache"),
                         shard_tokens=2_500_000)
        t0 = time.perf_counter()
        tok = train_tokenizer(docs, cfg.vocab_size)
        train_s = time.perf_counter() - t0

        raw, fast, built = [], [], []
        for r in range(repeats):
            n_raw, dt = raw_encode(tok, docs)
            raw.append(n_raw / dt)
            n_fast, dt = raw_encode(tok, docs, "encode_batch_fast")
            fast.append(n_fast / dt)
            n_built, dt = build_pass(tok, cfg, tmp / f"pass{r}")
            built.append(n_built / dt)
        t0 = time.perf_counter()
        manifest = build_dataset(cfg, str(tmp / "full"), log=lambda s: None)
        full_tps = manifest.total_tokens / (time.perf_counter() - t0)

    raw_tps, fast_tps, build_tps = statistics.median(raw), statistics.median(fast), statistics.median(built)
    ratio, strict = build_tps / raw_tps, build_tps / fast_tps
    corpus_bytes = sum(len(d.encode()) for d in docs) / 1e6
    print(f"corpus: embedded x{copies}, {len(docs)} docs, {corpus_bytes:.1f} MB, {n_raw:,} tokens (+BOS/EOS: {n_built:,})")
    print(f"raw encode_batch: {raw_tps:,.0f} tok/s   (runs: {', '.join(f'{v:,.0f}' for v in raw)})")
    print(f"build shard pass: {build_tps:,.0f} tok/s   (runs: {', '.join(f'{v:,.0f}' for v in built)})")
    print(f"raw encode_batch_fast: {fast_tps:,.0f} tok/s (runs: {', '.join(f'{v:,.0f}' for v in fast)})")
    print(f"ratio: {ratio:.3f} (goal >= 0.8); against encode_batch_fast, which the build itself uses: {strict:.3f}")
    print(f"full build incl. tokenizer training ({train_s:.1f}s alone): {full_tps:,.0f} tok/s")
    cmd = " ".join(["python benchmarks/genesis_build.py", *argv])
    append_row(
        "Genesis build vs raw encode_batch",
        ["corpus", "build tok/s", "raw encode_batch tok/s", "ratio", "raw encode_batch_fast tok/s",
         "ratio vs fast", "full build tok/s", "machine", "command"],
        [f"embedded x{copies}, {corpus_bytes:.1f} MB, {n_built:,} tokens", f"{build_tps:,.0f}", f"{raw_tps:,.0f}",
         f"**{ratio:.2f}**", f"{fast_tps:,.0f}", f"{strict:.2f}", f"{full_tps:,.0f}", machine(), f"`{cmd}`"],
        note=("Build = the shard pass (read JSONL through `datasets`, encode, BOS/EOS, cut, SHA-256, fsync'd "
              "writes) with a trained tokenizer; raw = `encode_batch` on the same documents in memory. The build "
              "encodes with `encode_batch_fast` (no character offsets), so the stricter ratio against that is "
              "shown too. Medians of interleaved runs. Goal >= 0.8. Full build = tokenizer training + shard pass "
              "+ manifest."),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
