"""neuroray's DiLoCo side by side with torchft 0.2.0's DiLoCo: same model, data, M, H, token budget, seed, cores.

Both arms train neuroray's tiny model (4 layers, d_model 128) on the embedded genesis dataset, M replicas of one
stage each, H inner AdamW steps (neuroray's DilocoConfig defaults: lr 1e-3, weight decay 0.1, betas 0.9/0.95,
grad clip 1.0) between outer Nesterov SGD steps (lr 0.7, momentum 0.9), ``mb`` sequences of ``seq_len`` tokens per
replica and step, ``rounds`` outer steps, the same initial weights (``seed``), one torch thread per replica.

- neuroray: ``neuroray.training.run.run`` (Ray stage-holder actors, the outer-step task, the object store), the
  path ``neuroray.train`` takes, with ``diloco.replicas=M``, ``swarm.num_stages=1``: the full system a user runs,
  so the comparison includes its control plane, as torchft's includes its Lighthouse and Manager.
- torchft: a ``LighthouseServer`` in this process (min_replicas 1 so a survivor may go on alone; join timeout
  10 s and quorum tick 100 ms, as torchft's README starts its lighthouse) and M processes of
  ``benchmarks/_torchft_replica.py`` (``Manager`` + ``ProcessGroupGloo`` + ``DiLoCo``).

Reported per arm: final eval loss (the same 16 held-out batches of ``mb`` sequences), bytes of the outer syncs
(neuroray: what ``OuterSync.measure`` read from the object store, pseudo-gradients up plus broadcasts down;
torchft: the tensors handed to ``Manager.allreduce``, all replicas, which for Gloo's ring at M=2 is what each
replica sends; the replicas' ``wchar`` during sync steps beside it as a cross-check), the median inner step, and
recovery: a second run per arm in which replica 1 is killed mid-round (neuroray: its holder actor ``ray.kill``ed,
Ray restarts it from its snapshot; torchft: its process SIGKILLed and started again at once, as torchelastic
would, healing from the live replica at its first quorum). Recovery = kill -> the restarted replica is back at
work: neuroray, the first step submitted after the kill completes (as benchmarks/recovery.py times it); torchft,
the first outer step committed by all M replicas again (the restarted process trains from fresh weights until its
first quorum, where it heals from the live replica; its first inner step is reported beside it).

    flock /tmp/neuroray-cpu.lock python benchmarks/torchft_side_by_side.py [rounds=6] [h=20] [m=2] [mb=4]
        [seq_len=64] [seed=0] [recovery=1] [int8=1] [arms=both|torchft] [write=1]

``int8=1`` adds a neuroray run with ``diloco.compression=int8`` (clean only: its bytes and loss);
``arms=torchft`` runs the torchft arm alone and writes nothing (a check that it runs). ``extra="k=v k2=v2"``:
Hydra overrides for the neuroray arms only (e.g. ``extra=checkpoint.spares=1``, warm spares: docs/checkpointing.md);
their rows name them.

Appends the rows to docs/benchmarks.md ("Side by side with torchft DiLoCo").
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import append_row, machine  # noqa: E402
from neuroray.configure import load_config  # noqa: E402

SECTION = "Side by side with torchft DiLoCo"
REPLICA = Path(__file__).resolve().parent / "_torchft_replica.py"
# the data store's default, spelled out: a process on a lab host (benchmarks/lab_torchft.py) has a HOME of its own
DATA_STORE = str(Path("~/.cache/neuroray/genesis").expanduser())


def overrides(args: dict, run_dir: str, extra=()) -> list[str]:
    """One config for both arms: torchft's replicas read the model, data and DiLoCo settings from it too. The
    holder keys live beside the runs, so ``node_ids`` can hand torchft's replica r the data stream of neuroray's."""
    return [f"swarm.key_dir={Path(run_dir).parent / 'keys'}", f"seed={args['seed']}", f"diloco.replicas={args['m']}",
            f"diloco.inner_steps={args['h']}",
            f"rounds={args['rounds']}", "swarm.num_stages=1", f"data.seq_len={args['seq_len']}",
            f"data.microbatch_size={args['mb']}", "data.num_microbatches=1", "cluster.cpus_per_holder=0.5",
            f"data.store={DATA_STORE}",
            "checkpoint.interval_s=0", f"run_dir={run_dir}", "sample_tokens=1", "log_every=1",
            "progress_bar=false", *extra]


def node_ids(cfg) -> list[str]:
    """The node id of each replica's first-stage holder: its ``TokenStream`` (shard = sha256(node id) mod N) is
    the data that replica trains on; torchft's replica r reads the same stream, batch for batch."""
    from neuroray.ponw.identity import Identity

    key_dir = Path(cfg.swarm.key_dir).expanduser()
    key_dir.mkdir(parents=True, exist_ok=True)
    return [Identity.load_or_create(str(key_dir / f"holder-r{r}-s0.pem")).node_id
            for r in range(cfg.diloco.replicas)]


