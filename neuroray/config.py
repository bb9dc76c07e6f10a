"""The config schema: one frozen-shape dataclass per section, and nothing above it.

This module sits at the bottom of the package: it imports no other neuroray module but errors.
Config flows one way: YAML in ``conf/`` + overrides -> Hydra compose, typed by these dataclasses
(neuroray/configure.py) -> ``OmegaConf.to_object`` -> plain dataclasses, checked across fields by
neuroray/config_checks.py. Actors only ever receive the plain dataclasses.
"""

from __future__ import annotations

import dataclasses
from typing import Optional
from dataclasses import dataclass, field

from neuroray.errors import ConfigError


SCHEMA_NAME = "neuroray_schema"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # TrainConfig.precision's values (docs/precision.md)
HOP_COMPRESSIONS = ("none", "int8", "lowrank", "lowrank_mixed")  # swarm.hop_compression (swarm/hop_codec.py)
# swarm.hop_transport's values (neuroray/swarm/direct_transport.py, shm_transport.py)
HOP_TRANSPORTS = ("object_store", "gloo", "nccl", "shm", "auto")
SCHEDULES = ("gpipe", "1f1b")  # swarm.schedule's values (neuroray/training/schedule.py)
MAX_BUBBLE = 0.2  # data.num_microbatches=0 (auto): the largest pipeline bubble (S-1)/(m+S-1) it accepts


@dataclass
class ModelConfig:
    """Decoder-only transformer shape. The vocabulary size comes from the tokenizer at run time."""

    name: str = "tiny"  # which conf/model/ file this came from; auto: size from the cluster (neuroray/planner)
    d_model: int = 128  # hidden size
    n_layers: int = 4  # transformer blocks, split into swarm.num_stages layer ranges
    n_heads: int = 4  # attention heads (d_model must divide by it)
    n_kv_heads: int = 4  # key/value heads (grouped-query attention; divides n_heads)
    ffn_hidden: int = 0  # 0: SwiGLU default, 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 256  # longest context (RoPE tables); data.seq_len must fit
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # standard deviation of the initial weights
    # recompute each transformer block's activations in backward instead of keeping them (torch.utils.checkpoint):
    # a block keeps only its input between forward and backward, for about one more forward of compute
    # (docs/memory.md); training only, the computed gradients are unchanged
    activation_checkpointing: bool = False


@dataclass
class DataConfig:
    """Genesis data: where the text comes from, how it is tokenized and sharded, how it is batched."""

    name: str = "embedded"  # which conf/data/ file this came from
    # "embedded" (text that ships with Python); a .txt/.md/.json/.jsonl/.parquet file, a directory or a glob
    # of them; or "hf:<owner>/<name>" for a Hugging Face Hub dataset
    source: str = "embedded"
    text_field: str = "text"  # the text column of json/jsonl/parquet/Hub sources
    hub_config: str = ""  # Hub sources: the dataset configuration ("" for its default)
    hub_split: str = "train"  # Hub sources: the split to read
    encoding_errors: str = "strict"  # non-UTF-8 bytes: strict (stop, naming the file) | replace | ignore
    store: str = "~/.cache/neuroray/genesis"  # fsspec URL (path, s3://, memory://); datasets keyed by settings
    dataset: str = ""  # URL of a built dataset (also https://) to use as-is; "": <store>/<name>-<settings hash>
    manifest_sha256: str = ""  # pin: the sha256 of manifest.json as published; another manifest is refused
    manifest_publisher: str = ""  # or: the publisher's public key (66 hex); manifest.sig must verify under it
    cache_dir: str = "~/.cache/neuroray/cache"  # local: verified shards from remote stores, embedded corpus
    cache_size_mb: int = 4096  # shard cache limit; least recently used shards are evicted
    base_tokenizer: str = ""  # tokenizer.json or dataset URL to grow: keeps every id, appends new ones
    # your own tokenizer (a tokenizer.json or a Hugging Face tokenizer directory) used as-is instead of training
    # one; BOS/EOS/PAD must be ids 0/1/2; data.vocab_size is then its size; the manifest records its SHA-256
    tokenizer: str = ""
    tokenizer_docs: int = 0  # documents the tokenizer trains on; 0: all of them
    vocab_size: int = 4096  # BPE tokenizer size (ln of it is the loss of a uniform guess)
    shard_tokens: int = 2_500_000  # tokens per uint16 shard
    eval_shards: int = 1  # shards held out for the eval loss
    seq_len: int = 128  # tokens per training sequence
    # sequences per inner step on each replica: the optimizer's batch (batch_size x seq_len tokens), the same
    # whatever the stage count; split into num_microbatches microbatches of microbatch_size sequences
    batch_size: int = 16
    microbatch_size: int = 0  # sequences per microbatch; 0: batch_size / num_microbatches
    # microbatches per inner step (gradient accumulation); 0 (auto): the fewest dividing batch_size that keep the
    # pipeline bubble (S-1)/(m+S-1) of S = swarm.num_stages at most 20 % (docs/schedule.md)
    num_microbatches: int = 0
    # Re-read the dataset's manifest every this many outer rounds (0: never): a dataset extended in place with
    # a grown tokenizer (data.base_tokenizer, docs/genesis.md) grows the running model's vocabulary
    watch_rounds: int = 0


