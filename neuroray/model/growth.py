"""Function-preserving growth: a bigger model that computes exactly what the smaller one did.

When the planner adopts a bigger architecture (neuroray.planner.cluster.UpgradeRule), existing
holders migrate their weights with these functions, so the loss does not jump.

**Width** d -> d' (with heads H -> H', KV heads, SwiGLU hidden f -> f'; the head size and the number of
query heads per KV head stay fixed, neuroray.planner.scaling). Tensors are embedded block-wise; every
new entry is either a *writer* (it writes into a new residual dimension or reads a new head / hidden
unit into the residual stream), set to zero, or a *reader* (it reads from a new dimension, or belongs
to a new head / hidden unit), drawn at random. Writers at zero keep the function exact; readers at
random keep it trainable (with both at zero every gradient of the new entries would be zero).

RMSNorm normalises over d_model, so zero-padding the residual stream alone would change it: with
h' = [h, 0], mean(h'^2) = mean(h^2) * d/d'. The residual stream is therefore scaled by
c = sqrt(d'/d) and the norm gains by 1/c::

    embedding, wo, w2 (everything that writes the residual): old block x c
    h' = [c h, 0]                 mean(h'^2) = c^2 * sum(h^2) / d' = mean(h^2)      (eps unchanged)
    RMSNorm'(h')[:d] = c h / rms(h) * g / c = RMSNorm(h)                          (gains g' = g / c)

so every norm output, and hence every attention score, SwiGLU activation and logit, is unchanged
(exactly, up to float rounding; no change of ``norm_eps`` is needed).

**Depth** L -> L': new layers are inserted evenly between the old ones (:func:`depth_layout`); a new
layer's output projections ``attn.wo`` and ``mlp.w2`` are zero, so the block is the identity
``x + 0 + 0``, while its other weights are random so that it starts learning at once.

All random entries come from generators seeded by ``(seed, new shape, parameter name)``, so every
holder of a range grows its copy identically (DiLoCo needs identical replicas). ``kind="delta"``
grows a vector that lives in parameter space but is a difference (a pseudo-gradient, the outer
momentum): the same linear map, with zero instead of random or constant fills. AdamW's moments grow
with :func:`grow_optimizer_state`. Running holders migrate with these functions
(neuroray.planner.upgrade). The vocabulary is grown by neuroray.model.vocab.
"""

from __future__ import annotations

import math
import re

import torch

from neuroray.config import ModelConfig
from neuroray.model.seeds import named_seed
from neuroray.model.stage import StageModule
from neuroray.planner.scaling import ffn_width, growth_blockers

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
# kind -> power p of the width scale c applied to old writer blocks (c^p) and norm gains (c^-p)
KINDS = {"weights": 1, "delta": 1, "grad": -1, "grad_sq": -2}
_NORMS = ("attn_norm.weight", "mlp_norm.weight")


def depth_layout(old_layers: int, new_layers: int) -> list[int | None]:
    """For each new layer index, the old layer it copies, or None for a new identity layer.

    The ``k``-th of the ``E = L' - L`` new layers goes right after old layer ``floor((k + 1) L / E) - 1``
    (before layer 0 if that is -1), which spreads them evenly: 16 -> 24 puts one after every second layer.
    """
    if new_layers < old_layers:
        raise ValueError(f"depth cannot shrink ({old_layers} -> {new_layers})")
    extra = new_layers - old_layers
    after: dict[int, int] = {}
    for k in range(extra):
        pos = (k + 1) * old_layers // extra - 1
        after[pos] = after.get(pos, 0) + 1
    layout: list[int | None] = [None] * after.get(-1, 0)
    for i in range(old_layers):
        layout.append(i)
        layout += [None] * after.get(i, 0)
    assert len(layout) == new_layers
    return layout


