"""A synthetic corpus with real structure: topic-modulated bigram chains over a small vocabulary."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def words(vocab_size: int) -> list[str]:
    """Token strings ``w00``, ``w01``, …"""
    width = len(str(vocab_size - 1))
    return [f"w{i:0{width}d}" for i in range(vocab_size)]


def corpus(num_sequences: int, length: int, vocab_size: int, seed: int, *, topics: int = 3) -> np.ndarray:
    """``(num_sequences, length)`` token ids.

    Each sequence draws a topic (a preference over tokens) and then walks a sparse, asymmetric
    bigram chain re-weighted by that topic. So the corpus has directed next-token structure (B̄),
    long-range co-occurrence through the topic (Φ̄), and tokens sharing predecessors (Σ_B̄).
    """
    rng = np.random.default_rng(seed)
    transitions = rng.dirichlet(np.full(vocab_size, 0.2), size=vocab_size)
    preference = rng.dirichlet(np.full(vocab_size, 0.5), size=topics)
    ids = np.empty((num_sequences, length), dtype=np.int64)
    for n in range(num_sequences):
        weight = preference[rng.integers(topics)]
        ids[n, 0] = rng.choice(vocab_size, p=weight)
        for t in range(1, length):
            p = transitions[ids[n, t - 1]] * weight
            ids[n, t] = rng.choice(vocab_size, p=p / p.sum())
    return ids


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over :func:`words`, as a real HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words(vocab_size))}, unk_token="w00"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=core)
