"""DiLoCo measured: counted bytes and final eval loss at equal tokens, against the synchronous baseline.

Every run goes through the real training path (``neuroray.training.run``: Ray stage-holder actors, the
outer-step Ray task, compression on the holders) on the tiny model, one stage per replica, and trains
the same number of tokens. ``batch=global`` (default, the DiLoCo papers' setup): every run takes
``steps4`` inner steps with the same global batch (``4 x mb`` sequences), split over its M replicas.
``batch=replica``: every replica takes ``mb`` sequences a step, so M replicas take ``4 * steps4 / M``
steps. Final eval loss: the checkpoint on the same 16 eval batches of 4 x mb sequences for every run.
Runs: synchronous (``diloco=sync``: 4 replicas, H=1, weights averaged every step), DiLoCo with M in {1, 2, 4}
and H in {10, 50, 100}, int8 / fp16 / sparse compression at M=4, H=50 (and int8 at M=4, H=10; sparse also with
``diloco.sparse_broadcast=union``, outer lr 1.0 without momentum), and Streaming DiLoCo
at M=4 with F=2 fragments at H=50 (also in int8) and F=4 at H=100 (F must divide H), whose peak bytes per
outer step go to a table of their own. ``outer=<preset>``: the DiLoCo runs' outer optimizer from
``conf/diloco/<preset>.yaml`` (default: lr 0.7, Nesterov 0.9; ``swept`` and ``tuned``: the settings chosen
with ``benchmarks/diloco_outer_sweep.py``, ``tuned`` at the headline setup that ``make bench`` runs). ``lr=cosine``: every run's inner lr warms up over its first 10 % of
steps and decays to a tenth by its last (``diloco.lr_schedule=cosine``); without it the lr is constant.
Bytes are the ones ``OuterSync.measure`` read from Ray's object store (pseudo-gradient payloads plus the
broadcasts to every holder); control-plane bytes (outer reports, acknowledgements, proofs) apart.

    flock /tmp/neuroray-cpu.lock python benchmarks/diloco_comm.py [batch=global|replica] [steps4=300]
                                                   [seq_len=64] [mb=4] [runs=label,...] [outer=default] [lr=constant|cosine] [seed=0] [write=1]
                                                   [sync=1]

A run label is one of the table's, or ``M=<m> H=<h>[ int8|fp16|sparse][ union][ <knob>=<value> ...]`` (run_of):
e.g. ``runs=M=4 H=10,M=4 H=10 sparse union ef=0.9 olr=4``. ``sync=0`` (with ``write=0``): leave out the sync run,
for a quick probe that only prints.

Writes docs/diloco_loss[_replica_batch][_<outer>][_cosine][_<steps4>][_seed<N>].png, appends the tables to docs/benchmarks.md (a row per run).
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from benchmarks._report import append_row, machine  # noqa: E402
from neuroray.configure import load_config  # noqa: E402
from neuroray.training.plots import metric_rows  # noqa: E402
from neuroray.training.run import run  # noqa: E402

PNG = ROOT / "docs" / "diloco_loss.png"
# (label, replicas M, inner steps H, compression, streaming fragments F); "sync" uses the diloco=sync preset
# "plain AdamW": one replica whose outer step (lr 1, no momentum) sets theta0 to its own weights, i.e. no
# DiLoCo at all: one AdamW on the whole batch, so with batch=global the gradient data-parallel training averages
RUNS = [("sync", 4, 1, "none", 1), ("plain AdamW", 1, 100, "none", 1)] + [(f"M={m} H={h}", m, h, "none", 1) for m in (1, 2, 4) for h in (10, 50, 100)] + [
    ("M=4 H=50 int8", 4, 50, "int8", 1), ("M=4 H=50 fp16", 4, 50, "fp16", 1), ("M=4 H=10 int8", 4, 10, "int8", 1),
    ("M=4 H=50 F=2", 4, 50, "none", 2), ("M=4 H=100 F=4", 4, 100, "none", 4), ("M=4 H=50 F=2 int8", 4, 50, "int8", 2),
    ("M=4 H=50 sparse", 4, 50, "sparse", 1), ("M=4 H=50 sparse union", 4, 50, "sparse", 1)]
# "... union": diloco.sparse_broadcast=union, which has no outer momentum (neuroray/diloco/union.py): the
# accepted payloads' mean applied at outer lr 1.0 (SparseLoCo's plain averaged step, error feedback in place of
# momentum), whatever outer=<preset> says
UNION = ["diloco.sparse_broadcast=union", "diloco.outer_lr=1.0", "diloco.outer_momentum=0.0", "diloco.nesterov=false"]


REFERENCES = ("sync", "plain AdamW")  # not DiLoCo runs: no outer preset, no goals


# the settings a run's label may add, ``<short>=<value>`` (run_of): diloco.<key>
KNOBS = {"ef": "sparse_feedback_decay", "olr": "outer_lr", "mom": "outer_momentum", "d": "sparse_density",
         "blk": "compression_block"}


def run_of(label: str) -> tuple:
    """A run of RUNS, or one named ``M=<m> H=<h>[ int8|fp16|sparse][ union][ <knob>=<value> ...]`` with knobs of
    KNOBS (``ef``: SparseLoCo's error-feedback decay, ``olr`` / ``mom``: the outer lr / momentum over the
    preset's and union's, ``d``: sparse density, ``blk``: compression block), e.g.
    ``M=4 H=10 sparse union ef=0.95 olr=2``."""
    known = {r[0]: r for r in RUNS}
    if label in known:
        return known[label]
    words = label.split()
    try:
        m, h = (int(w.split("=")[1]) for w, key in zip(words[:2], ("M=", "H=")) if w.startswith(key))
        compression = words[2] if len(words) > 2 and words[2] in ("int8", "fp16", "sparse") else "none"
        rest = words[2 + (compression != "none"):]
        assert all(w == "union" and compression == "sparse" or w.split("=")[0] in KNOBS and float(w.split("=")[1]) >= 0
                   for w in rest)
    except (ValueError, AssertionError, IndexError):
        raise SystemExit(f"run {label!r}: not a run of the table ({', '.join(known)}) nor "
                         "'M=<m> H=<h>[ int8|fp16|sparse][ union][ <knob>=<value> ...]' with knobs "
                         f"{sorted(KNOBS)}") from None
    return (label, m, h, compression, 1)


def _overrides(label: str, m: int, h: int, compression: str, fragments: int, args: dict, run_dir: str, extra=()):
    steps4, seq_len, mb = int(args["steps4"]), int(args["seq_len"]), int(args["mb"])
    if args["batch"] == "global":  # the same global batch and steps for every M
        steps, mb = steps4, mb * 4 // m
    else:  # the same per-replica batch: fewer replicas take more steps
        steps = steps4 * 4 // m
    assert steps % h == 0, f"{label}: {steps} steps is not a whole number of rounds of {h}"
    return [
        *(["diloco=sync"] if label == "sync" else []),
        # the outer optimizer of every DiLoCo run: a diloco preset (outer=default: lr 0.7, Nesterov 0.9)
        *([] if label in REFERENCES or args.get("outer", "default") == "default" else [f"diloco={args['outer']}"]),
        *(["diloco.outer_lr=1.0", "diloco.outer_momentum=0.0", "diloco.nesterov=false"] if label == "plain AdamW" else []),
        *(UNION if "union" in label.split() else []),
        *[f"diloco.{KNOBS[k]}={v}" for k, _, v in (w.partition("=") for w in label.split()[2:]) if k in KNOBS],
        # lr=cosine: every run's inner lr warms up over its first 10 % of steps, then decays to a tenth
        *(["diloco.lr_schedule=cosine", f"diloco.warmup_steps={steps // 10}"] if args.get("lr") == "cosine" else []),
        *([f"seed={args['seed']}"] if "seed" in args else []),  # the initial weights; the same data and eval
        f"diloco.replicas={m}", f"diloco.inner_steps={h}", f"diloco.compression={compression}",
        f"diloco.streaming_fragments={fragments}",
        f"rounds={steps // h}", "swarm.num_stages=1", f"data.seq_len={seq_len}", f"data.microbatch_size={mb}",
        "data.num_microbatches=1", f"cluster.cpus_per_holder={2 / 4}", "checkpoint.interval_s=0",
        f"run_dir={run_dir}", "sample_tokens=1", f"log_every={max(steps // 4, 1)}", "progress_bar=false",
        *extra,
    ]


def one_run(label, m, h, compression, fragments, args, tmp, extra=(), tag="") -> dict:
    """Train one run of the table (``extra``: more overrides, e.g. the outer optimizer) and measure it."""
    run_dir = str(Path(tmp) / (tag + label.replace(" ", "_").replace("=", "")))
    cfg = load_config(_overrides(label, m, h, compression, fragments, args, run_dir, extra))
    t0 = time.monotonic()
    result = run(cfg, log=lambda *a, **k: None)
    # batch=replica: every run has the same microbatch, so train.run's own eval set is the same for all
    eval_loss = result.eval_loss if args["batch"] == "replica" else _eval(cfg, result.checkpoint, int(args["mb"]) * 4)
    rows = metric_rows(result.run_dir / "metrics.jsonl")[0]  # the training rows
    tokens_per_step = result.tokens / len(result.losses)
    out = {"label": label, "m": m, "h": h, "compression": compression, "fragments": fragments, "eval_loss": eval_loss,
           "outer_steps": len(result.comm), "peak_sync_bytes": max(c["sync_bytes"] for c in result.comm),
           "tokens": result.tokens, "sync_bytes": result.sync_bytes, "control_bytes": result.control_bytes,
           "payload_bytes": sum(c["payload_bytes"] for c in result.comm),
           "broadcast_bytes": sum(c["broadcast_bytes"] for c in result.comm),
           "curve": [(r["step"] * tokens_per_step, r["loss"]) for r in rows], "seconds": time.monotonic() - t0}
    print(f"{tag}{label:>16}: eval {out['eval_loss']:.4f}, {out['sync_bytes'] / out['tokens']:,.1f} sync B/token, "
          f"{out['control_bytes'] / out['tokens']:,.2f} control B/token, {out['seconds']:.0f}s", flush=True)
    return out


def _eval(cfg, checkpoint: Path, microbatch: int) -> float:
    """Eval loss of a run's checkpoint on the same batches for every run (train.run's own eval uses the
    run's microbatch size, which differs between runs when the global batch is split over M replicas)."""
    import torch

    from neuroray.checkpoint import load_checkpoint
    from neuroray.genesis import ensure_dataset, eval_batches
    from neuroray.model import build_monolith

    root, manifest = ensure_dataset(cfg.data, log=lambda *a, **k: None)
    state, meta = load_checkpoint(checkpoint)
    model = build_monolith(cfg.model, meta["vocab_size"], seed=cfg.seed)
    model.load_state_dict(state)
    model.eval()
    batches = eval_batches(root, manifest, cfg.data.seq_len, microbatch, max_batches=16)
    with torch.no_grad():
        return sum(float(model.loss(model(x), y)) for x, y in batches) / len(batches)


