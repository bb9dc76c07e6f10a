"""Distributed inference: stage holders with per-session KV caches, and the engine that routes sessions.

Holders (:class:`InferenceHolder`, one Ray actor each) load one layer range of a checkpoint, split
by :func:`neuroray.model.split_layers`, as in training: the **Driver** tokenizes prompts and holds the
embedding and the first layers, **Workers** the middle ranges, the **Validator** the last layers, the
final norm and the LM head, and returns next-token logits. Several holders may hold the same range.

Each holder keeps a :class:`~neuroray.model.kv_cache.KVCache` keyed by session id, frees sessions idle
for longer than ``session_ttl_s`` (a background reaper does it even when no request comes), and signs a
Proof of Neural Work (``proof_type="inference"``) for the tokens it processed.

:class:`PipelineEngine` is the client side: it gives each session a *route* (one holder per range)
and keeps it there, because that is where its cache lives; it batches the sessions of a route into a
few microbatches and keeps them all in flight so every stage is busy. When a step fails it pings the
route's holders, replaces the dead (or hung) ones by another holder of the same range, and replays the
sessions' whole prefix from position 0, which rebuilds their caches on the new holder.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from neuroray.config import ModelConfig
from neuroray.errors import ConfigError, PipelineError
from neuroray.generate import LoadedCheckpoint, Session, load_weights, pack
from neuroray.model import build_stage, split_layers
from neuroray.model.kv_cache import CacheMissError, KVCache
from neuroray.ponw.identity import Identity

log = logging.getLogger(__name__)

NAMESPACE = "neuroray"  # named inference swarms live here, so a later command can find them


@dataclass
class InferenceSpec:
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

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == len(self.ranges) - 1

    @property
    def role(self) -> str:
        return "driver" if self.is_first else "validator" if self.is_last else "worker"


class InferenceHolder:
    """One layer range of a trained model, serving incremental forward passes for many sessions."""

    def __init__(self, spec: InferenceSpec, weights: dict[str, torch.Tensor]):
        self.spec = spec
        torch.set_num_threads(spec.torch_threads)
        self.device = torch.device("cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu")
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
        self.busy_s = 0.0  # time spent in forward: busy_s / wall time is this stage's utilisation
        # The reaper thread and the request thread both touch the cache.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        interval = min(max(spec.session_ttl_s / 4, 0.05), 30.0)
        threading.Thread(target=self._reap, args=(interval,), daemon=True, name="kv-reaper").start()

    # ----- identity -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        lo, hi = self.spec.ranges[self.spec.stage]
        return f"inference-{self.spec.role}[r{self.spec.replica} L{lo}-{hi - 1}]"

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
        from neuroray.generate import encode_prompt

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
        t0 = time.perf_counter()
        with self._lock, torch.inference_mode():
            caches = self.cache.acquire([(sid, start) for sid, start, _ in requests])
            out = self.module.forward_cached(x.to(self.device), caches, lengths, last_only=self.spec.is_last)
            n = sum(lengths)
            self.tokens_processed += n
            self.unproven_tokens += n
            self.batches += 1
            self.max_batch_sessions = max(self.max_batch_sessions, len(requests))
            out = out.cpu()
            self.busy_s += time.perf_counter() - t0
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
                    "max_batch_sessions": self.max_batch_sessions, "busy_s": self.busy_s,
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


def sign_inference_proof(identity: Identity, tokens: int, window: int, layer_start: int, layer_end: int,
                         has_embedding: bool, has_lm_head: bool) -> bytes:
    """The wire bytes of a signed Proof of Neural Work of type ``inference`` for ``tokens`` positions."""
    from neuroray.ponw.proof import Proof, new_nonce, now_ms

    proof = Proof(
        node_id=identity.node_id, proof_type="inference", timestamp_ms=now_ms(), nonce=new_nonce(),
        outer_round=window, tokens_processed=tokens, training_batches=0, layers_held=layer_end - layer_start,
        layer_start=layer_start, has_embedding=has_embedding, has_lm_head=has_lm_head, shard_id=None,
        data_position=0, theta0_before="", theta0_after="", pseudo_gradient="",
    )
    return proof.sign(identity).to_bytes()


# ----- starting and finding holders ---------------------------------------------------------


def holder_name(swarm: str, stage: int, replica: int) -> str:
    return f"{swarm}-s{stage}-r{replica}"


def start_holders(loaded: LoadedCheckpoint, stages: int, replicas: int = 1, key_dir: str | Path = "~/.cache/neuroray/keys",
                  cpus_per_holder: float = 0.0, gpus_per_holder: float = 0.0, torch_threads: int = 1,
                  session_ttl_s: float = 300.0, swarm: str = "", detached: bool = False,
                  start_timeout_s: float = 180.0) -> list[list]:
    """Start ``replicas`` holders of each of ``stages`` layer ranges; returns ``holders[stage][replica]``."""
    import ray

    cfg = loaded.model
    if stages > cfg.n_layers:
        raise ConfigError(f"stages={stages} is more than the checkpoint's {cfg.n_layers} layers; "
                          "every stage needs at least one layer: lower stages")
    ranges = split_layers(cfg.n_layers, stages)
    tok_json = loaded.tokenizer.to_str()
    key_dir = Path(key_dir).expanduser()
    prefix = swarm or "inference"
    holders: list[list] = []
    for s, (lo, hi) in enumerate(ranges):
        stage = build_stage(cfg, loaded.vocab_size, s, ranges)  # only for its key set: which tensors go here
        weights = ray.put({k: loaded.state[k] for k in stage.state_dict() if k in loaded.state})
        del stage
        row = []
        for r in range(replicas):
            spec = InferenceSpec(stage=s, ranges=ranges, model=cfg, vocab_size=loaded.vocab_size,
                                 key_path=str(key_dir / f"{prefix}-s{s}-r{r}.pem"), replica=r,
                                 tokenizer_json=tok_json if s == 0 else "", tokenizer_sha256=loaded.tokenizer_sha256,
                                 session_ttl_s=session_ttl_s, torch_threads=torch_threads, use_gpu=gpus_per_holder > 0)
            opts = {"num_cpus": cpus_per_holder, "num_gpus": gpus_per_holder, "max_concurrency": 1}
            if swarm:
                opts.update(name=holder_name(swarm, s, r), namespace=NAMESPACE)
            if detached:
                opts["lifetime"] = "detached"
            row.append(ray.remote(InferenceHolder).options(**opts).remote(spec, weights))
        holders.append(row)
    try:
        ray.get([h.info.remote() for row in holders for h in row], timeout=start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise PipelineError(f"inference holders did not start within {start_timeout_s:g}s; "
                            "check the Ray dashboard for pending actors (not enough CPUs or GPUs?)") from None
    except ray.exceptions.RayError as exc:
        raise unwrap(exc) from None
    return holders


def find_holders(swarm: str) -> list[list] | None:
    """The holders of a running named swarm, ``holders[stage][replica]``; None if none is running."""
    import ray

    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == NAMESPACE and a["name"].startswith(f"{swarm}-s")}
    if not names:
        return None
    holders, s = [], 0
    while any(n.startswith(f"{swarm}-s{s}-r") for n in names):
        row = [ray.get_actor(n, namespace=NAMESPACE) for n in sorted(names) if n.startswith(f"{swarm}-s{s}-r")]
        holders.append(row)
        s += 1
    return holders


def unwrap(exc: BaseException) -> BaseException:
    """The holder's own exception inside Ray's RayTaskError wrapper (or the error itself)."""
    import ray

    while isinstance(exc, ray.exceptions.RayTaskError) and getattr(exc, "cause", None) is not None:
        if exc.cause is exc:
            break
        exc = exc.cause
    return exc


# ----- the engine ---------------------------------------------------------------------------


@dataclass
class _Flight:
    group: list[Session]
    route: tuple
    refs: list  # each stage's output; the last is the Validator's logits
    tokens: int
    attempt: int


class PipelineEngine:
    """Routes sessions through ``holders[stage][replica]``; an engine for :func:`neuroray.generate.run_sessions`.

    ``microbatches`` is how many groups each route's sessions are split into (default: one per stage,
    so every stage has a group to work on). ``step_timeout_s`` bounds one step; only a holder that then
    also fails a ping within ``step_timeout_s`` is given up on, so a slow but healthy holder is kept.
    """

    def __init__(self, holders: list[list], max_seq_len: int, microbatches: int = 0, step_timeout_s: float = 120.0,
                 max_attempts: int = 3):
        import ray

        if not holders or not all(holders):
            raise PipelineError("an inference pipeline needs at least one holder for every layer range")
        self.ray = ray
        self.alive = [list(row) for row in holders]
        self.max_seq_len = max_seq_len
        self.microbatches = microbatches or len(holders)
        self.step_timeout_s, self.max_attempts = step_timeout_s, max_attempts
        self.routes: dict[str, tuple] = {}
        self.load: dict = {}  # holder -> sessions routed through it
        self.in_flight_refs: dict = {}  # ObjectRef of the Validator's logits -> _Flight
        self.node_ids = {h: nid for h, nid in zip([h for row in holders for h in row],
                                                  ray.get([h.ping.remote() for row in holders for h in row],
                                                          timeout=step_timeout_s))}
        self.observed_tokens: dict[str, int] = {}  # node_id -> tokens it was seen to process (proof receipts)
        self.failovers = 0  # groups moved off a lost holder
        self.replays = 0  # groups whose caches were rebuilt in place (expired or evicted)

    # ----- routing --------------------------------------------------------------------------
    def _pick(self, stage: int):
        return min(self.alive[stage], key=lambda h: self.load.get(h, 0))

    def _assign(self, session: Session, route: tuple) -> None:
        old = self.routes.get(session.sid)
        for h in old or ():
            self.load[h] -= 1
        for h in route:
            self.load[h] = self.load.get(h, 0) + 1
        self.routes[session.sid] = route

    def open(self, session: Session) -> None:
        session.check_fits(self.max_seq_len)
        if session.sid not in self.routes:
            self._assign(session, tuple(self._pick(s) for s in range(len(self.alive))))

    def groups(self, sessions: list[Session]) -> list[list[Session]]:
        """Sessions of one route together (one call per holder), in up to ``microbatches`` groups each."""
        by_route: dict[tuple, list[Session]] = {}
        for s in sessions:
            by_route.setdefault(self.routes[s.sid], []).append(s)
        out = []
        for members in by_route.values():
            k = min(self.microbatches, len(members))
            out.extend(members[i::k] for i in range(k))
        return out

    # ----- steps ----------------------------------------------------------------------------
    def submit(self, group: list[Session], replay: bool = False, attempt: int = 0) -> None:
        route = self.routes[group[0].sid]
        assert all(self.routes[s.sid] == route for s in group), "a group shares one route"
        x, requests = pack(group, replay)
        refs, ref = [], x
        for holder in route:
            ref = holder.forward.remote(requests, ref)
            refs.append(ref)
        self.in_flight_refs[ref] = _Flight(group, route, refs, int(x.shape[1]), attempt)

    @property
    def in_flight(self) -> int:
        return len(self.in_flight_refs)

    def wait(self) -> tuple[list[Session], torch.Tensor]:
        ray = self.ray
        while True:
            ready, _ = ray.wait(list(self.in_flight_refs), num_returns=1, timeout=self.step_timeout_s)
            if not ready:
                self._recover_hung()
                continue
            ref = ready[0]
            flight = self.in_flight_refs.pop(ref)
            try:
                logits = ray.get(ref)
            except ray.exceptions.RayError as exc:
                self._observe(flight, failed=True)
                self._recover(flight, unwrap(exc))
                continue
            self._observe(flight)
            return flight.group, logits

    def _observe(self, flight: _Flight, failed: bool = False) -> None:
        """Count the tokens each holder of the route was seen to process (the receipts of its proofs).

        After a failure, the stages before the failing one did their work: count exactly those, so a
        holder's honest claim never exceeds what was observed.
        """
        for holder, ref in zip(flight.route, flight.refs):
            if failed:
                done, _ = self.ray.wait([ref], timeout=0)
                if not done:
                    break
                try:
                    self.ray.get(ref)
                except self.ray.exceptions.RayError:
                    break
            nid = self.node_ids[holder]
            self.observed_tokens[nid] = self.observed_tokens.get(nid, 0) + flight.tokens

    def _is_alive(self, holder) -> bool:
        ray = self.ray
        try:
            ray.get(holder.ping.remote(), timeout=self.step_timeout_s)
            return True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False

    def _fail_over(self, flight: _Flight, dead: set) -> None:
        """Move the group off ``dead`` holders and replay its sessions' prefixes on the new route."""
        for s, row in enumerate(self.alive):
            row[:] = [h for h in row if h not in dead]
            if not row:
                raise PipelineError(f"every holder of layer range {s} is gone; start more (replicas=2 or more) "
                                    "to survive the loss of a holder")
        route = tuple(self._pick(s) if h in dead else h for s, h in enumerate(flight.route))
        for session in flight.group:
            self._assign(session, route)
        self.failovers += 1
        self.submit(flight.group, replay=True, attempt=flight.attempt + 1)

    def _recover(self, flight: _Flight, error: BaseException) -> None:
        if flight.attempt + 1 >= self.max_attempts:
            raise PipelineError(f"a generation step failed {self.max_attempts} times; last error: {error}") from None
        dead = {h for h in flight.route if not self._is_alive(h)}
        if dead:
            log.warning("inference: %d holder(s) lost; replaying %d session(s) on another route", len(dead), len(flight.group))
            self._fail_over(flight, dead)
        elif isinstance(error, CacheMissError):
            # A holder expired or evicted a session (e.g. a slow client): rebuild its cache in place.
            self.replays += 1
            self.submit(flight.group, replay=True, attempt=flight.attempt + 1)
        else:
            raise error

    def _recover_hung(self) -> None:
        """No step finished within the timeout: give up on holders that also fail a ping, replay their groups."""
        routes = {h for f in self.in_flight_refs.values() for h in f.route}
        dead = {h for h in routes if not self._is_alive(h)}
        if not dead:
            raise PipelineError(f"no generation step finished within step_timeout_s={self.step_timeout_s:g}s "
                                "and every holder still answers; raise step_timeout_s")
        for ref, flight in list(self.in_flight_refs.items()):
            if dead & set(flight.route):
                del self.in_flight_refs[ref]
                self._fail_over(flight, dead)

    def close(self, session: Session) -> None:
        """Free the session's caches on its route now (not waiting for the TTL)."""
        route = self.routes.pop(session.sid, ())
        for h in route:
            self.load[h] -= 1
            h.close.remote([session.sid])  # fire and forget: a lost close is caught by the TTL

    # ----- proofs ---------------------------------------------------------------------------
    def registrations(self) -> list[dict]:
        """Ledger registrations (NodeRecord dicts) of the live holders."""
        return self.ray.get([h.registration.remote() for row in self.alive for h in row], timeout=self.step_timeout_s)

    def collect_proofs(self) -> list[tuple[bytes, dict]]:
        """Each live holder's signed proof of its work since its last proof, with this engine's receipt.

        The receipt (a :class:`neuroray.ponw.verifier.Receipt` as a dict) holds the tokens this engine
        saw the holder process, which the ledger checks the claim against. Receipts are exact when one
        engine drives the holders between two collections.
        """
        from neuroray.ponw.proof import SignedProof

        holders = [h for row in self.alive for h in row]
        proofs = self.ray.get([h.prove.remote() for h in holders], timeout=self.step_timeout_s)
        out = []
        for data in proofs:
            if data is None:
                continue
            p = SignedProof.from_bytes(data).proof
            receipt = {"node_id": p.node_id, "outer_round": p.outer_round, "proof_type": "inference",
                       "tokens": self.observed_tokens.pop(p.node_id, 0)}
            out.append((data, receipt))
        return out


