"""One prompt through a pipeline of Ray inference holders, and the keys that configure it.

:class:`GenerateConfig` holds every key of ``python -m neuroray.generate`` (neuroray/cli/generate.py
parses them); :func:`run_pipeline` is what that command runs with ``stages >= 1``: start (or find) the
holders, check the swarm serves this checkpoint, stream the tokens, collect and credit the proofs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from neuroray.inference.loading import LoadedCheckpoint
from neuroray.inference.sessions import Session, run_sessions


@dataclass
class GenerateConfig:
    """Keys of ``python -m neuroray.generate key=value ...``."""

    checkpoint: str = ""  # checkpoint directory (model.safetensors, meta.json, tokenizer.json)
    prompt: str = ""
    tokenizer: str = ""  # "": the checkpoint's tokenizer.json
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    stages: int = 2  # stage holders the model is split over; 0: generate in this process, without Ray
    replicas: int = 1  # holders per layer range; 2+ lets a session fail over when a holder dies
    bos: bool = True  # start the prompt with <|bos|>, as every training document starts
    stop_at_eos: bool = True
    address: str = ""  # Ray address; "": RAY_ADDRESS if set, else start a local Ray
    swarm: str = ""  # name of a running inference swarm to use (started from the checkpoint if absent)
    keep_swarm: bool = False  # leave the swarm running (detached) for later commands; needs address
    key_dir: str = "~/.cache/neuroray/keys"  # holder identities (secp256k1 keys that sign inference proofs)
    ledger: str = ""  # a training run's ledger.sqlite: credit the holders' signed inference proofs there
    cpus_per_holder: float = 0.0
    gpus_per_holder: float = 0.0
    torch_threads: int = 1
    session_ttl_s: float = 300.0
    step_timeout_s: float = 120.0


def run_pipeline(cfg: GenerateConfig, loaded: LoadedCheckpoint, expected_ids: list[int], sampler, stop_id, write,
                 on_token, log) -> Session:
    """``python -m neuroray.generate`` with ``stages >= 1``: one prompt through Ray stage holders.

    The Driver tokenizes the prompt; ``expected_ids`` (the client's own encoding, already checked)
    catches a swarm whose tokenizer differs from the checkpoint's.
    """
    import os

    import ray

    from neuroray.checkpoint import CheckpointError
    from neuroray.inference.discovery import find_holders, start_holders
    from neuroray.inference.engine import PipelineEngine
    from neuroray.inference.proofs import credit_proofs
    from neuroray.swarm.ray_errors import unwrap_ray_error

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
            raise unwrap_ray_error(exc) from None
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
            credit_proofs(cfg.ledger, engine.registrations(), proofs, log, cfg.key_dir)
        return session
    finally:
        if owned and holders is not None:
            for row in holders:
                for h in row:
                    ray.kill(h)
        if started:
            ray.shutdown()