def _plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for r in results:
        xs, ys = zip(*r["curve"])
        k = max(len(ys) // 60, 1)  # smooth: mean of k consecutive steps, so 1200-step runs stay readable
        xs = [sum(xs[i:i + k]) / len(xs[i:i + k]) for i in range(0, len(xs), k)]
        ys = [sum(ys[i:i + k]) / len(ys[i:i + k]) for i in range(0, len(ys), k)]
        style = "-" if r["label"] in REFERENCES else "--" if r["compression"] != "none" else ":"
        ax.plot(xs, ys, style, lw=2.2 if r["label"] == "sync" else 1.2,
                label=f"{r['label']} (eval {r['eval_loss']:.3f})")
    ax.set_xlabel("training tokens (all replicas)")
    ax.set_ylabel("train loss (nats, mean of replicas)")
    ax.set_title(title, fontsize=8, wrap=True)  # the setup line is long
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _goals(r: dict, sync: dict, ratio: float) -> str:
    if r["label"] in REFERENCES:
        return ""
    loss = r["eval_loss"] / sync["eval_loss"] - 1
    need = 3.8 if r["compression"] == "int8" else 0.95
    goals = [f"bytes >= {need}H: {'met' if ratio >= need * r['h'] else 'NOT met'}"]
    if r["m"] == 4 and r["h"] == 50 and r["compression"] == "none" and r["fragments"] == 1:
        goals.append(f"loss <= +3%: {'met' if loss <= 0.03 else 'NOT met'}")
    if r["m"] == 1:
        goals.append(f"loss <= sync: {'met' if loss <= 0 else 'NOT met'}")
    return "; ".join(goals)


def main(argv: list[str]) -> None:
    args = {"batch": "global", "steps4": "300", "seq_len": "64", "mb": "4", "write": "1",
            **dict(a.split("=", 1) for a in argv)}
    if args["batch"] not in ("global", "replica"):
        raise SystemExit(f"batch={args['batch']}: choose global or replica")
    # runs=: sync first (everything is measured against it; sync=0 leaves it out, with write=0 only, for probes)
    labels = [r[0] for r in RUNS] if "runs" not in args else ["sync"] + [
        x for x in args["runs"].split(",") if x != "sync"]
    if args.get("sync") == "0":
        if args["write"] != "0":
            raise SystemExit("sync=0 needs write=0: the tables are measured against sync")
        labels = [x for x in labels if x != "sync"]
    runs = [run_of(x) for x in labels]
    for r in runs:  # a bad run's config fails here, not after the others have trained for half an hour
        load_config(_overrides(*r, args, "unused"))
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "300000")  # as neuroray.train does
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="diloco-comm-") as tmp:
            results = [one_run(*r, args, tmp) for r in runs]
    finally:
        ray.shutdown()
    if args["write"] == "0":
        return
    _write(results, args, "flock /tmp/neuroray-cpu.lock python benchmarks/diloco_comm.py " + shlex.join(argv))


