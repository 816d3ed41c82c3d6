"""Corpus statistics of the leading terms (docs/leading_terms.md), estimated by scatter-adds in O(N·T²)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ckpt_analysis.errors import DataError

OOV = -1
"""Index of a token outside the top-K vocabulary: an all-zero one-hot row (docs/leading_terms.md)."""


@dataclass(frozen=True)
class CorpusStats:
    """The K×K basis functions of docs/leading_terms.md (float64) and the positional prediction Δ.

    ``bigram`` B̄ (rows current token, columns next token), ``context`` Φ̄ (rows target, columns
    prefix token), ``interchange`` Σ_B̄, ``value`` V*, ``g`` G, ``qk`` Q̄ (rows query token,
    columns key token), ``delta`` Δ_m for m = 0 … T − 1, and ``pairs`` = NT, the number of
    (input, target) positions averaged over.
    """

    bigram: torch.Tensor
    context: torch.Tensor
    interchange: torch.Tensor
    value: torch.Tensor
    g: torch.Tensor
    qk: torch.Tensor
    delta: torch.Tensor
    pairs: int


def top_vocabulary(ids: np.ndarray, mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most frequent token ids among real tokens (ties by id) and their counts."""
    counts = np.bincount(ids[mask > 0].ravel())
    order = np.lexsort((np.arange(counts.size), -counts))
    present = order[counts[order] > 0]
    if present.size < k:
        raise DataError(
            f"corpus_stats.vocab_size = {k} but the corpus has only {present.size} distinct tokens"
        )
    top = present[:k]
    return top.astype(np.int64), counts[top].astype(np.int64)


def vocab_index(ids: np.ndarray, vocab: np.ndarray) -> np.ndarray:
    """Map token ids to their vocabulary rank 0 … K − 1, or :data:`OOV`."""
    lookup = np.full(max(int(ids.max()), int(vocab.max())) + 1, OOV, dtype=np.int64)
    lookup[vocab] = np.arange(vocab.size)
    return lookup[ids]


def check_right_padded(mask: np.ndarray) -> None:
    """Corpus statistics need each sequence's real tokens first, padding after them."""
    real = mask > 0
    if (real[:, 1:] & ~real[:, :-1]).any():
        raise DataError("corpus_stats needs right-padded sequences (real tokens first, then padding)")


