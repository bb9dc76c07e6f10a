"""The operator path: `ray job submit` as the README tells a user to run it, against real Ray heads.

* The README's job block runs verbatim in a fresh copy of the project, with a fresh HOME and the
  caller's PATH (no virtualenv on it): the job must find the project's Python by itself, write its
  outputs to a stable path it prints, keep every listening socket on 127.0.0.1, and stop only its head
  (a bystander head started here must survive it).
* On the bystander head: a job's Prometheus series carry the names the README documents, and a job
  under a Python without the dependencies ends with one line naming them.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_pipeline_ray import _write_corpus

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
VENV = Path(sys.prefix)
START_TIMEOUT_S = 300  # a head on a loaded 2-core machine can take minutes to accept jobs


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _user_env(home: Path) -> dict:
    """The caller's environment as a user's shell would have it: no activated virtualenv, no PYTHONPATH
    pointing at a checkout, no cluster address, and a HOME of its own (a new user)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != Path(sys.executable).parent.resolve())
    env["HOME"] = str(home)
    return env


def _readme_block(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    after = text.split(marker, 1)[1]
    return after.split("```bash\n", 1)[1].split("```", 1)[0]


def _loopback_only(pid: int) -> list[str]:
    """Listening sockets of a process tree that are not on 127.0.0.1."""
    import psutil

    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    pids = {p.pid for p in tree}
    bad = []
    for c in psutil.net_connections("inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids and c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1"):
            bad.append(f"{c.laddr.ip}:{c.laddr.port} (pid {c.pid})")
    return bad


class Head:
    """A `ray start --head --block` of this test's own; stopped by signalling that process (never `ray stop`)."""

    def __init__(self, home: Path, temp_dir: Path, *, joinable: bool = False):
        """``joinable``: other nodes may join (Ray then moves its services off the loopback, see the README)."""
        self.gcs, self.dash, a, b, c, self.metrics, client, nm = _free_ports(8)
        self.env = dict(_user_env(home), RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=str(int(joinable)))
        # `ray start --head` does not make a token: a new user's first head needs one made
        subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, capture_output=True, check=True, timeout=120)
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}", "--num-cpus=2",
             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--port={self.gcs}",
             f"--dashboard-port={self.dash}", f"--dashboard-agent-listen-port={a}", f"--dashboard-agent-grpc-port={b}",
             f"--runtime-env-agent-port={c}", f"--metrics-export-port={self.metrics}",
             f"--ray-client-server-port={client}", f"--node-manager-port={nm}"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def submit(self, entrypoint: list[str], *, wait: bool = True) -> subprocess.CompletedProcess:
        """Submit (retrying while the head's job agent is not up yet: nothing was started then)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            job = subprocess.run(
                [RAY, "job", "submit", "--address", f"http://127.0.0.1:{self.dash}", "--runtime-env",
                 str(REPO / "jobs" / "runtime_env.yaml"), *([] if wait else ["--no-wait"]), "--", *entrypoint],
                cwd=REPO, env=self.env, capture_output=True, text=True, timeout=START_TIMEOUT_S)
            out = job.stdout + job.stderr
            retry = "No available agent" in out or "Failed to connect to Ray" in out
            if job.returncode == 0 or not retry or time.monotonic() > deadline:
                return job
            time.sleep(2)

    def job_status(self, job_id: str) -> str:
        out = subprocess.run([RAY, "job", "status", "--address", f"http://127.0.0.1:{self.dash}", job_id],
                             env=self.env, capture_output=True, text=True, timeout=120).stdout
        return next((s for s in ("SUCCEEDED", "FAILED", "STOPPED") if s in out), "RUNNING")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    root = tmp_path_factory.mktemp("head")
    h = Head(root / "home", Path(f"/tmp/neuroray-test-{os.getpid()}"))
    yield h
    h.stop()
    shutil.rmtree(f"/tmp/neuroray-test-{os.getpid()}", ignore_errors=True)


def _fresh_copy(dest: Path) -> Path:
    """What a fresh clone holds (tracked and new, not ignored files), plus the .venv `make venv` makes."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file() and not src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
        elif src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dest / name)
    (dest / ".venv").symlink_to(VENV)
    return dest