def _write(results: list[dict], args: dict, cmd: str) -> None:
    """The loss-curve PNG and the tables in docs/benchmarks.md (the main one; streaming's peak bytes apart)."""
    sync = results[0]
    sync_bpt = sync["sync_bytes"] / sync["tokens"]
    # fp32 at the same M, H and F: what compression's own cost is measured against
    fp32 = {(r["h"], r["fragments"]): r for r in results if r["m"] == 4 and r["compression"] == "none"}
    tokens = sync["tokens"]
    outer = args.get("outer", "default")
    title = (f"tiny model, 1 stage, {tokens:,} tokens per run (sync: 4 replicas, H=1), seq {args['seq_len']}, "
             + (f"global batch 4 x {args['mb']} sequences split over M replicas, {args['steps4']} steps"
                if args["batch"] == "global" else f"{args['mb']} sequences per replica and step")
             + (f", outer optimizer diloco={outer}" if outer != "default" else "")
             + (", inner lr cosine (10 % warmup, decay to a tenth)" if args.get("lr") == "cosine" else ""))
    suffix = ("" if args["batch"] == "global" else "_replica_batch") + ("" if outer == "default" else f"_{outer}") + (
        "_cosine" if args.get("lr") == "cosine" else "") + ("" if args["steps4"] == "300" else f"_{args['steps4']}") + (
        f"_seed{args['seed']}" if "seed" in args else "")
    png = PNG.with_name(f"diloco_loss{suffix}.png")
    _plot(results, png, title)
    section = f"DiLoCo: counted bytes and loss at equal tokens ({args['batch']} batch fixed" + (
        "" if outer == "default" else f", diloco={outer}") + (", cosine lr" if args.get("lr") == "cosine" else "") + (
        "" if args["steps4"] == "300" else f", {args['steps4']} steps") + (
        f", seed {args['seed']}" if "seed" in args else "") + ")"
    for r in results:
        bpt = r["sync_bytes"] / r["tokens"]
        ratio = sync_bpt / bpt
        loss = r["eval_loss"] / sync["eval_loss"] - 1
        goals = _goals(r, sync, ratio)
        base = fp32.get((r["h"], r["fragments"])) if r["compression"] != "none" else None
        if base is not None:  # compression's own cost, against the same M, H and F in fp32
            cost = r["eval_loss"] / base["eval_loss"] - 1
            goals += f"; {cost:+.2%} vs fp32" + (f" (<= +0.5%: {'met' if cost <= 0.005 else 'NOT met'})"
                                                  if r["compression"] == "int8" else "")
            if r["compression"] == "sparse":  # issue #20: >= 100x fewer bytes than fp32, loss <= fp32's
                fewer = (base["sync_bytes"] / base["tokens"]) / bpt
                up, down = (base[k] / r[k] for k in ("payload_bytes", "broadcast_bytes"))
                goals += (f"; {fewer:.0f}x fewer bytes than fp32 (>= 100x: {'met' if fewer >= 100 else 'NOT met'}; "
                          f"up {up:.0f}x, down {down:.0f}x)"
                          f"; loss <= fp32: {'met' if cost <= 0 else 'NOT met'}")
        append_row(
            section,
            ["run", "M", "H", "compression", "eval loss", "vs sync", "sync B/token", "ratio to sync",
             "payload / broadcast MB", "control B/token", "goals", "s", "machine", "command"],
            [r["label"], str(r["m"]), str(r["h"]), r["compression"], f"{r['eval_loss']:.4f}", f"{loss:+.2%}",
             f"{bpt:,.1f}", f"**{ratio:,.1f}**", f"{r['payload_bytes'] / 1e6:,.1f} / {r['broadcast_bytes'] / 1e6:,.1f}",
             f"{r['control_bytes'] / r['tokens']:,.2f}", goals, f"{r['seconds']:.0f}", machine(), f"`{cmd}`"],
            note=(f"Real training path (`neuroray.training.run`), {title}. Bytes: serialized sizes, measured by the "
                  "outer-step task (a test checks them against Ray's object store), of every pseudo-gradient "
                  "payload and of what every holder fetched back (docs/diloco.md); "
                  "ratio = sync's bytes per token / the run's. Goals: ratio >= 0.95 H (fp32), >= 3.8 H (int8); "
                  "M=4 H=50 within +3 % of sync; M=1 at or below sync; int8 at most +0.5 % vs fp32 at the same "
                  f"M and H. Loss curves: [{png.name}]({png.name}). F: Streaming DiLoCo fragments per range."))
    _write_streaming(results, sync, section, cmd)


