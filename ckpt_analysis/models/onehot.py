"""The leading-term paper's one-hot attention model (its Def. 3.1), loaded like any checkpoint."""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

MODEL_TYPE = "onehot_attention"


class OneHotAttentionConfig(PretrainedConfig):
    """Vocabulary size K (the residual width), layer count and the longest relative distance."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 16,
        num_hidden_layers: int = 1,
        max_position_embeddings: int = 64,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.num_hidden_layers = num_hidden_layers
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)


class OneHotAttentionLayer(nn.Module):
    """One single-head attention layer on the K-wide residual stream.

    ``h ← h + softmax(h W hᵀ + P[t − m], causal incl. the diagonal) h V``; all weights start at 0.
    """

    def __init__(self, k: int, positions: int) -> None:
        super().__init__()
        self.qk = nn.Parameter(torch.zeros(k, k))  # W: rows query token, columns key token
        self.value = nn.Parameter(torch.zeros(k, k))  # V: rows attended token
        self.position = nn.Parameter(torch.zeros(positions))  # P_m, m = t − key position

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        length = h.shape[1]
        distance = torch.arange(length, device=h.device)[:, None] - torch.arange(length, device=h.device)
        scores = h @ self.qk @ h.transpose(1, 2) + self.position[distance.clamp(min=0)]
        scores = scores.masked_fill(distance < 0, float("-inf"))
        return h + torch.softmax(scores, dim=-1) @ h @ self.value


class OneHotAttentionModel(PreTrainedModel):
    """No embedding: the input is the one-hot token; logits are ``h W_O`` (rows current token)."""

    config_class = OneHotAttentionConfig
    base_model_prefix = "onehot"
    _supports_sdpa = True  # its attention is plain tensor ops, whichever implementation is asked for

    def __init__(self, config: OneHotAttentionConfig) -> None:
        super().__init__(config)
        k = config.vocab_size
        self.layers = nn.ModuleList(
            OneHotAttentionLayer(k, config.max_position_embeddings) for _ in range(config.num_hidden_layers)
        )
        self.output = nn.Parameter(torch.zeros(k, k))  # W_O: rows current token, columns next token
        self.post_init()  # type: ignore[no-untyped-call]  # transformers leaves post_init unannotated

    def _init_weights(self, module: nn.Module) -> None:
        """Zero initialisation, as in the paper's analysis (parameters are created as zeros)."""

    def layer(self, index: int) -> OneHotAttentionLayer:
        """Layer ``index``, typed (``self.layers`` is a plain ModuleList)."""
        layer = self.layers[index]
        assert isinstance(layer, OneHotAttentionLayer)
        return layer

    def forward(self, input_ids: torch.Tensor, **_: Any) -> CausalLMOutput:
        h = nn.functional.one_hot(input_ids, self.config.vocab_size).to(self.output.dtype)
        for layer in self.layers:
            h = layer(h)
        return CausalLMOutput(logits=h @ self.output)


@cache
def register() -> None:
    """Make ``AutoConfig``/``AutoModelForCausalLM`` load saved one-hot models (once per process)."""
    AutoConfig.register(MODEL_TYPE, OneHotAttentionConfig)
    AutoModelForCausalLM.register(OneHotAttentionConfig, OneHotAttentionModel)
