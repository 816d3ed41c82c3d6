"""A tiny trainer: a small GPTNeoX learns 3-digit addition or subtraction, saving HF checkpoints."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from ckpt_analysis.device import resolve_device
from ckpt_analysis.progress import progress, quiet_transformers_bars
from ckpt_analysis.zoo.tasks import arithmetic

if TYPE_CHECKING:
    from transformers import GPTNeoXForCausalLM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Task, model size and optimisation settings of the tiny arithmetic run."""

    task: arithmetic.Operation = "addition"
    steps: int = 600
    save_every: int = 50
    batch_size: int = 128
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear warm-up of the learning rate from 0 over this many steps (the POLCA paper: 100)."""
    seed: int = 0
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    device: Literal["auto", "cpu", "cuda"] = "auto"


def with_paper_optimiser(config: TrainConfig) -> TrainConfig:
    """``config`` with the POLCA paper's AdamW: betas (0.9, 0.95), weight decay 0.1, 100 warm-up steps."""
    return replace(config, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=100)


def tiny_gpt_neox(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 64,
    seed: int = 0,
) -> GPTNeoXForCausalLM:
    """A randomly initialised small GPTNeoX (the usual test and demo model)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config)


def answer_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer digits only."""
    logits = model(input_ids=ids).logits
    pos = torch.tensor(arithmetic.ANSWER_POSITIONS, device=ids.device)
    return torch.nn.functional.cross_entropy(logits[:, pos - 1].flatten(0, 1), ids[:, pos].flatten())


def _save(model: torch.nn.Module, tokenizer: object, out: Path, step: int) -> None:
    folder = out / f"checkpoint-{step}"
    model.save_pretrained(folder)  # type: ignore[operator]
    tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def train_arithmetic(out: Path, config: TrainConfig = TrainConfig()) -> float:
    """Train on fresh random problems each step, saving ``checkpoint-<N>`` every ``save_every``.

    Returns the final answer-digit accuracy on held-out problems.
    """

    quiet_transformers_bars()
    tokenizer = arithmetic.build_tokenizer()
    model = tiny_gpt_neox(
        len(arithmetic.VOCAB),
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        seed=config.seed,
    )
    torch.nn.Module.to(model, resolve_device(config.device))  # transformers mis-types .to
    device = next(model.parameters()).device
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    )
    out.mkdir(parents=True, exist_ok=True)
    _save(model, tokenizer, out, 0)
    with progress(config.steps, "training") as advance:
        for step in range(1, config.steps + 1):
            a, b = arithmetic.problems(config.batch_size, config.seed * 1_000_003 + step, config.task)
            ids = arithmetic.encode(tokenizer, a, b, config.task)
            loss = answer_loss(model, torch.from_numpy(ids).to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            warmup.step()
            if step % config.save_every == 0:
                _save(model, tokenizer, out, step)
            advance(f"loss {loss.item():.3f}", True)
    return answer_accuracy(model, tokenizer, config.task)


HELD_OUT_SEED = 2**32 - 1
"""Seed of the held-out accuracy problems: the last numpy seed, which no training step (seeded from
``TrainConfig.seed`` upwards) reaches."""


@torch.no_grad()
def answer_accuracy(
    model: torch.nn.Module, tokenizer: object, task: arithmetic.Operation = "addition", n: int = 512
) -> float:
    """Teacher-forced accuracy of the answer digits on held-out problems."""
    a, b = arithmetic.problems(n, HELD_OUT_SEED, task)
    encoded = arithmetic.encode(tokenizer, a, b, task)  # type: ignore[arg-type]
    ids = torch.from_numpy(encoded).to(next(model.parameters()).device)
    pos = torch.tensor(arithmetic.ANSWER_POSITIONS, device=ids.device)
    pred = model(input_ids=ids).logits[:, pos - 1].argmax(-1)
    return float((pred == ids[:, pos]).float().mean())