class _Grower:
    def __init__(self, old: ModelConfig, new: ModelConfig, seed: int, kind: str):
        blockers = growth_blockers(old, new)
        if blockers:
            raise ValueError("cannot grow function-preservingly: " + "; ".join(blockers))
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: use one of {', '.join(KINDS)}")
        self.old, self.new, self.seed, self.kind = old, new, seed, kind
        # Writers (embedding, wo, w2) scale by c^p, norm gains by c^-p: p = 1 for parameters and their
        # differences; gradients scale inversely (dL/d(c w) = dL/dw / c), so p = -1, and -2 for squares.
        c = math.sqrt(new.d_model / old.d_model)
        p = KINDS[kind]
        self.c, self.writer_scale, self.norm_scale = c, c**p, c**-p
        hd = old.d_model // old.n_heads
        self.q, self.q2 = old.n_heads * hd, new.n_heads * hd
        self.kv, self.kv2 = old.n_kv_heads * hd, new.n_kv_heads * hd
        self.f, self.f2 = ffn_width(old), ffn_width(new)
        self.d, self.d2 = old.d_model, new.d_model
        self.fills: dict[str, float] = {}  # grad_sq: value of new entries per tensor kind (see _typical_values)

    def _blank(self, shape: tuple[int, ...], key: str) -> torch.Tensor:
        """New entries that are not random: zero, or for squared gradients the tensor's typical value."""
        return torch.full(shape, self.fills.get(key, 0.0)) if self.kind == "grad_sq" else torch.zeros(shape)

    def _random(self, shape: tuple[int, ...], name: str, key: str) -> torch.Tensor:
        if self.kind != "weights":
            return self._blank(shape, key)
        tag = f"grow:{self.new.n_layers}x{self.new.d_model}:{name}"
        g = torch.Generator(device="cpu").manual_seed(named_seed(self.seed, tag))
        return torch.empty(shape).normal_(0.0, self.new.init_std, generator=g)

    def _norm(self, old: torch.Tensor | None, key: str) -> torch.Tensor:
        if self.kind == "weights":
            out = torch.full((self.d2,), 1.0 if old is None else 1.0 / self.c)
        else:
            out = self._blank((self.d2,), key)
        if old is not None:
            out[: self.d] = old.float() * self.norm_scale
        return out

    def _reader(self, old: torch.Tensor | None, rows: tuple[int, int], name: str, key: str) -> torch.Tensor:
        """[rows', d'] random, old block copied in: a matrix that reads the residual stream."""
        out = self._random((rows[1], self.d2), name, key)
        if old is not None:
            out[: rows[0], : self.d] = old.float()
        return out

    def _writer(self, old: torch.Tensor | None, cols: tuple[int, int], key: str) -> torch.Tensor:
        """[d', cols'] zero, old block x c copied in: a matrix that writes the residual stream."""
        out = torch.zeros(self.d2, cols[1]) if self.kind == "weights" else self._blank((self.d2, cols[1]), key)
        if old is not None:
            out[: self.d, : cols[0]] = old.float() * self.writer_scale
        return out

    def layer_tensor(self, suffix: str, old: torch.Tensor | None, name: str) -> torch.Tensor:
        """One tensor of a layer; ``old`` None: the tensor of a new identity layer."""
        if suffix in _NORMS:
            return self._norm(old, suffix)
        if suffix == "attn.wq.weight":
            return self._reader(old, (self.q, self.q2), name, suffix)
        if suffix in ("attn.wk.weight", "attn.wv.weight"):
            return self._reader(old, (self.kv, self.kv2), name, suffix)
        if suffix in ("mlp.w1.weight", "mlp.w3.weight"):
            return self._reader(old, (self.f, self.f2), name, suffix)
        if suffix == "attn.wo.weight":
            return self._writer(old, (self.q, self.q2), suffix)
        if suffix == "mlp.w2.weight":
            return self._writer(old, (self.f, self.f2), suffix)
        raise KeyError(f"unknown layer tensor {suffix!r}")

    def other_tensor(self, name: str, old: torch.Tensor) -> torch.Tensor:
        if name == "embed.weight":  # writes the residual stream: new columns zero, old ones x c
            out = torch.zeros(old.shape[0], self.d2) if self.kind == "weights" else self._blank((old.shape[0], self.d2), name)
            out[:, : self.d] = old.float() * self.writer_scale
            return out
        if name == "lm_head.weight":  # reads the final norm's output
            out = self._random((old.shape[0], self.d2), name, name)
            out[:, : self.d] = old.float()
            return out
        if name == "norm.weight":
            return self._norm(old, name)
        raise KeyError(f"unknown tensor {name!r}")


_LAYER_SUFFIXES = ("attn_norm.weight", "attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "attn.wo.weight",
                   "mlp_norm.weight", "mlp.w1.weight", "mlp.w3.weight", "mlp.w2.weight")


