"""Where a fixed model's layer ranges are cut: swarm.split_points, or balance by layers or by compute."""

import pytest

from neuroray.errors import ConfigError
from neuroray.configure import load_config
from neuroray.planner import scaling
from neuroray.swarm.swarm import stage_ranges


def test_the_default_split_is_equal_layer_counts():
    assert stage_ranges(load_config([]), 4096) == [(0, 2), (2, 4)]


def test_split_points_cut_where_given():
    assert stage_ranges(load_config(["swarm.split_points=[1]"]), 4096) == [(0, 1), (1, 4)]
    cfg = load_config(["model.n_layers=6", "swarm.num_stages=3", "swarm.split_points=[2,5]"])
    assert stage_ranges(cfg, 4096) == [(0, 2), (2, 5), (5, 6)]


def test_compute_balance_gives_the_head_its_weight():
    """The tiny model's head + loss cost about 2.5 layers: balanced by FLOPs, the last stage keeps one layer."""
    cfg = load_config(["swarm.balance=compute"])
    head = scaling.head_flops_per_token(cfg.model, 4096)
    layer = scaling.layer_flops_per_token(cfg.model, cfg.data.seq_len)
    assert 2 * layer < head < 3 * layer
    ranges = stage_ranges(cfg, 4096)
    assert ranges == [(0, 3), (3, 4)]
    cost = [(b - a) * layer + (head if b == 4 else 0) for a, b in ranges]
    even = [2 * layer, 2 * layer + head]
    assert max(cost) < max(even)
    # a tiny vocabulary makes the head cheap: the even split is the balanced one again
    assert stage_ranges(cfg, 64) == [(0, 2), (2, 4)]


@pytest.mark.parametrize("overrides, words", [
    (["swarm.split_points=[4]"], "must be increasing layer indices in [1, 3]"),
    (["swarm.split_points=[2,1]", "swarm.num_stages=3"], "must be increasing"),
    (["swarm.split_points=[1,2]"], "gives 3 stages but swarm.num_stages=2"),
    (["swarm.balance=flops"], "swarm.balance=flops must be layers or compute"),
    (["swarm.split_points=[2]", "model=auto"], "cannot be combined with model=auto"),
    (["swarm.start_grace_s=0"], "swarm.start_grace_s=0"),
    (["swarm.split_points=[3]", "diloco.streaming_fragments=2", "diloco.inner_steps=4"], "exceeds the 1 layers"),
])
def test_bad_split_config_is_one_clear_error(overrides, words):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(overrides)
    assert words in str(err.value)
