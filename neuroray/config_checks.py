"""Cross-field config checks that types alone cannot express, including those the domain packages own.

Config sits at the bottom of the package; checks that need domain knowledge (which aggregators and
attacks exist, what the planner accepts) live in their packages and are called from here, above both.
"""

from __future__ import annotations

import re

from neuroray.config import (  # noqa: F401  (resolve_batch and friends: re-exported for the config's readers)
    HOP_COMPRESSIONS, HOP_TRANSPORTS, PRECISIONS, SCHEDULES, SwarmConfig, TrainConfig, auto_microbatches, pipeline_bubble,
    resolve_batch,
)
from neuroray.errors import ConfigError


def _check_imports(cfg: TrainConfig) -> None:
    """init_from= and data.tokenizer= against the keys they cannot be combined with."""
    if cfg.init_from and cfg.model.name == "auto":
        raise ConfigError(f"init_from={cfg.init_from} sets the model from its config.json, model=auto would size "
                          "another one from the cluster: drop model=auto")
    if cfg.init_from and cfg.resume:
        raise ConfigError(f"init_from={cfg.init_from} starts a new run from imported weights, resume=true continues "
                          "a run from its snapshots: drop init_from to resume (the snapshots hold the weights)")
    if cfg.data.tokenizer and cfg.data.base_tokenizer:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} is used as-is, data.base_tokenizer="
                          f"{cfg.data.base_tokenizer} would be grown into a new one: set only one of them")


def resolve_init_from(cfg: TrainConfig, model_given: bool) -> TrainConfig:
    """``init_from=``: ``cfg`` with the checkpoint's model (its config.json; every tensor's shape is checked from
    the safetensors headers, no weight is read). ``model_given``: the user chose a model (``model=`` or
    ``model.*=``), which must then fit the checkpoint, every differing key named (InteropError)."""
    if not cfg.init_from:
        return cfg
    _check_imports(cfg)  # before reading anything: model=auto or resume would ignore the checkpoint's shape
    from dataclasses import replace

    from neuroray.model.hf import load_hf_llama  # lazy: imports torch and safetensors

    model, _ = load_hf_llama(cfg.init_from, cfg.model if model_given else None, None, keys=())
    return replace(cfg, model=model)


