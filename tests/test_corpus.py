"""Scatter-add corpus statistics against the dense one-hot formulas of docs/leading_terms.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import dense_corpus_statistics

from ckpt_analysis.corpus import (
    OOV,
    check_right_padded,
    corpus_statistics,
    shuffle_tokens,
    stream_corpus_statistics,
    top_vocabulary,
    vocab_index,
)
from ckpt_analysis.errors import DataError

FIELDS = ("bigram", "context", "interchange", "value", "g", "qk", "delta")


def random_corpus(
    seed: int, *, n: int = 24, length: int = 11, vocab: int = 12, padded: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Random ids with a skewed unigram distribution and ragged right padding."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(vocab, size=(n, length), p=np.arange(vocab, 0, -1) / (vocab * (vocab + 1) / 2))
    lengths = rng.integers(2, length + 1, n) if padded else np.full(n, length)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int8)
    return ids, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [5, 12])
def test_scatter_add_statistics_equal_the_dense_one_hot_formulas(seed: int, k: int) -> None:
    ids, mask = random_corpus(seed)
    vocab, _ = top_vocabulary(ids, mask, k)
    index = vocab_index(ids, vocab)
    stats = corpus_statistics(index, mask, k, chunk=4)
    dense = dense_corpus_statistics(index, mask, k)
    for name in FIELDS:
        got = getattr(stats, name).numpy()
        np.testing.assert_allclose(got, dense[name], rtol=1e-10, atol=1e-14, err_msg=name)
    assert stats.pairs == int(mask[:, 1:].sum())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_streamed_row_blocks_tile_every_matrix_and_equal_the_dense_formulas(dtype: torch.dtype) -> None:
    ids, mask = random_corpus(4)
    vocab, _ = top_vocabulary(ids, mask, 12)
    index = vocab_index(ids, vocab)
    dense = dense_corpus_statistics(index, mask, 12)
    got: dict[str, np.ndarray] = {}
    seen: dict[str, list[tuple[int, int]]] = {}
    for name, rows, values in stream_corpus_statistics(index, mask, 12, chunk=3, dtype=dtype, rows=5):
        if name in ("delta", "pairs"):
            got[name] = values.numpy()
            continue
        got.setdefault(name, np.full((12, 12), np.nan))[rows] = values.numpy()
        seen.setdefault(name, []).append((rows.start, rows.stop))
    assert all(blocks == [(0, 5), (5, 10), (10, 12)] for blocks in seen.values()), seen
    tight = dtype == torch.float64  # float32 products: float32 round-off
    for name in FIELDS:
        scale = np.abs(dense[name]).max()
        np.testing.assert_allclose(
            got[name],
            dense[name],
            rtol=1e-10 if tight else 1e-5,
            atol=(1e-14 if tight else 1e-6) * scale,
            err_msg=name,
        )
    assert int(got["pairs"]) == int(mask[:, 1:].sum())


def test_statistics_are_not_symmetric_so_orientation_is_checked() -> None:
    ids, mask = random_corpus(3, padded=False)
    index = vocab_index(ids, top_vocabulary(ids, mask, 12)[0])
    stats = corpus_statistics(index, mask, 12)
    for name in ("bigram", "context", "value", "qk"):
        matrix = getattr(stats, name).numpy()
        assert np.abs(matrix - matrix.T).max() > 0.1 * np.abs(matrix).max(), name


def test_without_out_of_vocabulary_tokens_bigram_rows_and_context_columns_sum_to_zero() -> None:
    ids, mask = random_corpus(4)
    k = np.unique(ids[mask > 0]).size
    stats = corpus_statistics(vocab_index(ids, top_vocabulary(ids, mask, k)[0]), mask, k)
    np.testing.assert_allclose(stats.bigram.sum(dim=1).numpy(), 0.0, atol=1e-15)
    np.testing.assert_allclose(stats.context.sum(dim=0).numpy(), 0.0, atol=1e-15)


def test_top_vocabulary_orders_by_frequency_then_id() -> None:
    ids = np.array([[3, 3, 1, 1, 2, 7, 7, 7]])
    vocab, counts = top_vocabulary(ids, np.ones_like(ids), 3)
    assert vocab.tolist() == [7, 1, 3]
    assert counts.tolist() == [3, 2, 2]
    assert vocab_index(ids, vocab).tolist() == [[2, 2, 1, 1, OOV, 0, 0, 0]]


def test_a_vocabulary_larger_than_the_corpus_is_one_clear_error() -> None:
    ids = np.array([[1, 2, 1]])
    with pytest.raises(DataError, match="vocab_size = 5 but the corpus has only 2 distinct tokens"):
        top_vocabulary(ids, np.ones_like(ids), 5)


def test_left_padding_is_rejected() -> None:
    with pytest.raises(DataError, match="right-padded"):
        check_right_padded(np.array([[0, 1, 1]]))


def test_shuffling_keeps_unigram_counts_and_padding() -> None:
    ids, mask = random_corpus(5)
    ids = np.where(mask > 0, ids, 99)
    shuffled = shuffle_tokens(ids, mask, seed=0)
    assert (shuffled[mask == 0] == 99).all()
    assert np.array_equal(np.sort(shuffled[mask > 0]), np.sort(ids[mask > 0]))
    assert not np.array_equal(shuffled, ids)
