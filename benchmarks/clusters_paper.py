"""Clusters at the POLCA paper's size: one HDBSCAN fit of 5,000 curves × 501 points, and fits spread
over threads.

The paper's run clusters 5 trajectories × up to 50 vectors × 2 windows (402 fits: the exact loss
is one curve set per window) of 5,000 token curves over 501 checkpoints. Synthetic curves (random
walks, a third of them given a shared rise, a fifth a shared fall) at that size; the paper's
min_cluster_size 150 and min_samples 333. Times, side by side: HDBSCAN's tree-based ``best``
algorithm (what ``hdbscan_labels`` used before) and the dense ``generic`` one it uses now, both
with BLAS on every core; then ``--fits`` fits one after another with BLAS on one thread, and the
same fits over ``_fitting_threads`` (a clusters unit's ``compute.torch_threads``). Prints the
per-fit times and the projection for the 402 fits on 16 cores.

Run: ``python benchmarks/clusters_paper.py [--fits 8] [--threads 2]`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import machine, table
from threadpoolctl import threadpool_limits

from ckpt_analysis.analyses import clusters

TOKENS, CHECKPOINTS, PAPER_FITS = 5000, 501, 402
OPTIONS = {"min_cluster_fraction": 0.03, "min_samples_fraction": 1 / 15}


def curves(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.cumsum(rng.normal(size=(TOKENS, CHECKPOINTS)), axis=1) * 0.01 + rng.normal(size=(TOKENS, 1))
    out[: TOKENS // 3] += np.linspace(0, 3, CHECKPOINTS)
    out[TOKENS // 3 : TOKENS // 3 + TOKENS // 5] -= np.linspace(0, 2, CHECKPOINTS)
    return out


def timed(fn: object, *args: object) -> float:
    start = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return time.perf_counter() - start


def main(fits: int, threads: int) -> None:
    sets = [curves(seed) for seed in range(fits)]
    fit = lambda x: clusters.hdbscan_labels(x, **OPTIONS)  # noqa: E731
    fit(sets[0][:500])  # first-call costs (imports, BLAS start-up) out of the timings
    dense = timed(fit, sets[0])
    saved, clusters.DENSE_DISTANCES_BYTES = clusters.DENSE_DISTANCES_BYTES, 0
    tree = timed(fit, sets[0])
    clusters.DENSE_DISTANCES_BYTES = saved
    with threadpool_limits(1):
        one = timed(lambda: [fit(x) for x in sets]) / fits
    with clusters._fitting_threads(threads) as pool:
        spread = timed(lambda: list(pool.map(fit, sets))) / fits
    rows = [
        ["tree-based `best` (before), BLAS all cores", f"{tree:.2f}", ""],
        ["dense `generic` (now), BLAS all cores", f"{dense:.2f}", f"{tree / dense:.1f}× faster"],
        ["dense, BLAS 1 thread, one fit after another", f"{one:.2f}", ""],
        [
            f"dense, {threads} fits at a time (`_fitting_threads`)",
            f"{spread:.2f}",
            f"{one / spread:.2f}× one",
        ],
    ]
    print(machine(), "\n")
    print(f"{TOKENS} curves × {CHECKPOINTS} points, {fits} fits\n")
    print(table(["fit", "s per fit", ""], rows))
    print(
        f"\n{PAPER_FITS} fits on 16 cores at {one:.2f} s each, 16 at a time: ≈ {PAPER_FITS * one / 16:.0f} s"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fits", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    main(args.fits, args.threads)