def _check_watch(cfg: TrainConfig) -> None:
    """data.watch_rounds (live vocabulary growth, neuroray/training/vocab_growth.py): what it cannot run beside."""
    d, dl = cfg.data, cfg.diloco
    if d.watch_rounds < 0:
        raise ConfigError(f"data.watch_rounds={d.watch_rounds} must be >= 0 (0: never re-read the manifest)")
    if d.watch_rounds == 0:
        return
    if d.manifest_sha256:
        raise ConfigError("data.watch_rounds with data.manifest_sha256: a pinned manifest never changes, so the "
                          "dataset can never be extended; pin the publisher (data.manifest_publisher) instead")
    if dl.overlap != "none":
        raise ConfigError(f"data.watch_rounds with diloco.overlap={dl.overlap}: the vocabulary grows between rounds "
                          "and an overlapped run always has one in flight; set diloco.overlap=none")
    if cfg.swarm.routing == "router":
        raise ConfigError("data.watch_rounds with swarm.routing=router: the vocabulary grows on every holder at once, "
                          "which the router's late and lost holders would miss; use swarm.routing=fixed")


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    m, d, s, dl = cfg.model, cfg.data, cfg.swarm, cfg.diloco
    positive = {
        "model.d_model": m.d_model, "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
        "model.n_kv_heads": m.n_kv_heads, "model.max_seq_len": m.max_seq_len,
        "data.vocab_size": d.vocab_size, "data.shard_tokens": d.shard_tokens, "data.seq_len": d.seq_len,
        "data.batch_size": d.batch_size,
        "swarm.num_stages": s.num_stages, "diloco.replicas": dl.replicas,
        "diloco.inner_steps": dl.inner_steps, "rounds": cfg.rounds, "log_every": cfg.log_every,
        "cluster.torch_threads": cfg.cluster.torch_threads,
        "cluster.actor_start_timeout_s": cfg.cluster.actor_start_timeout_s,
        "cluster.step_timeout_s": cfg.cluster.step_timeout_s,
        "cluster.store_timeout_s": cfg.cluster.store_timeout_s, "cluster.store_chunk_mb": cfg.cluster.store_chunk_mb,
        "cluster.store_probe_timeout_s": cfg.cluster.store_probe_timeout_s,
        "cluster.liveness_probe_s": cfg.cluster.liveness_probe_s,
        "checkpoint.keep": cfg.checkpoint.keep,
        "checkpoint.recovery_timeout_s": cfg.checkpoint.recovery_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    if d.microbatch_size < 0 or d.num_microbatches < 0:  # 0: derived by resolve_batch
        raise ConfigError(f"data.microbatch_size={d.microbatch_size} and data.num_microbatches={d.num_microbatches} "
                          "must be >= 0 (0: derived from data.batch_size and swarm.num_stages)")
    if cfg.cluster.liveness_timeout_s < 0:
        raise ConfigError(f"cluster.liveness_timeout_s={cfg.cluster.liveness_timeout_s} must be >= 0 "
                          "(0 waits for Ray's own node-death detection)")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision} is unknown; choose {', '.join(PRECISIONS)}")
    if s.num_stages > m.n_layers:
        raise ConfigError(
            f"swarm.num_stages={s.num_stages} is more than model.n_layers={m.n_layers}; "
            "every stage needs at least one layer: lower swarm.num_stages or raise model.n_layers"
        )
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"head size {m.d_model // m.n_heads} must be even for RoPE; change model.n_heads")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} is not a multiple of model.n_kv_heads={m.n_kv_heads}")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if d.vocab_size < 300:
        raise ConfigError(f"data.vocab_size={d.vocab_size} is below 300: byte-level BPE needs 256 bytes + specials")
    if d.vocab_size > 2**32 - 1:
        raise ConfigError(f"data.vocab_size={d.vocab_size} does not fit in uint32 shards")
    if d.eval_shards < 0 or d.tokenizer_docs < 0 or d.cache_size_mb <= 0:
        raise ConfigError(f"data.eval_shards={d.eval_shards} and data.tokenizer_docs={d.tokenizer_docs} must be "
                          f">= 0 and data.cache_size_mb={d.cache_size_mb} positive")
    if d.encoding_errors not in ("strict", "replace", "ignore"):
        raise ConfigError(f"data.encoding_errors={d.encoding_errors} must be strict, replace or ignore")
    if d.manifest_sha256 and not re.fullmatch(r"[0-9a-f]{64}", d.manifest_sha256):
        raise ConfigError(f"data.manifest_sha256={d.manifest_sha256!r} must be 64 lowercase hex digits "
                          "(the sha256 of manifest.json that `python -m neuroray.genesis info` prints)")
    if d.manifest_publisher and not re.fullmatch(r"0[23][0-9a-f]{64}", d.manifest_publisher):
        raise ConfigError(f"data.manifest_publisher={d.manifest_publisher!r} must be a compressed secp256k1 "
                          "public key: 66 lowercase hex digits starting 02 or 03")
    _check_watch(cfg)
    if not d.source or not (d.store or d.dataset):
        raise ConfigError("data.source and data.store must not be empty; data.source=embedded needs no files")
    if cfg.cluster.object_store_mb < 0:
        raise ConfigError(f"cluster.object_store_mb={cfg.cluster.object_store_mb} must be >= 0 (0: Ray's default size)")
    if cfg.cluster.cpus_per_holder < 0 or cfg.cluster.gpus_per_holder < 0:
        raise ConfigError("cluster.cpus_per_holder and cluster.gpus_per_holder must be >= 0")
    if cfg.cluster.local_stores not in ("serve", "shared"):
        raise ConfigError(f"cluster.local_stores={cfg.cluster.local_stores} must be serve (the driver's node serves "
                          "local paths to every node) or shared (they are a mount every node sees)")
    _check_imports(cfg)
    if cfg.resume and not cfg.run_dir:
        raise ConfigError("resume=true needs run_dir=<the run to continue> (its snapshots are under run_dir/snapshots)")
    if cfg.eval.every < 0 or cfg.eval.batches <= 0:
        raise ConfigError(f"eval.every={cfg.eval.every} must be >= 0 (0: only at the end) and eval.batches="
                          f"{cfg.eval.batches} positive")
    _check_reputation(cfg)
    if cfg.checkpoint.interval_s < 0 or cfg.checkpoint.max_restarts < 0:
        raise ConfigError("checkpoint.interval_s and checkpoint.max_restarts must be >= 0")
    _check_spares(cfg)
    if not 0 <= dl.outer_momentum < 1:
        raise ConfigError(f"diloco.outer_momentum={dl.outer_momentum} must be in [0, 1)")
    _check_routing(s)
    _check_split(s, cfg.model.n_layers, cfg.model.name)
    _check_hops(s)
    _check_hop_transport(cfg)
    if dl.compression not in ("none", "fp16", "int8", "sparse"):  # compress.MODES; that module imports torch
        raise ConfigError(f"diloco.compression={dl.compression} is unknown; choose none, fp16, int8 or sparse")
    if not 0 < dl.sparse_density <= 1:
        raise ConfigError(f"diloco.sparse_density={dl.sparse_density} must be in (0, 1], e.g. 0.015")
    if not 0 <= dl.sparse_feedback_decay <= 1:
        raise ConfigError(f"diloco.sparse_feedback_decay={dl.sparse_feedback_decay} must be in [0, 1], e.g. 0.95 "
                          "(1.0 keeps the whole residual)")
    if not 1 <= dl.compression_block <= 1 << 20:
        raise ConfigError(f"diloco.compression_block={dl.compression_block} must be in [1, 1048576]")
    _check_sparse_broadcast(cfg)
    _check_streaming(cfg)
    from neuroray.diloco.overlap import overlap_problem  # lazy: the diloco package imports torch

    problem = overlap_problem(dl.overlap, dl.overlap_steps, dl.inner_steps, dl.streaming_fragments, s.routing,
                              cfg.aggregator.name, cfg.model.name)
    if problem:
        raise ConfigError(problem)
    if dl.outer_step_in not in ("actor", "task"):
        raise ConfigError(f"diloco.outer_step_in={dl.outer_step_in} is unknown; choose actor or task")
    if dl.lr_schedule not in ("constant", "cosine"):  # lr.SCHEDULES
        raise ConfigError(f"diloco.lr_schedule={dl.lr_schedule} is unknown; choose constant or cosine")
    if not 0 <= dl.warmup_steps < cfg.rounds * dl.inner_steps:
        raise ConfigError(f"diloco.warmup_steps={dl.warmup_steps} must be in [0, rounds x inner_steps = "
                          f"{cfg.rounds * dl.inner_steps}); lower it or train longer")
    if not 0 <= dl.min_lr_ratio <= 1:
        raise ConfigError(f"diloco.min_lr_ratio={dl.min_lr_ratio} must be in [0, 1]")
    from neuroray.planner.cluster import check_planner_config  # lazy: the planner imports torch-free modules only

    check_planner_config(cfg)
    from neuroray.diloco.aggregate import config_problem  # lazy: aggregate imports torch
    from neuroray.diloco.attacks import attack_problem

    # n = holders per range = replicas: a rule that cannot tolerate f among them fails here, not mid-run
    problem = config_problem(cfg.aggregator, dl.replicas) or attack_problem(cfg.attack, dl.replicas)
    if problem:
        raise ConfigError(problem)


