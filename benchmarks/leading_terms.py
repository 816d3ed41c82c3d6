"""Corpus statistics (docs/leading_terms.md): scatter-adds vs dense one-hot, and peak memory against K.

1. Throughput at K = 2000, T = 128: ``corpus_statistics`` (O(N·T²) scatter-adds) against the
   dense one-hot formulas (O(N·T·K²) matmuls, ``tests/builders.py``); values must agree.
2. Peak resident memory of the ``corpus_stats`` unit's computation as K grows, each K in a fresh
   process: ``stream_corpus_statistics`` consumed block by block in the store dtype (float32),
   each block copied out as the unit hands it to the store.

Run: ``python benchmarks/leading_terms.py [--memory-only] [--ks 1000 2000 ...]`` (about 3 minutes
on 2 cores; K = 12,000 adds about 5).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, median_time, table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from builders import dense_corpus_statistics

from ckpt_analysis.corpus import corpus_statistics, top_vocabulary, vocab_index

K, LENGTH = 2000, 129
SEQUENCES = (64, 256)
MEMORY_KS = (50, 1000, 2000, 4000, 8000)


def zipf_corpus(sequences: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Token ids with a Zipfian unigram distribution, like text; every id occurs at least once."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1)
    ids = rng.choice(vocab, size=(sequences, length), p=p / p.sum())
    ids.reshape(-1)[:vocab] = rng.permutation(vocab)
    return ids


def throughput(sequences: int) -> list[str]:
    """One table row: both methods on ``sequences`` sequences, their ratio and largest difference.

    Both include the three K×K products (Σ_B̄, V*, G), an O(K³) cost independent of the corpus.
    """
    ids = zipf_corpus(sequences, LENGTH, 2 * K)
    mask = np.ones_like(ids, dtype=np.int8)
    index = vocab_index(ids, top_vocabulary(ids, mask, K)[0])
    scatter = median_time(lambda: corpus_statistics(index, mask, K), 3)
    start = time.perf_counter()
    dense = dense_corpus_statistics(index, mask, K)
    dense_s = time.perf_counter() - start
    stats = corpus_statistics(index, mask, K)
    worst = max(
        float(np.abs(getattr(stats, n).numpy() - dense[n]).max() / np.abs(dense[n]).max())
        for n in ("bigram", "context", "interchange", "value", "g", "qk", "delta")
    )
    tokens = sequences * (LENGTH - 1)
    return [
        str(sequences),
        f"{scatter:.2f} s",
        f"{dense_s:.2f} s",
        f"{dense_s / scatter:.1f}×",
        f"{tokens / scatter:,.0f}",
        f"{worst:.1e}",
    ]


def _sequences(k: int) -> int:
    """256, or enough for the Zipf corpus over 2K tokens to hold every one of them."""
    return max(256, 2 * k // LENGTH + 1)


def peak_memory(k: int) -> float:
    """Peak RSS (MiB) of a fresh process (imports included) computing the statistics at size ``k``.

    Read from ``VmHWM``: unlike ``ru_maxrss`` it does not inherit this process's peak across exec.
    """
    code = (
        "import re, numpy as np, sys; sys.path.insert(0, 'benchmarks');"
        "from leading_terms import zipf_corpus;"
        "import collections, torch;"
        "from ckpt_analysis.corpus import stream_corpus_statistics, top_vocabulary, vocab_index;"
        f"ids = zipf_corpus({_sequences(k)}, {LENGTH}, {2 * k}); mask = np.ones_like(ids, dtype=np.int8);"
        f"index = vocab_index(ids, top_vocabulary(ids, mask, {k})[0]);"
        f"blocks = stream_corpus_statistics(index, mask, {k}, dtype=torch.float32);"
        "collections.deque((b.cpu().numpy().astype(np.float32) for _, _, b in blocks), maxlen=0);"
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def main(ks: list[int], *, throughput_too: bool) -> None:
    torch.set_num_threads(2)
    print(machine())
    if throughput_too:
        print(
            f"\n1. corpus statistics, K = {K}, T = {LENGTH - 1}: scatter-add (median of 3) vs dense (once)\n"
        )
        header = ["sequences", "scatter-add", "dense one-hot", "ratio", "tokens/s (scatter)", "max rel. diff"]
        print(table(header, [throughput(n) for n in SEQUENCES]))
    print("\n2. peak memory of a fresh process (256 sequences, more above K = 16,500; T = 128)\n")
    base = peak_memory(MEMORY_KS[0])
    rows = []
    for k in ks:
        extra = peak_memory(k) - base
        rows.append([str(k), f"{extra:.0f} MiB", f"{extra * 2**20 / (8 * k * k):.1f}"])
    print(f"K = {MEMORY_KS[0]} (imports, corpus): {base:.0f} MiB; above that:\n")
    print(table(["K", "peak RSS above K = 50", "in K×K float64 matrices"], rows))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--memory-only", action="store_true", help="skip part 1")
    parser.add_argument("--ks", type=int, nargs="+", default=list(MEMORY_KS[1:]), help="vocabulary sizes K")
    args = parser.parse_args()
    main(args.ks, throughput_too=not args.memory_only)
