"""Run inside a lab host by tests/test_hosts.py: one training run as ``python -m neuroray.train`` would do it
(config overrides as argv), then one JSON line ``RESULT {...}`` with what the test checks: the run's own
byte counts, snapshots, the stores' log line, and on which node every actor of the run lived (Ray's state
API keeps dead actors)."""

import json
import sys

import ray

from neuroray.configure import load_config
from neuroray.training.run import run


def main(argv: list[str]) -> None:
    ray.init()  # RAY_ADDRESS: the lab's head; run() then uses this connection and leaves it open
    lines = []

    def log(msg):
        lines.append(str(msg))
        print(msg, flush=True)

    res = run(load_config(argv), log=log)
    from ray.util.state import list_actors

    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    actors = [{"class": a.class_name, "name": a.name, "ip": ips.get(a.node_id), "state": a.state}
              for a in list_actors(detail=True, limit=10_000, raise_on_missing_output=False)]
    print("RESULT " + json.dumps({
        "comm": res.comm, "sync_bytes": res.sync_bytes, "control_bytes": res.control_bytes,
        "start_step": res.start_step, "snapshots": res.snapshots, "ledger": res.ledger,
        "losses": res.losses, "actors": actors, "log": lines, "driver_ip": ray.util.get_node_ip_address(),
    }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
