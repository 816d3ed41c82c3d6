"""Full-batch gradient descent of the one-hot attention model (the leading-term paper's Table 1 regime)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ckpt_analysis.models.onehot import OneHotAttentionConfig, OneHotAttentionModel
from ckpt_analysis.progress import progress, quiet_transformers_bars


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

    from ckpt_analysis.tasks.topics import build_tokenizer

    quiet_transformers_bars()
    dtype = getattr(torch, config.dtype)
    cfg = OneHotAttentionConfig(vocab_size, config.num_layers, max_position_embeddings=ids.shape[1])
    model = OneHotAttentionModel(cfg)
    torch.nn.Module.to(model, dtype)  # transformers mis-types .to
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
                    assert p.grad is not None  # every parameter takes part in the loss
                    p.sub_(config.lr * p.grad)
            advance(f"loss {loss.item():.4f}", True)
    return model


def _save(model: nn.Module, tokenizer: Any, folder: Path, step: int, config: GDConfig) -> None:
    model.save_pretrained(folder)  # type: ignore[operator]
    tokenizer.save_pretrained(folder)
    state = {"global_step": step, "learning_rate": config.lr, "optimizer": "full-batch GD"}
    (folder / "trainer_state.json").write_text(json.dumps(state))
