"""3-digit addition and subtraction: a character tokenizer, problems, and per-token place and
carry/borrow labels (docs/polca.md, "Tasks")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

Operation = Literal["addition", "subtraction"]
OPERATIONS: tuple[Operation, ...] = get_args(Operation)
SYMBOL: dict[Operation, str] = {"addition": "+", "subtraction": "-"}
LABEL: dict[Operation, str] = {"addition": "carry", "subtraction": "borrow"}
"""The per-token label each task scores clusters against (docs/polca.md, "Tasks")."""
SPECIALS = ("<pad>", "<bos>", "<eos>")
VOCAB: tuple[str, ...] = (*SPECIALS, *"0123456789", "+", "=", "-")
SEQ_LEN = 14
"""``<bos> a a a ∘ b b b = c c c c <eos>``: operands and the 4-digit answer, zero-padded."""
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


def problems(n: int, seed: int, operation: Operation = "addition") -> tuple[np.ndarray, np.ndarray]:
    """``n`` random operand pairs in [0, 999], reproducible from ``seed``; for subtraction a ≥ b."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 1000, n), rng.integers(0, 1000, n)
    if operation == "subtraction":
        return np.maximum(a, b), np.minimum(a, b)
    return a, b


def answers(a: np.ndarray, b: np.ndarray, operation: Operation) -> np.ndarray:
    result: np.ndarray = a + b if operation == "addition" else a - b
    return result


def texts(a: np.ndarray, b: np.ndarray, operation: Operation = "addition") -> list[str]:
    sign = SYMBOL[operation]
    rows = zip(a.tolist(), b.tolist(), answers(a, b, operation).tolist(), strict=True)
    return [f"<bos>{x:03d}{sign}{y:03d}={c:04d}<eos>" for x, y, c in rows]


def encode(
    tokenizer: PreTrainedTokenizerFast, a: np.ndarray, b: np.ndarray, operation: Operation = "addition"
) -> np.ndarray:
    """Token ids ``(n, SEQ_LEN)`` through the tokenizer itself."""
    needed = {"<bos>", "<eos>", *"0123456789", "=", SYMBOL[operation]}
    missing = sorted(needed - set(tokenizer.get_vocab()))
    ids = tokenizer(texts(a, b, operation), add_special_tokens=False)["input_ids"]
    out = np.asarray(ids, dtype=np.int64)
    if missing or out.shape != (len(a), SEQ_LEN):
        raise ValueError(
            f"the tokenizer does not spell {operation} problems one character per token"
            + (f" (it lacks {', '.join(map(repr, missing))})" if missing else "")
        )
    return out


def score_mask(n: int) -> np.ndarray:
    """Only the answer digits are scored (docs/jobs.md)."""
    mask = np.zeros((n, SEQ_LEN), dtype=bool)
    mask[:, list(ANSWER_POSITIONS)] = True
    return mask


def carry_into(a: np.ndarray, b: np.ndarray, place: int) -> np.ndarray:
    """Whether the digit at ``place`` of a + b receives a carry (docs/polca.md, "Tasks").

    10s: ones digits sum to ≥ 10; 100s: (a mod 100) + (b mod 100) ≥ 100; 1000s: a + b ≥ 1000.
    """
    mod = 10**place
    return np.asarray((a % mod) + (b % mod) >= mod)  # place 0: mod 1, never


def borrow_into(a: np.ndarray, b: np.ndarray, place: int) -> np.ndarray:
    """Whether the digit at ``place`` of a − b (a ≥ b) pays a borrow (docs/polca.md, "Tasks").

    10s: a's ones digit is below b's; 100s: (a mod 100) < (b mod 100); 1000s: never, as a ≥ b.
    """
    mod = 10**place
    return np.asarray((a % mod) < (b % mod))  # place 0: mod 1, never


def labels(a: np.ndarray, b: np.ndarray, operation: Operation = "addition") -> dict[str, np.ndarray]:
    """Per-token ``place`` and ``carry`` (addition) or ``borrow`` (subtraction) labels
    ``(n, SEQ_LEN)``, −1 off the answer (token t = target)."""
    rule = carry_into if operation == "addition" else borrow_into
    place = np.full((len(a), SEQ_LEN), -1, dtype=np.int64)
    flag = np.full((len(a), SEQ_LEN), -1, dtype=np.int64)
    for pos, p in zip(ANSWER_POSITIONS, PLACES, strict=True):
        place[:, pos] = p
        flag[:, pos] = rule(a, b, p)
    return {"place": place, LABEL[operation]: flag}
