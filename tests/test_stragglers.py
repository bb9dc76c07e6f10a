"""The straggler rule: a holder far slower per microbatch than the other holders of its range is paid 0."""

import pytest

from neuroray.config import PonwConfig
from neuroray.errors import ConfigError
from neuroray.ponw.rules import Rules
from neuroray.ponw.stragglers import StragglerWatch, straggler_factor, stragglers


def test_a_slow_walker_is_named_against_the_median_of_its_range_and_no_honest_holder_is():
    paces = {(0, 0): 0.010, (0, 1): 0.012, (0, 2): 0.031,  # range 0: replica 2 walks at 3x
             (1, 0): 0.020, (1, 1): 0.018, (1, 2): 0.021}  # range 1: honest spread, slower layers
    named = stragglers(paces, factor=2.0)
    assert set(named) == {(0, 2)}
    assert named[0, 2] == pytest.approx(0.031 / 0.011)
    assert stragglers(paces, factor=3.0) == {}  # 2.8x is under a factor of 3
    assert stragglers(paces, factor=0) == {}  # off


def test_two_holders_compare_with_each_other_and_one_holder_with_no_one():
    assert set(stragglers({(0, 0): 0.01, (0, 1): 0.03}, 2.0)) == {(0, 1)}  # the fast one is not named
    assert stragglers({(0, 0): 0.03}, 2.0) == {}
    # no pace measured (a holder that did nothing, or one the router never timed) names no one
    assert stragglers({(0, 0): 0.01, (0, 1): 0.0, (0, 2): float("inf")}, 2.0) == {}


def test_a_holder_is_named_only_after_rounds_in_a_row_over_the_factor():
    watch = StragglerWatch(factor=2.5, rounds=2)
    honest = {(0, 0): 0.010, (0, 1): 0.011, (0, 2): 0.012}
    blip = {**honest, (0, 1): 0.030}  # one slow round: descheduled, not slow
    walk = {**honest, (0, 2): 0.036}
    assert watch.observe(blip) == {} and set(watch.suspects) == {(0, 1)}  # its pay waits in escrow
    assert watch.observe(honest) == {} and watch.suspects == {}  # the streak is broken: released
    assert watch.observe(blip) == {}
    assert watch.observe(walk) == {} and set(watch.suspects) == {(0, 2)}  # r1's streak ended; r2's starts
    assert set(watch.observe(walk)) == {(0, 2)} and watch.suspects == {}  # the second slow round in a row
    assert set(watch.observe(walk)) == {(0, 2)}  # and every further one
    assert watch.observe(honest) == {}


@pytest.mark.parametrize("factor", [1.0, 0.5, -1.0, float("nan"), float("inf")])
def test_a_factor_that_would_name_honest_holders_is_refused(factor):
    with pytest.raises(ConfigError, match="ponw.straggler_factor"):
        Rules.from_config(PonwConfig(straggler_factor=factor))
    with pytest.raises(ConfigError, match="ponw.straggler_rounds"):
        Rules.from_config(PonwConfig(straggler_rounds=0))


def test_the_default_factor_follows_the_clock_that_times_the_calls():
    Rules.from_config(PonwConfig())  # null: accepted
    assert straggler_factor(None, "fixed") == 1.5  # paired calls (training/call_clock.py)
    assert straggler_factor(None, "router") == 2.5  # the router's hop times
    assert straggler_factor(3.0, "fixed") == straggler_factor(3.0, "router") == 3.0  # a value set applies to both
    assert straggler_factor(0.0, "fixed") == 0.0  # off
