"""The inference holder: one layer range of a trained model on a Ray actor, with a KV cache per session.

Holders load one layer range of a checkpoint, split by :func:`neuroray.model.split_layers`, as in
training (:class:`~neuroray.swarm.compute.RangeRole`): the **Driver** tokenizes prompts and holds the
embedding and the first layers, **Workers** the middle ranges, the **Validator** the last layers, the
final norm and the LM head, and returns next-token logits. Several holders may hold the same range.

Each holder keeps a :class:`~neuroray.model.kv_cache.KVCache` keyed by session id, frees sessions idle
for longer than ``session_ttl_s`` (a background reaper does it even when no request comes), and signs a
Proof of Neural Work (``proof_type="inference"``) for the tokens it processed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from neuroray.config import ModelConfig
from neuroray.errors import PipelineError
from neuroray.inference.loading import encode_prompt, load_weights
from neuroray.inference.proofs import sign_inference_proof
from neuroray.model import build_stage
from neuroray.model.kv_cache import KVCache
from neuroray.ponw.identity import Identity
from neuroray.swarm.compute import BusyClock, open_device
from neuroray.swarm.spec import RangeRole

log = logging.getLogger(__name__)


@dataclass
class InferenceSpec(RangeRole):
    """Everything an inference holder needs, as plain values (no Hydra objects cross into actors)."""

    stage: int
    ranges: list[tuple[int, int]]
    model: ModelConfig
    vocab_size: int
    key_path: str
    replica: int = 0
    tokenizer_json: str = ""  # Driver only: the checkpoint's tokenizer, to encode prompts
    tokenizer_sha256: str = ""  # what the swarm serves, so an attaching client can check it
    session_ttl_s: float = 300.0
    max_sessions: int = 1024
    torch_threads: int = 1
    use_gpu: bool = False


class InferenceHolder:
    """One layer range of a trained model, serving incremental forward passes for many sessions."""

    def __init__(self, spec: InferenceSpec, weights: dict[str, torch.Tensor]):
        self.spec = spec
        self.device = open_device(spec.torch_threads, spec.use_gpu)  # as a training holder picks it
        self.identity = Identity.load_or_create(spec.key_path)
        module = build_stage(spec.model, spec.vocab_size, spec.stage, spec.ranges)
        load_weights(module, weights, f"the weights given to {self.name}")
        self.module = module.to(self.device).eval()
        lo, hi = spec.ranges[spec.stage]
        self.cache = KVCache(range(lo, hi), ttl_s=spec.session_ttl_s, max_sessions=spec.max_sessions, name=self.name)
        self.tokenizer = None
        if spec.is_first and spec.tokenizer_json:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_str(spec.tokenizer_json)
        self.tokens_processed = 0  # all positions this holder ran forward
        self.unproven_tokens = 0  # of which not yet covered by a signed proof
        self.proof_window = 0  # the ledger credits one proof per (node, type, round): number them
        self.batches = 0
        self.max_batch_sessions = 0
        self.clock = BusyClock()  # time spent in forward: busy_s / wall time is this stage's utilisation
        # The reaper thread and the request thread both touch the cache.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        interval = min(max(spec.session_ttl_s / 4, 0.05), 30.0)
        threading.Thread(target=self._reap, args=(interval,), daemon=True, name="kv-reaper").start()

    # ----- identity -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"inference-{self.spec.label}"

    def __repr__(self) -> str:  # Ray prefixes this actor's log lines with it
        return self.name

    def info(self) -> dict:
        lo, hi = self.spec.ranges[self.spec.stage]
        return {"name": self.name, "node_id": self.identity.node_id, "public_key": self.identity.public_key.hex(),
                "role": self.spec.role, "stage": self.spec.stage, "replica": self.spec.replica, "layers": (lo, hi),
                "num_stages": len(self.spec.ranges), "max_seq_len": self.spec.model.max_seq_len,
                "tokenizer_sha256": self.spec.tokenizer_sha256, "device": str(self.device)}

    def ping(self) -> str:
        return self.identity.node_id

    # ----- serving --------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Driver only: the prompt's token ids, checked against the context (GenerationError otherwise)."""
        if self.tokenizer is None:
            raise PipelineError(f"{self.name} has no tokenizer: only the Driver (stage 0) encodes prompts")
        return encode_prompt(self.tokenizer, text, bos, self.spec.model.max_seq_len)

    def forward(self, requests: list[tuple[str, int, int]], x: torch.Tensor) -> torch.Tensor:
        """Run a packed batch: ``requests`` is ``(session_id, start_pos, length)`` per session, in order.

        ``x`` is ids ``[1, N]`` (Driver) or hidden ``[1, N, d]``. Returns hidden ``[1, N, d]``, or on
        the Validator the logits of each session's last position ``[len(requests), vocab]``. A session
        whose cache cannot continue at its ``start_pos`` raises CacheMissError before any work is done.
        """
        lengths = [n for _, _, n in requests]
        t0 = self.clock.start()
        with self._lock, torch.inference_mode():
            caches = self.cache.acquire([(sid, start) for sid, start, _ in requests])
            out = self.module.forward_cached(x.to(self.device), caches, lengths, last_only=self.spec.is_last)
            n = sum(lengths)
            self.tokens_processed += n
            self.unproven_tokens += n
            self.batches += 1
            self.max_batch_sessions = max(self.max_batch_sessions, len(requests))
            out = out.cpu()
            self.clock.stop(t0)
        return out

    def close(self, session_ids: list[str]) -> int:
        """Free finished sessions now; returns how many were here."""
        with self._lock:
            return sum(self.cache.close(sid) for sid in session_ids)

    def expire(self, idle_s: float | None = None) -> list[str]:
        """Free sessions idle for longer than ``idle_s`` (default: the TTL); returns their ids."""
        with self._lock:
            if idle_s is None:
                return self.cache.expire()
            return self.cache.expire(now=self.cache.clock() + self.cache.ttl_s - idle_s)

    def _reap(self, interval: float) -> None:
        while not self._stop.wait(interval):
            gone = self.expire()
            if gone:
                log.info("%s: expired %d idle session(s)", self.name, len(gone))

    def stop(self) -> None:
        """Stop the reaper (in-process use; a Ray actor's thread ends with its process)."""
        self._stop.set()

    def stats(self) -> dict:
        with self._lock:
            return {"sessions": len(self.cache), "cache_bytes": self.cache.nbytes, "expired": self.cache.expired,
                    "tokens_processed": self.tokens_processed, "batches": self.batches,
                    "max_batch_sessions": self.max_batch_sessions, "busy_s": self.clock.busy_s,
                    "session_ids": list(self.cache.sessions)}

    # ----- proofs ---------------------------------------------------------------------------
    def registration(self) -> dict:
        """What an orchestrator registers with the ledger for this holder (a NodeRecord as a dict)."""
        lo, hi = self.spec.ranges[self.spec.stage]
        return {"node_id": self.identity.node_id, "public_key": self.identity.public_key.hex(), "layer_start": lo,
                "layer_end": hi, "has_embedding": self.spec.is_first, "has_lm_head": self.spec.is_last}

    def prove(self) -> bytes | None:
        """A signed inference proof for the tokens processed since the last proof (None if there are none).

        Its ``outer_round`` is the proof's window number: strictly increasing, and at least the Unix
        time in seconds, so it never repeats across restarts of the holder (the ledger credits one
        proof per node, type and round).
        """
        from neuroray.ponw.proof import now_ms

        with self._lock:
            tokens, self.unproven_tokens = self.unproven_tokens, 0
            if tokens == 0:
                return None
            self.proof_window = max(self.proof_window + 1, now_ms() // 1000)
            window = self.proof_window
        lo, hi = self.spec.ranges[self.spec.stage]
        return sign_inference_proof(self.identity, tokens, window, lo, hi, self.spec.is_first, self.spec.is_last)
