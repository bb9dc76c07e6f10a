"""Issue #19, bad input: a job submitted to a cluster whose WORKER node lacks a dependency.

The head and the job's own Python have everything; a second Ray node joins from a Python environment
that has Ray and every other package but not torch (a worker machine set up by hand, as users do). The
job must end with one line naming that node's Python and what it lacks, not a ModuleNotFoundError
traceback from an actor constructor. The worker is a real `ray start` node of that Python, stopped by
signalling its own process (never `ray stop`).
"""

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from tests.test_job_submit import Head, _free_ports

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
NODE_JOIN_TIMEOUT_S = 300  # a node joining a loaded 2-core machine can take minutes
# the raylet waits this long for its dashboard agent (Ray's default, 30 s, is too short on a loaded 2-core machine)
AGENT_WAIT = {"RAY_agent_register_timeout_ms": "240000"}


def _python_without_torch(root: Path) -> Path:
    """A virtualenv whose site-packages see every package of this one except torch (and its triton/nvidia
    companions if any): each top-level entry is linked into a directory on the new Python's path."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    ours = Path(sysconfig.get_paths()["purelib"])
    partial = root / "partial-site"
    partial.mkdir()
    for entry in ours.iterdir():
        name = entry.name.lower()
        if name.startswith(("torch", "functorch", "triton", "nvidia", "__editable__")) or entry.suffix == ".pth":
            continue
        (partial / entry.name).symlink_to(entry)
    site = next((root / "lib").glob("python3*/site-packages"))
    (site / "partial.pth").write_text(f"{partial}\n")
    python = root / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import ray, hydra, numpy; import importlib.util as u; "
                            "print(u.find_spec('torch') is None)"], capture_output=True, text=True, timeout=300)
    assert probe.stdout.strip() == "True", probe.stdout + probe.stderr
    return python


def _alive_nodes(head: Head) -> int:
    out = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", f"--address=127.0.0.1:{head.gcs}"],
                         env=head.env, capture_output=True, text=True, timeout=120).stdout
    active = out.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return active.count("node_")


def _wait_for_nodes(head: Head, n: int, running, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + NODE_JOIN_TIMEOUT_S
    while _alive_nodes(head) < n:
        if not running() or time.monotonic() > deadline:
            raise AssertionError(f"{what}: {log.read_text()[-2000:] if log else ''}")
        time.sleep(2)


def test_a_worker_node_without_torch_is_one_line(tmp_path):
    temp = Path(f"/tmp/neuroray-wdeps-{os.getpid()}")
    head = Head(tmp_path / "home", temp, joinable=True)
    worker = None
    try:
        python = _python_without_torch(tmp_path / "bare-worker")
        _wait_for_nodes(head, 1, lambda: head.proc.poll() is None, "the head did not start")
        log = tmp_path / "worker.log"
        nm, om, met, a, b, c = _free_ports(6)
        worker = subprocess.Popen(
            [str(python), "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
             f"--address=127.0.0.1:{head.gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--metrics-export-port={met}",
             f"--dashboard-agent-listen-port={a}", f"--dashboard-agent-grpc-port={b}", f"--runtime-env-agent-port={c}"],
            env=dict(head.env, **AGENT_WAIT), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for_nodes(head, 2, lambda: worker.poll() is None, "the worker node did not join", log)
        job = head.submit([sys.executable, "-m", "neuroray.train", "rounds=1", f"run_dir={tmp_path / 'run'}"])
        out = job.stdout + job.stderr
        assert job.returncode != 0, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("neuroray: error:")]
        # Ray repeats the job's last log lines in its failure message: one distinct line, maybe shown twice
        assert len(set(errors)) == 1, out[-3000:]
        assert "Ray node" in errors[0] and f"({python}) lacks torch" in errors[0] and "make venv" in errors[0], errors
        assert "Traceback" not in out and "ModuleNotFoundError" not in out, out[-3000:]
    finally:
        try:
            if worker is not None and worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(timeout=120)
        finally:  # the head goes whatever happened to the worker
            head.stop()
            shutil.rmtree(temp, ignore_errors=True)
