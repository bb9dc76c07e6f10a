"""benchmarks/lab_torchft.py's two arms across lab hosts, short: torchft's replicas (Lighthouse on h0, replicas on
h1 and h2, Gloo over the lab links) and neuroray's (driver on h0, one holder on each of h1 and h2) start from the
same weights and read the same data with the same optimizers, so their final eval losses agree; torchft's
allreduce crosses the veths (the counters see at least the bytes it handed to Gloo); the lab is gone afterwards.

Correctness only: the figures come from the benchmark. Needs root and network namespaces; elsewhere skipped with
one line. Prefix `nu`, subnet 10.231.48.0/24, removed whatever happens.
"""

import subprocess
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(1200)]

from tests.test_lab import _why_no_lab  # noqa: E402

if _why_no_lab():
    pytest.skip(_why_no_lab(), allow_module_level=True)
pytest.importorskip("torchft", reason="torchft is a peer dev dependency (make venv installs it)")

from benchmarks._lab_run import lab_session  # noqa: E402
from benchmarks.lab_torchft import run_neuroray, run_torchft  # noqa: E402

ARGS = {"rounds": "3", "h": "4", "m": "2", "mb": "4", "seq_len": "64", "seed": "0"}


def test_torchft_and_neuroray_across_lab_hosts_agree_and_cross_the_links(tmp_path):
    with tempfile.TemporaryDirectory(prefix="nu-sbs-", dir="/var/tmp") as shared, \
            lab_session("nu", "10.231.48.0/24", "/run/neuroray-torchft-test-host", str(tmp_path / "lab")) as (cfg, ov):
        torchft = run_torchft(cfg, ov, ARGS, Path(shared), "unshaped", None)
        neuroray = run_neuroray(cfg, ov, ARGS, Path(shared), "unshaped", "none", None)
    assert torchft["placement"] == "r0: h1, r1: h2"
    hosts = sorted(slot.split(": ")[1] for slot in neuroray["placement"].split(", "))
    assert hosts == ["h1", "h2"], neuroray["placement"]  # one holder per host, none beside the driver on h0
    assert torchft["outer_steps"] == neuroray["outer_steps"] == 3
    assert torchft["tokens"] == neuroray["tokens"]
    assert neuroray["eval_loss"] == pytest.approx(torchft["eval_loss"], rel=1e-4)
    assert torchft["wire"] >= torchft["sync_bytes"]  # Gloo's ring at M=2 sends every byte it was handed
    assert neuroray["wire"] > 0
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ln for ln in leftovers.splitlines() if ln.startswith("nuh")]