def _check_sparse_broadcast(cfg: TrainConfig) -> None:
    """diloco.sparse_broadcast=union: the holders rebuild the step from the payloads (neuroray/diloco/union.py),
    so the step must be a weighted sum of them: no outer momentum, a rule whose result is one."""
    dl = cfg.diloco
    if dl.sparse_broadcast not in ("resparsify", "union"):
        raise ConfigError(f"diloco.sparse_broadcast={dl.sparse_broadcast} is unknown; choose resparsify or union")
    if dl.sparse_broadcast != "union" or dl.compression != "sparse":
        return
    if dl.outer_momentum != 0:  # nesterov without momentum is plain SGD: nothing dense to send
        raise ConfigError(f"diloco.outer_momentum={dl.outer_momentum} with diloco.sparse_broadcast=union: the holders "
                          "apply the payloads' mean themselves and a momentum term would be dense; set "
                          "diloco.outer_momentum=0 (error feedback stands in for momentum, as in SparseLoCo) or "
                          "diloco.sparse_broadcast=resparsify")
    rules = ("mean", "krum", "multi_krum", "geometric_median")  # union.RULES; that module imports torch
    if cfg.aggregator.name not in rules:
        raise ConfigError(f"aggregator={cfg.aggregator.name} does not reduce to a weighted sum of the payloads, "
                          f"which diloco.sparse_broadcast=union sends the holders; choose one of {', '.join(rules)} "
                          "or diloco.sparse_broadcast=resparsify")


