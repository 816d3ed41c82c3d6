"""Bar (issue 21): windowed scoring adds ≤ 5 % to a clusters unit.

On a finished POLCA store, times a ``clusters/polca`` unit's work in two forms, side by side and
interleaved: the curves as the unit builds them for a window (slice, re-sum from the window's
first checkpoint, filters at its last: ``trajectory_curves(kind, read, span)``), and the curves
as they were read before windows existed (the stored projected loss and ``token_kept``, no
re-sum), each followed by the same clustering (HDBSCAN per kept vector and the breakthrough
steps). Prints the medians and their ratio for the whole run and for a window from the middle.

Run: ``python benchmarks/cluster_windows.py STORE [--repeats 5]`` (e.g. the demo's
``demo_out/polca.zarr``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import machine, table

from ckpt_analysis.analyses.clusters import (
    breakthrough_steps,
    hdbscan_labels,
    trajectory_curves,
    uniform_grid,
    window_span,
)
from ckpt_analysis.store import open_results


def _cluster(curves: np.ndarray, kept: np.ndarray, steps: np.ndarray, lag: int) -> None:
    for c, k in zip(curves, kept, strict=True):
        if k.sum() >= 3:
            hdbscan_labels(c[k], min_cluster_fraction=0.03, min_samples_fraction=1 / 15)
        grid, uniform = uniform_grid(steps, c)
        breakthrough_steps(grid, uniform, lag, "acceleration")


def _stored(read: object, span: slice) -> tuple[np.ndarray, np.ndarray]:
    """The pre-window path: the stored projected loss, transposed, and the stored filter."""
    projected = read("projected_loss").astype(np.float64)[span]  # type: ignore[operator]
    return projected.transpose(1, 2, 0), read("token_kept") == 1  # type: ignore[operator]


def trajectory_curves_polca(read: object, span: slice) -> tuple[np.ndarray, np.ndarray]:
    """The windowed path: what a ``clusters/polca`` unit builds."""
    return trajectory_curves("polca", read, span)  # type: ignore[arg-type]


def main(store: Path, repeats: int) -> None:
    ds = open_results(store)
    cache = {name: ds[name].values for name in ("token_loss", "projected_loss", "token_kept")}
    steps = ds.step.values
    lag = 2 * int(np.diff(steps).min())
    middle = steps[len(steps) // 2]
    rows = []
    for label, span in (
        ("whole run", slice(None)),
        (f"from step {middle}", window_span(middle, steps[-1], steps)),
    ):
        times: dict[str, list[float]] = {"windowed": [], "stored": []}
        for _ in range(repeats):
            for kind, build in (("windowed", trajectory_curves_polca), ("stored", _stored)):
                start = time.perf_counter()
                curves, kept = build(cache.__getitem__, span)
                _cluster(
                    curves, kept, steps[span], lag if span == slice(None) else 2 * int(np.diff(steps).min())
                )
                times[kind].append(time.perf_counter() - start)
        windowed, stored = (float(np.median(times[k])) for k in ("windowed", "stored"))
        rows.append([label, f"{stored:.3f}", f"{windowed:.3f}", f"{windowed / stored:.3f}×"])
    print(machine())
    print(table(["curves", "stored filter s", "windowed s", "ratio (bar ≤ 1.05×)"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("store", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    main(args.store, args.repeats)