@dataclass
class DilocoConfig:
    """R data-parallel pipeline replicas, H inner AdamW steps, then an outer Nesterov step on theta0."""

    name: str = "default"  # which conf/diloco/ file this came from
    replicas: int = 2  # R: data-parallel pipeline replicas
    inner_steps: int = 20  # H: inner AdamW steps between outer steps
    inner_lr: float = 1e-3  # AdamW learning rate (peak, with a schedule)
    weight_decay: float = 0.1  # AdamW weight decay
    grad_clip: float = 1.0  # 0 disables; clipped per stage holder, on its own parameters
    outer_lr: float = 0.7  # outer SGD learning rate on theta0
    outer_momentum: float = 0.9  # outer momentum
    nesterov: bool = True  # Nesterov momentum for the outer step
    # Pseudo-gradients (holder -> outer step) and the outer update (outer step -> holders) cross as:
    # none (float32) | fp16 | int8 (one float32 scale per compression_block values) | sparse (the largest
    # sparse_density of each compression_block values, 2 bits each plus their position), with error feedback
    compression: str = "none"
    compression_block: int = 256  # int8: values per float32 scale; sparse: values per chunk
    sparse_density: float = 0.015  # sparse: the fraction of each chunk's values sent
    # sparse: error-feedback decay beta on each holder's residual, SparseLoCo's e = beta * e + delta before the
    # top-k (arXiv 2508.15706 uses about 0.95): what top-k left out fades instead of waiting in full (1.0: kept whole)
    sparse_feedback_decay: float = 1.0
    # sparse: what the outer step sends back to the holders. resparsify: its update theta0_old - theta0_new,
    # top-k sparsified again with its own error feedback (theta0 changes in at most sparse_density of each chunk
    # per round). union: the accepted holders' payloads themselves, which every holder decodes and averages
    # with the rule's weights (SparseLoCo's all-gather: the update's support is the union of theta0 supports;
    # about M payloads to each holder; no outer momentum, so outer_momentum must be 0; docs/diloco.md)
    sparse_broadcast: str = "resparsify"
    # Streaming DiLoCo: each range's layers split into this many fragments; fragment i runs its outer step
    # after inner steps t with (t - i*H/F) % H == 0, so one fragment syncs every H/F steps (1: off)
    streaming_fragments: int = 1
    # Inner learning rate per step (neuroray/diloco/lr.py): constant | cosine (from inner_lr down to
    # inner_lr * min_lr_ratio at the last step), after warmup_steps of linear warmup
    lr_schedule: str = "constant"
    warmup_steps: int = 0  # inner steps of linear warmup (0: none)
    min_lr_ratio: float = 0.1  # cosine: the last step's learning rate as a fraction of inner_lr
    # The outer step overlaps the next inner steps (docs/diloco.md): none (holders wait for it) | delayed
    # (holders go on from their own weights; the aggregate lands overlap_steps later, their progress since
    # the round's end kept on top) | eager (holders restart at once from their own pseudo-gradient through
    # the outer optimizer, corrected to the aggregate when it lands)
    overlap: str = "none"
    overlap_steps: int = 1  # delayed/eager: inner steps after a round's end at which its outer step lands
    # Where each layer range's outer step runs: actor (one long-lived actor per range on the driver's node,
    # neuroray/diloco/outer_actors.py) | task (a fresh Ray task each round, which may wait for a new worker
    # to start and import torch; kept to measure that: benchmarks/outer_step_idle.py). Same values either way
    outer_step_in: str = "actor"


