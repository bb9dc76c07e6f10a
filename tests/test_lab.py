"""The multi-host lab (docs/lab.md) with real namespaces, tc and Ray nodes: up/status/down, private disks,
cut/heal, shaping, byte counters, and every bad input giving one line and leaving nothing behind.

Needs root and network namespaces; elsewhere the module is skipped with one line saying why. One 3-host lab
is shared by the module (Ray nodes are heavy on small machines); the bad-input tests that need no lab run
first, the test that takes the lab down runs last. Every test cleans up in finally / fixture teardown.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent
PREFIX, OTHER = "nt", "nq"  # not the default "nr", so a developer's own lab is never touched
HOST_ROOT = "/run/neuroray-test-host"


def _why_no_lab() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, veths, tc)"
    if any(shutil.which(t) is None for t in ("ip", "tc", "unshare", "nsenter")):
        return "lab tests need iproute2 (ip, tc) and util-linux (unshare, nsenter)"
    if subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True).returncode != 0:
        return "lab tests need network namespaces (`unshare --net --mount` is not permitted here)"
    return None


if _why_no_lab():
    pytest.skip(_why_no_lab(), allow_module_level=True)

from neuroray.lab import attach, command, counters, down, load_lab_config, probe, up  # noqa: E402
from neuroray.lab.preflight import available_mb  # noqa: E402
from neuroray.lab.proc import start_time  # noqa: E402


# ---------------------------------------------------------------- helpers, independent of the lab's own discovery

def _cli(*args, wrap=(), timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([*wrap, sys.executable, "-m", "neuroray.lab", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(res: subprocess.CompletedProcess, needle: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("neuroray: error:"), res.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def _netns(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if re.fullmatch(rf"{prefix}h\d+", ln.split()[0])]


def _links(prefix: str) -> list[str]:
    out = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True).stdout)
    return [d["ifname"] for d in out if re.fullmatch(rf"{prefix}(v\d+|br0)", d["ifname"])]


def _leftovers(prefix: str, lab_dir: str, host_root: str) -> list[str]:
    mounts = [ln for ln in open("/proc/mounts") if lab_dir in ln or host_root in ln or f"/run/netns/{prefix}h" in ln]
    paths = [p for p in (lab_dir, host_root) if os.path.exists(p)]
    return _netns(prefix) + _links(prefix) + mounts + paths


def _ns_processes(inodes: set[int]) -> list[int]:
    """Every process on the machine whose network namespace is one of ``inodes``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino in inodes:
                found.append(int(pid))
        except OSError:
            pass
    return found


def _on(ov, host, *argv, timeout=120) -> subprocess.CompletedProcess:
    full, env = command(ov, host, list(argv), cwd="/")
    return subprocess.run(full, env=env, capture_output=True, text=True, timeout=timeout)


def _tbf_rate(prefix_args: list[str], dev: str) -> int | None:
    out = subprocess.run(["tc", *prefix_args, "-j", "qdisc", "show", "dev", dev], capture_output=True, text=True)
    tbf = [q for q in json.loads(out.stdout or "[]") if q.get("kind") == "tbf" and q.get("root")]
    return tbf[0]["options"]["rate"] if tbf else None  # bytes/s


# ---------------------------------------------------------------- bad input before any lab exists

def test_up_without_root_is_one_line_and_leaves_nothing(tmp_path):
    # a user namespace without mappings: the same binaries, but euid is not 0 and no privilege over the machine
    lab_dir = str(tmp_path / "lab")
    res = _cli("up", f"prefix={OTHER}", f"lab_dir={lab_dir}", f"host_root={HOST_ROOT}",
               wrap=("unshare", "--user", "--"))
    _one_line_error(res, "needs root")
    assert _leftovers(OTHER, lab_dir, HOST_ROOT) == []


def test_up_without_network_namespaces_is_one_line_and_leaves_nothing(tmp_path):
    # still uid 0, but CAP_SYS_ADMIN dropped from the bounding set: `unshare --net` is refused, as in a container
    lab_dir = str(tmp_path / "lab")
    res = _cli("up", f"prefix={OTHER}", f"lab_dir={lab_dir}", f"host_root={HOST_ROOT}",
               wrap=("setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", "--"))
    _one_line_error(res, "network namespaces are not available")
    assert _leftovers(OTHER, lab_dir, HOST_ROOT) == []


