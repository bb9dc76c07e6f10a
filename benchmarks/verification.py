"""Detection table: holders that cheat from inside their own processes, and what catches them.

1. Real holders (Ray): for every holder-side attack of neuroray/swarm/attacks_in_holder.py (``misbehaving``),
   one run of the tiny model, ``replicas`` replicas x 2 stages, ``aggregator=robust``, ``rounds`` rounds,
   ``routing`` fixed or router; one holder of replica 2 (:data:`ATTACKS` names which) cheats from round 1 on
   (tampered hops, lazy compute, lying accounts, poisoned, replayed or copied pseudo-gradients, wrong data,
   slow walking, also hidden from the holder's own clock), replicas 0 and 1 are honest. Spot checks at
   ``ponw.spot_check_rate=rate`` (1.0 by default: every credited Driver proof, so the table shows what a
   check catches; at a rate p a persistent liar is caught after 1/p rounds on average). Per attack:
   whether the attacker was caught and in which round first (its proof refused, invalidated, earning 0, or
   its holder named among the round's rejections), the NEURO it kept against an honest holder's of its range,
   false positives (an honest holder refused, named, slashed or paid 0: the cheater's replica-mate
   included), the eval loss against the honest run's, and the cost of the spot checks: the
   recompute thread's seconds over the run's training seconds; and of the hop rechecks
   (``ponw.hop_recheck_rate=hop_rate``, 1.0 by default, neuroray/training/hop_audit.py): the holders' own
   re-execution seconds over the run's training seconds.
   ``cost=1``: instead, the honest run at each hop recheck rate of ``cost_rates`` (default 0,0.1,1; a rate may
   repeat, to see the noise): training seconds and the re-executions' share, side by side (the step-time
   overhead is the training-time ratio).
2. Honest rounds, in process: ``seeds`` x ``honest_rounds`` DiLoCo rounds of 8 honest replicas (the
   robustness benchmark's setup) through the outer step with ``aggregator=robust`` (f=2): how many
   honest holders the outlier naming (neuroray/ponw/outliers.py) names, with the smallest cosine to the
   robust aggregate and the largest norm ratio seen (the thresholds are 0 and 4).

    flock /tmp/neuroray-cpu.lock python benchmarks/verification.py [rounds=3] [rate=1.0] [hop_rate=1.0]
                                 [replicas=3] [routing=fixed] [seed=0] [seeds=3] [honest_rounds=100] [attacks=a,b,...]
                                 [cost=0] [cost_rates=0,0.1,1] [write=1] [keep=DIR]

Appends rows to docs/benchmarks.md ("Verification: ..."). ``keep=DIR``: the runs' directories (each with the
run's log.txt) go under DIR and are kept, to see which rule named a holder.
"""

from __future__ import annotations

import contextlib
import math
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402

from benchmarks._report import append_row, machine  # noqa: E402
from neuroray.config import PonwConfig  # noqa: E402
from neuroray.configure import load_config  # noqa: E402