@dataclass
class AggregatorConfig:
    """How the pseudo-gradients of one layer range are reduced into one (definitions: docs/aggregation.md
    and neuroray/diloco/aggregate.py). ``f`` is the number of Byzantine holders per range to tolerate."""

    name: str = "mean"  # mean | median | trimmed_mean | krum | multi_krum | geometric_median | centered_clip
    f: int = 0  # Byzantine holders per range to tolerate (rules that need it refuse too many)
    m: int = 0  # multi_krum: how many best-scored inputs to average; 0 = n - f
    tau: float = 2.0  # centered_clip radius, in units of the median distance of the inputs to the centre (>= 1)
    iterations: int = 3  # centered_clip iterations
    gm_max_iter: int = 100  # geometric_median: Weiszfeld iterations at most
    gm_tol: float = 1e-6  # geometric_median: stop when a step moves less than this x the inputs' spread
    gm_smoothing: float = 1e-6  # geometric_median: distances are floored at this x the inputs' spread
    clip: float = 0.0  # pre-step: clip each input's norm to clip x the median norm (0: off, else >= 1)
    nnm: bool = False  # pre-step: nearest-neighbour mixing (each input -> mean of its n - f nearest)
    bucket: int = 0  # pre-step: average random buckets of this many inputs (0 or 1: off)
    chunk: int = 65536  # elements per input processed at a time: extra memory is O(n x chunk)


@dataclass
class AttackConfig:
    """Byzantine holders (definitions: neuroray/diloco/attacks.py): in every range, the first ``fraction`` of
    the holders (rounded half up; replicas 0, 1, ...) attack. ``where=reduce`` simulates the attack in the
    outer step's reduce task (the holder's pseudo-gradient is replaced there); ``where=holder`` runs it inside
    those holders' own processes (neuroray/swarm/attacks_in_holder.py), on everything they send."""

    # reduce: none | sign_flip | scaled | gaussian | alie | ipm | mimic | zero | stale | nan. holder: none |
    # sign_flip | scaled | zero | stale | replay | tamper_activations | tamper_gradients | lazy_zero | lazy_stale |
    # copy | wrong_data | slow_walk | slow_walk_hidden | lie_loss | inflate_batches
    name: str = "none"
    fraction: float = 0.0  # share of each range's holders that attack (0: none)
    where: str = "reduce"  # reduce: simulated in the outer step's reduce task | holder: inside the holder processes
    # scaled: multiply the holder's own pseudo-gradient by this; tamper_*: multiply the activation / gradient it
    # sends; slow_walk(_hidden): every compute call takes this x as long; lie_loss: commit this x its losses;
    # inflate_batches: claim this many extra microbatches per round
    scale: float = 1e6
    # gaussian: standard deviation of the noise sent; tamper_*: noise added to the sent tensor, times its RMS
    std: float = 1.0
    z: Optional[float] = None  # alie: honest mean - z x honest std per coordinate; null: the paper's z_max
    epsilon: float = 0.1  # ipm: send -epsilon x the honest mean