def _typical_values(state: dict) -> dict[str, float]:
    """Mean of each kind of tensor (a layer suffix, or a top-level name) over all layers in ``state``.

    New entries of AdamW's ``exp_avg_sq`` start at this value rather than 0: with 0, Adam's first
    update of every new entry is ``lr * sign(g)``-sized, all at once, which shows as a loss bump;
    with the tensor's typical second moment the new entries move at the pace the old ones do.
    """
    sums: dict[str, list] = {}
    for k, v in state.items():
        m = _LAYER.match(k)
        key = m.group(2) if m else k
        acc = sums.setdefault(key, [0.0, 0])
        acc[0] += float(v.double().sum())
        acc[1] += v.numel()
    return {k: s / n for k, (s, n) in sums.items() if n}


def grow_state_dict(state: dict, old: ModelConfig, new: ModelConfig, *, seed: int = 0, layers=None,
                    kind: str = "weights") -> dict:
    """Grow a state dict keyed like :class:`StageModule` (global layer indices) from ``old`` to ``new``.

    ``layers``: the NEW global layer indices to produce (default: every new layer whose source old
    layer is in ``state``, plus every new identity layer, i.e. everything for a monolith). A new layer
    copied from an old one needs that old layer in ``state``. Embedding, final norm and head are grown
    when present. Tensors come back in float32 (the holders' dtype).
    """
    g = _Grower(old, new, seed, kind)
    layout = depth_layout(old.n_layers, new.n_layers)
    present = {int(m.group(1)) for k in state if (m := _LAYER.match(k))}
    if kind == "grad_sq":
        g.fills = _typical_values(state)
    if layers is None:
        layers = [j for j, src in enumerate(layout) if src is None or src in present]
    out: dict[str, torch.Tensor] = {}
    for j in layers:
        src = layout[j]
        if src is not None and src not in present:
            raise KeyError(f"new layer {j} copies old layer {src}, which is not in the given state dict")
        for suffix in _LAYER_SUFFIXES:
            name = f"layers.{j}.{suffix}"
            old_t = None if src is None else state[f"layers.{src}.{suffix}"]
            out[name] = g.layer_tensor(suffix, old_t, name)
    for name in ("embed.weight", "norm.weight", "lm_head.weight"):
        if name in state:
            out[name] = g.other_tensor(name, state[name])
    return out


def new_ranges_for(old_ranges: list[tuple[int, int]], old_layers: int, new_layers: int) -> list[tuple[int, int]]:
    """The old split carried over: each new layer joins the stage of the old layer before it."""
    layout = depth_layout(old_layers, new_layers)
    stage_of_old = {i: s for s, (a, b) in enumerate(old_ranges) for i in range(a, b)}
    owner, current = [], 0
    for src in layout:
        current = stage_of_old[src] if src is not None else current
        owner.append(current)
    return [(owner.index(s), len(owner) - owner[::-1].index(s)) for s in range(len(old_ranges))]


def grow_stages(stage_states: list[dict], old: ModelConfig, new: ModelConfig, new_ranges: list[tuple[int, int]],
                *, seed: int = 0, kind: str = "weights") -> list[dict]:
    """Grow a whole pipeline: merge the stages' state dicts, grow, split into ``new_ranges``.

    Stage 0 gets the embedding, the last stage the final norm and head, as
    :func:`neuroray.model.stage.build_stage` expects. ``new_ranges`` may differ from the old split
    (the planner repartitions the bigger model); :func:`new_ranges_for` keeps the old one.
    """
    merged: dict = {}
    for st in stage_states:
        merged.update(st)
    if new_ranges[0][0] != 0 or new_ranges[-1][1] != new.n_layers or any(
            a[1] != b[0] for a, b in zip(new_ranges, new_ranges[1:])):
        raise ValueError(f"new_ranges {new_ranges} do not tile the {new.n_layers} layers of the new model")
    out = []
    for s, (a, b) in enumerate(new_ranges):
        part = grow_state_dict(merged, old, new, seed=seed, layers=range(a, b), kind=kind)
        keep = {k: v for k, v in part.items() if k.startswith("layers.")}
        if s == 0:
            keep["embed.weight"] = part["embed.weight"]
        if s == len(new_ranges) - 1:
            keep["norm.weight"], keep["lm_head.weight"] = part["norm.weight"], part["lm_head.weight"]
        out.append(keep)
    return out


