"""Re-cluster a finished demo store under other settings (trajectory normalisation, HDBSCAN sizes).

Run after ``ckpt-analysis demo``: ``python benchmarks/polca_tuning.py demo_out/polca.zarr``.
Only clustering is redone; projections come from the store. Scores follow the paper's protocol
(> 85 % of a cluster's labelled tokens in an allowed place); for another task name its label and
restriction: ``--label borrow --restrict place --restrict-values 1 2``.
"""

from __future__ import annotations

import argparse

import numpy as np
from common import table

from ckpt_analysis.analyses.clusters import (
    hdbscan_labels,
    label_scores,
    normalise,
    passes_restriction,
    trajectory_curves,
)
from ckpt_analysis.data import label_variable
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
    has_label: np.ndarray,
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
            if passes_restriction(labels == c, has_label, allowed, 0.85):
                best = np.nanmax([best, label_scores(labels, has_label, c)[0]])
    return float(best), count


def main(path: str, label: str, restrict: str, values: list[int]) -> None:
    ds = open_results(path)
    has_label = ds[label_variable(label)].values == 1
    allowed = np.isin(ds[label_variable(restrict)].values, values)
    rows = []
    for trajectory in ("polca", "polca_axis", "exact_loss"):
        curves, kept = trajectory_curves(trajectory, lambda name: ds[name].values)
        for mode, size, samples in SETTINGS:
            best, count = best_homogeneity(curves, kept, has_label, allowed, mode, size, samples)
            rows.append([trajectory, mode, f"{size:g}", f"{samples:.3g}", str(count), f"{best:.3f}"])
    rate = has_label[allowed].mean()
    print(f"store {path}; {label} base rate among {restrict} in {values} tokens: {rate:.3f}\n")
    print(
        table(
            [
                "trajectory",
                "normalise",
                "min cluster",
                "min samples",
                "clusters",
                f"best {label} homogeneity",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("store", nargs="?", default="demo_out/polca.zarr")
    parser.add_argument("--label", default="carry", help="label column scored (without label_)")
    parser.add_argument("--restrict", default="place", help="label column of the restriction")
    parser.add_argument("--restrict-values", type=int, nargs="+", default=[1, 2], help="allowed values")
    args = parser.parse_args()
    main(args.store, args.label, args.restrict, args.restrict_values)