# ----- CLI path -------------------------------------------------------------------------------


def credit_proofs(ledger_file: str, registrations: list[dict], proofs: list[tuple[bytes, dict]], log) -> list[dict]:
    """Register the holders with an existing ledger and submit their proofs with receipts; one commit."""
    from neuroray.ponw.ledger import Ledger, LedgerError
    from neuroray.ponw.rules import format_units

    path = Path(ledger_file).expanduser()
    if not path.is_file():
        raise LedgerError(f"no ledger at {path}; pass ledger=<run_dir>/ledger.sqlite of a training run, or leave "
                          "ledger= empty")
    ledger = Ledger(path, create=False)
    try:
        ledger.register(registrations)
        outcomes = [o.to_dict() for o in ledger.submit_many(proofs)]
    finally:
        ledger.close()
    credited = [o for o in outcomes if o["accepted"]]
    log(f"ledger: credited {len(credited)}/{len(outcomes)} inference proofs, "
        f"{format_units(sum(o['reward'] for o in credited))} NEURO"
        + "".join(f"; rejected {o['node_id'][:12]}: {o['reason']}" for o in outcomes if not o["accepted"]))
    return outcomes



def run_pipeline(cfg, loaded: LoadedCheckpoint, expected_ids: list[int], sampler, stop_id, write, on_token,
                 log) -> Session:
    """``python -m neuroray.generate`` with ``stages >= 1``: one prompt through Ray stage holders.

    The Driver tokenizes the prompt; ``expected_ids`` (the client's own encoding, already checked)
    catches a swarm whose tokenizer differs from the checkpoint's.
    """
    import os

    import ray

    from neuroray.checkpoint import CheckpointError
    from neuroray.generate import run_sessions

    started = False
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS", "")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(address="local", log_to_driver=False, include_dashboard=False)
        started = True  # this command connected, so it disconnects (a detached swarm keeps running)
    holders, owned = None, False
    try:
        holders = find_holders(cfg.swarm) if cfg.swarm else None
        if holders is not None:
            infos = ray.get([row[0].info.remote() for row in holders], timeout=cfg.step_timeout_s)
            if any(i["tokenizer_sha256"] != loaded.tokenizer_sha256 for i in infos) or len(infos) != infos[0]["num_stages"]:
                raise CheckpointError(f"the running swarm {cfg.swarm!r} serves another model than {loaded.path}; "
                                      "pick another swarm= name or stop that swarm")
            log(f"generate: using running swarm {cfg.swarm!r} ({len(holders)} stages)")
        else:
            t0 = time.monotonic()
            holders = start_holders(loaded, cfg.stages, cfg.replicas, cfg.key_dir, cfg.cpus_per_holder,
                                    cfg.gpus_per_holder, cfg.torch_threads, cfg.session_ttl_s, cfg.swarm,
                                    detached=cfg.keep_swarm)
            owned = not cfg.keep_swarm
            log(f"generate: {len(holders)} stages x {cfg.replicas} holders up in {time.monotonic() - t0:.1f}s")
        engine = PipelineEngine(holders, loaded.model.max_seq_len, step_timeout_s=cfg.step_timeout_s)
        try:
            ids = ray.get(holders[0][0].encode.remote(cfg.prompt, cfg.bos), timeout=cfg.step_timeout_s)
        except ray.exceptions.RayError as exc:
            raise unwrap(exc) from None
        if ids != expected_ids:
            raise CheckpointError(f"the Driver's tokenizer encodes the prompt differently from {loaded.path}'s "
                                  "tokenizer; serve this checkpoint with a fresh swarm")
        session = Session(ids, cfg.max_new_tokens, sampler, stop_id)
        write(cfg.prompt)
        run_sessions(engine, [session], on_token)
        write("\n")
        proofs = engine.collect_proofs()
        tokens = sorted((r["tokens"] for _, r in proofs), reverse=True)
        log(f"generate: {len(proofs)} signed inference proofs (tokens per holder {tokens})")
        if cfg.ledger:
            credit_proofs(cfg.ledger, engine.registrations(), proofs, log)
        return session
    finally:
        if owned and holders is not None:
            for row in holders:
                for h in row:
                    ray.kill(h)
        if started:
            ray.shutdown()