@dataclass
class SwarmConfig:
    """How the model is split into stage holders."""

    name: str = "default"  # which conf/swarm/ file this came from
    num_stages: int = 2  # layer ranges (stage holders) per replica
    # Where the layer ranges are cut, as torchtitan's pipeline split points: the first layer of every
    # stage after the first ([3] on 4 layers: [0-2], [3]). Empty: cut by swarm.balance.
    split_points: list[int] = field(default_factory=list)
    # "layers": equal layer counts (earlier stages take the extra layer). "compute": equal forward FLOPs,
    # counting the embedding and the head + loss (on small models the head costs several layers).
    balance: str = "layers"
    key_dir: str = "~/.cache/neuroray/keys"  # one persistent secp256k1 key per holder name
    # "fixed": replica r's microbatches always cross pipeline r. "router": every hop of every microbatch
    # goes to the best-scored holder of the next range (docs/routing.md), with failover and hedging.
    routing: str = "fixed"
    # swarm.routing=fixed: the order each holder runs its microbatches in (docs/schedule.md). "gpipe": all forwards,
    # then all backwards (measured faster on CPU); "1f1b": one forward, one backward, so a holder keeps at most
    # S - stage microbatch graphs instead of all of them (less activation memory)
    schedule: str = "gpipe"
    queue_depth: int = 2  # router: calls waiting or running on one holder (its inbound queue)
    outbound_depth: int = 2  # router: finished activations of one holder waiting for a downstream slot
    max_inflight: int = 0  # router: microbatches between first forward and last backward; 0: a whole step
    latency_ewma: float = 0.3  # router: weight of the newest hop time in a holder's latency average
    # router: a queued call that has not started start_grace_s after its turn came (the holder's previous
    # call finished) is taken back and re-sent: the holder's compute thread is stuck on something else
    start_grace_s: float = 0.03
    failover_k: float = 3.0  # router: a call is late after failover_k x p99 of its holder's hop times ...
    failover_floor_s: float = 0.05  # ... but never before this ...
    failover_ceiling_s: float = 10.0  # ... and always after this (also the deadline before 5 hop times are known)
    failure_penalty_s: float = 1.0  # router: score added per recent failure (halves every failover_ceiling_s)
    probe_interval_s: float = 0.5  # router: how often a down holder is asked whether Ray restarted it
    outer_quorum: float = 1.0  # router: fraction of a range's live holders the outer step waits for ...
    outer_deadline_s: float = 30.0  # ... after this long it goes on with whoever answered, if a quorum did
    # What crosses between stage holders on every microbatch (activations forward, gradients back; docs/hops.md):
    # "none" (float32), "int8" (blockwise, a float32 scale per hop_block values), "lowrank" (a truncated SVD
    # of the [tokens, hidden] matrix with int8 factors, at least hop_ratio x fewer bytes than float32), or
    # "lowrank_mixed" (the same SVD, the leading components' factors in int8 and the next ones' in int4, the split
    # picked per hop for the least error at the same hop_ratio)
    hop_compression: str = "none"
    hop_block: int = 256  # hop_compression=int8: values per float32 scale
    hop_ratio: float = 16.0  # hop_compression=lowrank|lowrank_mixed: the payload is this many x fewer bytes (at least)
    # >0: a holder's results above this many bytes stay in its node's object store, so the next holder pulls a hop
    # straight from the sender's node. 0: Ray's own limit (100 KiB), which inlines smaller hops into the caller, the
    # driver: a compressed hop then crosses sender -> driver -> receiver (measured trade-off: docs/hops.md)
    hop_inline_max_bytes: int = 0
    # How a hop's tensor crosses (docs/hops.md, "Transport"): "object_store" (a numpy buffer through Ray's object
    # store); "gloo" (CPU tensors) or "nccl" (CUDA tensors): Ray Direct Transport, the receiver pulls the tensor from
    # the sender over a collective group, one per fixed pipeline (fixed routing, hop_compression=none only);
    # "shm": same-node edges of fixed pipelines through a preallocated ring of shared-memory slots per edge, only a
    # small handle in the Ray call (neuroray/swarm/shm_transport.py); the object store where the peer is on another
    # node or no slot is free; "auto": nccl when every holder has a GPU, else object_store
    hop_transport: str = "object_store"
    # hop_transport=shm: slots in each edge's ring (each the size of one activation); 0: data.num_microbatches + 1,
    # enough for GPipe's stash of every microbatch's activation until its backward (a full ring falls back, never waits)
    hop_shm_slots: int = 0
    # Checks at every hop (neuroray/swarm/hop_guard.py, docs/hops.md): a holder checks each activation and gradient
    # it receives for shape, dtype, NaN/Inf and a norm band; a violation is rejected and counted against its sender.
    hop_check: bool = True  # (false: received tensors are used unchecked; a compressed payload is still checked)
    hop_check_history: int = 64  # the norm band's memory: the last this many accepted hops per holder and direction
    hop_check_warmup: int = 16  # the band is enforced once this many hops are in the history
    hop_check_factor: float = 100.0  # a norm this many times above or below the history's median is rejected