def test_host_count_that_does_not_fit_is_one_line_and_leaves_nothing(tmp_path):
    lab_dir = str(tmp_path / "lab")
    per_host = available_mb()  # so that 3 hosts need three times what is free, on any machine
    res = _cli("up", "hosts=3", f"memory_per_host_mb={per_host}", f"prefix={OTHER}", f"lab_dir={lab_dir}",
               f"host_root={HOST_ROOT}")
    _one_line_error(res, "hosts=3 needs about")
    res = _cli("up", "hosts=300", f"prefix={OTHER}", f"lab_dir={lab_dir}")  # more than a /24 holds
    _one_line_error(res, "does not fit in subnet")
    assert _leftovers(OTHER, lab_dir, HOST_ROOT) == []


def test_cut_without_a_lab_is_one_line(tmp_path):
    _one_line_error(_cli("cut", "h1", f"lab_dir={tmp_path / 'none'}"), "no lab is up")
    assert not (tmp_path / "none").exists()


def test_failed_up_cleans_up_after_itself(tmp_path):
    # the bridge, h0's namespace, link, disk and holder exist by the time h0's disk cannot be mounted
    lab_dir, host_root = str(tmp_path / "lab"), "/proc/neuroray-no-such-dir"
    res = _cli("up", "ray=false", "hosts=2", f"prefix={OTHER}", f"lab_dir={lab_dir}", f"host_root={host_root}")
    _one_line_error(res, "lab up failed and was cleaned up")
    assert _leftovers(OTHER, lab_dir, host_root) == []


