"""Hop rechecks under swarm routing, without Ray (neuroray/training/hop_routes.py): 3 replicas x 3 stages of real
holders, one routed inner step run by hand in which each microbatch crosses holders of different replicas (as the
router sends it), the router's flights built from real route-state objects, every owned microbatch re-executed on
another holder of its range and judged by route; and which Drivers the spot checks excuse."""

import random

import torch

from neuroray.swarm.route_state import Flight, HolderState
from neuroray.training.hop_audit import Routes, data_findings, draw_checks, inputs_for, judge
from neuroray.training.hop_routes import excused_drivers, routes_of
from tests.test_hop_recheck import TOL, V, S, R, _swarm

N = 6  # microbatches of the step (2 per Driver)
HEDGED, RECOMPUTED = 0, 1  # mb 0: range 1's forward hedged (the loser ran it too); mb 1: range 1's backward redone


def _path(mb: int) -> tuple[int, int, int]:
    """The holder index per range for ``mb``: never one replica's chain."""
    return mb % R, (mb + 1) % R, (mb + 2) % R


def _ring(mb: int, shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Microbatch ``mb`` of the shared ring (a seeded generator stands for the shards); ``shift``: another ring."""
    gen = torch.Generator().manual_seed(1000 * shift + mb)
    return torch.randint(0, V, (2, 8), generator=gen), torch.randint(0, V, (2, 8), generator=gen)


def _routed_step(swarm, wrong_data: int | None = None) -> tuple[dict, dict]:
    """One inner step routed by hand; the holders' records and the router's flights (who ran what, the loss)."""
    states = [[HolderState(swarm[i][s], s, i) for i in range(R)] for s in range(S)]
    flights = {}
    for mb in range(N):
        a, b, c = _path(mb)
        x, labels = _ring(mb, shift=int(a == wrong_data))
        f = Flight(mb, [None] * S, [None] * S, [None] * S)
        act1 = swarm[a][0].forward(mb, x)
        act2 = swarm[b][1].forward(mb, act1)
        if mb == HEDGED:  # a hedge of range 1's forward that lost the race: it ran, its output was not passed on
            swarm[(b + 1) % R][1].forward(mb, act1)
        loss, g2 = swarm[c][2].forward_backward(mb, act2, labels, 1.0)
        if mb == RECOMPUTED:  # range 1's backward taken back and recomputed from its input on another holder
            g1, _ = swarm[(b + 1) % R][1].recompute_backward(mb, act1, g2)
            f.trained[1] = states[1][(b + 1) % R]
        else:
            g1 = swarm[b][1].backward(mb, g2)
            f.trained[1] = states[1][b]
        swarm[a][0].backward(mb, g1)
        f.fwd[0], f.fwd[1], f.trained[0], f.trained[2] = states[0][a], states[1][b], states[0][a], states[2][c]
        f.loss = loss
        flights[mb] = f
    for p in swarm:
        for h in p:
            h.step(mean=True)
    return {(s, i): swarm[i][s].take_hop_record() for i in range(R) for s in range(S)}, flights


def _recheck(swarm, records, route, losses) -> tuple[list, list]:
    draws = draw_checks(records, S, list(range(R)), 1.0, random.Random(0), route)
    findings = []
    for d in draws:
        inputs, forged = inputs_for(records, d, S, route)
        if forged is not None:
            findings.append(forged)
        elif inputs is not None:
            out = swarm[d.checker][d.stage].reexecute(inputs["x"], inputs["grad"], inputs["labels"], inputs["scale"])
            findings.append(judge(records, d, out, losses, S, TOL, route))
    return draws, [f for f in findings if f is not None]


def test_routes_come_from_the_flights_and_only_owned_microbatches_are_drawn(tmp_path):
    swarm = _swarm(tmp_path, {})
    records, flights = _routed_step(swarm)
    route, losses = routes_of(flights, S)
    assert route.fwd[2] == route.bwd[2] == _path(2) and losses[_path(2)[2], 2] == flights[2].loss
    assert route.owner(RECOMPUTED, 1) is None and route.owner(RECOMPUTED, 0) == _path(RECOMPUTED)[0]
    draws, findings = _recheck(swarm, records, route, losses)
    assert findings == []
    drawn = {(d.stage, d.replica, d.mb) for d in draws}
    # the hedge's loser holds a record of mb 0 on range 1, but its output went nowhere: not drawn
    loser = (_path(HEDGED)[1] + 1) % R
    assert HEDGED in records[1, loser]["sent"] and (1, loser, HEDGED) not in drawn
    assert (1, _path(HEDGED)[1], HEDGED) in drawn
    # every microbatch's every range, but range 1 of the recomputed one
    assert len(drawn) == N * S - 1 and all(d.checker != d.replica for d in draws)


def test_a_tamperer_is_blamed_by_route_and_the_drivers_it_spoiled_are_excused(tmp_path):
    # r2-s2 computes its first microbatch (nothing to resend yet), then resends that one's loss and gradient
    swarm = _swarm(tmp_path, {"r1-s1": ("tamper_activations", -1.0), "r2-s2": ("lazy_stale", 0.0)})
    records, flights = _routed_step(swarm)
    route, losses = routes_of(flights, S)
    _, findings = _recheck(swarm, records, route, losses)
    blamed = {f.slot for f in findings}
    assert blamed == {"r1-s1", "r2-s2"}, findings
    # the tamperer's receivers are other replicas' Validators (the router sent its activations there)
    assert {f.mb for f in findings if f.slot == "r1-s1"} == {mb for mb in range(N) if _path(mb)[1] == 1}
    assert {f.mb for f in findings if f.slot == "r2-s2"} == {3}
    assert all(f.direction in ("fwd", "bwd", "loss") and f.error > 0.5 for f in findings)
    failed = {(f.stage, f.replica) for f in findings}
    committed = {r: [2 * r, 2 * r + 1] for r in range(R)}
    # microbatches 0 and 3 went forward through r1-s1 and r2-s2: Drivers 0 and 1 committed their losses, not 2
    assert [mb for mb in range(N) if _path(mb)[1] == 1 or _path(mb)[2] == 2] == [0, 3]
    assert excused_drivers(route, committed, failed) == {(0, 0), (0, 1)}
    # a Driver found faulty itself is not excused
    assert (0, 0) not in excused_drivers(route, committed, failed | {(0, 0)})


def test_a_driver_reading_off_the_shared_ring_is_blamed(tmp_path):
    swarm = _swarm(tmp_path, {})
    records, _ = _routed_step(swarm, wrong_data=2)
    found = data_findings(records, list(range(R)), lambda r, position: _ring(position), shared=True)
    assert [(f.slot, f.direction) for f in found] == [("r2-s0", "data")], found
    assert "position 2 of the shared ring" in found[0].detail


def test_a_route_owner_is_who_ran_both_ways():
    route = Routes({0: (1, 2), 1: (0, 1)}, {0: (1, 0), 1: (0, 1)})
    assert [route.owner(0, s) for s in range(2)] == [1, None] and [route.owner(1, s) for s in range(2)] == [0, 1]
    assert route.owner(7, 0) is None and route.holder(0, 5, "fwd") is None