# key -> (what the table calls it, the cheating slot, holder attack, value[, first round, noise std]); replica 2
# is the attacker, replicas 0 and 1 are honest. Stage 0 is the Driver, stage 1 the Validator
# (neuroray/swarm/attacks_in_holder.py).
ATTACKS = {
    "honest": ("honest (no attacker)", None, None, 0),
    "lie": ("lying loss: commits 0.5 x the losses it computed", "r2-s0", "lie_loss", 0.5),
    "lie_small": ("lying loss: 0.98 x", "r2-s0", "lie_loss", 0.98),
    "lie_half_pct": ("lying loss: 0.995 x", "r2-s0", "lie_loss", 0.995),
    "lie_within": ("lying loss: 0.9995 x (inside the float32 tolerance, 0.001)", "r2-s0", "lie_loss", 0.9995),
    "inflate": ("inflated batch count: +4 per round", "r2-s0", "inflate_batches", 4),
    "scale": ("scaled pseudo-gradient: x100", "r2-s0", "scale_delta", 100),
    "sign_flip": ("sign-flipped pseudo-gradient", "r2-s0", "sign_flip", 1),
    "zero": ("zero pseudo-gradient (free rider)", "r2-s0", "zero_delta", 0),
    "replay": ("replayed pseudo-gradient (previous round's)", "r2-s0", "stale_delta", 0),
    "copy": ("copied pseudo-gradient (replica 0's, read from its actor)", "r2-s0", "copy", 0),
    "tamper_act": ("tampered activations: sign-flipped (Driver)", "r2-s0", "tamper_activations", -1),
    "tamper_act_noise": ("tampered activations: + noise at 1 x their RMS (Driver)", "r2-s0", "tamper_activations", 1,
                         1, 1.0),
    "tamper_grad": ("tampered gradients: sign-flipped (Validator)", "r2-s1", "tamper_gradients", -1),
    "lazy_zero": ("lazy Validator: zeros, loss ln V", "r2-s1", "lazy_zero", 0),
    "lazy_stale": ("lazy Validator: previous microbatch's loss and gradient", "r2-s1", "lazy_stale", 0),
    "wrong_data": ("wrong data: the Driver trains on the next shard", "r2-s0", "wrong_data", 1),
    "slow_walk": ("slow walk: every compute call x3 (Validator)", "r2-s1", "slow_walk", 3),
    "slow_walk_hidden": ("slow walk hidden from its own clock: every compute call x3, its busy clock records 1x "
                         "(Validator)", "r2-s1", "slow_walk_hidden", 3),
    "slow_walk_hidden8": ("slow walk hidden from its own clock: x8 (Validator)", "r2-s1", "slow_walk_hidden", 8),
}
STAGES = 2
SMALL = ["data.vocab_size=1024", "data.seq_len=32", "data.microbatch_size=8", "data.num_microbatches=2",
         "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4", "model.max_seq_len=64"]
NAMED = re.compile(r"outer round (\d+): range (\d+) rejected holder #(\d+): (.*)")
# a holder that worked on what a proven-faulty holder sent is credited though the rule set its update aside
EXCUSED = re.compile(r"ledger: round (\d+): r(\d+)-s(\d+) excused:")
# a hop its receiver rejected: the trainer names the sender, which the step leaves out (under the router: benched,
# so it has no proof of the round for the ledger to refuse)
HOP_REJECTED = re.compile(r"^hop rejected: .*\(sent by r(\d+)-s(\d+), inner step (\d+)\)")
CHECKED = re.compile(r"spot check: round \d+: \d+ Driver proof\(s\) recomputed in ([0-9.]+)s")
RECHECKED = re.compile(r"hop recheck: round \d+: (\d+) microbatch\(es\) re-executed on peers in ([0-9.]+)s")
REPLAY_CHECK = re.compile(r"replay check: outer round (\d+): range (\d+): (.*) \(([0-9.]+)s\)$")
SCORE = re.compile(r"r(\d+) (fresh rows x|lead )([+-]?[0-9.]+|inf)")
# fixed routing: each holder's pace on the driver's clock of the calls (neuroray/training/call_clock.py), per round
PACES = re.compile(r"call clock: round (\d+): pace, x the range's median per call: (.*?) \(the clock's own CPU so far ([0-9.]+)s in (\d+) wakes")


def pace_spread(lines: list[str], attacker: str | None) -> dict:
    """From a run's call-clock lines: every holder's pace over the median of its range's other holders', per round;
    the honest holders' largest ratio in one round and in two rounds in a row (the straggler rule's test), the
    attacker's ratios, and the clock thread's CPU seconds and wakes."""
    ratios, cpu, wakes = [], 0.0, 0
    for line in lines:
        m = PACES.search(line)
        if not m:
            continue
        pace = {k: float(v) for k, v in re.findall(r"(r\d+-s\d+) ([0-9.]+)", m.group(2))}
        cpu, wakes = float(m.group(3)), int(m.group(4))
        ratios.append({k: v / statistics.median([x for o, x in pace.items() if o != k and o[-3:] == k[-3:]])
                       for k, v in pace.items() if sum(o[-3:] == k[-3:] for o in pace) > 1})
    honest = [{k: v for k, v in r.items() if k != attacker} for r in ratios]
    one = max((v for r in honest for v in r.values()), default=0.0)
    two = max((min(v, b[k]) for a, b in zip(honest, honest[1:]) for k, v in a.items() if k in b), default=0.0)
    return {"honest_max": one, "honest_max_two": two, "attacker": [r.get(attacker, 0.0) for r in ratios],
            "clock_cpu_s": cpu, "clock_wakes": wakes}