def shuffle_tokens(ids: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray:
    """The token-shuffled null corpus: real tokens permuted across the whole corpus, padding kept."""
    out = ids.copy()
    real = mask > 0
    out[real] = np.random.default_rng(seed).permutation(ids[real])
    return out


def corpus_statistics(
    index: np.ndarray,
    mask: np.ndarray,
    k: int,
    *,
    chunk: int = 64,
    device: str | torch.device = "cpu",
) -> CorpusStats:
    """All of docs/leading_terms.md's corpus matrices from vocabulary-indexed sequences ``(N, T + 1)``.

    Two passes of scatter-adds over chunks of ``chunk`` sequences: the first accumulates B̄ and
    Φ̄, the second (which needs G) Q̄ and Δ. Memory is O(K² + chunk·T²); no one-hot tensor is
    ever formed. ``mask`` marks real tokens (right padding); a position counts when its target
    is real.
    """
    first = _FirstPass(k, device)
    for x, ok in _chunks(index, mask, chunk, device):
        first.add(x, ok)
    bigram, context = first.result()
    interchange = bigram.T @ bigram  # Σ_B̄ = B̄ᵀB̄ (docs/leading_terms.md)
    value = context.T @ bigram.T  # V* = Φ̄ᵀB̄ᵀ
    g = context.T @ interchange  # G = Φ̄ᵀΣ_B̄
    second = _QueryKeyPass(g, index.shape[1] - 1)
    for x, ok in _chunks(index, mask, chunk, device):
        second.add(x, ok)
    qk, delta = second.result(first.pairs)
    return CorpusStats(bigram, context, interchange, value, g, qk, delta, first.pairs)


def _chunks(
    index: np.ndarray, mask: np.ndarray, chunk: int, device: str | torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, index.shape[0], chunk):
        part = slice(start, start + chunk)
        x = torch.from_numpy(index[part]).to(device)
        ok = torch.from_numpy(mask[part, 1:] > 0).to(device)
        yield x, ok


def _causal(length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower-triangular (t, m ≤ t) mask and 1/t weights for 0-based query positions t."""
    tri = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    inv_t = 1.0 / torch.arange(1, length + 1, dtype=torch.float64, device=device)
    return tri, inv_t


class _FirstPass:
    """Scatter-add accumulators of B̄ and Φ̄ (docs/leading_terms.md)."""

    def __init__(self, k: int, device: str | torch.device) -> None:
        self.k = k
        f64 = torch.float64
        self.joint = torch.zeros(k * k, dtype=f64, device=device)  # Σ [x_t = i][x_{t+1} = j]
        self.inputs = torch.zeros(k, dtype=f64, device=device)  # Σ [x_t = i]
        self.prefix = torch.zeros(k * k, dtype=f64, device=device)  # Σ_t [y_t = i] (1/t) Σ_{m≤t} [x_m = j]
        self.prefix_mass = torch.zeros(k, dtype=f64, device=device)  # Σ_t (1/t) Σ_{m≤t} [x_m = j]
        self.pairs = 0

    def add(self, x: torch.Tensor, ok: torch.Tensor) -> None:
        inp, tgt = x[:, :-1], x[:, 1:]
        k = self.k
        seen = ok & (inp != OOV)
        self.inputs.index_add_(0, inp[seen], torch.ones_like(inp[seen], dtype=torch.float64))
        both = seen & (tgt != OOV)
        self.joint.index_add_(0, (inp * k + tgt)[both], torch.ones_like(inp[both], dtype=torch.float64))
        tri, inv_t = _causal(inp.shape[1], x.device)
        pairs = ok[:, :, None] & tri & (inp[:, None, :] != OOV)  # (n, t, m ≤ t)
        weight = inv_t[None, :, None].expand(pairs.shape)  # 1/t for every (t, m) pair
        m_tok = inp[:, None, :].expand(pairs.shape)
        self.prefix_mass.index_add_(0, m_tok[pairs], weight[pairs])
        with_target = pairs & (tgt[:, :, None] != OOV)
        flat = tgt[:, :, None] * k + inp[:, None, :]
        self.prefix.index_add_(0, flat[with_target], weight[with_target])
        self.pairs += int(ok.sum())

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """B̄ and Φ̄, each K×K."""
        k, nt = self.k, self.pairs
        # B̄[i,j] = (1/NT) Σ [x_t = i]([x_{t+1} = j] − 1/|V|)   (docs/leading_terms.md, bigram)
        bigram = (self.joint.view(k, k) - self.inputs[:, None] / k) / nt
        # Φ̄[i,j] = (1/NT) Σ ([x_{t+1} = i] − 1/|V|) (1/t) Σ_{m≤t} [x_m = j]   (docs/leading_terms.md, context)
        context = (self.prefix.view(k, k) - self.prefix_mass[None, :] / k) / nt
        return bigram, context


class _QueryKeyPass:
    """Scatter-add accumulators of Q̄ and Δ given G (docs/leading_terms.md, query–key prediction)."""

    def __init__(self, g: torch.Tensor, length: int) -> None:
        k = g.shape[0]
        self.k = k
        # Index K stands for an out-of-vocabulary token: a zero row and column of G.
        self.g = torch.zeros(k + 1, k + 1, dtype=torch.float64, device=g.device)
        self.g[:k, :k] = g
        self.row_mean = self.g.sum(dim=1) / k  # rowsum(G)[x_k] / |V|
        self.qk = torch.zeros(k * k, dtype=torch.float64, device=g.device)
        self.q_sum = torch.zeros(length, length, dtype=torch.float64, device=g.device)  # Σ_n q[t, j]

    def add(self, x: torch.Tensor, ok: torch.Tensor) -> None:
        k = self.k
        inp, tgt = x[:, :-1], x[:, 1:]
        xi = torch.where(inp == OOV, k, inp)
        yi = torch.where(tgt == OOV, k, tgt)
        tri, inv_t = _causal(inp.shape[1], x.device)
        q = query_key_scores(
            self.g[xi[:, None, :], yi[:, :, None]] - self.row_mean[xi][:, None, :], tri, inv_t
        )
        q = q * ok[:, :, None]
        keep = ok[:, :, None] & tri & (inp[:, :, None] != OOV) & (inp[:, None, :] != OOV)
        flat = inp[:, :, None] * k + inp[:, None, :]
        self.qk.index_add_(0, flat[keep], q[keep])
        self.q_sum += q.sum(dim=0)

    def result(self, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Q̄ (K×K) and Δ (T): Δ_m is the m-th sub-diagonal sum of the averaged q."""
        length = self.q_sum.shape[0]
        delta = torch.stack([self.q_sum.diagonal(-m).sum() for m in range(length)])
        return self.qk.view(self.k, self.k) / pairs, delta / pairs


def query_key_scores(scores: torch.Tensor, tri: torch.Tensor, inv_t: torch.Tensor) -> torch.Tensor:
    """``q[t,j] = (s[t,j] − mean_{k≤t} s[t,k]) / t`` on the causal triangle, zero above it.

    docs/leading_terms.md (query–key prediction): ``scores[..., t, k] = G[x_k, y_t] − rowsum(G)[x_k]/|V|``.
    """
    s = scores * tri
    mean = s.sum(dim=-1, keepdim=True) * inv_t[:, None]
    return (s - mean) * tri * inv_t[:, None]