@dataclass
class ClusterConfig:
    """Where to run and what each stage holder asks of Ray."""

    name: str = "local"  # which conf/cluster/ file this came from
    address: str = ""  # "": RAY_ADDRESS if set, else start a local Ray; "auto" or "ray://..." to connect
    num_cpus: int = 0  # CPUs of a locally started Ray; 0 means all of this machine's
    object_store_mb: int = 0  # object store of a locally started Ray, MiB; 0: Ray's default (30 % of memory)
    # directory of a locally started Ray's object store; "": /dev/shm. A tmpfs mounted with huge=always makes a
    # large hop's copy into the store fault 2 MiB pages, not 4 KiB (docs/hops.md, "Transport")
    object_store_dir: str = ""
    # a locally started Ray faults its whole object store in at start (Ray's RAY_preallocate_plasma_memory):
    # the store's memory is taken up front, and no hop pays for fresh store pages
    object_store_prefault: bool = False
    cpus_per_holder: float = 0.5  # Ray CPUs each stage holder reserves
    gpus_per_holder: float = 0.0  # Ray GPUs each stage holder reserves (> 0 puts its layers on CUDA)
    torch_threads: int = 1  # intra-op threads inside each holder
    actor_start_timeout_s: float = 180.0  # how long the holders may take to start and load
    step_timeout_s: float = 600.0  # how long one inner step (or an outer step) may take before it counts as failed
    # a step (fixed routing) or a router's control call not back within this has the hosts of its holders
    # probed (a TCP connect to their Ray node): fixed routing starts the holders of a host that does not
    # answer afresh on a live node, the router marks them down. 0: wait for Ray's node-death detection
    # (about a minute; docs/lab.md). Probing a host that answers costs nothing, so this may be short.
    liveness_timeout_s: float = 1.0
    liveness_probe_s: float = 1.0  # how long a holder's host may take to accept that connection
    # joining a cluster: how long every node's Python may take to report missing dependencies (a worker
    # start imports nothing of ours, but a node under load can take seconds to start one)
    node_check_timeout_s: float = 120.0
    # Local paths (data.store, checkpoint.dir) when the cluster has several nodes: "serve" has the driver's
    # node serve them to every node through Ray (neuroray/hoststore, docs/lab.md); "shared" says they are a
    # mount every node sees. Either way every node proves at start that it reads the data.
    local_stores: str = "serve"
    store_timeout_s: float = 120.0  # one call to the driver-hosted store
    store_chunk_mb: int = 16  # the most bytes of a file one call to the driver-hosted store moves
    store_probe_timeout_s: float = 120.0  # every node reading the data's manifest at start
    # Plan for these nodes instead of the live Ray cluster (python -m neuroray.plan): one entry per node,
    # "24GB" (host memory), "64GB+8x80GB" (host + 8 GPUs of 80 GB), "10x4GB" (ten such nodes).
    nodes: list[str] = field(default_factory=list)
    # Uplink rate of live nodes, for placement that knows the links (docs/planner.md): "<address or node-id
    # prefix>@<rate>", e.g. ["10.0.0.2@100mbit", "*@1gbit"]; cluster.nodes entries take "24GB@1gbit" instead
    links: list[str] = field(default_factory=list)


@dataclass
class CheckpointConfig:
    """Hot snapshots of every holder (and of each range's outer state) on any fsspec store."""

    name: str = "local"  # which conf/checkpoint/ file this came from
    dir: str = ""  # fsspec URL of the snapshot store; "": <run_dir>/snapshots
    interval_s: float = 120.0  # snapshot every this many seconds (at the next inner-step boundary); 0: never
    every_round: bool = False  # also snapshot at each outer-round boundary
    keep: int = 5  # snapshots kept per holder
    # times a slot's crashed holder is brought back, each from its newest good snapshot: by Ray restarting the
    # process, or with spares by a spare (or, none ready, a fresh holder) taking the slot over
    max_restarts: int = 3
    recovery_timeout_s: float = 120.0  # how long to wait for a restarted holder before giving up
    # idle warm holders per layer range (swarm.routing=fixed): a crashed holder's slot is taken over by one in well
    # under a second instead of waiting seconds for Ray's restart; each costs one holder's CPUs, GPUs and memory
    spares: int = 0