def real_run(tmp: Path, label: str, slot: str | None, attack: tuple | None, rounds: int, rate: float, replicas: int,
             routing: str, hop_rate: float = 1.0, seed: int = 0) -> dict:
    """One run with ``slot`` cheating; what the ledger and the logs say about every holder."""
    from neuroray.ponw.identity import Identity
    from neuroray.swarm.attacks_in_holder import misbehaving
    from neuroray.training.run import run

    run_dir = tmp / label
    # one set of holder keys for every run: each Driver reads the same shards in every run, so the eval-loss
    # column compares attacks, not shard assignments (fresh keys moved it by up to 2.4 % with no attack on training)
    keys = tmp / "keys"
    cfg = load_config([*SMALL, f"run_dir={run_dir}", f"rounds={rounds}", "diloco.inner_steps=4",
                       f"diloco.replicas={replicas}", f"swarm.num_stages={STAGES}", "aggregator=robust",
                       f"swarm.routing={routing}", f"swarm.key_dir={keys}", "cluster.cpus_per_holder=0.25",
                       "sample_tokens=1", "checkpoint.every_round=false", "checkpoint.interval_s=0",
                       "progress_bar=false", f"ponw.spot_check_rate={rate}", f"ponw.hop_recheck_rate={hop_rate}",
                       f"seed={seed}"])
    lines: list[str] = []
    holders = misbehaving({slot: attack} if attack else {})
    t0 = time.monotonic()
    result = run(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))), holder_cls=holders)
    slots = [f"r{r}-s{s}" for r in range(replicas) for s in range(STAGES)]
    ids = {Identity.load_or_create(keys / f"holder-{x}.pem").node_id: x for x in slots}
    db = sqlite3.connect(run_dir / "ledger.sqlite")
    caught: dict[str, set[int]] = {x: set() for x in slots}  # slot -> rounds it was caught in
    how: dict[str, set[str]] = {x: set() for x in slots}  # slot -> what caught it
    for node, rnd, status, reward, reason in db.execute(
            "SELECT node_id, outer_round, status, reward, reason FROM proofs WHERE proof_type = 'training'"):
        if node in ids and (status != "credited" or reward == 0):
            caught[ids[node]].add(rnd)
            invalidated = next((name for name in ("hop recheck", "data check") if str(reason).startswith(name)),
                               "spot check")
            how[ids[node]].add({"credited": "paid 0", "invalidated": invalidated}.get(status, f"proof {status}"))
    excused = {(f"r{m.group(2)}-s{m.group(3)}", int(m.group(1))) for line in lines if (m := EXCUSED.search(line))}
    for line in lines:
        m = NAMED.search(line)
        if m and (f"r{m.group(3)}-s{m.group(2)}", int(m.group(1))) not in excused:
            caught[f"r{m.group(3)}-s{m.group(2)}"].add(int(m.group(1)))
            how[f"r{m.group(3)}-s{m.group(2)}"].add("named")
        m = HOP_REJECTED.search(line)
        if m:
            caught[f"r{m.group(1)}-s{m.group(2)}"].add((int(m.group(3)) - 1) // cfg.diloco.inner_steps + 1)
            how[f"r{m.group(1)}-s{m.group(2)}"].add("hop check")
    held = {ids[n]: v for n, v in db.execute("SELECT node_id, balance + stake FROM accounts") if n in ids}
    slashed = {ids[n] for (n,) in db.execute("SELECT DISTINCT node_id FROM events WHERE kind IN ('slash', 'clawback')")
               if n in ids}
    check_s = sum(float(m.group(1)) for line in lines if (m := CHECKED.search(line)))
    rechecks = [(int(m.group(1)), float(m.group(2))) for line in lines if (m := RECHECKED.search(line))]
    honest = [x for x in slots if x != slot]
    # the replay check (neuroray/training/replays.py): its seconds, and every holder's lead per round
    leads: dict[str, list[tuple[int, float]]] = {}
    replay_s = 0.0
    for line in lines:
        m = REPLAY_CHECK.search(line)
        if m:
            replay_s += float(m.group(4))
            for r, kind, x in SCORE.findall(re.sub(r"\[[^]]*\]", "", m.group(3))):
                leads.setdefault(f"r{r}-s{m.group(2)}", []).append((int(m.group(1)), float(x)))
    stage = slot.split("-s")[1] if slot else "0"
    peers = [x for x in honest if x.endswith(f"-s{stage}") and not x.startswith("r2-")]  # honest, same range
    false_pos = {x: sorted(caught[x]) for x in honest if caught[x] or x in slashed}
    for x in false_pos:  # what named an honest holder: said on the console, with the run's log kept beside it
        print(f"{label}: false positive {x} in rounds {false_pos[x]}: {sorted(how[x])}", flush=True)
    (run_dir / "log.txt").write_text("\n".join(lines))
    train_s = result.tokens / max(result.tokens_per_s, 1e-9)
    paces = pace_spread(lines, slot)
    if paces["clock_wakes"]:
        print(f"{label}: call clock: honest holders at most {paces['honest_max']:.2f}x their range's others in a round, "
              f"{paces['honest_max_two']:.2f}x in two rounds in a row"
              + (f"; the attacker {' '.join(f'{x:.2f}x' for x in paces['attacker'])}" if slot else "")
              + f"; the clock's thread {paces['clock_cpu_s']:.2f}s of CPU in {paces['clock_wakes']} wakes over "
                f"{train_s:.1f}s of training", flush=True)
    return {"caught": sorted(caught[slot]) if slot else [], "how": sorted(how[slot]) if slot else [], "attacker": held.get(slot, 0) / 1e6,
            "honest": min(held.get(x, 0) for x in peers) / 1e6, "false_pos": false_pos,
            "honest_rounds": len(honest) * rounds, "check_s": check_s, "train_s": train_s,
            "rechecked": sum(n for n, _ in rechecks), "recheck_s": sum(x for _, x in rechecks),
            "eval_loss": result.eval_loss, "wall_s": time.monotonic() - t0, "replay_s": replay_s,
            "honest_ratios": [x for h in honest if h.endswith("-s0") for _, x in leads.get(h, [])],
            "honest_leads": [x for h in honest if not h.endswith("-s0") for _, x in leads.get(h, [])],
            "attacker_leads": leads.get(slot, []) if slot else []}


def honest_rounds(seeds: int, rounds: int) -> dict:
    """Outlier naming over honest DiLoCo rounds (8 replicas, robust rule with f=2), in this process."""
    import copy

    from torch.nn.utils import parameters_to_vector

    from benchmarks.robustness import OVERRIDES, Replicas, _setup, rule_overrides
    from neuroray.diloco.aggregate import aggregate
    from neuroray.diloco.sync import OuterMemory, outer_step

    named = total = 0
    min_cos, max_ratio = 1.0, 0.0
    torch.set_num_threads(1)
    for seed in range(seeds):
        cfg = load_config(OVERRIDES + [f"seed={seed}", "diloco.inner_steps=10", *rule_overrides("trimmed_mean+nnm")])
        vocab, batches, _ = _setup(cfg, seed, rounds * 10)
        reps = Replicas(cfg, vocab, seed)
        theta0 = parameters_to_vector(reps.models[0].parameters()).detach().clone()
        momentum, memory = None, OuterMemory()
        for rnd in range(rounds):
            if rnd:
                reps.load(theta0)
            deltas = reps.inner(theta0, batches, rnd * 10, 10)
            agg = aggregate(copy.deepcopy(cfg.aggregator), deltas, theta0.numel()).value
            for d in deltas:
                min_cos = min(min_cos, float(torch.dot(d, agg) / (d.norm() * agg.norm())))
            norms = sorted(float(d.norm()) for d in deltas)
            max_ratio = max(max_ratio, norms[-1] / ((norms[3] + norms[4]) / 2))
            theta0, momentum, report, memory = outer_step(cfg.aggregator, cfg.diloco, 0, theta0, momentum, *deltas,
                                                          memory=memory, round_index=rnd, seed=seed, observe=True)
            named += len(report.rejected)
            total += len(deltas)
    return {"named": named, "total": total, "min_cos": min_cos, "max_ratio": max_ratio}


def _false_pos(r: dict) -> str:
    fp = r["false_pos"]
    n = sum(max(len(v), 1) for v in fp.values())
    where = "; ".join(f"{x} round{'s' if len(v) > 1 else ''} {','.join(map(str, v)) or 'slashed'}"
                      for x, v in fp.items())
    return f"{n} of {r['honest_rounds']}" + (f" ({where})" if where else "")


def cost(tmp: Path, rounds: int, replicas: int, routing: str, rates: list[float], cmd: str, write: bool) -> None:
    """The honest run at each hop recheck rate: training seconds, and the re-executions' own seconds."""
    rows = [(r, real_run(tmp, f"cost-{i}-{r}", None, None, rounds, 0.0, replicas, routing, r))
            for i, r in enumerate(rates)]
    base = rows[0][1]["train_s"]
    columns = ["ponw.hop_recheck_rate", "microbatches re-executed", "re-execution s (holders)",
               "training s", "training time vs the first rate", "re-execution / training time", "setup", "command"]
    print("| " + " | ".join(columns) + " |")
    for r, x in rows:
        values = [f"{r:g}", str(x["rechecked"]), f"{x['recheck_s']:.3f}", f"{x['train_s']:.2f}",
                  f"{x['train_s'] / base - 1:+.1%}", f"{x['recheck_s'] / x['train_s']:.2%}",
                  f"{replicas} replicas x {STAGES} stages, tiny d64 L2, {rounds} rounds x H=4, 2 microbatches, no spot "
                  f"checks, {machine()}", f"`flock /tmp/neuroray-cpu.lock {cmd}`"]
        print("| " + " | ".join(values) + " |", flush=True)
        if write:
            append_row(f"Verification: cost of the hop rechecks, {routing} routing (Ray)", columns, values,
                       note="benchmarks/verification.py cost=1: the honest run at each ponw.hop_recheck_rate, one after "
                            "the other in one process after an untimed warm-up run. Re-execution seconds are the holders' "
                            "own (StageHolder.reexecute), summed; training seconds the run's tokens over its tokens/s.")


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    rounds, rate = int(opts.get("rounds", 3)), float(opts.get("rate", 1.0))
    hop_rate = float(opts.get("hop_rate", 1.0))
    replicas, seeds = int(opts.get("replicas", 3)), int(opts.get("seeds", 3))
    routing = opts.get("routing", "fixed")
    seed = int(opts.get("seed", 0))  # the real runs' seed (weights, data order); the in-process part has seeds=
    n_honest = int(opts.get("honest_rounds", 100))
    labels = [x for x in opts["attacks"].split(",") if x] if "attacks" in opts else list(ATTACKS)  # "": part 2 only
    cmd = " ".join(["python benchmarks/verification.py", *argv])
    write = opts.get("write", "1") != "0"
    t0 = time.time()
    rows = {}
    if opts.get("cost", "0") != "0":
        rates = [float(x) for x in opts.get("cost_rates", "0,0.1,1").split(",")]
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                real_run(Path(tmp), "warmup", None, None, 1, 0.0, replicas, routing, rates[-1])
                cost(Path(tmp), rounds, replicas, routing, rates, cmd, write)
        finally:
            ray.shutdown()
        return
    if labels:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        with (tempfile.TemporaryDirectory() if "keep" not in opts else contextlib.nullcontext(opts["keep"])) as tmp:
            # untimed: the first run builds the dataset and warms the caches
            if labels:
                warm = real_run(Path(tmp), "warmup", None, None, 1, 1.0, replicas, routing, seed=seed)
                print(f"warm-up run: spot checks took {warm['check_s']:.2f}s", flush=True)
            for label in labels:
                _, slot, attack, *spec = ATTACKS[label]
                rows[label] = real_run(Path(tmp), label, slot, (attack, *spec) if attack else None, rounds, rate,
                                       replicas, routing, hop_rate, seed)
                print(label, rows[label], flush=True)
    finally:
        if labels:
            ray.shutdown()
    clean = rows.get("honest", {}).get("eval_loss", math.nan)
    columns = ["attack", "cheating holder", "detected", "first round caught", "NEURO kept: attacker / honest peer",
               "false positives (honest holder-rounds)", "eval loss vs honest run", "spot checks / training time",
               "hop rechecks / training time"]
    if rows:
        print("| " + " | ".join(columns) + " |")
    for label, r in rows.items():
        name, slot = ATTACKS[label][:2]
        detected = "-" if not slot else (f"yes ({', '.join(r['how'])})" if r["caught"] else "**no**")
        first = str(r["caught"][0]) if r["caught"] else "-"
        values = [name, slot or "-", detected, first,
                  f"{r['attacker']:.4f} / {r['honest']:.4f}" if slot else f"- / {r['honest']:.4f}", _false_pos(r),
                  f"{r['eval_loss'] / clean - 1:+.2%}" if math.isfinite(clean) else "-",
                  f"{r['check_s']:.2f}s / {r['train_s']:.1f}s = {r['check_s'] / r['train_s']:.1%}",
                  f"{r['rechecked']} mb, {r['recheck_s']:.2f}s = {r['recheck_s'] / r['train_s']:.1%}"]
        print("| " + " | ".join(values) + " |", flush=True)
        if write:
            append_row(f"Verification: holders that really misbehave, {routing} routing, with hop rechecks (Ray)",
                       [*columns, "setup", "command"],
                       [*values, f"{replicas} replicas x {STAGES} stages, tiny d64 L2, robust rule, {rounds} rounds "
                                 f"x H=4, spot_check_rate={rate}, hop_recheck_rate={hop_rate}, {machine()}", f"`flock /tmp/neuroray-cpu.lock {cmd}`"],
                       note="benchmarks/verification.py part 1: one holder of replica 2 cheats from round 1 inside its "
                            "own process (neuroray/swarm/attacks_in_holder.py); replicas 0 and 1 are honest. 'Caught': "
                            "its proof refused, invalidated or paid 0, or its holder named among the round's "
                            "rejections. False positives: honest holders caught so, including the cheater's own "
                            "replica's other holder (harmed by it, blamed for it). Spot-check time is the recompute "
                            "thread's own seconds, after an untimed warm-up run.")
    for label, r in rows.items():  # the replay check's own table: the honest margins, the attacker's scores, its cost
        name, slot = ATTACKS[label][:2]
        hr, hl = r["honest_ratios"], r["honest_leads"]
        p = PonwConfig()
        values = [name, routing, str(len(hr) + len(hl)), f"{min(hr):.1f}" if hr else "-",
                  f"{min(hl):+.3f}" if hl else "-",
                  " ".join(f"r{k} {x:g}" for k, x in r["attacker_leads"]) or "-",
                  f"{r['replay_s']:.2f}s / {r['train_s']:.1f}s = {r['replay_s'] / r['train_s']:.1%}"]
        print("replay check: | " + " | ".join(values) + " |", flush=True)
        if write:
            append_row("Verification: the replay check, honest margins and cost (Ray)",
                       ["attack", "routing", "honest holder-rounds scored",
                        f"smallest honest fresh-row ratio, Driver range (refused under {p.replay_min_ratio:g})",
                        f"smallest honest lead, other range (refused under {p.replay_min_lead:g})",
                        "cheating Driver's score per round", "replay check / training time", "setup", "command"],
                       [*values, f"{replicas} replicas x {STAGES} stages, tiny d64 L2, robust rule, {rounds} rounds x "
                                 f"H=4, {machine()}", f"`flock /tmp/neuroray-cpu.lock {cmd}`"],
                       note="benchmarks/verification.py part 1, the same runs, read from each run's log "
                            "(neuroray/ponw/replays.py): on the Driver's range (the embedding), how much more the rows "
                            "of the round's new tokens moved than never-seen rows; on the other range, the update's "
                            "lead on its own batches over its stream's neighbours. Check time: the driver's own "
                            "seconds scoring, over the run's training seconds.")
    if n_honest and seeds:
        h = honest_rounds(seeds, n_honest)
        print(f"honest rounds: {h['named']} of {h['total']} honest holder-rounds named; smallest cosine to the "
              f"robust aggregate {h['min_cos']:+.3f}; largest norm / median {h['max_ratio']:.2f}")
        if write:
            append_row("Verification: outlier naming over honest rounds (in process)",
                       ["honest holder-rounds", "named (false positives)", "smallest cosine to the robust aggregate",
                        "largest norm / median", "setup", "command"],
                       [str(h["total"]), str(h["named"]), f"{h['min_cos']:+.3f} (threshold 0)",
                        f"{h['max_ratio']:.2f} (threshold 4)",
                        f"8 replicas, tiny d64 L2, trimmed_mean+nnm f=2, H=10, {seeds} seeds x {n_honest} rounds, "
                        f"{machine()}", f"`flock /tmp/neuroray-cpu.lock {cmd}`"])
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