def _write_streaming(results: list[dict], sync: dict, section: str, cmd: str) -> None:
    """Streaming rows beside the unstreamed run of the same M, H and compression: the peak bytes of one
    outer step (the largest round's payloads + broadcasts) against the bytes of the whole run."""
    whole = {(r["m"], r["h"], r["compression"]): r for r in results if r["fragments"] == 1}
    for r in results:
        base = whole.get((r["m"], r["h"], r["compression"]))
        if base is None or not any(x["fragments"] > 1 and (x["m"], x["h"], x["compression"]) == (r["m"], r["h"],
                                                                                        r["compression"])
                                   for x in results):
            continue
        append_row(
            section.replace("counted bytes and loss", "streaming, peak bytes per outer step,"),
            ["run", "F", "outer steps", "eval loss", "vs sync", "vs F=1", "peak sync MB per outer step",
             "F=1 peak / this peak", "total sync MB", "total vs F=1", "machine", "command"],
            [r["label"], str(r["fragments"]), str(r["outer_steps"]), f"{r['eval_loss']:.4f}",
             f"{r['eval_loss'] / sync['eval_loss'] - 1:+.2%}", f"{r['eval_loss'] / base['eval_loss'] - 1:+.2%}",
             f"{r['peak_sync_bytes'] / 1e6:,.2f}", f"**{base['peak_sync_bytes'] / r['peak_sync_bytes']:.2f}**",
             f"{r['sync_bytes'] / 1e6:,.1f}", f"{r['sync_bytes'] / base['sync_bytes']:.4f}", machine(), f"`{cmd}`"],
            note=("Same runs as the table above. An outer step's bytes: every holder's payload plus what every "
                  "holder fetched back, in one sync (a fragment's, with streaming). Fragments are groups of the "
                  "range's layers (embedding with the first, norm and head with the last), so they are not "
                  "equal: the peak falls by less than F when one fragment is larger."))


if __name__ == "__main__":
    main(sys.argv[1:])
