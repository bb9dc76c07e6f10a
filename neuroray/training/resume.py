"""Which snapshot set a ``resume=true`` run continues from, and (``model=auto``) what model it records."""

from __future__ import annotations

from neuroray.config import TrainConfig
from neuroray.errors import NeurorayError


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


def resume_step_of(cfg: TrainConfig, snapshot_root: str, log) -> int:
    """The newest step for which every holder and every range's outer state has a good snapshot."""
    from neuroray.model import split_layers
    from neuroray.snapshot import SnapshotStore

    slots = _slots(cfg.diloco.replicas, len(split_layers(cfg.model.n_layers, cfg.swarm.num_stages)))
    stores = [SnapshotStore(snapshot_root, slot) for slot in slots]
    common = set.intersection(*(set(st.steps()) for st in stores))
    for step in sorted(common, reverse=True):
        if _readable(snapshot_root, slots, step, log):
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
