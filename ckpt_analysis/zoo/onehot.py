"""The leading-term paper's one-hot attention model (its Def. 3.1) and GD trainer (docs/leading_terms.md)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from ckpt_analysis.progress import progress, quiet_transformers_bars

log = logging.getLogger(__name__)

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
        self.post_init()

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


@dataclass(frozen=True)
class GDConfig:
    """Full-batch gradient descent from zero initialisation (the paper's Table 1 regime)."""

    lr: float = 0.5
    steps: int = 40
    save_every: int = 1
    num_layers: int = 1
    dtype: str = "float64"


def full_batch_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all N·T positions of the corpus."""
    logits = model(input_ids=ids[:, :-1]).logits
    return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def train_onehot(
    ids: np.ndarray, vocab_size: int, out: Path | None, config: GDConfig = GDConfig()
) -> OneHotAttentionModel:
    """Train on the whole corpus ``ids`` each step, saving ``checkpoint-<s>`` after step s.

    ``out = None`` keeps nothing on disk (tests). Returns the trained model.
    """

    from ckpt_analysis.zoo.tasks.topics import build_tokenizer

    quiet_transformers_bars()
    dtype = getattr(torch, config.dtype)
    cfg = OneHotAttentionConfig(vocab_size, config.num_layers, max_position_embeddings=ids.shape[1])
    model = OneHotAttentionModel(cfg).to(dtype)
    tokens = torch.from_numpy(ids)
    tokenizer = build_tokenizer(vocab_size)
    with progress(config.steps, "gradient descent") as advance:
        for step in range(config.steps + 1):
            if out is not None and step % config.save_every == 0:
                _save(model, tokenizer, out / f"checkpoint-{step}", step, config)
            if step == config.steps:
                break
            loss = full_batch_loss(model, tokens)
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= config.lr * p.grad
            advance(f"loss {loss.item():.4f}", True)
    return model


def _save(model: nn.Module, tokenizer: Any, folder: Path, step: int, config: GDConfig) -> None:
    model.save_pretrained(folder)  # type: ignore[operator]
    tokenizer.save_pretrained(folder)
    state = {"global_step": step, "learning_rate": config.lr, "optimizer": "full-batch GD"}
    (folder / "trainer_state.json").write_text(json.dumps(state))