def test_down_after_up_crashed_halfway_removes_everything(tmp_path):
    lab_dir, host_root = str(tmp_path / "lab"), HOST_ROOT + "-crash"
    args = [f"prefix={OTHER}", "hosts=2", f"lab_dir={lab_dir}", f"host_root={host_root}"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "neuroray.lab", "up", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # wait until h0's Ray head is starting (its GCS or raylet runs in nqh0), then kill `up` without warning
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            pids = subprocess.run(["ip", "netns", "pids", f"{OTHER}h0"], capture_output=True, text=True).stdout
            comms = {Path(f"/proc/{p}/comm").read_text().strip() for p in pids.split()
                     if os.path.exists(f"/proc/{p}/comm")}
            if comms & {"gcs_server", "raylet"}:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "up finished (or failed) before it could be killed halfway"
        proc.kill()
        proc.wait()
        inodes = {os.stat(f"/run/netns/{ns}").st_ino for ns in _netns(OTHER)}
        assert inodes and _ns_processes(inodes), "the crash should have left namespaces and processes behind"
        res = _cli("down", f"lab_dir={lab_dir}")
        assert res.returncode == 0, res.stderr
        assert _leftovers(OTHER, lab_dir, host_root) == []
        assert _ns_processes(inodes) == []
        res = _cli("down", f"lab_dir={lab_dir}")  # idempotent
        assert res.returncode == 0 and "removed 0 things" in res.stdout, res.stdout + res.stderr

        # a crash before the state file was written: down still finds the lab by its name prefix
        cfg = load_lab_config([*args, "ray=false", "hosts=1"])
        up(cfg)
        (Path(lab_dir) / "state.json").unlink()
        res = _cli("down", f"prefix={OTHER}", f"lab_dir={lab_dir}", f"host_root={host_root}")
        assert res.returncode == 0, res.stderr
        assert _leftovers(OTHER, lab_dir, host_root) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        down(load_lab_config([f"prefix={OTHER}", f"lab_dir={lab_dir}", f"host_root={host_root}"]))


# ---------------------------------------------------------------- one 3-host lab with Ray nodes

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab_dir = str(tmp_path_factory.mktemp("lab") / "lab")
    cfg = load_lab_config([f"prefix={PREFIX}", "hosts=3", f"lab_dir={lab_dir}", f"host_root={HOST_ROOT}"])
    try:
        up(cfg)
        yield cfg, [f"lab_dir={lab_dir}"]
    finally:
        down(cfg)


def test_status_reports_three_hosts(lab):
    cfg, ov = lab
    res = _cli("status", "--json", *ov)
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert s["phase"] == "up" and s["bridge"] == f"{PREFIX}br0"
    assert [(h["host"], h["ip"], h["link"], h["raylet"]) for h in s["hosts"]] == [
        (f"h{i}", f"10.231.0.{i + 1}", "up", True) for i in range(3)]


def test_hosts_have_own_addresses_and_reach_each_other(lab):
    cfg, ov = lab
    for i in range(3):
        addrs = json.loads(_on(ov, f"h{i}", "ip", "-j", "-4", "addr", "show", "dev", "eth0").stdout)
        assert [a["local"] for a in addrs[0]["addr_info"]] == [cfg.host_ip(i)]
        routes = json.loads(_on(ov, f"h{i}", "ip", "-j", "-4", "route").stdout)
        assert [r["dst"] for r in routes] == [cfg.subnet]  # no default route: a host reaches only the lab
    with probe.listener(ov, "h1"):
        assert probe.send(ov, "h0", "h1") and probe.send(ov, "h2", "h1")
    with probe.listener(ov, "h0"):
        assert probe.send(ov, "h2", "h0")


def test_each_host_has_its_own_disk(lab):
    cfg, ov = lab
    name = f"marker-{uuid.uuid4().hex[:8]}"
    paths = [f"{cfg.host_root}/home/{name}", f"{cfg.host_root}/cache/{name}", f"/tmp/{name}"]
    res = _on(ov, "h1", "sh", "-c", 'for p in "$@"; do echo h1 > "$p" || exit 1; done', "sh", *paths)
    assert res.returncode == 0, res.stderr
    env_paths = _on(ov, "h1", "sh", "-c", 'echo "$HOME $XDG_CACHE_HOME $TMPDIR"').stdout.split()
    assert env_paths == [f"{cfg.host_root}/home", f"{cfg.host_root}/cache", "/tmp"]
    for p in paths:
        assert _on(ov, "h1", "test", "-e", p).returncode == 0, p
        assert _on(ov, "h2", "test", "-e", p).returncode == 1, f"{p} written on h1 exists on h2"
        assert not os.path.exists(p), f"{p} written on h1 exists on the machine"
    assert (Path(cfg.lab_dir) / "disks" / "h1" / "home" / name).read_text() == "h1\n"


def test_ray_cluster_has_one_alive_node_per_host(lab):
    cfg, ov = lab
    script = ("import json, ray; ray.init(); "
              "print(json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")
    res = _on(ov, "h0", sys.executable, "-c", script)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [cfg.host_ip(i) for i in range(3)]
    for i in range(3):  # each node keeps its session on its own disk
        assert list((Path(cfg.lab_dir) / "disks" / f"h{i}" / "tmp" / "ray").glob("session_2*/logs/raylet.out"))


def test_shape_sets_the_kernel_qdisc_both_directions(lab):
    cfg, ov = lab
    veth, inside = [f"{PREFIX}v1"], ["-n", f"{PREFIX}h1"]
    try:
        assert _tbf_rate([], veth[0]) is None and _tbf_rate(inside, "eth0") is None  # up was unshaped
        assert _cli("shape", "h1", "100mbit", *ov).returncode == 0
        assert _tbf_rate([], veth[0]) == 12_500_000 and _tbf_rate(inside, "eth0") == 12_500_000
        res = _cli("shape", "h1", "20mbit", "--upload", "5mbit", *ov)
        assert res.returncode == 0 and "upload 5 Mbit/s, download 20 Mbit/s" in res.stdout, res.stdout
        assert _tbf_rate([], veth[0]) == 2_500_000 and _tbf_rate(inside, "eth0") == 625_000
        _one_line_error(_cli("shape", "h1", "fast", *ov), "is not a tc rate")
        assert _tbf_rate([], veth[0]) == 2_500_000  # a refused change changes nothing
        assert _cli("shape", "h1", "none", *ov).returncode == 0
        assert _tbf_rate([], veth[0]) is None and _tbf_rate(inside, "eth0") is None
    finally:
        _cli("shape", "h1", "none", *ov)


def test_counters_count_the_bytes_on_the_wire(lab):
    cfg, ov = lab
    before = counters(cfg)
    try:
        _cli("shape", "h1", "100mbit", *ov)
        got = probe.transfer(ov, "h2", "h1", 3_000_000, timeout_s=60)
    finally:
        _cli("shape", "h1", "none", *ov)
    after = counters(cfg)
    assert got["bytes"] == 3_000_000
    # payload plus TCP/IP/Ethernet headers crossed each veth: at least the payload, counted by the kernel
    assert after["h2"]["tx_bytes"] - before["h2"]["tx_bytes"] >= 3_000_000
    assert after["h1"]["rx_bytes"] - before["h1"]["rx_bytes"] >= 3_000_000
    res = _cli("counters", *ov)
    assert res.returncode == 0 and json.loads(res.stdout)["h1"]["rx_bytes"] >= after["h1"]["rx_bytes"]
    print(f"3 MB h2 -> h1 under 100mbit: {got['mbit_s']:.1f} Mbit/s (informative, not asserted)")


def test_cut_makes_a_host_unreachable_until_heal(lab):
    cfg, ov = lab
    try:
        with probe.listener(ov, "h1", timeout_s=120):
            assert probe.send(ov, "h0", "h1")
            assert _cli("cut", "h1", *ov).returncode == 0
            assert [h["link"] for h in json.loads(_cli("status", "--json", *ov).stdout)["hosts"]] == ["up", "cut", "up"]
            assert not probe.send(ov, "h0", "h1", timeout_s=2.0)
            assert not probe.send(ov, "h2", "h1", timeout_s=2.0)
            assert _cli("heal", "h1", *ov).returncode == 0
            # the bridge port comes back within moments; retry within a bound instead of timing it
            deadline = time.monotonic() + 30
            while not probe.send(ov, "h0", "h1", timeout_s=2.0):
                assert time.monotonic() < deadline, "h1 still unreachable 30 s after heal"
    finally:
        _cli("heal", "h1", *ov)


def test_second_up_is_refused_and_the_lab_is_untouched(lab, tmp_path):
    cfg, ov = lab
    _one_line_error(_cli("up", f"prefix={PREFIX}", *ov), "already up")
    other_dir = str(tmp_path / "other")
    line = _one_line_error(_cli("up", f"prefix={OTHER}", f"lab_dir={other_dir}", f"host_root={HOST_ROOT}-other"),
                           "10.231.0.0/24 is already in use")
    assert f"{PREFIX}br0" in line
    assert _leftovers(OTHER, other_dir, f"{HOST_ROOT}-other") == []
    assert sorted(_netns(PREFIX)) == [f"{PREFIX}h{i}" for i in range(3)]
    assert json.loads(_cli("status", "--json", *ov).stdout)["phase"] == "up"


def test_cut_of_an_unknown_host_is_one_line(lab):
    cfg, ov = lab
    _one_line_error(_cli("cut", "h9", *ov), "unknown host 'h9'; this lab has h0, h1, h2")
    assert all(h["link"] == "up" for h in json.loads(_cli("status", "--json", *ov).stdout)["hosts"])


def test_down_removes_everything_and_is_idempotent(lab):
    """Last: it takes the shared lab down."""
    cfg, ov = lab
    inodes = {os.stat(f"/run/netns/{ns}").st_ino for ns in _netns(PREFIX)}
    procs = [(p, start_time(p)) for p in _ns_processes(inodes)]
    assert len(inodes) == 3 and procs
    res = _cli("down", *ov)
    assert res.returncode == 0, res.stderr
    assert _leftovers(PREFIX, cfg.lab_dir, cfg.host_root) == []
    assert _ns_processes(inodes) == []
    assert all(start_time(p) != st for p, st in procs)
    res = _cli("down", *ov)
    assert res.returncode == 0 and "removed 0 things" in res.stdout, res.stdout + res.stderr
    with pytest.raises(Exception, match="no lab is up"):
        attach(ov)
