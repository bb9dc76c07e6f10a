"""Starting inference holders on Ray and finding a running named swarm of them (``swarm=<name>``)."""

from __future__ import annotations

from pathlib import Path

from neuroray.errors import ConfigError, PipelineError
from neuroray.inference.holder import InferenceHolder, InferenceSpec
from neuroray.inference.loading import LoadedCheckpoint
from neuroray.model import build_stage, split_layers
from neuroray.swarm.ray_errors import unwrap_ray_error

NAMESPACE = "neuroray"  # named inference swarms live here, so a later command can find them


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
        raise unwrap_ray_error(exc) from None
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
