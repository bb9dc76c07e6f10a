"""A pinned Genesis manifest (issue 21, item 9): a run that pins the manifest's hash, or trusts a
publisher's signature, refuses a dataset whose manifest and shards were replaced together."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from neuroray.config import TrainConfig
from neuroray.config_checks import validate
from neuroray.errors import ConfigError
from neuroray.genesis import dataset_url, ensure_dataset
from neuroray.genesis.manifest import ManifestPinError, check_pinned, sign_manifest
from neuroray.genesis.store import Store
from neuroray.ponw.identity import Identity
from tests.test_genesis_corpus import corpus_file, quiet, small_cfg

__all__ = ["corpus_file"]  # a fixture, used by name

PUBLISHER = Identity.from_secret(hashlib.sha256(b"genesis test publisher").digest())


def _replace_dataset(root: Path) -> None:
    """What whoever controls the store can do: new shard bytes, and a manifest that vouches for them."""
    manifest = json.loads((root / "manifest.json").read_text())
    shard = manifest["shards"][0]
    data = np.frombuffer((root / shard["file"]).read_bytes(), dtype="<u2").copy()
    data[:] = data[::-1]  # the attacker's tokens
    (root / shard["file"]).write_bytes(data.tobytes())
    shard["sha256"] = hashlib.sha256(data.tobytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def test_a_pinned_manifest_refuses_a_replaced_dataset(corpus_file, tmp_path):
    cfg = small_cfg(tmp_path, corpus_file)
    root, manifest = ensure_dataset(cfg, log=quiet)
    pin = check_pinned(Store(dataset_url(cfg)), hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest())
    pinned = replace(cfg, manifest_sha256=pin)
    assert ensure_dataset(pinned, log=quiet)[1] == manifest  # the pinned dataset is used as it is
    _replace_dataset(Path(root))
    assert ensure_dataset(cfg, log=quiet)[1] != manifest  # unpinned, the replacement is accepted
    with pytest.raises(ManifestPinError, match="was replaced") as err:
        ensure_dataset(pinned, log=quiet)  # pinned: refused, and never rebuilt over
    assert "\n" not in str(err.value) and "data.manifest_sha256" in str(err.value)


def test_a_publisher_signature_refuses_a_replaced_dataset(corpus_file, tmp_path):
    cfg = small_cfg(tmp_path, corpus_file)
    root, manifest = ensure_dataset(cfg, log=quiet)
    store = Store(dataset_url(cfg))
    trusted = replace(cfg, manifest_publisher=PUBLISHER.public_key.hex())
    with pytest.raises(ManifestPinError, match="manifest.sig is missing"):
        ensure_dataset(trusted, log=quiet)
    sign_manifest(store, PUBLISHER)
    assert ensure_dataset(trusted, log=quiet)[1] == manifest
    _replace_dataset(Path(root))
    with pytest.raises(ManifestPinError, match="signs another manifest"):
        ensure_dataset(trusted, log=quiet)
    sign_manifest(store, Identity.from_secret(b"\x05" * 32))  # the attacker signs with its own key
    with pytest.raises(ManifestPinError, match="not signed by publisher"):
        ensure_dataset(trusted, log=quiet)
    (Path(root) / "manifest.sig").write_bytes(b"{}")
    with pytest.raises(ManifestPinError, match="malformed"):
        ensure_dataset(trusted, log=quiet)


def test_pin_settings_are_checked():
    cfg = TrainConfig()
    for field, value in (("manifest_sha256", "ABC"), ("manifest_publisher", "04" + "00" * 32)):
        with pytest.raises(ConfigError, match=field):
            validate(replace(cfg, data=replace(cfg.data, **{field: value})))