@dataclass
class PonwConfig:
    """Proof of Neural Work and the NEURO ledger (docs/ponw.md). Amounts are in NEURO."""

    name: str = "default"  # which conf/ponw/ file this came from
    enabled: bool = True  # false: no proofs, no ledger
    ledger_path: str = ""  # "": <run_dir>/ledger.sqlite
    actor_name: str = "neuroray-ledger"  # name of the Ray actor that owns the ledger (one per concurrent run)
    coordinator_key: str = ""  # the driver's key file (signs receipts, registrations); "": <swarm.key_dir>/coordinator.pem
    synchronous: str = "FULL"  # SQLite WAL sync: FULL survives power loss, NORMAL only process crashes
    backend: str = "auto"  # signatures: auto (coincurve if installed, else ecdsa), ecdsa, coincurve
    max_proof_bytes: int = 4096  # larger proofs are refused unread
    timestamp_window_s: int = 300  # proofs older or newer than this are refused
    rate_limit_per_hour: int = 120  # proofs per node per hour at most
    require_receipts: bool = True  # credit only work the orchestrator observed
    reward_per_batch_layer: float = 0.001  # training: per microbatch x layer held
    embedding_bonus: float = 0.2  # role bonus (fraction) for the embedding holder
    lm_head_bonus: float = 0.2  # and for the LM head holder
    reward_per_inference_token: float = 0.00001  # inference: per token served
    validation_fee_per_batch: float = 0.002  # per recomputed batch
    max_reward_per_proof: float = 10.0  # cap per proof
    max_reward_per_day: float = 1000.0  # per node, per UTC day
    stake_multiplier_max: float = 1.5  # reward x (1 + bonus), bonus linear in stake up to this bound
    stake_for_max_multiplier: float = 100.0  # stake that earns the full stake_multiplier_max
    slash_fraction: float = 0.5  # of stake + balance, stake first
    slash_burn_fraction: float = 0.5  # the rest goes to the reporting validator (all burned if none)
    free_rider_norm_fraction: float = 0.1  # pseudo-gradient norm below this x range median earns 0
    # a holder whose compute calls take more than this x the median of its range's other holders', in
    # straggler_rounds rounds in a row, earns 0 for that round and every further slow one (a slow walker sets the
    # whole swarm's pace; neuroray/ponw/stragglers.py); 0: off; null: by the clock that times the calls, 2.5 under
    # the router (its hop times), 1.5 under fixed routing (each call paired with the same call on the range's other
    # holders, a tighter clock: honest holders at most 1.34x two rounds in a row, a 3x walker 1.64x; docs/ponw.md)
    straggler_factor: Optional[float] = None  # x its range's other holders' pace (0: off; null: 2.5 router, 1.5 fixed)
    straggler_rounds: int = 2  # that many rounds in a row over straggler_factor before a holder is named
    # fixed routing: the driver times each holder's calls itself (neuroray/training/call_clock.py); a call submitted
    # while its watcher thread waits is stamped at the thread's next wake, at most this late
    call_clock_poll_s: float = 0.005  # seconds between the call clock's wakes while calls are in flight
    # how many inner steps of each round the call clock times, drawn at random each round (the same steps on every
    # replica, so calls pair; unknowable to a holder); of the step before each it waits only on each holder's last
    # call, of the others on nothing. The clock's thread wakes at every call it watches, which costs the holders CPU
    # on shared cores; 0: every step
    call_clock_steps: int = 4
    # before each range's rule, a pseudo-gradient made before its holder's batches of the round (a replayed one) is
    # refused and paid 0: on the embedding's range by the rows of the round's new tokens (moved only by weight decay),
    # elsewhere by the loss it removes there against its stream's neighbours (docs/ponw.md, Replayed pseudo-gradients)
    replay_check: bool = True  # false: every pseudo-gradient goes to the rule unscored
    replay_min_ratio: float = 3.0  # embedding range: rows of tokens new this round must move this x never-seen rows
    replay_min_lead: float = -2.0  # other ranges: the least mean lead on own batches over neighbours (-2..2; -2: off)
    max_batches_per_s: float = 1000.0  # physical bound when the orchestrator measured none
    spot_check_rate: float = 0.1  # fraction of Driver proofs whose sampled batch is recomputed
    # nats, relative to max(1, loss) (hop rechecks: relative L2 of a hop); 0 (auto): 0.001 when every holder computes
    # in float32 (precision=fp32, or auto with no GPU holder), else 0.01 (bf16/fp16 autocast; docs/ponw.md)
    spot_check_tolerance: float = 0.0
    # fraction of each holder's microbatches of a round's first inner step that another holder of its range
    # re-executes at theta0 from the same inputs (router: by route); a mismatch is excluded, slashed (docs/ponw.md)
    hop_recheck_rate: float = 0.1
    # held-out scores -> per-holder reputation -> aggregation weights and rewards (docs/ponw.md); off by default:
    # it reweighs honest replicas by noisy scores, so the outer step is no longer plain DiLoCo's
    reputation: bool = False
    reputation_batch: int = 4  # sequences in the fixed held-out scoring batch (the start of the eval split)
    reputation_decay: float = 0.7  # EMA: reputation <- decay x reputation + (1 - decay) x round score
    reputation_prior: float = 0.5  # a holder's reputation before its first score (newcomers start below a record)
    reputation_floor: float = 0.1  # below this a holder's factor is 0: no weight in the outer step, no reward


