"""Where Genesis text comes from, read through HF ``datasets`` in streaming mode.

Sources (``data.source``):

* ``embedded`` — text that ships with Python: every pydoc topic (``pydoc_data.topics``) plus the module,
  class and function docstrings of the standard library, read by parsing the ``.py`` files with
  :mod:`ast` (stdlib modules are never imported: some, like ``antigravity``, act on import). Collected
  once into a JSONL file in the local cache, then read like any JSONL source.
* local files — ``.txt``/``.text``/``.md`` (each paragraph, i.e. text between blank lines, is a
  document), ``.json``/``.jsonl`` and ``.parquet`` (the ``data.text_field`` column); a file, a directory
  (recursively) or a glob, read in sorted path order.
* ``hf:<name>`` — a Hugging Face Hub dataset (``data.hub_config``, ``data.hub_split``), when the network
  allows.

Everything streams: documents are produced batch by batch, never all held in memory, so a corpus larger
than RAM builds. A :class:`Source` is re-iterable (each ``iter()`` reads it anew), since a build reads
the text twice: once to train the tokenizer, once to encode it.
"""

from __future__ import annotations

import ast
import codecs
import glob
import json
import os
import platform
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from neuroray.errors import DataError
from neuroray.genesis.fetch import DEFAULT_CACHE_DIR
from neuroray.genesis.store import atomic_write

EMBEDDED = "embedded"
HUB_PREFIX = "hf:"
MIN_DOC_CHARS = 40  # embedded corpus: shorter docstrings are mostly "Return x." noise
_BATCH = 1000  # documents per datasets batch: amortises the per-batch Arrow -> Python conversion
_CHUNK_BYTES = 1 << 20  # text/json read size: bounds memory per file (datasets' default is 10 MB)
BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet"}
ENCODING_ERRORS = ("strict", "replace", "ignore")

# Directory names under the stdlib that hold tests, third-party code, generated codecs (the same
# boilerplate docstring a hundred times) or demos rather than prose.
_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "lib2to3", "turtledemo",
    "ensurepip", "encodings", "__pycache__", "lib-dynload",
})
_CORPUS_VERSION = 1  # bump when the extraction rules change, so stale caches are not reused


# ---------------------------------------------------------------- the embedded corpus


def _docstrings(source: str) -> Iterator[str]:
    """Module, class and function docstrings of one source file, in source order."""
    tree = ast.parse(source)
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))  # ast.walk is breadth-first; read in file order
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


def embedded_corpus_file(cache_dir: str | Path) -> Path:
    """The embedded corpus as JSONL (``{"text": ...}`` a line) in ``cache_dir``, collected on first use.

    Collecting takes seconds, so the file is kept, keyed by the Python version (the text differs
    between versions). Written atomically: a concurrent reader sees no file or a complete one.
    """
    path = Path(cache_dir).expanduser() / f"embedded-py{platform.python_version()}-v{_CORPUS_VERSION}.jsonl"
    if not path.is_file():
        lines = (json.dumps({"text": doc}, ensure_ascii=False) for doc in _collect_embedded())
        atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def embedded_corpus(cache_dir: str | Path) -> list[str]:
    """English text that ships with Python (pydoc topics + stdlib docstrings, a few MB), in a fixed order."""
    with embedded_corpus_file(cache_dir).open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """A resolved ``data.source``: iterate it for its documents (each iteration reads it anew)."""

    spec: str
    kind: str  # "embedded" | "files" | "hub"
    files: tuple[Path, ...] = ()
    text_field: str = "text"
    encoding_errors: str = "strict"
    hub_config: str = ""
    hub_split: str = "train"
    cache_dir: str = DEFAULT_CACHE_DIR

    def __iter__(self) -> Iterator[str]:
        return iter_documents(self)

    @property
    def name(self) -> str:
        """A short human name (the dataset directory's prefix)."""
        if self.kind == EMBEDDED:
            return EMBEDDED
        if self.kind == "hub":
            return self.spec[len(HUB_PREFIX):]
        return Path(self.spec).expanduser().stem or "data"

    def key(self) -> dict:
        """What identifies this text: an edited file (size, mtime) or another Python makes a new dataset."""
        base = {"text_field": self.text_field, "encoding_errors": self.encoding_errors}
        if self.kind == EMBEDDED:
            return {**base, "source": EMBEDDED, "python": platform.python_version(), "corpus": _CORPUS_VERSION}
        if self.kind == "hub":
            return {**base, "hub": self.spec[len(HUB_PREFIX):], "config": self.hub_config, "split": self.hub_split}
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in self.files]
        return {**base, "files": stats}

    def describe(self) -> str:
        if self.kind == EMBEDDED:
            return f"embedded (Python {platform.python_version()} pydoc topics + stdlib docstrings)"
        if self.kind == "hub":
            return f"{self.spec} (config {self.hub_config or 'default'}, split {self.hub_split})"
        return f"{self.spec} ({len(self.files)} file{'s' * (len(self.files) != 1)})"


