"""Where Genesis text comes from: the embedded corpus that ships with Python, or local files.

The embedded corpus needs no network: every pydoc topic (``pydoc_data.topics``) plus the module, class
and function docstrings of the standard library. Docstrings are read by parsing the ``.py`` sources with
:mod:`ast`; stdlib modules are never imported, because some (``antigravity``, ``this``) act on import.
"""

from __future__ import annotations

import ast
import json
import os
import platform
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

from neuroray.errors import DataError

MIN_DOC_CHARS = 40
EMBEDDED = "embedded"

# Directory names under the stdlib that hold tests, third-party code, generated codecs (the same
# boilerplate docstring a hundred times) or demos rather than prose. tkinter and idlelib stay: they
# are only parsed, never imported, and add ~10 % of the text.
_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "lib2to3", "turtledemo",
    "ensurepip", "encodings", "__pycache__", "lib-dynload",
})
_CORPUS_VERSION = 1  # bump when the extraction rules change, so stale caches are not reused


def _docstrings(source: str) -> Iterator[str]:
    """Module, class and function docstrings of one source file, in source order."""
    tree = ast.parse(source)
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    # ast.walk is breadth-first; sort by line so the text reads in file order.
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc


def _stdlib_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place, sorted, so the walk order is the same on every machine.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                yield Path(dirpath) / name


def _collect_embedded() -> list[str]:
    docs: list[str] = []
    try:
        from pydoc_data.topics import topics  # plain data module: safe to import
    except ImportError:  # some distro builds strip pydoc_data; docstrings alone still suffice
        topics = {}
    docs.extend(topics[key] for key in sorted(topics))
    for path in _stdlib_files(Path(sysconfig.get_paths()["stdlib"])):
        try:
            docs.extend(_docstrings(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue  # a few stdlib files are deliberately broken or non-UTF-8 fixtures
    return [d.strip() for d in docs if len(d.strip()) >= MIN_DOC_CHARS]


def embedded_corpus(cache_dir: str | Path) -> list[str]:
    """English text that ships with Python: pydoc topics + stdlib docstrings (a few MB).

    Collecting takes tens of seconds, so the result is cached in ``cache_dir`` as JSONL (one JSON string
    a line), keyed by the Python version since the text differs between versions. Deterministic order.
    """
    cache_dir = Path(cache_dir).expanduser()
    cache = cache_dir / f"embedded-py{platform.python_version()}-v{_CORPUS_VERSION}.jsonl"
    if cache.is_file():
        try:
            with cache.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # a damaged cache is just recollected
    docs = _collect_embedded()
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Temp file + rename: a concurrent reader sees either no cache or a complete one.
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".embedded-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        os.replace(tmp, cache)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return docs


def source_files(source: str | Path) -> list[Path]:
    """The ``.txt``/``.jsonl`` files a local source names, sorted; DataError if there are none."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix in (".txt", ".jsonl"):
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
        if files:
            return files
        raise DataError(f"data.source={source} holds no .txt or .jsonl files; add some or use data.source=embedded")
    if path.is_file():
        raise DataError(f"data.source={source} is neither .txt nor .jsonl; convert it or use data.source=embedded")
    raise DataError(
        f"data.source={source} does not exist; point it at a .txt/.jsonl file or a directory of them, "
        "or use data.source=embedded"
    )


def _read_txt(path: Path) -> Iterator[str]:
    # Paragraphs (runs of non-blank lines, separated by one or more blank lines) are documents.
    para: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                para.append(line.rstrip("\n"))
            elif para:
                yield "\n".join(para).strip()
                para = []
    if para:
        yield "\n".join(para).strip()


def _read_jsonl(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(
                    f"{path}:{lineno} is not a JSON object with a \"text\" field; fix or remove that line"
                ) from None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: \"text\" must be a string; fix or remove that line")
            if text.strip():
                yield text


def iter_documents(source: str, cache_dir: str | Path) -> Iterator[str]:
    """Documents of ``source``: ``"embedded"``, a ``.txt`` file, a ``.jsonl`` file, or a directory.

    In a ``.txt`` file each paragraph (text separated by blank lines) is one document; in ``.jsonl``
    each line's ``"text"`` field is. Directories are read recursively in sorted path order. Empty
    documents are skipped. An unknown path raises :class:`DataError` at the call, not on first use.
    """
    if source == EMBEDDED:
        return iter(embedded_corpus(cache_dir))
    files = source_files(source)  # eager, so a bad path fails here rather than deep inside a build
    return (doc for path in files for doc in (_read_txt(path) if path.suffix == ".txt" else _read_jsonl(path)))