@dataclass
class PlannerConfig:
    """How ``model=auto`` sizes the model from cluster memory and places stage holders (neuroray/planner)."""

    name: str = "default"  # which conf/planner/ file this came from
    device: str = "auto"  # auto: GPU nodes if the cluster has any, else CPU nodes; gpu: demand GPUs; cpu: ignore them
    safety_fraction: float = 0.8  # share of each node's (GPU or host) memory a plan may fill
    # per holder: Python + torch + the Ray worker + what building a range and AdamW first loads (host memory,
    # measured about 415 MB, docs/memory.md), or the CUDA context (GPU)
    holder_overhead: str = "420MB"
    microbatch_size: int = 0  # activation accounting; 0: data.microbatch_size (seq_len, microbatches from data)
    stages: int = 0  # 0: choose; else exactly this many layer ranges
    replicas: int = 0  # 0: as many pipeline replicas as fit; else exactly this many
    max_replicas: int = 0  # 0: no cap on the chosen number of replicas
    # Ray strategy inside one replica (a plan's or a fixed config's): PACK, SPREAD, STRICT_PACK, STRICT_SPREAD
    within_replica: str = "PACK"
    across_replicas: str = "SPREAD"  # SPREAD: replicas on different nodes first; PACK: fill nodes first
    reserve_cpus: float = 1.0  # CPUs no holder may take on one node: outer-step tasks and the driver run there
    exclude_small_nodes: bool = False  # true: leave out nodes too small for one layer instead of failing
    gpu_memory_resource: str = "gpu_memory_gib"  # custom Ray resource: total GiB of GPU memory on the node
    probe_gpu_memory: bool = True  # no resource and unknown accelerator type: ask torch.cuda on the node
    gpu_probe_timeout_s: float = 60.0  # how long that probe may wait for a free GPU on the node (then: unknown)
    upgrade_every_nodes: int = 50  # recompute the architecture after this many nodes joined
    min_growth: float = 1.3  # adopt a new architecture only if it has this many times the parameters
    watch_interval_s: float = 10.0  # ClusterWatcher polling period
    add_replicas: bool = True  # model=auto: start new replicas on joined nodes between rounds (fixed routing)
    # Host memory per node: total (its MemTotal, read by a zero-CPU probe task: the same on every run) | ray
    # (Ray's memory resource: ray start --memory, else about 70 % of what was free when Ray started)
    host_memory: str = "total"
    memory_probe_timeout_s: float = 30.0  # how long the host-memory probe may take per node (then: Ray's resource)
    # CPU holders take cluster.torch_threads cores each (no oversubscription: stages x replicas <= CPUs -
    # reserve_cpus), and the stage count is chosen for the most predicted tokens/s (docs/planner.md)
    fill_cores: bool = True
    probe_links: bool = False  # measure each node's link to the driver's node at start (a timed ray.get)
    link_probe_bytes: str = "8MB"  # bytes one link probe moves
    link_probe_timeout_s: float = 20.0  # how long one link probe may take (then: the link stays unknown)


