"""Decoder-only transformer, split into pipeline stages.

:class:`StageModule` holds a contiguous range of global layers, with the token embedding on the
first stage and the final norm + LM head on the last. ``build_monolith`` is the same class holding
everything; stages built with the same seed hold exactly the monolith's tensors under the same
``state_dict`` keys, so ``merge_state_dicts`` of the stages is the monolith's state dict.
"""

from neuroray.model.layers import (
    Block,
    CausalSelfAttention,
    RMSNorm,
    SwiGLU,
    apply_rope,
    ffn_hidden_size,
    rope_cache,
)
from neuroray.model.stage import (
    StageModule,
    build_monolith,
    build_stage,
    count_parameters,
    merge_state_dicts,
    split_layers,
)

__all__ = [
    "Block",
    "CausalSelfAttention",
    "RMSNorm",
    "StageModule",
    "SwiGLU",
    "apply_rope",
    "build_monolith",
    "build_stage",
    "count_parameters",
    "ffn_hidden_size",
    "merge_state_dicts",
    "rope_cache",
    "split_layers",
]
