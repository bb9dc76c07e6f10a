"""Which snapshot set a ``resume=true`` run continues from, and (``model=auto``) what model it records."""

from __future__ import annotations

import json
from pathlib import Path

from neuroray.config import TrainConfig
from neuroray.errors import ConfigError, NeurorayError, VocabularyShrankError

# What a resumed run may not change: the snapshots' tensors have these shapes (and rope/norm define the function)
_MODEL_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len", "rope_theta", "norm_eps")


def _slots(replicas: int, stages: int) -> list[str]:
    return [f"r{r}-s{s}" for r in range(replicas) for s in range(stages)] + [f"outer-s{s}" for s in range(stages)]


def _readable(snapshot_root: str, slots: list[str], step: int, log) -> bool:
    """Every slot has a snapshot of ``step`` that verifies."""
    from neuroray.snapshot import SnapshotStore

    try:
        for slot in slots:
            SnapshotStore(snapshot_root, slot).read(step)
    except ValueError as exc:
        log(f"resume: snapshot set of step {step} is unusable ({exc}); trying the previous one")
        return False
    return True


def _refuse_changed_model(cfg: TrainConfig, recorded_model: dict, recorded_vocab, where: str) -> None:
    for key in _MODEL_KEYS:
        if key in recorded_model and recorded_model[key] != getattr(cfg.model, key):
            raise ConfigError(f"resume=true cannot change model.{key} ({recorded_model[key]} in {where}, "
                              f"{getattr(cfg.model, key)} now); start a new run instead")
    if recorded_vocab is not None and recorded_vocab != cfg.data.vocab_size:
        raise ConfigError(f"resume=true cannot change data.vocab_size ({recorded_vocab} in {where}, "
                          f"{cfg.data.vocab_size} now); start a new run instead")


def check_same_model(cfg: TrainConfig, run_dir: Path) -> None:
    """``resume=true`` (fixed model): refuse a config whose model differs from the one the run dir's
    config.yaml records, before that file is rewritten. The snapshots are checked too (resume_step_of)."""
    import yaml

    recorded = Path(run_dir) / "config.yaml"
    if cfg.model.name == "auto" or not recorded.is_file():
        return
    old = yaml.safe_load(recorded.read_text()) or {}
    _refuse_changed_model(cfg, old.get("model") or {}, (old.get("data") or {}).get("vocab_size"), str(recorded))


def trim_log(metrics_jsonl: Path, step: int) -> None:
    """Keep only the rows of steps up to ``step`` (the snapshot resumed from): the steps after it are
    trained again, and each step must appear in the log once (a crash may have logged beyond the snapshot)."""
    if not metrics_jsonl.is_file():
        return
    rows = [line for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    if len(kept) != len(rows):
        metrics_jsonl.write_text("".join(line + "\n" for line in kept))


def comm_before(comm_json: Path, rounds: int) -> list[dict]:
    """The bytes booked for outer rounds up to ``rounds`` (the snapshot's round count) by earlier runs."""
    if not comm_json.is_file():
        return []
    return [c for c in json.loads(comm_json.read_text()) if c["round"] <= rounds]


def resume_step_of(cfg: TrainConfig, snapshot_root: str, log, vocab: int | None = None) -> int:
    """The newest step for which every holder and every range's outer state has a good snapshot.

    ``vocab``: the dataset's vocabulary now; a snapshot of a larger one is refused (a vocabulary only grows).
    A smaller one (taken before the dataset was extended with a grown tokenizer) is grown at restore."""
    from neuroray.model import split_layers
    from neuroray.snapshot import SnapshotStore

    slots = _slots(cfg.diloco.replicas, len(split_layers(cfg.model.n_layers, cfg.swarm.num_stages)))
    stores = [SnapshotStore(snapshot_root, slot) for slot in slots]
    common = set.intersection(*(set(st.steps()) for st in stores))
    for step in sorted(common, reverse=True):
        if _readable(snapshot_root, slots, step, log):
            arch = SnapshotStore(snapshot_root, "r0-s0").read(step).meta.get("architecture")
            if arch is not None:  # what the snapshots' tensors are, whatever config.yaml says
                _refuse_changed_model(cfg, arch["model"], None, f"the snapshot of step {step}")
                if vocab is not None and arch.get("vocab_size", 0) > vocab:
                    raise VocabularyShrankError(f"the dataset {cfg.data.dataset or 'of data.*'} (resuming the snapshot "
                                                f"of step {step})", vocab, arch["vocab_size"])
            log(f"resume: continuing from the snapshot set of step {step} in {snapshot_root}")
            return step
    raise NeurorayError(f"resume=true but {snapshot_root} holds no complete snapshot set for "
                        f"{cfg.diloco.replicas} replicas x {cfg.swarm.num_stages} stages; start a new run instead")


def resume_auto(snapshot_root: str, log):
    """``model=auto``: the newest complete snapshot set and what it records -- ``(step, model, ranges, replicas)``.

    After a live upgrade or added replicas the run is not what the law would plan for today's cluster:
    the holders' snapshots record the model and split they trained (``architecture``), and the replicas
    are the ``r<i>-s0`` slots that hold the step."""
    from neuroray.config import ModelConfig
    from neuroray.snapshot import SnapshotStore

    first = SnapshotStore(snapshot_root, "r0-s0")
    for step in reversed(first.steps()):
        try:
            arch = first.read(step).meta.get("architecture")
        except ValueError as exc:
            log(f"resume: snapshot set of step {step} is unusable ({exc}); trying the previous one")
            continue
        if arch is None:  # written before snapshots recorded it: nothing says what model this was
            continue
        model, ranges = ModelConfig(**arch["model"]), [tuple(r) for r in arch["ranges"]]
        replicas = 1
        while step in SnapshotStore(snapshot_root, f"r{replicas}-s0").steps():
            replicas += 1
        if _readable(snapshot_root, _slots(replicas, len(ranges)), step, log):
            log(f"resume: continuing from the snapshot set of step {step} in {snapshot_root}")
            return step, model, ranges, replicas
    raise NeurorayError(f"resume=true but {snapshot_root} holds no complete snapshot set that records its model "
                        "(model=auto resumes the architecture its snapshots hold); start a new run instead")