def _check_reputation(cfg: TrainConfig) -> None:
    p = cfg.ponw
    if p.reputation_batch <= 0:
        raise ConfigError(f"ponw.reputation_batch={p.reputation_batch} must be positive (sequences in the scoring batch)")
    if not 0 <= p.reputation_decay < 1:
        raise ConfigError(f"ponw.reputation_decay={p.reputation_decay} must be in [0, 1) (the weight of the old value)")
    for key, value in (("reputation_prior", p.reputation_prior), ("reputation_floor", p.reputation_floor)):
        if not 0 <= value <= 1:
            raise ConfigError(f"ponw.{key}={value} must be in [0, 1]")
    if p.reputation and p.reputation_floor > p.reputation_prior:
        raise ConfigError(f"ponw.reputation_floor={p.reputation_floor} is above ponw.reputation_prior="
                          f"{p.reputation_prior}: every newcomer would start with no weight and no reward; "
                          "lower the floor or raise the prior")


def hop_recheck_off(cfg: TrainConfig) -> str | None:
    """Why the hop rechecks (``ponw.hop_recheck_rate``, neuroray/training/hop_audit.py) do not run here, or None.
    They redo a holder's first inner step of a round at theta0 on another holder of its range, so they need
    every holder of a range at theta0 when a round starts, hops that cross as they were computed, and a peer. Under
    ``swarm.routing=router`` they follow the router's routes (neuroray/training/hop_routes.py)."""
    p, s, dl = cfg.ponw, cfg.swarm, cfg.diloco
    if not p.enabled or p.hop_recheck_rate == 0:
        return "ponw.enabled=false or ponw.hop_recheck_rate=0"
    if s.hop_compression != "none":
        return f"swarm.hop_compression={s.hop_compression} (a lossy codec moves every hop past the tolerance)"
    if dl.streaming_fragments > 1 or dl.overlap != "none":
        return "streaming or diloco.overlap (a round's first step does not start from the theta0 every holder keeps)"
    if dl.replicas < 2:
        return "diloco.replicas=1 (no other holder of a range to re-execute on)"
    if s.num_stages < 2:
        return "swarm.num_stages=1 (no hop crosses between holders)"
    return None


