"""One training run, end to end: data -> plan -> swarm -> DiLoCo loop -> eval, checkpoint and sample.

``run(cfg)`` is what ``python -m neuroray.train`` calls; notebooks, tests and benchmarks call it too.
It starts a local Ray when neither ``cluster.address`` nor ``RAY_ADDRESS`` is set (``ray job submit``
sets the latter), builds or loads the Genesis data, trains R pipeline replicas with H inner steps per
outer round, then writes a safetensors checkpoint and generates a sample.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from neuroray.config import TrainConfig, resolve_batch, to_dict, to_yaml
from neuroray.errors import ConfigError
from neuroray.training.local_ray import start_local_ray
from neuroray.training.resume import check_same_model, comm_before, resume_auto, resume_step_of, trim_log

@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    losses: list[float] = field(default_factory=list)  # mean training loss per inner step
    eval_loss: float = float("nan")
    start_step: int = 0  # > 0 when the run resumed from a snapshot
    recoveries: list[dict] = field(default_factory=list)
    snapshots: list[int] = field(default_factory=list)  # steps at which snapshot sets were taken
    ledger: dict | None = None  # the NEURO ledger's summary at the end (ponw.enabled)
    upgrades: list[dict] = field(default_factory=list)  # live architecture upgrades (model=auto)
    vocab_growths: list[dict] = field(default_factory=list)  # live vocabulary growths (data.watch_rounds)
    additions: list[dict] = field(default_factory=list)  # replicas added mid-run on joined nodes (model=auto)
    sample: str = ""
    tokens_per_s: float = 0.0
    routing: dict | None = None  # swarm.routing=router: hedges, re-sends, repairs, failover times, quorums
    tokens: int = 0  # training tokens processed by this run (all replicas)
    comm: list[dict] = field(default_factory=list)  # bytes counted per outer round (docs/diloco.md)
    hops: list[dict] = field(default_factory=list)  # per holder: hops sent and received, encoded bytes (docs/hops.md)
    hop_rejections: list[dict] = field(default_factory=list)  # hops a holder rejected, each named to its sender

    @property
    def sync_bytes(self) -> int:
        """Pseudo-gradient payloads + broadcasts to holders, as counted in the object store."""
        return sum(c["sync_bytes"] for c in self.comm)

    @property
    def control_bytes(self) -> int:
        return sum(c["control_bytes"] for c in self.comm)


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
        if cfg.cluster.object_store_dir or cfg.cluster.object_store_prefault or cfg.cluster.object_store_mb:
            log("ray: cluster.object_store_* apply to a Ray this run starts; a joined cluster's nodes take them "
                "from `ray start` (docs/hops.md, Transport)")
    else:
        start_local_ray(cfg.cluster, num_cpus=cfg.cluster.num_cpus or None)
        log(f"ray: started a local cluster with {ray.cluster_resources().get('CPU', 0):g} CPUs")
    return True


def run(cfg: TrainConfig, log=print, holder_cls=None) -> RunResult:
    """Train with a resolved config. Usable from notebooks and tests as well as the CLI.

    ``holder_cls``: the stage-holder class to run (tests and benchmarks pass neuroray.swarm.faults'
    fault-injecting subclass); None is the production :class:`~neuroray.swarm.holder.StageHolder`."""
    import ray

    from neuroray.checkpoint import save_checkpoint
    from neuroray.diloco.attacks import reduce_side
    from neuroray.diloco.sync import OuterSync
    from neuroray.inference.sessions import sample
    from neuroray.genesis import decode, encode, ensure_dataset, load_tokenizer
    from neuroray.model import build_monolith, merge_state_dicts
    from neuroray.swarm.swarm import DataPlan, Swarm
    from neuroray.planner.report import format_plan
    from neuroray.planner import plan_for_cluster
    from neuroray.planner.expand import plan_recorded
    from neuroray.planner.upgrade import Upgrader
    from neuroray.training.executor import value_or_none
    from neuroray.training.fixed import FixedPipelines
    from neuroray.training.evaluation import HeldOutEval, held_out_batches
    from neuroray.training.metrics import TrainMetrics
    from neuroray.training.plots import loss_curve
    from neuroray.training.routed import RoutedSwarm
    from neuroray.training.tensorboard_log import MirroredLog, TensorBoardLog, check_available
    from neuroray.training.trainer import Trainer

    cfg = resolve_batch(cfg)  # a TrainConfig built in Python may leave the batch shape to derive (0)
    if cfg.attack.where == "holder":  # the chosen holders cheat inside their own processes
        from neuroray.swarm.attacks_in_holder import holder_attack_class

        attackers = holder_attack_class(cfg.attack, cfg.diloco.replicas)
        if attackers is not None and holder_cls is not None:
            raise ConfigError("attack.where=holder installs its own holder class; pass no holder_cls with it")
        holder_cls = attackers or holder_cls
    if cfg.tensorboard:  # before anything starts: one line naming the extra to install
        check_available()
    run_dir = _run_dir(cfg)
    if cfg.resume:  # before config.yaml is rewritten: it records the model the run trained
        check_same_model(cfg, run_dir)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    root, manifest = ensure_dataset(cfg.data, log=log)
    tokenizer_file = Path(root) / manifest.tokenizer_file
    tok = load_tokenizer(tokenizer_file)
    from neuroray.genesis.extend import check_ids

    check_ids(tok, manifest, f"the dataset at {root}")  # shard ids beyond the model's rows would fail mid-run
    vocab = tok.get_vocab_size()
    if cfg.init_from:  # the checkpoint against this model and tokenizer, from its headers only: refused before Ray
        from neuroray.model.hf import load_hf_llama

        load_hf_llama(cfg.init_from, cfg.model, vocab, keys=())

    snapshot_root = cfg.checkpoint.dir or str(run_dir / "snapshots")
    resume_step = recorded = None
    if cfg.resume and cfg.model.name == "auto":
        resume_step, *recorded = resume_auto(snapshot_root, log)
    elif cfg.resume:
        resume_step = resume_step_of(cfg, snapshot_root, log, vocab=vocab)
    if resume_step is not None and resume_step >= cfg.rounds * cfg.diloco.inner_steps:
        raise ConfigError(f"resume=true: the run already trained {resume_step} steps and rounds={cfg.rounds} "
                          f"asks for {cfg.rounds * cfg.diloco.inner_steps}; raise rounds to train on")
    started_ray = _connect_ray(cfg, log)
    swarm = trainer = stores = outer = None
    try:
        from neuroray.hoststore.share import share_stores  # several nodes: the driver's node serves local paths
        stores = share_stores(cfg.cluster, str(root), root, snapshot_root, log)
        plan = upgrader = None
        if recorded:  # model=auto resumed: the snapshots' model, split and replicas, placed on today's nodes
            plan = plan_recorded(cfg, *recorded)
        elif cfg.model.name == "auto":  # size the model from the cluster's memory and place every holder
            plan = plan_for_cluster(cfg)
        if plan is not None:
            log(format_plan(plan))
            upgrader = Upgrader(cfg, plan, log=log)  # watches joins from now on
            cfg = replace(cfg, model=plan.model, swarm=replace(cfg.swarm, num_stages=plan.num_stages),
                          diloco=replace(cfg.diloco, replicas=plan.replicas))
        d, dl, c = cfg.data, cfg.diloco, cfg.cluster
        swarm = Swarm(cfg, vocab, DataPlan(stores.data_url, manifest.to_json()), log=log,
                      snapshot_root=stores.snapshot_root, resume_step=resume_step,
                      name_prefix=f"neuroray-{run_dir.name}-", plan=plan, holder_cls=holder_cls)
        outer = OuterSync(swarm.by_range, cfg.diloco, cfg.aggregator, reduce_side(cfg.attack), seed=cfg.seed,
                          node_id=plan.outer.node_id if plan is not None else "",  # the node the plan keeps free
                          name_prefix=f"neuroray-{run_dir.name}-")
        executor = RoutedSwarm() if cfg.swarm.routing == "router" else FixedPipelines()
        held_out = held_out_batches(root, manifest, d.seq_len, d.microbatch_size, cfg.eval.batches)
        if not held_out:
            log("eval: the dataset has no held-out shards (data.eval_shards=0): no eval loss")
        evaluator = HeldOutEval(cfg.eval, held_out, c.step_timeout_s, start_step=resume_step or 0)
        watch = None
        if d.watch_rounds > 0:  # the dataset may be extended with a grown tokenizer while this run trains
            from neuroray.training.vocab_growth import VocabWatch

            watch = VocabWatch(cfg, root, manifest, tok, log=log)
        trainer = Trainer(cfg, swarm, outer, run_dir, snapshot_root, executor, start_step=resume_step or 0,
                          log=log, metrics=TrainMetrics(run_dir.name), upgrades=upgrader, evaluator=evaluator,
                          vocab=watch)
        if resume_step is not None:
            trainer.restore_outer(resume_step)
            from neuroray.training.vocab_growth import grow_restored_outer

            if grow_restored_outer(swarm, outer, cfg.seed, c.step_timeout_s):  # snapshots from before the data grew
                log(f"resume: the snapshot of step {resume_step} predates the dataset's vocabulary growth; grown to "
                    f"{vocab} tokens")
            # the logs continue from the snapshot: rows and rounds after it are trained again, so dropped
            trim_log(run_dir / "metrics.jsonl", resume_step)
            trainer.comm_before = comm_before(run_dir / "comm.json", outer.rounds)
        streaming = (f" (streaming: {dl.streaming_fragments} fragments, one every {trainer.sync_every} steps)"
                     if dl.streaming_fragments > 1 else "")
        log(f"train: {cfg.rounds} rounds x {dl.inner_steps} inner steps{streaming}, {trainer.tokens_per_step} "
            f"tokens/step, vocab {vocab} (ln V = {math.log(vocab):.2f}), run dir {run_dir}"
            + (f", resuming at step {resume_step}" if resume_step is not None else ""))
        result = RunResult(run_dir=run_dir, checkpoint=run_dir / "checkpoint", start_step=resume_step or 0)
        board = None
        if cfg.tensorboard:  # a resumed run hides the events its predecessor logged past the snapshot
            board = TensorBoardLog(run_dir / "tensorboard", None if resume_step is None else resume_step + 1)
        with (run_dir / "metrics.jsonl").open("a" if cfg.resume else "w") as metrics_file:
            metrics = MirroredLog(metrics_file, board)
            try:
                stats = trainer.run(metrics)
                # the final evaluation through the holders, at theta0: the weights the checkpoint holds
                result.eval_loss = evaluator.final(swarm.replicas, trainer.total_steps, metrics, trainer.metrics, log)
            finally:
                if board is not None:
                    board.close()
        cfg = trainer.cfg  # a live upgrade may have grown the model
        if watch is not None and watch.growths:  # ... or its vocabulary: the checkpoint ships the grown tokenizer
            manifest, tok, vocab, tokenizer_file = watch.manifest, watch.tokenizer, watch.vocab_size, watch.tokenizer_file
            result.vocab_growths = watch.growths
        result.upgrades = [] if upgrader is None else upgrader.upgrades
        result.additions = [] if upgrader is None else upgrader.additions
        result.losses, result.recoveries, result.snapshots = stats.losses, stats.recoveries, stats.snapshots
        result.hop_rejections = stats.hop_rejections
        result.routing = trainer.routing_summary()
        if result.routing is not None:  # the router's hedges, take-backs, failovers and quorums, for the operator
            (run_dir / "routing.json").write_text(json.dumps(result.routing, indent=1, default=str))
        result.comm, result.tokens = stats.comm, trainer.tokens
        (run_dir / "comm.json").write_text(json.dumps(trainer.comm_before + stats.comm, indent=1))
        # every holder still answering (a routed swarm may end with one down): hops it sent and received
        hops, _ = ray.wait([h.hop_bytes.remote() for p in swarm.replicas for h in p],
                           num_returns=sum(map(len, swarm.replicas)), timeout=c.step_timeout_s)
        result.hops = [v for v in map(value_or_none, hops) if v is not None]
        (run_dir / "hops.json").write_text(json.dumps(result.hops, indent=1))
        result.ledger = trainer.ledger_summary()
        if result.ledger is not None:
            (run_dir / "ledger_summary.json").write_text(json.dumps(result.ledger, indent=2, sort_keys=True))
        result.tokens_per_s = trainer.tokens / max(stats.elapsed_s, 1e-9)
        elapsed = stats.elapsed_s
        # The model is theta0, the one every holder of a range agrees on: after the last outer step it is
        # every replica's weights. With streaming only the fragment synced last is; the others would carry
        # replica 0's own steps since their sync, which cost +5 % eval loss at M=4 (docs/diloco.md).
        state = merge_state_dicts(swarm.get([h.state_dict.remote(at_theta0=True) for h in swarm.replicas[0]],
                                            c.step_timeout_s,
                                            "collecting the final weights"))
    finally:
        if trainer is not None:  # its ledger actor too, even when training failed
            trainer.close()
        if outer is not None:  # the ranges' outer-step actors
            outer.close()
        if swarm is not None:
            swarm.shutdown()
        if stores is not None:
            stores.close(log)
        if started_ray:
            ray.shutdown()

    model = build_monolith(cfg.model, vocab, seed=cfg.seed)
    model.load_state_dict(state)
    model.eval()
    meta = {"model": to_dict(cfg.model), "vocab_size": vocab, "tokenizer_sha256": manifest.tokenizer_sha256,
            "rounds": cfg.rounds, "inner_steps": dl.inner_steps, "eval_loss": result.eval_loss, "seed": cfg.seed}
    save_checkpoint(result.checkpoint, state, meta, tokenizer_file)
    loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png", dl.inner_steps,
               title=f"{cfg.model.name} model, {dl.replicas} replicas x {cfg.swarm.num_stages} stages, H={dl.inner_steps}")
    prompt_ids = encode(tok, cfg.sample_prompt)
    result.sample = cfg.sample_prompt + decode(tok, sample(model, prompt_ids, cfg.sample_tokens, seed=cfg.seed))
    first = result.losses[0] if result.losses else float("nan")
    last = result.losses[-1] if result.losses else float("nan")
    log(f"done: train loss {first:.3f} -> {last:.3f}, eval loss {result.eval_loss:.3f}, "
        f"{result.tokens_per_s:,.0f} tok/s, {elapsed:.0f}s")
    log(f"sync: {result.sync_bytes:,} bytes ({result.sync_bytes / max(result.tokens, 1):.1f}/token, "
        f"compression {dl.compression}), control: {result.control_bytes:,} bytes")
    fwd, fp32 = (sum(h[k] for h in result.hops) for k in ("fwd_bytes", "fwd_fp32_bytes"))
    log(f"hops: {fwd + sum(h['bwd_bytes'] for h in result.hops):,} bytes sent between holders (activations "
        f"{fwd:,}, {fp32 / max(fwd, 1):.1f}x fewer than float32; compression {cfg.swarm.hop_compression})")
    if result.routing is not None:
        r = result.routing
        log(f"router: {len(r['failovers'])} failovers, {r['hedges']} hedges, {r['taken_back']} taken back from stuck "
            f"holders, {r['reroutes'] + r['revoked']} re-sent, {r['stolen']} stolen, {len(r['quorums'])} quorum "
            f"outer steps ({sum(1 for q in r['quorums'] if q['late'])} with late holders); {run_dir / 'routing.json'}")
    log(f"checkpoint: {result.checkpoint}")
    log(f"sample: {result.sample!r}")
    return result
