"""Streaming DiLoCo (Douillard et al. 2025): sync fragments of every range at staggered times.

With ``diloco.streaming_fragments=F`` each range's layers are cut into F consecutive groups, its
*fragments*. Fragment i runs its outer step after the inner steps t with ``(t - i*H/F) % H == 0``: one
fragment every H/F steps, each fragment still once per H. So every holder sends 1/F of its range at a
time, F times as often: the peak bytes of one sync fall by about F while the bytes per H stay the same.

Parameters are laid out in the flat vector as embedding, layers in order, final norm, LM head, so a
fragment is one contiguous slice ``[lo, hi)`` of the range's theta0: the embedding goes with the first
group of layers, the norm and head with the last.
"""

from __future__ import annotations

from typing import Iterable


def fragment_of(name: str, layers: tuple[int, int], fragments: int) -> int:
    """Fragment of the parameter ``name`` (a StageModule name) in a range holding ``layers = (lo, hi)``."""
    lo, hi = layers
    if name.startswith("layers."):
        return (int(name.split(".")[1]) - lo) * fragments // (hi - lo)
    if name.startswith("embed."):
        return 0
    return fragments - 1  # final norm and LM head


def fragment_slices(params: Iterable[tuple[str, int]], layers: tuple[int, int], fragments: int) -> list[tuple[int, int]]:
    """``[(lo, hi)]`` per fragment in the flat parameter vector, from ``(name, numel)`` in vector order.

    Raises ValueError when the range has fewer layers than fragments (a fragment would hold no layer)
    or when the layout is not embedding, layers, norm/head (a fragment would not be one slice)."""
    if layers[1] - layers[0] < fragments:
        raise ValueError(f"diloco.streaming_fragments={fragments} exceeds the {layers[1] - layers[0]} layers of "
                         f"range {layers[0]}-{layers[1] - 1}; use at most that many fragments")
    bounds, offset, current = [0], 0, 0
    for name, numel in params:
        f = fragment_of(name, layers, fragments)
        if f < current:
            raise ValueError(f"parameter {name} is out of fragment order; fragments must be contiguous slices")
        while current < f:
            bounds.append(offset)
            current += 1
        offset += numel
    bounds += [offset] * (fragments + 1 - len(bounds))
    return list(zip(bounds[:-1], bounds[1:]))


def due_fragment(done: int, inner_steps: int, fragments: int) -> int | None:
    """The fragment whose outer step runs after ``done`` inner steps (>= 1), or None.

    ``fragments=1`` is plain DiLoCo: fragment 0 (the whole range) every H steps."""
    every = inner_steps // fragments
    if done <= 0 or done % every:
        return None
    return (done // every) % fragments
