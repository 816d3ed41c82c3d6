"""A plain causal attention for differentiation: softmax in the input dtype, every op differentiable.

GPT-NeoX's eager attention computes softmax in float32 even for float64 models (capping float64
checks at ~1e-5), and CPU ``sdpa`` has no forward-mode AD (``docs/environment.md``). Models are
switched to this function by name while derivatives are taken.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

NAME = "ckpt_plain"


def plain_causal_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q kᵀ · scaling + mask) v`` with a causal mask, in the dtype of ``query``; with
    fewer key/value heads than query heads (grouped-query attention), each key/value head serves
    ``heads / kv_heads`` consecutive query heads, as transformers' ``repeat_kv`` lays them out.

    ``dropout`` belongs to transformers' attention-function signature and is ignored: every
    analysis runs its model in eval mode.
    """
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each key/value head serves
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)  # a group
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    q_len, k_len = scores.shape[-2:]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        allowed = allowed & attention_mask[..., :k_len]
    elif attention_mask is not None:
        scores = scores + attention_mask[..., :k_len]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, plain_causal_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def differentiable_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with :func:`plain_causal_attention` inside this block."""
    _register()
    config: Any = model.config
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
