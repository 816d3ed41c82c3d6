"""3-digit addition: a character tokenizer, problems, and per-token place and carry labels (docs/polca.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<bos>", "<eos>")
VOCAB: tuple[str, ...] = (*SPECIALS, *"0123456789", "+", "=")
SEQ_LEN = 14
"""``<bos> a a a + b b b = c c c c <eos>``: operands and the 4-digit answer, zero-padded."""
ANSWER_POSITIONS = (9, 10, 11, 12)
PLACES = (3, 2, 1, 0)
"""Digit place of each answer position: 3 = thousands … 0 = ones."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A one-character-per-token tokenizer over :data:`VOCAB`, as a real HF fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"<[a-z]+>|."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def problems(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random operand pairs in [0, 999], reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1000, n), rng.integers(0, 1000, n)


def texts(a: np.ndarray, b: np.ndarray) -> list[str]:
    return [f"<bos>{x:03d}+{y:03d}={x + y:04d}<eos>" for x, y in zip(a.tolist(), b.tolist(), strict=True)]


def encode(tokenizer: PreTrainedTokenizerFast, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Token ids ``(n, SEQ_LEN)`` through the tokenizer itself."""
    ids = tokenizer(texts(a, b), add_special_tokens=False)["input_ids"]
    out = np.asarray(ids, dtype=np.int64)
    if out.shape != (len(a), SEQ_LEN):
        raise ValueError(f"tokenizer is not the addition tokenizer: got shape {out.shape}")
    return out


def score_mask(n: int) -> np.ndarray:
    """Only the answer digits are scored (docs/jobs.md)."""
    mask = np.zeros((n, SEQ_LEN), dtype=bool)
    mask[:, list(ANSWER_POSITIONS)] = True
    return mask


def carry_into(a: np.ndarray, b: np.ndarray, place: int) -> np.ndarray:
    """Whether the digit at ``place`` receives a carry (docs/polca.md).

    10s: ones digits sum to ≥ 10; 100s: (a mod 100) + (b mod 100) ≥ 100; 1000s: a + b ≥ 1000.
    """
    if place == 0:
        return np.zeros(a.shape, dtype=bool)
    mod = 10**place
    return np.asarray((a % mod) + (b % mod) >= mod)


def labels(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """Per-token ``place`` and ``carry`` labels ``(n, SEQ_LEN)``, −1 off the answer (token t = target)."""
    place = np.full((len(a), SEQ_LEN), -1, dtype=np.int64)
    carry = np.full((len(a), SEQ_LEN), -1, dtype=np.int64)
    for pos, p in zip(ANSWER_POSITIONS, PLACES, strict=True):
        place[:, pos] = p
        carry[:, pos] = carry_into(a, b, p)
    return {"place": place, "carry": carry}