def eval_loss(cfg, state: dict) -> float:
    """Loss of ``state`` on the same 16 held-out batches for both arms."""
    import torch

    from neuroray.genesis import ensure_dataset, eval_batches, load_tokenizer
    from neuroray.model import build_monolith

    root, manifest = ensure_dataset(cfg.data, log=lambda *a, **k: None)
    vocab = load_tokenizer(Path(root) / manifest.tokenizer_file).get_vocab_size()
    model = build_monolith(cfg.model, vocab, seed=cfg.seed)
    model.load_state_dict(state)
    model.eval()
    batches = eval_batches(root, manifest, cfg.data.seq_len, cfg.data.microbatch_size, max_batches=16)
    with torch.no_grad():
        return sum(float(model.loss(model(x), y)) for x, y in batches) / len(batches)


# ---------------------------------------------------------------- torchft


def start_lighthouse(min_replicas: int = 1):
    from torchft.coordination import LighthouseServer

    return LighthouseServer(bind="[::]:0", min_replicas=min_replicas, join_timeout_ms=10000, quorum_tick_ms=100)


def _rows(progress: Path) -> list[dict]:
    return [json.loads(line) for line in progress.read_text().splitlines() if line.endswith("}")] \
        if progress.exists() else []


class OnePlace:
    """Where the torchft arm's processes run: here, the Lighthouse in this process and the replicas beside it.
    benchmarks/lab_torchft.py puts them on lab hosts instead."""

    def lighthouse(self):
        """Start it; returns (its address, a function that stops it)."""
        server = start_lighthouse()
        return server.address(), server.shutdown

    def replica(self, r: int, argv: list[str], env: dict) -> tuple[list[str], dict, str]:
        """(argv, env) that start replica ``r``, and the address it advertises to its peers."""
        return argv, env, "localhost"


def torchft_arm(args: dict, tmp: Path, kill_at: int | None, deadline_s: float, place=None) -> dict:
    """M replica processes under one Lighthouse; with ``kill_at``, replica 1 is SIGKILLed after its local step
    ``kill_at`` and started again at once (where ``place`` starts it)."""
    place = place or OnePlace()
    tmp.mkdir(parents=True, exist_ok=True)
    lighthouse, stop_lighthouse = place.lighthouse()
    progress = tmp / "progress.jsonl"
    ids = node_ids(load_config(overrides(args, str(tmp))))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def spawn(r: int, incarnation: int) -> subprocess.Popen:
        spec = {"replica": r, "node_id": ids[r], "overrides": overrides(args, str(tmp)),
                "lighthouse": lighthouse,
                "rounds": int(args["rounds"]), "min_replicas": 1, "timeout_s": 120, "progress": str(progress),
                "barrier": 0 if incarnation else int(args["m"]),
                "result": str(tmp / f"result-{r}-{incarnation}.json"),
                "save": str(tmp / "final.pt") if r == 0 else ""}
        argv, run_env, spec["host"] = place.replica(r, [sys.executable, str(REPLICA)], env)
        return subprocess.Popen(argv + [json.dumps(spec)], env=run_env, cwd=str(ROOT), stdout=subprocess.DEVNULL,
                                stderr=open(tmp / f"replica-{r}-{incarnation}.log", "w"))

    t0 = time.time()
    procs = {r: spawn(r, 0) for r in range(int(args["m"]))}
    killed: dict = {}
    try:
        while any(p.poll() is None for p in procs.values()):
            if time.time() - t0 > deadline_s:
                raise RuntimeError(f"torchft arm: not done after {deadline_s:.0f} s (logs in {tmp})")
            if kill_at is not None and not killed and any(
                    r["replica"] == 1 and r.get("local") == kill_at for r in _rows(progress)):
                victim = procs[1]
                os.kill(victim.pid, signal.SIGKILL)
                killed = {"t": time.time(), "pid": victim.pid}
                victim.wait()
                procs[1] = spawn(1, 1)
                killed["new_pid"] = procs[1].pid
            time.sleep(0.02)
        bad = {r: p.returncode for r, p in procs.items() if p.returncode != 0}
        if bad:
            raise RuntimeError(f"torchft replicas exited with {bad} (logs in {tmp})")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        stop_lighthouse()
    wall = time.time() - t0
    results = [json.loads(f.read_text()) for f in sorted(tmp.glob("result-*.json"))]
    rows = _rows(progress)
    out = {"arm": "torchft", "wall_s": wall, "tokens": sum(r["tokens"] for r in results),
           "inner_step_s": statistics.median(s for r in results for s in r["inner_s"]),
           "sync_bytes": sum(r["allreduce_bytes"] for r in results),
           "sync_wchar": sum(r["sync_wchar"] for r in results),
           "outer_steps": max(r["outer_steps"] for r in results)}
    steps = [r["t"] for r in rows if r["kind"] in ("inner", "sync")]
    out["first_step_t"], out["last_step_t"] = min(steps), max(steps)  # the ends of the first and last steps
    if killed:
        t = killed["t"]
        back = min(r["t"] for r in rows if r["pid"] == killed["new_pid"] and r["kind"] in ("inner", "sync"))
        full = min((r["t"] for r in rows if r["kind"] == "commit" and r["ok"] and r["t"] > t
                    and r["participants"] == int(args["m"])), default=float("nan"))
        out.update(recovery_s=back - t, full_quorum_s=full - t)
    else:
        import torch

        by_step: dict[int, list[float]] = {}
        for r in rows:
            if r["kind"] in ("inner", "sync"):
                by_step.setdefault(r["local"], []).append(r["loss"])
        out["curve"] = [statistics.mean(by_step[s]) for s in sorted(by_step)]
        out["eval_loss"] = eval_loss(load_config(overrides(args, str(tmp))), torch.load(tmp / "final.pt"))
    return out


