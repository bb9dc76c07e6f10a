"""``python -m neuroray.train [hydra overrides]``: plan -> data -> swarm -> DiLoCo loop -> checkpoint.

Starts a local Ray when neither ``cluster.address`` nor ``RAY_ADDRESS`` is set (``ray job submit``
sets the latter), builds or loads the Genesis data, trains R pipeline replicas with H inner steps
per outer round, then writes a safetensors checkpoint and prints a generated sample.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from neuroray.config import TrainConfig, load_config, to_dict
from neuroray.errors import NeurorayError

USAGE = """usage: python -m neuroray.train [key=value ...]

Hydra overrides, type-checked against neuroray/config.py, e.g.
  python -m neuroray.train rounds=5 diloco.inner_steps=50 swarm.num_stages=3 model=small
Groups (conf/): model, data, diloco, aggregator, swarm, cluster, checkpoint.
"""


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    losses: list[float] = field(default_factory=list)  # mean training loss per inner step
    eval_loss: float = float("nan")
    sample: str = ""
    tokens_per_s: float = 0.0


def _run_dir(cfg: TrainConfig) -> Path:
    path = Path(cfg.run_dir or f"outputs/{time.strftime('%Y-%m-%d_%H-%M-%S')}").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _connect_ray(cfg: TrainConfig, log) -> bool:
    """Connect to (or start) Ray; returns True when this call started it and must shut it down."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
        log(f"ray: connected to {address}")
    else:
        # Ray kills idle task workers after 1 s once actors fill the CPUs, so every outer step's
        # reduce task would pay a fresh worker start (~1.5 s of importing torch). Keep them around.
        os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "300000")
        ray.init(address="local", num_cpus=cfg.cluster.num_cpus or None)
        log(f"ray: started a local cluster with {ray.cluster_resources().get('CPU', 0):g} CPUs")
    return True


def run(cfg: TrainConfig, log=print) -> RunResult:
    """Train with a resolved config. Usable from notebooks and tests as well as the CLI."""
    import ray
    import torch

    from neuroray.checkpoint import save_checkpoint
    from neuroray.diloco.sync import OuterSync
    from neuroray.generate import sample
    from neuroray.genesis import decode, encode, ensure_dataset, eval_batches, load_tokenizer
    from neuroray.model import build_monolith, merge_state_dicts
    from neuroray.swarm.schedule import submit_inner_step
    from neuroray.swarm.swarm import DataPlan, Swarm

    run_dir = _run_dir(cfg)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    root, manifest = ensure_dataset(cfg.data, log=log)
    tokenizer_file = Path(root) / manifest.tokenizer_file
    tok = load_tokenizer(tokenizer_file)
    vocab = tok.get_vocab_size()

    started_ray = _connect_ray(cfg, log)
    swarm = None
    try:
        swarm = Swarm(cfg, vocab, DataPlan(str(root), manifest.to_json()), log=log)
        outer = OuterSync(swarm.by_range, cfg.diloco, cfg.aggregator.name)
        d, dl, c = cfg.data, cfg.diloco, cfg.cluster
        tokens_per_step = d.microbatch_size * d.seq_len * d.num_microbatches * dl.replicas
        total_steps = cfg.rounds * dl.inner_steps
        log(f"train: {cfg.rounds} rounds x {dl.inner_steps} inner steps, {tokens_per_step} tokens/step, "
            f"vocab {vocab} (ln V = {math.log(vocab):.2f}), run dir {run_dir}")
        result = RunResult(run_dir=run_dir, checkpoint=Path(cfg.checkpoint.dir or run_dir / "checkpoint"))
        metrics = (run_dir / "metrics.jsonl").open("w")
        t0 = time.monotonic()
        pending, mb_id = None, 0

        def collect(step_index: int, refs) -> None:
            losses = swarm.get([lr for r in refs for lr in r.losses] + [s for r in refs for s in r.steps],
                               c.step_timeout_s, f"inner step {step_index + 1}")
            loss = sum(losses[: len(losses) - sum(len(r.steps) for r in refs)]) / (d.num_microbatches * dl.replicas)
            result.losses.append(loss)
            elapsed = time.monotonic() - t0
            tps = tokens_per_step * (step_index + 1) / elapsed
            record = {"step": step_index + 1, "round": step_index // dl.inner_steps + 1, "loss": loss,
                      "tokens_per_s": tps, "elapsed_s": elapsed}
            metrics.write(json.dumps(record) + "\n")
            if (step_index + 1) % cfg.log_every == 0 or step_index + 1 == total_steps:
                eta = elapsed / (step_index + 1) * (total_steps - step_index - 1)
                log(f"round {record['round']}/{cfg.rounds} step {step_index + 1}/{total_steps} "
                    f"loss {loss:.4f} tok/s {tps:,.0f} elapsed {elapsed:.0f}s eta {eta:.0f}s", flush=True)

        for step in range(total_steps):
            # submit this step before waiting on the previous one, so holders never idle on the driver
            refs = [submit_inner_step(p, d.num_microbatches, mb_id) for p in swarm.replicas]
            mb_id += d.num_microbatches
            if pending is not None:
                collect(step - 1, pending)
            pending = refs
            if (step + 1) % dl.inner_steps == 0:
                collect(step, pending)
                pending = None
                reports, loads = outer.submit()
                for report in swarm.get(reports + loads, c.step_timeout_s,
                                        f"outer step of round {outer.rounds}")[: len(reports)]:
                    for holder, reason in report.rejected:
                        log(f"outer round {outer.rounds}: range {report.range_index} rejected holder #{holder}: {reason}")
                    if report.refused:
                        log(f"outer round {outer.rounds}: range {report.range_index} refused, theta0 unchanged: "
                            f"{report.refused}")
        metrics.close()
        elapsed = time.monotonic() - t0
        result.tokens_per_s = tokens_per_step * total_steps / elapsed

        # After an outer step every replica holds theta0: replica 0's ranges are the model.
        state = merge_state_dicts(swarm.get([h.state_dict.remote() for h in swarm.replicas[0]], c.step_timeout_s,
                                            "collecting the final weights"))
    finally:
        if swarm is not None:
            swarm.shutdown()
        if started_ray:
            ray.shutdown()

    model = build_monolith(cfg.model, vocab, seed=cfg.seed)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        batches = eval_batches(root, manifest, d.seq_len, d.microbatch_size, max_batches=8)
        result.eval_loss = sum(float(model.loss(model(x), y)) for x, y in batches) / max(len(batches), 1)
    meta = {"model": to_dict(cfg.model), "vocab_size": vocab, "tokenizer_sha256": manifest.tokenizer_sha256,
            "rounds": cfg.rounds, "inner_steps": dl.inner_steps, "eval_loss": result.eval_loss, "seed": cfg.seed}
    save_checkpoint(result.checkpoint, state, meta, tokenizer_file)
    prompt_ids = encode(tok, cfg.sample_prompt)
    result.sample = cfg.sample_prompt + decode(tok, sample(model, prompt_ids, cfg.sample_tokens, seed=cfg.seed))
    first = result.losses[0] if result.losses else float("nan")
    log(f"done: train loss {first:.3f} -> {result.losses[-1]:.3f}, eval loss {result.eval_loss:.3f}, "
        f"{result.tokens_per_s:,.0f} tok/s, {elapsed:.0f}s")
    log(f"checkpoint: {result.checkpoint}")
    log(f"sample: {result.sample!r}")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        run(load_config(argv))
    except NeurorayError as exc:
        print(f"neuroray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neuroray: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