def _check_hops(s: SwarmConfig) -> None:
    if s.hop_compression not in HOP_COMPRESSIONS:
        raise ConfigError(f"swarm.hop_compression={s.hop_compression} is unknown; choose {', '.join(HOP_COMPRESSIONS)}")
    if not 1 <= s.hop_block <= 1 << 20:
        raise ConfigError(f"swarm.hop_block={s.hop_block} must be in [1, 1048576]")
    if not 1 <= s.hop_ratio <= 1024:
        raise ConfigError(f"swarm.hop_ratio={s.hop_ratio} must be in [1, 1024] (16: at least 16x fewer bytes)")
    if s.hop_inline_max_bytes < 0:
        raise ConfigError(f"swarm.hop_inline_max_bytes={s.hop_inline_max_bytes} must be >= 0 (1024: hops above "
                          "1 KiB go from node to node; 0: Ray's own limit, 100 KiB)")
    if not 1 <= s.hop_check_warmup <= s.hop_check_history or s.hop_check_factor <= 1:
        raise ConfigError(f"swarm.hop_check_warmup={s.hop_check_warmup} must be in [1, swarm.hop_check_history="
                          f"{s.hop_check_history}] and swarm.hop_check_factor={s.hop_check_factor} above 1 (e.g. 100)")


def _check_hop_transport(cfg: TrainConfig) -> None:
    """Ray Direct Transport (swarm.hop_transport=gloo|nccl) and shared-memory rings (shm) are wired for fixed
    pipelines of plain tensors only."""
    s, t = cfg.swarm, cfg.swarm.hop_transport
    if t not in HOP_TRANSPORTS:
        raise ConfigError(f"swarm.hop_transport={t} is unknown; choose {', '.join(HOP_TRANSPORTS)}")
    if t in ("object_store", "auto"):
        return  # auto falls back to the object store wherever a direct path cannot run
    if s.hop_shm_slots < 0:
        raise ConfigError(f"swarm.hop_shm_slots={s.hop_shm_slots} must be >= 0 (0: data.num_microbatches + 1)")
    if s.routing != "fixed":
        what = "a ring per fixed edge" if t == "shm" else "a collective group per fixed pipeline"
        raise ConfigError(f"swarm.hop_transport={t} needs swarm.routing=fixed ({what}; routed hops go anywhere): "
                          "use swarm.hop_transport=object_store with the router")
    if s.hop_compression != "none":
        raise ConfigError(f"swarm.hop_transport={t} carries plain tensors, not swarm.hop_compression="
                          f"{s.hop_compression} payloads: set swarm.hop_compression=none or hop_transport=object_store")
    if t == "nccl" and cfg.model.name != "auto" and cfg.cluster.gpus_per_holder <= 0:
        raise ConfigError("swarm.hop_transport=nccl needs a GPU on every holder (cluster.gpus_per_holder > 0); "
                          "on CPUs use swarm.hop_transport=gloo or object_store")


def _check_split(s: SwarmConfig, n_layers: int, model_name: str) -> None:
    if s.balance not in ("layers", "compute"):
        raise ConfigError(f"swarm.balance={s.balance} must be layers or compute")
    if not s.split_points:
        return
    if model_name == "auto":
        raise ConfigError("swarm.split_points cannot be combined with model=auto: the planner cuts the ranges "
                          "it sizes; drop swarm.split_points or pick a fixed model")
    pts = list(s.split_points)
    if len(pts) != s.num_stages - 1:
        raise ConfigError(f"swarm.split_points={pts} gives {len(pts) + 1} stages but swarm.num_stages={s.num_stages}; "
                          f"give num_stages - 1 = {s.num_stages - 1} first layers, or leave split_points empty")
    if any(not isinstance(p, int) for p in pts) or pts != sorted(set(pts)) or pts[0] < 1 or pts[-1] >= n_layers:
        raise ConfigError(f"swarm.split_points={pts} must be increasing layer indices in [1, {n_layers - 1}] "
                          f"(model.n_layers={n_layers}), each the first layer of a later stage")


