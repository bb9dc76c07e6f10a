"""One torchft DiLoCo replica: the process benchmarks/torchft_side_by_side.py starts M of (and restarts one of).

neuroray's tiny model (``build_monolith``, the same seed as neuroray's run), the embedded genesis dataset through
``TokenStream`` (the stream of neuroray's replica ``replica``: ``node_id``), neuroray's inner AdamW (betas
0.9/0.95, grad clip) and outer Nesterov SGD, wrapped in torchft's ``Manager`` (its own TCPStore,
``ProcessGroupGloo``, the Lighthouse at ``lighthouse``) and ``DiLoCo`` (one fragment, ``sync_every`` = H). One
torch thread. Every inner step, outer sync and commit is appended to ``progress`` as a JSON line with a wall-clock
time (the supervisor reads it to kill mid-round and to time the recovery). The bytes of the outer sync are the
tensors handed to ``Manager.allreduce`` (counted by wrapping it on this instance) and, as a cross-check, this
process's ``wchar`` (bytes written by write/writev, which Gloo's TCP pairs use) during sync steps.

``host`` (optional, default ``localhost``): the address this replica advertises to its peers (its TCPStore, its
Manager server, its checkpoint server). benchmarks/lab_torchft.py runs each replica on its own lab host, where
the machine's hostname, which torchft advertises by default, resolves to 127.0.0.1 in every host: on real
machines it would name the machine, so the replica names its host's address instead.

    python benchmarks/_torchft_replica.py '<json spec>'
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def main(spec: dict) -> None:
    import torch
    import torch.distributed as dist
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import DiLoCo

    from neuroray.configure import load_config
    from neuroray.genesis import TokenStream, ensure_dataset, load_tokenizer
    from neuroray.model import build_monolith

    host = spec.get("host", "localhost")
    if host != "localhost":
        import socket

        socket.gethostname = lambda: host  # what torchft's checkpoint server puts in the address it hands out
    torch.set_num_threads(1)  # as a neuroray holder with cpus_per_holder < 1
    cfg = load_config(spec["overrides"])
    root, manifest = ensure_dataset(cfg.data, log=lambda *a, **k: None)
    vocab = load_tokenizer(Path(root) / manifest.tokenizer_file).get_vocab_size()
    model = build_monolith(cfg.model, vocab, seed=cfg.seed)
    d = cfg.diloco
    inner = torch.optim.AdamW(model.parameters(), lr=d.inner_lr, weight_decay=d.weight_decay, betas=(0.9, 0.95))
    outer = torch.optim.SGD(model.parameters(), lr=d.outer_lr, momentum=d.outer_momentum, nesterov=d.nesterov)
    stream = TokenStream(root, manifest, spec["node_id"], cfg.data.seq_len,
                         cfg.data.microbatch_size, prefetch=False)

    def state_dict():
        return {"model": model.state_dict(), "inner_optim": inner.state_dict()}

    def load_state_dict(state):  # a restarted replica heals from a live one at its first quorum
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["inner_optim"])

    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=spec["timeout_s"])
    manager = Manager(pg=ProcessGroupGloo(timeout=timeout), load_state_dict=load_state_dict, state_dict=state_dict,
                      # init_sync=False: every replica builds the same weights from the seed (torchft's docs)
                      min_replica_size=spec["min_replicas"], use_async_quorum=False, init_sync=False, timeout=timeout,
                      quorum_timeout=timeout, connect_timeout=timeout, rank=0, world_size=1, store_addr=host,
                      store_port=store.port, lighthouse_addr=spec["lighthouse"], replica_id=f"r{spec['replica']}",
                      hostname=host)
    progress = open(spec["progress"], "a", buffering=1)

    def emit(**row):
        progress.write(json.dumps({"t": time.time(), "replica": spec["replica"], "pid": os.getpid(), **row}) + "\n")

    sent = {"bytes": 0}
    allreduce, should_commit = manager.allreduce, manager.should_commit

    def counted_allreduce(tensor, *args, **kwargs):
        sent["bytes"] += tensor.numel() * tensor.element_size()
        return allreduce(tensor, *args, **kwargs)

    def logged_commit(*args, **kwargs):
        ok = should_commit(*args, **kwargs)
        emit(kind="commit", ok=ok, step=manager.current_step(), participants=manager.num_participants())
        return ok

    manager.allreduce, manager.should_commit = counted_allreduce, logged_commit
    emit(kind="start")
    # the first incarnations wait until all M heartbeat: with min_replicas 1 the Lighthouse would otherwise let
    # the first one up run a round alone, and the other would then heal from it instead of training that round
    while sum(r.startswith("{") and '"start"' in r for r in Path(spec["progress"]).read_text().splitlines()) \
            < spec["barrier"]:
        time.sleep(0.05)
    inner_s, sync_s, sync_wchar, local = [], [], 0, 0
    with DiLoCo(manager, [model], inner, outer, sync_every=d.inner_steps, pin_memory=False):
        while manager.current_step() < spec["rounds"]:
            x, y = stream.next_microbatch()
            t0, w0 = time.perf_counter(), _wchar()
            loss = model.loss(model(x), y)
            loss.backward()
            if d.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), d.grad_clip)
            inner.step()  # DiLoCo's post hook runs the quorum, allreduce and outer step every H-th call
            inner.zero_grad(set_to_none=True)
            local += 1
            seconds = time.perf_counter() - t0
            is_sync = local % d.inner_steps == 0
            if is_sync:
                sync_s.append(seconds)
                sync_wchar += _wchar() - w0
            else:
                inner_s.append(seconds)
            emit(kind="sync" if is_sync else "inner", local=local, step=manager.current_step(), loss=float(loss))
    if spec.get("save"):
        torch.save(model.state_dict(), spec["save"])
    Path(spec["result"]).write_text(json.dumps({
        "replica": spec["replica"], "inner_s": inner_s, "sync_s": sync_s, "allreduce_bytes": sent["bytes"],
        "sync_wchar": sync_wchar, "local_steps": local, "outer_steps": manager.current_step(),
        "tokens": local * cfg.data.microbatch_size * cfg.data.seq_len}))
    progress.close()
    manager.shutdown(wait=False)
    os._exit(0)  # torchft's server threads may keep a clean interpreter exit waiting


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
