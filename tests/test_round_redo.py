"""A round redone without a holder the hop rechecks proved faulty (neuroray/training/routed.py, swarm routing), on the
holders' side, without Ray: ``rejoin(theta0, redo=True)`` puts the weights back at theta0 and the inner optimizer back
at its state when the round started, so the redone round trains exactly as if the poisoned attempt never ran."""

import torch

from neuroray.config import DilocoConfig, ModelConfig
from neuroray.swarm.holder import HolderSpec, StageHolder

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16)
V, M = 64, 2


def _chain(tmp_path, name: str) -> list[StageHolder]:
    return [StageHolder(HolderSpec(replica=0, stage=s, ranges=[(0, 1), (1, 2)], model=CFG, vocab_size=V,
                                   diloco=DilocoConfig(inner_lr=1e-2), seed=0, key_path=str(tmp_path / f"{name}{s}.pem"),
                                   hop_record=True, round_redo=True)) for s in range(2)]


def _step(chain: list[StageHolder], seed: int) -> None:
    """One inner step of M microbatches drawn with ``seed``."""
    h0, h1 = chain
    gen = torch.Generator().manual_seed(seed)
    for mb in range(M):
        x, labels = torch.randint(0, V, (2, 8), generator=gen), torch.randint(0, V, (2, 8), generator=gen)
        _, g = h1.forward_backward(mb, h0.forward(mb, x), labels, 1 / M)
        h0.backward(mb, g)
    for h in chain:
        h.step()


def _round_two(chain: list[StageHolder]) -> list[torch.Tensor]:
    """Round 1 (one step), its theta0 loaded: round 2 starts with AdamW moments of its own. The round-2 theta0s."""
    _step(chain, seed=1)
    theta0 = [h.flat_params() for h in chain]
    for h, t in zip(chain, theta0):
        h.load_theta0(t)
    return theta0


def test_a_redone_round_trains_as_if_the_poisoned_attempt_never_ran(tmp_path):
    clean, redone, rejoined = _chain(tmp_path, "clean"), _chain(tmp_path, "redone"), _chain(tmp_path, "rejoined")
    for chain in (clean, redone, rejoined):
        theta0 = _round_two(chain)
    _step(clean, seed=3)
    for chain, redo in ((redone, True), (rejoined, False)):
        _step(chain, seed=2)  # the attempt a faulty holder poisoned (here: two steps on other data)
        _step(chain, seed=4)
        for h, t in zip(chain, theta0):
            h.rejoin(t, redo=redo)
            assert torch.equal(h.flat_params(), t)
        _step(chain, seed=3)
    for a, b in zip(clean, redone):
        assert torch.equal(a.flat_params(), b.flat_params())
    # a plain rejoin keeps the moments the poisoned steps left: the redone round would not be the clean one
    assert not all(torch.equal(a.flat_params(), b.flat_params()) for a, b in zip(clean, rejoined))