def _check_streaming(cfg: TrainConfig) -> None:
    F, H = cfg.diloco.streaming_fragments, cfg.diloco.inner_steps
    if F < 1:
        raise ConfigError(f"diloco.streaming_fragments={F} must be >= 1 (1 = off: every range syncs whole)")
    if F == 1:
        return
    if F > H:
        raise ConfigError(f"diloco.streaming_fragments={F} exceeds diloco.inner_steps={H}: "
                          "fragments sync H/F steps apart, so at most one fragment per inner step")
    if H % F:
        raise ConfigError(f"diloco.inner_steps={H} is not a multiple of diloco.streaming_fragments={F}: "
                          "fragments sync every H/F steps; pick F dividing H")
    cuts = [0, *cfg.swarm.split_points, cfg.model.n_layers]
    # the smallest range the split makes (balance=compute is checked when the ranges are cut)
    per_stage = (min(b - a for a, b in zip(cuts, cuts[1:])) if cfg.swarm.split_points
                 else cfg.model.n_layers // cfg.swarm.num_stages)
    if cfg.model.name != "auto" and F > per_stage:
        raise ConfigError(f"diloco.streaming_fragments={F} exceeds the {per_stage} layers of the smallest range "
                          f"(model.n_layers={cfg.model.n_layers} over swarm.num_stages={cfg.swarm.num_stages}): "
                          "a fragment is a group of a range's layers")
    if cfg.swarm.routing != "fixed":
        raise ConfigError("diloco.streaming_fragments>1 needs swarm.routing=fixed "
                          "(the routed outer step syncs whole ranges)")


def _check_spares(cfg: TrainConfig) -> None:
    """checkpoint.spares (neuroray/swarm/spares.py): what warm spare holders cannot run beside."""
    n = cfg.checkpoint.spares
    if n < 0:
        raise ConfigError(f"checkpoint.spares={n} must be >= 0 (0: a crashed holder waits for Ray's restart)")
    if n == 0:
        return
    if cfg.swarm.routing == "router":
        raise ConfigError("checkpoint.spares with swarm.routing=router: the router rejoins a restarted holder on its own "
                          "path, which spares do not take part in; set checkpoint.spares=0 or swarm.routing=fixed")
    if cfg.model.name == "auto":
        raise ConfigError("checkpoint.spares with model=auto: a spare reserves cluster.cpus_per_holder/gpus_per_holder, "
                          "the planner sizes every holder itself; set checkpoint.spares=0 or choose a model")
    if cfg.checkpoint.max_restarts == 0:
        raise ConfigError("checkpoint.spares with checkpoint.max_restarts=0: a spare takes a crashed holder's slot over "
                          "only within max_restarts replacements per slot; set checkpoint.max_restarts >= 1")


def _check_routing(s: SwarmConfig) -> None:
    if s.routing not in ("fixed", "router"):
        raise ConfigError(f"swarm.routing={s.routing} must be fixed or router")
    if s.schedule not in SCHEDULES:
        raise ConfigError(f"swarm.schedule={s.schedule} is unknown; choose {', '.join(SCHEDULES)}")
    if s.queue_depth < 1 or s.outbound_depth < 1 or s.max_inflight < 0:
        raise ConfigError("swarm.queue_depth and swarm.outbound_depth must be >= 1 and swarm.max_inflight >= 0")
    if not 0 < s.latency_ewma <= 1:
        raise ConfigError(f"swarm.latency_ewma={s.latency_ewma} must be in (0, 1]")
    if s.failover_k <= 0 or not 0 < s.failover_floor_s <= s.failover_ceiling_s:
        raise ConfigError(f"swarm.failover_k={s.failover_k} must be positive and 0 < swarm.failover_floor_s="
                          f"{s.failover_floor_s} <= swarm.failover_ceiling_s={s.failover_ceiling_s}")
    if s.start_grace_s <= 0:
        raise ConfigError(f"swarm.start_grace_s={s.start_grace_s} must be positive")
    if s.failure_penalty_s < 0 or s.probe_interval_s <= 0 or s.outer_deadline_s <= 0:
        raise ConfigError("swarm.failure_penalty_s must be >= 0, swarm.probe_interval_s and "
                          "swarm.outer_deadline_s positive")
    if not 0 < s.outer_quorum <= 1:
        raise ConfigError(f"swarm.outer_quorum={s.outer_quorum} must be in (0, 1]: a fraction of a range's holders")
