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
    ranks: np.ndarray = lookup[ids]
    return ranks


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


def row_block(k: int) -> int:
    """Rows of a K×K matrix per block: about 16 MB of float32 (the stored arrays' chunk height)."""
    return max(1, min(k, 2**22 // k))


Block = tuple[str, slice, torch.Tensor]
"""``(name, rows, values)``: rows ``rows`` of the statistic ``name`` (the whole of ``delta``/``pairs``)."""


def stream_corpus_statistics(
    index: np.ndarray,
    mask: np.ndarray,
    k: int,
    *,
    chunk: int = 64,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    rows: int | None = None,
) -> Iterator[Block]:
    """docs/leading_terms.md's corpus matrices from vocabulary-indexed sequences ``(N, T + 1)``,
    yielded in blocks of ``rows`` rows (default :func:`row_block`) as soon as each is known: B̄,
    Φ̄, then Σ_B̄, V* and G block by block, then Q̄, then Δ and NT.

    Three passes of scatter-adds over chunks of ``chunk`` sequences (B̄; Φ̄; Q̄ and Δ, which need
    G); no one-hot tensor is ever formed. Counts accumulate in float64; B̄ and Φ̄ are then kept,
    and the products and G computed, in ``dtype``. So the K×K matrices held at once never exceed
    16K² bytes with ``dtype = float32`` (6.4 GB at K = 20,000: while Φ̄ is cast, its float64 sums
    beside float32 B̄ and Φ̄), or 24K² with float64 (B̄, Φ̄ and G). ``mask`` marks real tokens
    (right padding); a position counts when its target is real.
    """
    first = _BigramPass(k, device)
    for x, ok in _chunks(index, mask, chunk, device):
        first.add(x, ok)
    pairs, bigram = first.pairs, first.result()
    del first  # the counts live on as B̄, in place
    blocks = list(_blocks(k, rows or row_block(k)))
    yield from _rows("bigram", bigram, blocks)
    bigram = bigram.to(dtype)
    second = _ContextPass(k, device)
    for x, ok in _chunks(index, mask, chunk, device):
        second.add(x, ok)
    context = second.result(pairs)
    del second
    yield from _rows("context", context, blocks)
    context = context.to(dtype)
    g = torch.zeros(k + 1, k + 1, dtype=dtype, device=context.device)  # index K: out of vocabulary
    for part in blocks:
        yield "interchange", part, bigram[:, part].T @ bigram  # Σ_B̄ = B̄ᵀB̄ (docs/leading_terms.md)
        value = (bigram @ context[:, part]).T.contiguous()  # V* = Φ̄ᵀB̄ᵀ = (B̄Φ̄)ᵀ, no K×K transpose copy
        yield "value", part, value
        g[part, :k] = value @ bigram  # G = Φ̄ᵀΣ_B̄ = V*B̄
        yield "g", part, g[part, :k]
    del bigram, context
    third = _QueryKeyPass(g, index.shape[1] - 1)
    for x, ok in _chunks(index, mask, chunk, device):
        third.add(x, ok)
    qk, delta = third.result(pairs)
    yield from _rows("qk", qk, blocks)
    yield "delta", slice(None), delta
    yield "pairs", slice(None), torch.tensor(pairs)


def corpus_statistics(
    index: np.ndarray,
    mask: np.ndarray,
    k: int,
    *,
    chunk: int = 64,
    device: str | torch.device = "cpu",
) -> CorpusStats:
    """All of :func:`stream_corpus_statistics` at once, in float64 (every matrix held: 6·8K² bytes)."""
    whole = {name: torch.empty(k, k, dtype=torch.float64, device=device) for name in _MATRICES}
    rest: dict[str, torch.Tensor] = {}
    for name, rows, values in stream_corpus_statistics(index, mask, k, chunk=chunk, device=device):
        if name in whole:
            whole[name][rows] = values
        else:
            rest[name] = values
    return CorpusStats(**whole, delta=rest["delta"], pairs=int(rest["pairs"]))


_MATRICES = ("bigram", "context", "interchange", "value", "g", "qk")


def _blocks(k: int, rows: int) -> Iterator[slice]:
    return (slice(start, min(start + rows, k)) for start in range(0, k, rows))


def _rows(name: str, matrix: torch.Tensor, blocks: list[slice]) -> Iterator[Block]:
    """Copies, not views: a block the consumer still holds must not keep the whole matrix alive."""
    return ((name, part, matrix[part].clone()) for part in blocks)


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


class _BigramPass:
    """Scatter-add accumulators of B̄ (docs/leading_terms.md, bigram)."""

    def __init__(self, k: int, device: str | torch.device) -> None:
        self.k = k
        self.joint = torch.zeros(k * k, dtype=torch.float64, device=device)  # Σ [x_t = i][x_{t+1} = j]
        self.inputs = torch.zeros(k, dtype=torch.float64, device=device)  # Σ [x_t = i]
        self.pairs = 0

    def add(self, x: torch.Tensor, ok: torch.Tensor) -> None:
        inp, tgt = x[:, :-1], x[:, 1:]
        seen = ok & (inp != OOV)
        self.inputs.index_add_(0, inp[seen], torch.ones_like(inp[seen], dtype=torch.float64))
        both = seen & (tgt != OOV)
        flat = (inp * self.k + tgt)[both]
        self.joint.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        self.pairs += int(ok.sum())

    def result(self) -> torch.Tensor:
        """B̄ (K×K), in place of the joint counts."""
        k = self.k
        # B̄[i,j] = (1/NT) Σ [x_t = i]([x_{t+1} = j] − 1/|V|)   (docs/leading_terms.md, bigram)
        return self.joint.view(k, k).sub_(self.inputs[:, None] / k).div_(self.pairs)


class _ContextPass:
    """Scatter-add accumulators of Φ̄ (docs/leading_terms.md, context)."""

    def __init__(self, k: int, device: str | torch.device) -> None:
        self.k = k
        self.prefix = torch.zeros(
            k * k, dtype=torch.float64, device=device
        )  # Σ_t [y_t = i] (1/t) Σ_{m≤t} [x_m = j]
        self.prefix_mass = torch.zeros(k, dtype=torch.float64, device=device)  # Σ_t (1/t) Σ_{m≤t} [x_m = j]

    def add(self, x: torch.Tensor, ok: torch.Tensor) -> None:
        inp, tgt = x[:, :-1], x[:, 1:]
        tri, inv_t = _causal(inp.shape[1], x.device)
        pairs = ok[:, :, None] & tri & (inp[:, None, :] != OOV)  # (n, t, m ≤ t)
        weight = inv_t[None, :, None].expand(pairs.shape)  # 1/t for every (t, m) pair
        m_tok = inp[:, None, :].expand(pairs.shape)
        self.prefix_mass.index_add_(0, m_tok[pairs], weight[pairs])
        with_target = pairs & (tgt[:, :, None] != OOV)
        flat = tgt[:, :, None] * self.k + inp[:, None, :]
        self.prefix.index_add_(0, flat[with_target], weight[with_target])

    def result(self, pairs: int) -> torch.Tensor:
        """Φ̄ (K×K), in place of the prefix sums; ``pairs`` = NT."""
        k = self.k
        # Φ̄[i,j] = (1/NT) Σ ([x_{t+1} = i] − 1/|V|) (1/t) Σ_{m≤t} [x_m = j]   (docs/leading_terms.md, context)
        return self.prefix.view(k, k).sub_(self.prefix_mass[None, :] / k).div_(pairs)


class _QueryKeyPass:
    """Scatter-add accumulators of Q̄ and Δ given G (docs/leading_terms.md, query–key prediction)."""

    def __init__(self, g: torch.Tensor, length: int) -> None:
        """``g`` is G padded to (K + 1)²: index K stands for an out-of-vocabulary token, a zero
        row and column. Its dtype is the products' (the scores are accumulated in float64)."""
        k = g.shape[0] - 1
        self.k = k
        self.g = g
        self.row_mean = g.sum(dim=1, dtype=torch.float64) / k  # rowsum(G)[x_k] / |V|
        self.qk = torch.zeros(k * k, dtype=torch.float64, device=g.device)
        self.q_sum = torch.zeros(length, length, dtype=torch.float64, device=g.device)  # Σ_n q[t, j]

    def add(self, x: torch.Tensor, ok: torch.Tensor) -> None:
        k = self.k
        inp, tgt = x[:, :-1], x[:, 1:]
        xi = torch.where(inp == OOV, k, inp)
        yi = torch.where(tgt == OOV, k, tgt)
        tri, inv_t = _causal(inp.shape[1], x.device)
        scores = self.g[xi[:, None, :], yi[:, :, None]].to(torch.float64) - self.row_mean[xi][:, None, :]
        q = query_key_scores(scores, tri, inv_t)
        q = q * ok[:, :, None]
        keep = ok[:, :, None] & tri & (inp[:, :, None] != OOV) & (inp[:, None, :] != OOV)
        flat = inp[:, :, None] * k + inp[:, None, :]
        self.qk.index_add_(0, flat[keep], q[keep])
        self.q_sum += q.sum(dim=0)

    def result(self, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Q̄ (K×K) and Δ (T): Δ_m is the m-th sub-diagonal sum of the averaged q."""
        length = self.q_sum.shape[0]
        delta = torch.stack([self.q_sum.diagonal(-m).sum() for m in range(length)])
        return self.qk.view(self.k, self.k).div_(pairs), delta / pairs


def query_key_scores(scores: torch.Tensor, tri: torch.Tensor, inv_t: torch.Tensor) -> torch.Tensor:
    """``q[t,j] = (s[t,j] − mean_{k≤t} s[t,k]) / t`` on the causal triangle, zero above it.

    docs/leading_terms.md (query–key prediction): ``scores[..., t, k] = G[x_k, y_t] − rowsum(G)[x_k]/|V|``.
    """
    s = scores * tri
    mean = s.sum(dim=-1, keepdim=True) * inv_t[:, None]
    return (s - mean) * tri * inv_t[:, None]