def grow_module(module: StageModule, new: ModelConfig, *, seed: int = 0) -> StageModule:
    """A grown copy of ``module``: the monolith, or any stage when only the width grows.

    With new layers a single stage cannot know which of them are its own: use :func:`grow_stages`.
    """
    old = module.cfg
    whole = module.layer_start == 0 and module.layer_end == old.n_layers and module.has_embedding and module.has_head
    if new.n_layers != old.n_layers and not whole:
        raise ValueError("depth growth of one stage needs the whole pipeline: use grow_stages")
    start, end = (0, new.n_layers) if whole else (module.layer_start, module.layer_end)
    grown = StageModule(new, module.vocab_size, start, end, has_embedding=module.has_embedding,
                        has_head=module.has_head, seed=seed)
    state = grow_state_dict(module.state_dict(), old, new, seed=seed, layers=range(start, end))
    grown.load_state_dict(state)
    return grown.to(next(module.parameters()).device)


def grow_optimizer_state(opt_state: dict, old_names: list[str], new_names: list[str], old: ModelConfig,
                         new: ModelConfig, layers=None) -> dict:
    """Grow an ``AdamW.state_dict()`` to the grown model, so the inner optimizer carries on smoothly.

    ``old_names`` / ``new_names``: parameter names in the order the optimizers hold them (the modules'
    ``named_parameters()`` order). Works for the monolith and for one holder whose new range is its
    old one plus the identity layers inserted into it (:func:`new_ranges_for`); a parameter whose
    source this optimizer never held gets no state (AdamW starts it fresh). ``exp_avg`` is grown as a gradient (``kind="grad"``), ``exp_avg_sq``
    as a squared gradient (``"grad_sq"``); new entries start at zero and every tensor keeps the step
    count, so the bias corrections stay where they were. A fresh AdamW would instead take a
    sign-sized step (``lr``) on every weight at once, which on a trained model is a loss jump.
    ``layers``: the new global layer indices this optimizer will hold (as in :func:`grow_state_dict`);
    a holder passes its grown range, so it does not build moments for other holders' new layers.
    """
    groups = opt_state["param_groups"]
    if len(groups) != 1:
        raise ValueError(f"expected one parameter group (as the holders use), got {len(groups)}")
    ids = groups[0]["params"]
    assert len(ids) == len(old_names), "old_names must list the optimizer's parameters in order"
    moments: dict[str, dict] = {"exp_avg": {}, "exp_avg_sq": {}}
    step = None
    for name, pid in zip(old_names, ids):
        st = opt_state["state"].get(pid)
        if st:
            moments["exp_avg"][name], moments["exp_avg_sq"][name] = st["exp_avg"], st["exp_avg_sq"]
            step = st["step"] if step is None or float(st["step"]) > float(step) else step
    if step is None:  # the optimizer never stepped: nothing to carry
        return {"state": {}, "param_groups": [dict(groups[0], params=list(range(len(new_names))))]}
    grown = {key: grow_state_dict(sd, old, new, layers=layers, kind="grad" if key == "exp_avg" else "grad_sq")
             for key, sd in moments.items()}
    state = {}
    for i, name in enumerate(new_names):
        if name not in grown["exp_avg"]:  # a layer this optimizer never held (a repartition): starts fresh
            continue
        state[i] = {"step": step.clone() if torch.is_tensor(step) else step,
                    "exp_avg": grown["exp_avg"][name], "exp_avg_sq": grown["exp_avg_sq"][name]}
    return {"state": state, "param_groups": [dict(groups[0], params=list(range(len(new_names))))]}


def _layout(module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) per parameter in flat order, from a module or from such a list itself (what a
    remote holder reports, neuroray.swarm.holder.StageHolder.param_layout)."""
    if isinstance(module, torch.nn.Module):
        return [(name, tuple(p.shape)) for name, p in module.named_parameters()]
    return [(name, tuple(shape)) for name, shape in module]


def flat_to_state(vector: torch.Tensor, module) -> dict:
    """A flat vector in ``module.parameters()`` order (theta0, pseudo-gradients, outer momentum) as a
    state dict keyed like the module, so it can be grown with :func:`grow_stages`. ``module`` may
    also be a ``[(name, shape)]`` layout."""
    out, i = {}, 0
    for name, shape in _layout(module):
        n = math.prod(shape)
        out[name] = vector[i: i + n].view(shape)
        i += n
    assert i == vector.numel(), f"vector has {vector.numel()} entries, the module {i}"
    return out


def state_to_flat(state: dict, module) -> torch.Tensor:
    """The inverse of :func:`flat_to_state` for (a grown) ``module`` or ``[(name, shape)]`` layout."""
    return torch.cat([state[name].reshape(-1).float() for name, _ in _layout(module)])
