"""What a stage holder is, as plain values: its place in the pipeline and everything it needs to start.

Plain dataclasses, so no Hydra object crosses into an actor; the holder's parts (compute, outer state,
proving, lifecycle) read their settings from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from neuroray.config import DilocoConfig, ModelConfig


class RangeRole:
    """Where a range sits in the pipeline, for any spec with ``stage``, ``ranges`` and ``replica``.

    The **Driver** holds the first range and the embedding, **Workers** the middle ranges, the
    **Validator** the last range, the final norm and the LM head.
    """

    stage: int
    ranges: list[tuple[int, int]]
    replica: int

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == len(self.ranges) - 1

    @property
    def role(self) -> str:
        return "driver" if self.is_first else "validator" if self.is_last else "worker"

    @property
    def label(self) -> str:
        """``role[r<replica> L<first>-<last layer>]``, the name in logs and error messages."""
        lo, hi = self.ranges[self.stage]
        return f"{self.role}[r{self.replica} L{lo}-{hi - 1}]"


@dataclass
class HolderSpec(RangeRole):
    """Everything a holder needs, as plain values (no Hydra objects cross into actors)."""

    replica: int
    stage: int
    ranges: list[tuple[int, int]]
    model: ModelConfig
    vocab_size: int
    diloco: DilocoConfig
    seed: int
    key_path: str
    torch_threads: int = 1
    use_gpu: bool = False
    precision: str = "auto"  # TrainConfig.precision: auto | fp32 | bf16 | fp16 (neuroray/swarm/compute.py)
    # swarm.hop_compression, hop_block, hop_ratio: what this holder's activations and gradients cross as
    hop_compression: str = "none"
    hop_block: int = 256
    hop_ratio: float = 16.0
    # swarm.hop_transport, resolved: "object_store", or "gloo"/"nccl" (Ray Direct Transport, direct_transport.py)
    hop_transport: str = "object_store"
    # swarm.hop_check*: the checks of every received activation and gradient (neuroray/swarm/hop_guard.py)
    hop_check: bool = True
    hop_check_history: int = 64
    hop_check_warmup: int = 16
    hop_check_factor: float = 100.0
    # hop rechecks on (neuroray/config_checks.py hop_recheck_off): keep the round's first step for a peer to redo
    # (hop_record.py)
    hop_record: bool = False
    # ... and under swarm routing: keep the inner optimizer's state at each round's start, so a round redone without
    # a holder the rechecks proved faulty restarts from it (StageHolder.rejoin(redo=True), training/routed.py)
    round_redo: bool = False
    # Driver only: where its Genesis shards live
    data_root: str | None = None
    manifest: dict | None = None
    # A microbatch's shape (the Driver reads it; every holder checks received hops against it; 0: unchecked)
    seq_len: int = 0
    microbatch_size: int = 0
    # Snapshots: where this holder's slot lives, how many to keep, and which step a resumed job restores
    snapshot_root: str | None = None
    snapshot_keep: int = 5
    resume_step: int | None = None
    # Proofs of Neural Work: tokens in one microbatch (0 disables proofs)
    tokens_per_batch: int = 0
    # Swarm routing: every Driver reads one shared ring from this shard, so microbatch m is the same data
    # whichever Driver the router sends it to (None: this node's own shard, as in fixed routing)
    data_start: int | None = None
    # init_from=: a Hugging Face Llama directory whose tensors of this range replace the seeded init at start
    init_from: str = ""
    # checkpoint.spares (neuroray/swarm/spares.py): ``spare`` starts an idle warm holder of this range (process up,
    # module built, no slot, no key) that waits for StageHolder.become; ``restore_latest``: the holder takes over a
    # crashed one's slot and restores the slot's newest good snapshot, as a Ray-restarted holder does
    spare: bool = False
    restore_latest: bool = False

    @property
    def slot(self) -> str:
        return f"r{self.replica}-s{self.stage}"
