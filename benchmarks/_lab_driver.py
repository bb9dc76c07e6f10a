"""One training run inside a lab host (``lab exec h0 -- python benchmarks/_lab_driver.py OVERRIDES``), with clocks.

Used by benchmarks/lab_train.py and tests/test_lab_ops.py. It runs ``neuroray.training.run.run`` as
``python -m neuroray.train`` would, and prints, each on its own line and flushed at once:

* ``LOG <unix time> <line>``: every line the run logs;
* ``EV {"t", "kind": "submit"|"done", "step"}``: when each inner step (0-based) was first submitted and when
  the driver recorded it as completed. The loop is not changed: ``FixedPipelines._submit`` (fixed routing:
  the loop submits step s before it collects step s-1), ``Router.run_step`` (swarm routing: one call per
  step) and ``Trainer._record`` are wrapped here, in this process only. A re-submission of a step after a
  recovery is not a new "submit" (the first one counts).
* ``RESULT {...}``: the run's counts (comm, tokens, elapsed, recoveries, routing, ledger), where every
  actor lived, and per holder what it held when the loop ended (outer rounds applied, a hash of its
  theta0), taken before the run shuts the swarm down.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import ray


def _emit(kind: str, step: int) -> None:
    print("EV " + json.dumps({"t": time.time(), "kind": kind, "step": step}), flush=True)


def instrument(emit=_emit, final: dict | None = None) -> set:
    """Wrap the loop's submit/record (and, with ``final``, its end) so that ``emit(kind, step)`` sees both.
    Also used in-process by benchmarks/recovery.py."""
    from neuroray.swarm.router import Router
    from neuroray.training.fixed import FixedPipelines
    from neuroray.training.trainer import Trainer

    submitted: set[int] = set()
    submit, record, router_step = FixedPipelines._submit, Trainer._record, Router.run_step
    trainer_run = Trainer.run

    def _submit(self, step, replica):
        if step not in submitted:
            submitted.add(step)
            emit("submit", step)
        return submit(self, step, replica)

    def _record(self, step, loss):
        record(self, step, loss)
        emit("done", step)

    def run_step(self, mb_ids, timeout_s, lr=None):
        step = mb_ids[0] // len(mb_ids)  # one call per inner step, N microbatches each
        if step not in submitted:
            submitted.add(step)
            emit("submit", step)
        return router_step(self, mb_ids, timeout_s, lr)

    def _holders_now(trainer) -> None:
        """Counters and theta0 hash of every holder that answers, before run() shuts the swarm down."""
        for r, pipeline in enumerate(trainer.swarm.replicas):
            for s, h in enumerate(pipeline):
                try:
                    counters = ray.get(h.counters.remote(), timeout=60)
                    state = ray.get(h.state_dict.remote(at_theta0=True), timeout=60)
                except Exception as exc:  # noqa: BLE001  (a holder that is gone: say so)
                    final[f"r{r}-s{s}"] = {"error": type(exc).__name__}
                    continue
                digest = hashlib.sha256()
                for k in sorted(state):
                    digest.update(k.encode())
                    digest.update(state[k].detach().contiguous().float().numpy().tobytes())
                info = trainer.swarm.infos[r * len(pipeline) + s]
                final[f"r{r}-s{s}"] = counters | {"theta0_sha256": digest.hexdigest(), "node_id": info["node_id"]}

    def _placement(trainer) -> None:
        """``PLACE {slot: node ip}`` before the first step: where Ray put each holder."""
        from ray.util.state import list_actors

        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        prefix = trainer.swarm.name_prefix or ""
        place = {a.name[len(prefix):]: ips.get(a.node_id)
                 for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False)
                 if (a.name or "").startswith(prefix)}
        print("PLACE " + json.dumps(place), flush=True)
        stages = len(trainer.swarm.ranges)
        print("IDS " + json.dumps({f"r{k // stages}-s{k % stages}": info["node_id"]
                                   for k, info in enumerate(trainer.swarm.infos)}), flush=True)

    def wrap(original):
        def run(self, metrics_file):
            _placement(self)
            stats = original(self, metrics_file)
            _holders_now(self)
            return stats
        return run

    FixedPipelines._submit, Trainer._record, Router.run_step = _submit, _record, run_step
    if final is not None:
        Trainer.run = wrap(trainer_run)
    return submitted  # clear it between runs in one process


def main(argv: list[str], emit=_emit) -> None:
    from neuroray.configure import load_config
    from neuroray.training.run import run

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS: the lab's head
    final: dict = {}
    instrument(emit, final)

    def log(msg):
        print(f"LOG {time.time():.3f} {msg}", flush=True)

    t0 = time.time()
    res = run(load_config(argv), log=log)
    from ray.util.state import list_actors

    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    actors = [{"class": a.class_name, "name": a.name, "ip": ips.get(a.node_id), "state": a.state}
              for a in list_actors(detail=True, limit=10_000, raise_on_missing_output=False)]
    print("RESULT " + json.dumps({
        "comm": res.comm, "sync_bytes": res.sync_bytes, "control_bytes": res.control_bytes, "tokens": res.tokens,
        "tokens_per_s": res.tokens_per_s, "recoveries": res.recoveries, "routing": res.routing,
        "ledger": res.ledger, "losses": res.losses, "actors": actors, "holders": final, "run_dir": str(res.run_dir),
        "wall_s": time.time() - t0, "driver_ip": ray.util.get_node_ip_address(),
        "eval_loss": res.eval_loss,
        "hop_rejections": res.hop_rejections,  # hops a holder rejected (docs/hops.md): a rejected hop fails a round  # the final held-out evaluation at theta0 (NaN without eval shards)
        "hops": res.hops,  # per holder: hops sent and received, counted from the payloads (docs/hops.md)
    }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
