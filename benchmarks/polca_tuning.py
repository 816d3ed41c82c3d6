"""Re-cluster a finished demo store under other settings (trajectory normalisation, HDBSCAN sizes).

Run after ``ckpt-analysis demo``: ``python benchmarks/polca_tuning.py demo_out/polca.zarr``.
Only clustering is redone; projections come from the store. Scores follow the paper's protocol
(> 85 % of a cluster's carry tokens in the 10s/100s place).
"""

from __future__ import annotations

import sys

import numpy as np
from common import table

from ckpt_analysis.analyses.clusters import (
    hdbscan_labels,
    label_scores,
    normalise,
    passes_restriction,
    trajectory_curves,
)
from ckpt_analysis.store import open_results

SETTINGS = [
    ("none", 0.03, 1 / 15),
    ("zscore", 0.03, 1 / 15),
    ("range", 0.03, 1 / 15),
    ("none", 0.01, 0.01),
    ("zscore", 0.01, 0.01),
    ("range", 0.01, 0.01),
]


def best_homogeneity(
    curves: np.ndarray,
    kept: np.ndarray,
    carry: np.ndarray,
    allowed: np.ndarray,
    mode: str,
    size: float,
    samples: float,
) -> tuple[float, int]:
    best, count = np.nan, 0
    for vector, keep in zip(curves, kept, strict=True):
        if keep.sum() < 3:
            continue
        labels = np.full(len(keep), -2)
        labels[keep] = hdbscan_labels(
            normalise(vector[keep], mode),  # type: ignore[arg-type]
            min_cluster_fraction=size,
            min_samples_fraction=samples,
        )
        for c in range(labels.max() + 1):
            count += 1
            if passes_restriction(labels == c, carry, allowed, 0.85):
                best = np.nanmax([best, label_scores(labels, carry, c)[0]])
    return float(best), count


def main(path: str) -> None:
    ds = open_results(path)
    carry = ds.label_carry.values == 1
    allowed = np.isin(ds.label_place.values, [1, 2])
    rows = []
    for trajectory in ("polca", "polca_axis", "exact_loss"):
        curves, kept = trajectory_curves(trajectory, lambda name: ds[name].values)
        for mode, size, samples in SETTINGS:
            best, count = best_homogeneity(curves, kept, carry, allowed, mode, size, samples)
            rows.append([trajectory, mode, f"{size:g}", f"{samples:.3g}", str(count), f"{best:.3f}"])
    print(f"store {path}; carry base rate among 10s/100s-place tokens: {carry[allowed].mean():.3f}\n")
    print(
        table(
            ["trajectory", "normalise", "min cluster", "min samples", "clusters", "best carry homogeneity"],
            rows,
        )
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo_out/polca.zarr")
