"""Issue #19 goal 6: every example the README shows runs, on the 2-core machine it describes.

The commands are read from README.md itself (the configuration block and the "Other entry points"
table), so an example edited there is the example tested here. They run as a user runs them: from a
directory of their own, with a fresh HOME (so the first one builds the Genesis data), the venv's
python, and no PATH or PYTHONPATH set up by the test. Three things are adapted, and only these:
- training runs are shortened to 2 rounds of 4 inner steps (the options the example shows are kept);
- placeholders get real values: `/path/to/texts/` a directory of texts, `outputs/<run>/checkpoint` the
  checkpoint the first example wrote, `NODE` that run's first ledger node;
- `python -m neuroray.lab ...` needs root and namespaces; tests/test_lab.py runs it.
"""

import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_job_submit import _user_env
from neuroray.genesis import embedded_corpus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 900  # one shortened example on a loaded 2-core machine
SHORT = {"rounds": "2", "diloco.inner_steps": "4", "sample_tokens": "4", "progress_bar": "false"}


def _readme_commands() -> list[list[str]]:
    """Every `python -m neuroray.*` and `make demo` command of the README, as argument lists: the
    configuration block's lines, and each row of the entry-point table (a row's `(or `x`)` alternative is
    the row's module with `x`; `a\\|b` alternatives each; `[...]` optional arguments left out)."""
    text = (REPO / "README.md").read_text()
    config_block = text.split("## Configuration", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line) for line in config_block.splitlines() if line.strip()]
    table = text.split("## Other entry points", 1)[1].split("\n\n", 2)[1]
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        first, *others = re.findall(r"`([^`]+)`", row[2:].split(" | ", 1)[0])
        base = shlex.split(re.sub(r"\[(?:[^][]|\[[^]]*\])*\]", "", first).replace("\\|", "|"))
        variants = [base] + [base[:3] + shlex.split(o) for o in others if not o.startswith("python")]
        for v in variants:
            commands += _alternatives(v)
    return commands


def _alternatives(args: list[str]) -> list[list[str]]:
    for i, a in enumerate(args):
        if "|" in a:
            return [x for alt in a.split("|") for x in _alternatives(args[:i] + [alt] + args[i + 1:])]
    return [args]


def _shorten(args: list[str], run_dir: Path, rounds: int = 2) -> list[str]:
    """A training example cut to a few rounds of 4 inner steps, in its own run_dir unless it names one."""
    keys = dict(a.split("=", 1) for a in args if "=" in a)
    short = dict(SHORT, rounds=str(rounds))
    if keys.get("diloco") == "sync":
        short.pop("diloco.inner_steps")  # sync is one inner step per round by definition
    if "diloco.warmup_steps" in keys:
        short["rounds"] = str(max(rounds, int(keys["diloco.warmup_steps"]) // 4 + 2))  # the warmup ends
    merged = [a for a in args if a.split("=", 1)[0] not in short] + [f"{k}={v}" for k, v in short.items()]
    return merged if "run_dir" in keys else merged + [f"run_dir={run_dir}"]


def _argv(args: list[str], root: Path, texts: Path, n: int) -> list[str] | None:
    """The argument list that runs README command ``args``; None for the lab (root only, tests/test_lab.py)."""
    py, run1 = sys.executable, root / "outputs" / "run1"
    if args[:2] == ["make", "demo"]:
        extra = shlex.split(next(a for a in args if a.startswith("ARGS=")).split("=", 1)[1])
        return [py, "-m", "neuroray.train", *_shorten(extra, root / "runs" / str(n))]
    assert args[0].endswith("python") and args[1] == "-m", args
    module, rest = args[2], args[3:]
    rest = [a.replace("/path/to/texts/", f"{texts}/").replace("outputs/<run>/checkpoint", str(run1 / "checkpoint"))
            .replace("out=hf-model", f"out={root / 'hf-model'}") for a in rest]
    if module == "neuroray.lab":
        return None
    if module == "neuroray.train" and not any(a.startswith("-") for a in rest):
        rounds = 3 if "resume=true" in rest else 2  # a resumed run goes on past the 2 rounds it had
        return [py, "-m", module, *_shorten(rest, root / "runs" / str(n), rounds)]
    if module == "neuroray.ledger":
        if rest[0] in ("stake", "unstake"):
            rest = [rest[0], _first_node(run1 / "ledger.sqlite"), "0.001"]
        return [py, "-m", module, "--ledger", str(run1 / "ledger.sqlite"), *rest]
    return [py, "-m", module, *rest]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    (root / "home").mkdir()
    texts = root / "texts"  # a user's directory of text files: 1.5 MB of the embedded corpus
    texts.mkdir()
    docs = embedded_corpus(root / "corpus-cache")
    for i in range(0, 1500, 100):
        (texts / f"part{i // 100}.txt").write_text("\n\n".join(docs[i:i + 100]))
    env = _user_env(root / "home")
    return root, env, texts


def _run(argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert p.returncode == 0, f"{shlex.join(argv)} exited {p.returncode}:\n{(p.stdout + p.stderr)[-4000:]}"
    return p


def test_the_readme_examples_run(user):
    root, env, texts = user
    commands = _readme_commands()
    assert len(commands) >= 20, commands  # the parser found the table
    # `run_dir=outputs/run1 resume=true` continues a run: its user made that run first
    _run([sys.executable, "-m", "neuroray.train", *_shorten(["run_dir=outputs/run1"], root)], root, env)
    done = []
    for n, args in enumerate(commands):
        argv = _argv(args, root, texts, n)
        if argv is not None:
            _run(argv, root, env)
            done.append(shlex.join(args))
    assert any("swarm=router" in d for d in done) and any("neuroray.export" in d for d in done), done


def _first_node(path: Path) -> str:
    with sqlite3.connect(path) as db:
        # a node that earned (the README's NODE): the spot-check validator's account may hold nothing
        return db.execute("SELECT node_id FROM accounts WHERE balance > 0 ORDER BY node_id LIMIT 1").fetchone()[0]
