"""Tiny trainers: a small GPTNeoX learns 3-digit arithmetic or the annotated grammar, saving checkpoints."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from ckpt_analysis.device import resolve_device
from ckpt_analysis.progress import progress, quiet_transformers_bars
from ckpt_analysis.tasks import arithmetic, grammar

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel, GPTNeoXForCausalLM

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
    architecture: Literal["gpt_neox", "gpt2"] = "gpt_neox"
    """``gpt2``: learned absolute positions, a sequential residual and an untied unembedding, the
    block of the POLCA paper's TransformerLens model; ``gpt_neox``: the demo's parallel block."""


def with_paper_optimiser(config: TrainConfig) -> TrainConfig:
    """``config`` with the POLCA paper's AdamW: betas (0.9, 0.95), weight decay 0.1, 100 warm-up steps."""
    return replace(config, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=100)


SPECIAL_IDS: dict[str, Any] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
"""The arithmetic and grammar tokenizers' special tokens, as the tiny models' configs name them."""


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
        **SPECIAL_IDS,
    )
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config)


def tiny_gpt2(
    vocab_size: int, *, hidden_size: int, num_layers: int, num_heads: int, seed: int = 0
) -> GPT2LMHeadModel:
    """A small GPT-2 of the same shape (MLP 4 × hidden, 64 positions), its unembedding untied as
    in the POLCA paper's TransformerLens model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    sizes: dict[str, Any] = {
        "n_embd": hidden_size,
        "n_layer": num_layers,
        "n_head": num_heads,
        "n_inner": 4 * hidden_size,
    }
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=64, tie_word_embeddings=False, **sizes, **SPECIAL_IDS
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


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
    tokenizer = arithmetic.build_tokenizer()
    model = _model(config, len(arithmetic.VOCAB))

    def batch(step: int) -> np.ndarray:
        a, b = arithmetic.problems(config.batch_size, config.seed * 1_000_003 + step, config.task)
        return arithmetic.encode(tokenizer, a, b, config.task)

    optimiser = _Optimiser(config.lr, config.betas, config.weight_decay, config.warmup_steps)
    saves = range(config.save_every, config.steps + 1, config.save_every)
    _record(out, config, model)
    _fit(model, tokenizer, out, batch, answer_loss, optimiser, config.steps, set(saves))
    return answer_accuracy(model, tokenizer, config.task)


@dataclass(frozen=True)
class GrammarTrainConfig:
    """The grammar run: TRACE's setting (a 2-layer decoder, AdamW lr 1e-3, batch 128) on a fixed
    corpus of ``train_sequences`` packed sequences (6000 × 32 words ≈ TRACE's 25K sentences)."""

    vocab_size: int = 1000
    seq_len: int = 32
    noise: float = 0.0
    train_sequences: int = 6000
    steps: int = 1500
    save_every: int = 100
    early_saves: bool = True
    """Also save at steps 1, 2, 4, 8, … below ``save_every``, where curvature moves fastest."""
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    device: Literal["auto", "cpu", "cuda"] = "auto"


def save_steps(steps: int, every: int, *, early: bool) -> set[int]:
    """Every ``every`` steps up to ``steps``, plus the powers of two below ``every`` if ``early``."""
    doubling = {2**k for k in range(every.bit_length()) if 2**k < every} if early else set()
    return {s for s in doubling | set(range(every, steps + 1, every)) if s <= steps}


def train_grammar(out: Path, config: GrammarTrainConfig = GrammarTrainConfig()) -> float:
    """Train on the grammar corpus (shuffled epochs, seeded), saving ``checkpoint-<N>`` on
    :func:`save_steps`; returns the final next-token loss on held-out sequences."""
    lexicon = grammar.Grammar.of_size(config.vocab_size)
    tokenizer = grammar.build_tokenizer(lexicon)
    words, _, _ = grammar.corpus(
        lexicon, config.train_sequences, config.seq_len, config.seed, noise=config.noise
    )
    ids = grammar.encode(tokenizer, words)
    model = _model(config, len(tokenizer), max_positions=max(64, config.seq_len))
    rng = np.random.default_rng(config.seed)
    order = np.empty(0, dtype=np.int64)

    def batch(step: int) -> np.ndarray:
        nonlocal order
        if len(order) < config.batch_size:
            order = np.concatenate([order, rng.permutation(len(ids))])
        chosen, order = order[: config.batch_size], order[config.batch_size :]
        return ids[chosen]

    optimiser = _Optimiser(config.lr, (0.9, 0.999), 0.0, 0)
    saves = save_steps(config.steps, config.save_every, early=config.early_saves)
    _record(out, config, model)
    _fit(model, tokenizer, out, batch, next_token_loss, optimiser, config.steps, saves)
    held_out, _, _ = grammar.corpus(lexicon, 256, config.seq_len, HELD_OUT_SEED)
    with torch.no_grad():
        return float(
            next_token_loss(model, torch.from_numpy(grammar.encode(tokenizer, held_out)).to(model.device))
        )


def next_token_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position after the first."""
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def skeleton_run(out: Path, config: TrainConfig) -> Path:
    """The checkpoints a ``config`` run saves (step 0, then every ``save_every``), each the
    untrained model: one saved copy that the others link to. For planning and timing a protocol
    before training it; its store's shapes and its units' costs do not depend on the weights."""
    tokenizer = arithmetic.build_tokenizer()
    first = out / "checkpoint-0"
    if not first.is_dir():
        _save(_model(replace(config, device="cpu"), len(arithmetic.VOCAB)), tokenizer, out, 0)
    for step in range(config.save_every, config.steps + 1, config.save_every):
        folder = out / f"checkpoint-{step}"
        if folder.is_dir():
            continue
        folder.mkdir()
        for file in first.iterdir():
            if file.name != "trainer_state.json":
                (folder / file.name).symlink_to(file.resolve())
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return out


@dataclass(frozen=True)
class _Optimiser:
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_steps: int


def _model(
    config: TrainConfig | GrammarTrainConfig, vocab_size: int, *, max_positions: int = 64
) -> GPTNeoXForCausalLM | GPT2LMHeadModel:
    sizes = {
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
    }
    model: GPTNeoXForCausalLM | GPT2LMHeadModel
    if isinstance(config, TrainConfig) and config.architecture == "gpt2":
        model = tiny_gpt2(vocab_size, **sizes, seed=config.seed)
    else:
        model = tiny_gpt_neox(vocab_size, **sizes, max_positions=max_positions, seed=config.seed)
    torch.nn.Module.to(model, resolve_device(config.device))  # transformers mis-types .to
    return model


def _record(out: Path, config: TrainConfig | GrammarTrainConfig, model: torch.nn.Module) -> None:
    """``out/training.json``: the settings, seed, device and torch thread count of the run. The
    same seed on another thread count or device gives other floating-point sums, hence other
    checkpoints (docs/trace_parity.md, "Determinism")."""
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "config": asdict(config),
        "torch_threads": torch.get_num_threads(),
        "device": str(next(model.parameters()).device),
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def _fit(
    model: torch.nn.Module,
    tokenizer: object,
    out: Path,
    batch: Callable[[int], np.ndarray],
    loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    opt: _Optimiser,
    steps: int,
    saves: set[int],
) -> None:
    """AdamW with linear warm-up over ``steps`` steps of ``batch(step)``; saves step 0 and ``saves``."""
    quiet_transformers_bars()
    device = next(model.parameters()).device
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay
    )
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / opt.warmup_steps) if opt.warmup_steps else 1.0
    )
    out.mkdir(parents=True, exist_ok=True)
    _save(model, tokenizer, out, 0)
    with progress(steps, "training") as advance:
        for step in range(1, steps + 1):
            loss = loss_fn(model, torch.from_numpy(batch(step)).to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            warmup.step()
            if step in saves:
                _save(model, tokenizer, out, step)
            advance(f"loss {loss.item():.3f}", True)


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
