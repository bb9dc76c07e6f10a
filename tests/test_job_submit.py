"""`ray job submit -- python -m neuroray.train ...` against a real `ray start --head` on 127.0.0.1,
with Ray 2.60's token authentication on (the job-submit client must send ~/.ray/auth_token)."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_pipeline_ray import _write_corpus

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_job_submit_trains(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    start = subprocess.run(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats",
         # not the default agent ports: another Ray on this machine (a benchmark) may hold them
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        corpus = tmp_path / "corpus.txt"
        _write_corpus(corpus)
        overrides = [
            f"data.source={corpus}", f"data.store={tmp_path / 'store'}", "data.vocab_size=320",
            "data.shard_tokens=4096", "data.seq_len=32", "data.microbatch_size=4", "model.d_model=64",
            "model.n_layers=2", "model.max_seq_len=64", f"swarm.key_dir={tmp_path / 'keys'}", "rounds=1",
            "diloco.inner_steps=3", f"run_dir={tmp_path / 'run'}", "sample_tokens=4",
        ]
        # the head's job agent can come up seconds (on a loaded machine, minutes) after `ray start` returns
        deadline = time.monotonic() + 240
        while True:
            job = subprocess.run(
                [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--runtime-env",
                 str(REPO / "jobs" / "runtime_env.yaml"), "--", "python", "-m", "neuroray.train", *overrides],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
            )
            out = job.stdout + job.stderr
            if job.returncode == 0 or "No available agent" not in out or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert job.returncode == 0, out[-3000:]
        assert "succeeded" in out and "round 1/1 step 3/3" in out and "ray: connected to" in out
        assert (tmp_path / "run" / "checkpoint" / "model.safetensors").is_file()
    finally:
        _stop_cluster(gcs)


def _stop_cluster(gcs_port: int) -> None:
    """Stop only the cluster this test started: `ray stop` would kill every Ray on the machine,
    including a user's own or another suite's. Its processes all name the GCS port on their command line."""
    import psutil

    ours = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] != os.getpid() and (f":{gcs_port}" in cmd or f"port={gcs_port}" in cmd):
            ours.append(proc)
    for proc in ours:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(ours, timeout=30)