@dataclass
class EvalConfig:
    """Held-out evaluation while training (docs/interop.md): the dataset's eval shards, run forward only
    through the stage holders at theta0, into metrics.jsonl, the dashboard, loss.png and TensorBoard."""

    # inner steps between evaluations: one runs right after the first outer step at or past each multiple
    # (theta0, the model, changes only there); 0: only the final evaluation, after the last step
    every: int = 40
    batches: int = 8  # microbatches of the held-out shards per evaluation, spread evenly over them


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diloco: DilocoConfig = field(default_factory=DilocoConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    ponw: PonwConfig = field(default_factory=PonwConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0  # seeds the model init, data order, attacks and sampling
    # Compute precision of every holder's forward and backward (docs/precision.md): auto (bf16 on CUDA,
    # fp32 on the CPU) | fp32 | bf16 | fp16 (CUDA only, a dynamic loss scale per holder). Weights, AdamW,
    # theta0 and pseudo-gradients stay float32 in every mode; bf16 activations cross holders as bf16.
    precision: str = "auto"
    rounds: int = 10  # outer DiLoCo rounds
    # "": outputs/<timestamp> under the current directory; under `ray job submit`, a relative or empty run_dir
    # is under $NEURORAY_OUTPUT_ROOT or ~/neuroray on the driver's host (Ray deletes the job's working dir)
    run_dir: str = ""
    resume: bool = False  # continue the run in run_dir from its newest complete snapshot set
    # a Hugging Face Llama directory (safetensors) to start from: its config.json sets the model, each holder
    # loads its own range's tensors; the path must be readable on every node (docs/interop.md)
    init_from: str = ""
    log_every: int = 5  # inner steps between progress lines
    progress_bar: bool = True  # a live tqdm bar when stderr is a terminal (log lines otherwise)
    # also write the metrics as TensorBoard event files in <run_dir>/tensorboard (pip install 'neuroray[tensorboard]')
    tensorboard: bool = False
    sample_prompt: str = "The"  # the prompt of the sample generated at the end of a run
    sample_tokens: int = 40  # tokens generated for that sample (0: none)


def pipeline_bubble(stages: int, microbatches: int) -> float:
    """The idle fraction of an S-stage pipeline over m microbatches: (S-1)/(m+S-1) (GPipe and 1F1B alike)."""
    return (stages - 1) / (microbatches + stages - 1)


def auto_microbatches(batch_size: int, stages: int) -> int:
    """``data.num_microbatches=0``: the fewest microbatches dividing ``batch_size`` with a bubble of at most
    MAX_BUBBLE; ``batch_size`` itself (one sequence each) when none does, the least bubble that batch allows."""
    return next((m for m in range(1, batch_size + 1)
                 if batch_size % m == 0 and pipeline_bubble(stages, m) <= MAX_BUBBLE + 1e-12), batch_size)


def resolve_batch(cfg: TrainConfig, batch_given: bool = False) -> TrainConfig:
    """``cfg`` with ``data.microbatch_size`` and ``data.num_microbatches`` set (0: derived, docs/schedule.md) and
    ``data.batch_size`` their product. Both given: they set the batch, which a ``batch_given`` batch_size must
    equal. Idempotent: a resolved config comes back as it is."""
    d = cfg.data
    B, b, m = d.batch_size, d.microbatch_size, d.num_microbatches
    if b < 0 or m < 0:
        raise ConfigError(f"data.microbatch_size={b} and data.num_microbatches={m} must be >= 0 (0: derived)")
    if b and m:
        if batch_given and B != b * m:
            raise ConfigError(f"data.batch_size={B} is not data.microbatch_size={b} x data.num_microbatches={m} = "
                              f"{b * m}: set two of the three")
        B = b * m
    elif B <= 0:
        raise ConfigError(f"data.batch_size={B} must be positive (sequences per inner step and replica)")
    elif b or m:
        given, other = ("microbatch_size", "num_microbatches") if b else ("num_microbatches", "microbatch_size")
        if B % (b or m):
            raise ConfigError(f"data.batch_size={B} does not divide by data.{given}={b or m}: pick a {given} that "
                              f"divides it, or set data.{other} too (the batch is then their product)")
        b, m = (b, B // b) if b else (B // m, m)
    else:  # model=auto: the planner's stage count where it is fixed (planner.stages), else swarm.num_stages
        stages = cfg.planner.stages if cfg.model.name == "auto" and cfg.planner.stages > 0 else cfg.swarm.num_stages
        m = auto_microbatches(B, stages)
        b = B // m
    if (B, b, m) == (d.batch_size, d.microbatch_size, d.num_microbatches):
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(d, batch_size=B, microbatch_size=b, num_microbatches=m))


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (what a run directory records)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg) -> dict:
    """Plain nested dict of a config dataclass (for JSON run records)."""
    return dataclasses.asdict(cfg)
