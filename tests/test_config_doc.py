"""docs/config.md is generated from neuroray/config.py: it fails when the file is stale or a key has no meaning."""

import dataclasses
from pathlib import Path

from neuroray import config
from neuroray.cli.configdoc import field_comments, generate

ROOT = Path(__file__).resolve().parent.parent


def test_docs_config_md_is_current():
    assert (ROOT / "docs" / "config.md").read_text() == generate(), (
        "docs/config.md is stale: python -m neuroray.cli.configdoc > docs/config.md")


def test_every_key_has_a_type_default_and_meaning():
    sections = [f.default_factory for f in dataclasses.fields(config.TrainConfig)
                if f.default_factory is not dataclasses.MISSING]
    text = generate()
    for cls in (config.TrainConfig, *sections):
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            if cls is config.TrainConfig and f.default_factory is not dataclasses.MISSING:
                continue  # a section: its keys are documented one by one
            assert comments[f.name], f"{cls.__name__}.{f.name} needs a comment saying what it means"
            key = f.name if cls is config.TrainConfig else None
            assert key is None or f"| `{key}` | `{f.type}` |" in text
    assert len(sections) == 11