def test_readme_job_recipe_runs_verbatim(tmp_path, head):
    clone = _fresh_copy(tmp_path / "clone")
    home = tmp_path / "home"
    # the embedded Genesis dataset takes a minute to build: share the user's cache (what a second run sees)
    cache = Path.home() / ".cache" / "neuroray" / "genesis"
    cache.mkdir(parents=True, exist_ok=True)
    (home / ".cache" / "neuroray").mkdir(parents=True)
    (home / ".cache" / "neuroray" / "genesis").symlink_to(cache)
    block = _readme_block("<!-- tests/test_job_submit.py runs this block verbatim -->")
    assert "submit_local.sh" in block
    proc = subprocess.Popen(["bash", "-c", "set -e\n" + block], cwd=clone, env=_user_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, head_pid, exposed = [], None, None
    for line in proc.stdout:  # watch the sockets while the holders (workers) are up
        lines.append(line)
        m = re.match(r"ray head: pid (\d+)", line)
        head_pid = int(m.group(1)) if m else head_pid
        if line.startswith("train:") and head_pid and exposed is None:
            exposed = _loopback_only(head_pid)
    assert proc.wait(timeout=60) == 0, "".join(lines)[-4000:]
    out = "".join(lines)
    assert "succeeded" in out and "round 2/2 step 20/20" in out, out[-3000:]
    assert exposed == [], f"listening beyond 127.0.0.1: {exposed}"
    # outputs: one stable path under the new user's home, printed at the start and at the end
    run_dirs = re.findall(r"^run dir: (\S+)$", out, re.M)
    assert len(run_dirs) == 2 and run_dirs[0] == run_dirs[1], run_dirs
    run_dir = Path(run_dirs[0])
    assert run_dir.parent == home / "neuroray" / "outputs" and "runtime_resources" not in run_dir.parts
    assert (run_dir / "checkpoint" / "model.safetensors").is_file() and (run_dir / "metrics.jsonl").is_file()
    # the ledger is one file: audit a copy of ledger.sqlite alone
    alone = tmp_path / "ledger-copy" / "ledger.sqlite"
    alone.parent.mkdir()
    shutil.copyfile(run_dir / "ledger.sqlite", alone)
    audit = subprocess.run([sys.executable, "-m", "neuroray.ledger", "--ledger", str(alone), "verify"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert audit.returncode == 0 and "proofs re-verified" in audit.stdout, audit.stdout + audit.stderr
    # it stopped its own head, and only that one
    import psutil

    assert head_pid and not psutil.pid_exists(head_pid)
    assert head.proc.poll() is None, "the recipe stopped a Ray head it did not start"


def _documented_metrics() -> list[str]:
    text = (REPO / "README.md").read_text().split("<!-- metric names:", 1)[1].split("Two counters", 1)[0]
    names = []
    for cell in re.findall(r"^  \| (.+?) \|", text, re.M):
        first = re.findall(r"`([a-z_]+)`", cell)
        for name in first:
            names.append(name if name.startswith("ray_") else first[0].rsplit("_", 1)[0] + name)
    return [n for n in names if n.startswith("ray_neuroray_")]


def test_metrics_have_the_documented_names(tmp_path, head):
    documented = _documented_metrics()
    assert "ray_neuroray_loss" in documented and "ray_neuroray_step_seconds_sum" in documented, documented
    corpus = tmp_path / "corpus.txt"
    _write_corpus(corpus)
    overrides = [
        f"data.source={corpus}", f"data.store={tmp_path / 'store'}", "data.vocab_size=320", "data.shard_tokens=4096",
        "data.seq_len=32", "data.microbatch_size=4", "data.num_microbatches=2", "model.d_model=64", "model.n_layers=2",
        "model.max_seq_len=64",
        f"swarm.key_dir={tmp_path / 'keys'}", "rounds=2", "diloco.inner_steps=4", "log_every=1",
        f"run_dir={tmp_path / 'run'}", "sample_tokens=4", "ponw.actor_name=metrics-test-ledger",
        "eval.every=4",  # an evaluation mid-run, so the eval gauges are exported while the job runs
    ]
    job = head.submit([sys.executable, "-m", "neuroray.train", *overrides], wait=False)
    assert job.returncode == 0, job.stdout + job.stderr
    job_id = re.search(r"raysubmit_\w+", job.stdout + job.stderr).group(0)
    seen: set[str] = set()
    deadline = time.monotonic() + START_TIMEOUT_S + 300
    while time.monotonic() < deadline:  # the union of scrapes while the job runs
        status = head.job_status(job_id)
        try:
            page = urllib.request.urlopen(f"http://127.0.0.1:{head.metrics}/metrics", timeout=30).read().decode()
            seen |= set(re.findall(r"^(ray_neuroray_\w+?)(?:\{| )", page, re.M))
        except OSError:
            pass  # the agent's endpoint comes up after the head
        if status != "RUNNING" or set(documented) <= seen:
            break
        time.sleep(2)
    assert set(documented) <= seen, f"documented but not exported: {sorted(set(documented) - seen)}; exported: {sorted(seen)}"
    undocumented = {n for n in seen if n not in documented} - {"ray_neuroray_failovers_total",
                                                                "ray_neuroray_contributions_rejected_total"}
    assert not undocumented, f"exported but not in the README: {sorted(undocumented)}"


def test_a_python_without_the_dependencies_is_one_line(tmp_path, head):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120,
                   env=_user_env(tmp_path))
    job = head.submit([str(bare / "bin" / "python"), "-m", "neuroray.train", "rounds=1"])
    out = job.stdout + job.stderr
    assert job.returncode != 0 and "failed" in out.lower()
    errors = [line for line in out.splitlines() if line.startswith("neuroray: error:")]
    # Ray repeats the job's last log lines in its failure message: one distinct line, maybe shown twice
    assert len(set(errors)) == 1 and "lacks torch" in errors[0] and "hydra-core" in errors[0], out[-3000:]
    assert "Traceback" not in out and "ModuleNotFoundError" not in out