def _local_files(spec: str) -> tuple[Path, ...]:
    path = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        found = [Path(p) for p in glob.glob(str(path), recursive=True)]
    elif path.is_dir():  # hidden files (editor swap files, .git) are not corpus
        found = [p for p in path.rglob("*") if not any(part.startswith(".") for part in p.relative_to(path).parts)]
    elif path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise DataError(f"data.source={spec} is not one of {', '.join(sorted(BUILDERS))}; convert it or "
                            "use data.source=embedded")
        return (path.absolute(),)
    else:
        raise DataError(f"data.source={spec} does not exist; point it at a text/json/jsonl/parquet file, a directory "
                        "or glob of them, hf:<hub dataset>, or use data.source=embedded")
    files = sorted(p.absolute() for p in found if p.is_file() and p.suffix.lower() in BUILDERS)
    if not files:
        raise DataError(f"data.source={spec} holds no {'/'.join(sorted(BUILDERS))} files; add some or use "
                        "data.source=embedded")
    return tuple(files)


def open_source(cfg) -> Source:
    """Resolve ``cfg.source`` (a DataConfig) eagerly, so a bad path fails here and not deep inside a build."""
    if cfg.encoding_errors not in ENCODING_ERRORS:
        raise DataError(f"data.encoding_errors={cfg.encoding_errors} must be one of {ENCODING_ERRORS}")
    common = {"text_field": cfg.text_field, "encoding_errors": cfg.encoding_errors, "cache_dir": cfg.cache_dir}
    if cfg.source == EMBEDDED:
        return Source(EMBEDDED, EMBEDDED, **common)
    if cfg.source.startswith(HUB_PREFIX):
        if not cfg.source[len(HUB_PREFIX):]:
            raise DataError("data.source=hf: names no dataset; write data.source=hf:<owner>/<name>")
        return Source(cfg.source, "hub", hub_config=cfg.hub_config, hub_split=cfg.hub_split, **common)
    return Source(cfg.source, "files", _local_files(cfg.source), **common)


# ---------------------------------------------------------------- reading


def _invalid_utf8_offset(path: Path) -> int | None:
    """Byte offset of the first invalid UTF-8 sequence in ``path``, or None if it is all valid."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return offset - pending + exc.start
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return offset - len(decoder.getstate()[0])
    return None


def _load_kwargs(builder: str, source: Source) -> dict:
    if builder == "text":
        return {"sample_by": "paragraph", "encoding_errors": source.encoding_errors, "chunksize": _CHUNK_BYTES}
    if builder == "json" and source.encoding_errors != "strict":
        # The json builder only applies encoding_errors when the encoding is not spelled "utf-8";
        # "utf_8" is the same codec under another name, so bad bytes are replaced/ignored as asked.
        return {"encoding": "utf_8", "encoding_errors": source.encoding_errors, "chunksize": _CHUNK_BYTES}
    if builder == "json":
        return {"chunksize": _CHUNK_BYTES}
    if builder == "parquet":
        return {"columns": [source.text_field]}
    return {}


def _read_file(path: Path, source: Source) -> Iterator[str]:
    """Documents of one file. One ``datasets`` load per file (a few ms): files of one corpus may carry
    different extra columns, which one multi-file load would refuse, and errors can name the file."""
    import datasets

    builder = BUILDERS[path.suffix.lower()]
    field = "text" if builder == "text" else source.text_field
    if path.stat().st_size == 0:
        return  # the json builder fails on empty files; an empty file simply holds no documents
    try:
        ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True,
                                   **_load_kwargs(builder, source))
        for batch in ds.iter(batch_size=_BATCH):
            if field not in batch:
                raise DataError(f"{path} has no {field!r} field (it has {sorted(batch)}); set data.text_field "
                                "to the column that holds the text")
            for doc in batch[field]:
                if doc is None:
                    continue
                if not isinstance(doc, str):
                    raise DataError(f"{path}: field {field!r} holds {type(doc).__name__} values, not text; "
                                    "set data.text_field to a text column")
                if builder == "text":
                    doc = doc.strip()  # paragraphs keep the stray newlines around blank-line runs
                if doc.strip():
                    yield doc
    except DataError:
        raise
    except UnicodeDecodeError:
        offset = _invalid_utf8_offset(path)
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {offset}); re-encode it as UTF-8, "
                        "or set data.encoding_errors=replace to substitute U+FFFD") from None
    except StopIteration:
        return  # the json builder's schema probe found no rows: a whitespace-only file
    except Exception as exc:  # pyarrow/json parse errors: the file is malformed
        text = " ".join(str(exc).split())[:160]
        raise DataError(f"cannot read {path} as {builder} ({type(exc).__name__}: {text}); fix the file or "
                        "remove it from data.source") from None


def _read_hub(source: Source) -> Iterator[str]:
    import datasets

    name = source.spec[len(HUB_PREFIX):]
    try:
        ds = datasets.load_dataset(name, source.hub_config or None, split=source.hub_split, streaming=True)
        for batch in ds.iter(batch_size=_BATCH):
            if source.text_field not in batch:
                raise DataError(f"Hub dataset {name} has no {source.text_field!r} column (it has {sorted(batch)}); "
                                "set data.text_field")
            yield from (d for d in batch[source.text_field] if isinstance(d, str) and d.strip())
    except DataError:
        raise
    except Exception as exc:  # offline, unknown name, bad config/split: all mean "cannot read this source"
        raise DataError(f"cannot read Hub dataset {name} ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
                        "check the name, data.hub_config, data.hub_split and the network, or use a local "
                        "source") from None


def iter_documents(source: Source) -> Iterator[str]:
    """The non-empty documents of ``source``, streamed, in a fixed order."""
    if source.kind == EMBEDDED:
        files = [embedded_corpus_file(Path(source.cache_dir).expanduser() / "corpus")]
    elif source.kind == "hub":
        yield from _read_hub(source)
        return
    else:
        files = list(source.files)
    for path in files:
        yield from _read_file(path, source)
