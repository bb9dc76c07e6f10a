"""The object store options of a locally started Ray (cluster.object_store_*)."""

import pytest

from neuroray.config import ClusterConfig
from neuroray.configure import load_config
from neuroray.errors import ConfigError
from neuroray.training.local_ray import object_store_options


def test_object_store_options_follow_the_config(tmp_path):
    assert object_store_options(ClusterConfig()) == {}
    opts = object_store_options(ClusterConfig(object_store_mb=512, object_store_dir=str(tmp_path)))
    assert opts == {"object_store_memory": 512 * 2**20, "_plasma_directory": str(tmp_path)}


def test_a_missing_store_directory_or_negative_size_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="object_store_dir=.*is not a directory"):
        object_store_options(ClusterConfig(object_store_dir=str(tmp_path / "absent")))
    with pytest.raises(ConfigError, match="object_store_mb=-1 must be >= 0"):
        load_config(["cluster.object_store_mb=-1"])