# ---------------------------------------------------------------- neuroray


def neuroray_arm(args: dict, tmp: Path, kill_at: int | None, compression: str = "none") -> dict:
    """``run`` on the same config; with ``kill_at``, replica 1's holder is ``ray.kill``ed once the driver has
    recorded inner step ``kill_at`` (Ray restarts it from its snapshot)."""
    import ray

    from benchmarks._lab_driver import instrument
    from neuroray.checkpoint import load_checkpoint
    from neuroray.training.plots import metric_rows
    from neuroray.training.run import run

    run_dir = tmp / ("neuroray-kill" if kill_at is not None else f"neuroray-{compression}")
    cfg = load_config(overrides(args, str(run_dir), [f"diloco.compression={compression}"] + (
        ["checkpoint.every_round=true"] if kill_at is not None else []) + args["extra"].split()))
    submits, dones, marks = {}, {}, {}

    def clock(kind: str, step: int) -> None:
        (submits if kind == "submit" else dones)[step] = time.monotonic()
        if kind == "done" and step == kill_at and "kill" not in marks:
            marks["kill"] = time.monotonic()
            ray.kill(ray.get_actor(f"neuroray-{run_dir.name}-r1-s0"), no_restart=False)

    if kill_at is not None:
        instrument(clock).clear()
    t0 = time.monotonic()
    result = run(cfg, log=lambda *a, **k: None)
    wall = time.monotonic() - t0
    rows, h = metric_rows(result.run_dir / "metrics.jsonl")[0], int(args["h"])
    # inner steps only: the step that ends a round waits for the outer step, the next one for its broadcast
    inner = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:]) if b["step"] % h not in (0, 1)]
    out = {"arm": "neuroray", "wall_s": wall, "tokens": result.tokens, "inner_step_s": statistics.median(inner),
           "sync_bytes": result.sync_bytes, "outer_steps": len(result.comm)}
    if kill_at is not None:
        assert result.recoveries, "the kill did not trigger a recovery"
        after = sorted(s for s, t in submits.items() if t > marks["kill"] and s in dones)
        out.update(recovery_s=dones[after[0]] - marks["kill"], restored_s=result.recoveries[0]["seconds"])
    else:
        out["curve"] = [r["loss"] for r in rows]
        out["eval_loss"] = eval_loss(cfg, load_checkpoint(result.checkpoint)[0])
    return out


# ---------------------------------------------------------------- report


def _write(clean: dict, kill: dict, args: dict, cmd: str) -> None:
    m, h, rounds = int(args["m"]), int(args["h"]), int(args["rounds"])
    note = (f"neuroray's tiny model, M={m} replicas of one stage, H={h}, {rounds} outer steps, {args['mb']} x "
            f"{args['seq_len']} tokens per replica and step, seed {args['seed']}, one torch thread per replica, "
            "both arms in one run on the same cores (benchmarks/torchft_side_by_side.py docstring has the setup). "
            "Sync bytes: neuroray, the object-store payloads (pseudo-gradients up + outer update broadcast down, "
            "fp32); torchft, the tensors handed to `Manager.allreduce` by all replicas (Gloo's ring at M=2 sends "
            "that much), replicas' `wchar` during sync steps in brackets. Recovery: replica 1 killed mid-round, "
            "then kill -> the restarted replica is back at work: neuroray, the first step submitted after the kill "
            "completes (benchmarks/recovery.py's clock); torchft, the first outer step committed by all M replicas "
            "again (a restarted replica trains from its fresh weights until its first quorum, heals from the live "
            "replica there, and only then counts). Eval loss: the final weights on the same 16 held-out batches. "
            "Step times and wall times are only indicative: the lock keeps other benchmarks off the 2 cores, not "
            "other sessions' tests; losses and bytes do not depend on load.")
    for arm in clean:
        c, k = clean[arm], kill.get(arm, {})
        label = arm if arm == "torchft" or not args["extra"] else f"{arm} ({args['extra']})"
        per = c["sync_bytes"] / max(c["outer_steps"], 1)
        bytes_cell = f"{c['sync_bytes'] / 2**20:.2f} MiB ({per / 2**20:.2f} MiB/outer step)"
        if arm == "torchft":
            bytes_cell += f" [wchar {c['sync_wchar'] / 2**20:.2f} MiB]"
        rec = "-" if not k else (
            f"**{k['full_quorum_s']:.2f} s** (restarted process's first inner step, from fresh weights before it "
            f"heals, after {k['recovery_s']:.2f} s)" if arm == "torchft"
            else f"**{k['recovery_s']:.2f} s** (holder restored from its snapshot in {k['restored_s']:.2f} s)")
        append_row(SECTION, ["arm", "eval loss", "tokens", "outer sync bytes", "median inner step", "loop wall s",
                             "recovery after a replica is killed", "machine", "command"],
                   [label, f"{c['eval_loss']:.4f}", f"{c['tokens']:,}", bytes_cell, f"{c['inner_step_s'] * 1e3:.1f} ms",
                    f"{c['wall_s']:.1f}", rec, machine(), f"`{cmd}`"], note=note)


def main(argv: list[str]) -> None:
    args = {"rounds": "6", "h": "20", "m": "2", "mb": "4", "seq_len": "64", "seed": "0", "recovery": "1",
            "arms": "both", "int8": "1", "write": "1", "extra": "", **dict(a.split("=", 1) for a in argv)}
    if int(args["m"]) < 2 or int(args["rounds"]) < 3:
        raise SystemExit("need m >= 2 (replica 1 is the one killed) and rounds >= 3 (the kill is in round 2)")
    load_config(overrides(args, "unused", args["extra"].split()))  # a bad override fails before anything trains
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the arms' `finally` stop the replica processes
    kill_at = 2 * int(args["h"]) + int(args["h"]) // 2  # mid-round, in the third round
    import ray

    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "300000")  # as neuroray.train does
    clean, kill = {}, {}
    with tempfile.TemporaryDirectory(prefix="torchft-sbs-") as tmp:
        clean["torchft"] = torchft_arm(args, Path(tmp) / "torchft", None, deadline_s=900)
        print("torchft clean:", json.dumps(clean["torchft"]), flush=True)
        if args["recovery"] == "1":
            kill["torchft"] = torchft_arm(args, Path(tmp) / "torchft-kill", kill_at, deadline_s=900)
            print("torchft kill:", json.dumps(kill["torchft"]), flush=True)
        if args["arms"] == "torchft":
            return
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            clean["neuroray"] = neuroray_arm(args, Path(tmp), None)
            print("neuroray clean:", json.dumps(clean["neuroray"]), flush=True)
            if args["int8"] == "1":  # neuroray's int8 pseudo-gradients and broadcasts, for the bytes
                clean["neuroray int8"] = {**neuroray_arm(args, Path(tmp), None, "int8"), "arm": "neuroray int8"}
                print("neuroray int8 clean:", json.dumps(clean["neuroray int8"]), flush=True)
            if args["recovery"] == "1":
                kill["neuroray"] = neuroray_arm(args, Path(tmp), kill_at)
                print("neuroray kill:", json.dumps(kill["neuroray"]), flush=True)
        finally:
            ray.shutdown()
    if args["write"] != "0":
        _write(clean, kill, args, "flock /tmp/neuroray-cpu.lock python benchmarks/torchft_side_by_side.py "
               + shlex.join(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
