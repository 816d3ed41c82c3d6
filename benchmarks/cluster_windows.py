"""Bar (issue 21): windowed scoring adds ≤ 5 % to a clusters unit.

On a finished POLCA store, times, side by side and interleaved, the curves as a ``clusters/polca``
unit builds them for a window (slice, re-sum from the window's first checkpoint, filters at its
last: ``trajectory_curves(kind, read, span)``) and the curves as they were read before windows
existed (the stored projected loss and ``token_kept``, no re-sum), and the clustering that
follows either (HDBSCAN per kept vector and the breakthrough steps, on the windowed curves, so
both forms are charged the same clustering). Prints the medians and the unit's ratio,
(windowed curves + clustering) / (stored curves + clustering), for the whole run and for a
window from the middle.

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
        times: dict[str, list[float]] = {"windowed": [], "stored": [], "cluster": []}
        for _ in range(repeats):
            for kind, build in (("windowed", trajectory_curves_polca), ("stored", _stored)):
                start = time.perf_counter()
                curves, kept = build(cache.__getitem__, span)
                times[kind].append(time.perf_counter() - start)
            start = time.perf_counter()
            _cluster(curves, kept, steps[span], lag)  # the same clustering after either
            times["cluster"].append(time.perf_counter() - start)
        windowed, stored, cluster = (float(np.median(times[k])) for k in ("windowed", "stored", "cluster"))
        ratio = (windowed + cluster) / (stored + cluster)
        rows.append([label, f"{stored:.3f}", f"{windowed:.3f}", f"{cluster:.3f}", f"{ratio:.3f}×"])
    print(machine())
    header = ["curves", "stored curves s", "windowed curves s", "clustering s", "unit ratio (bar ≤ 1.05×)"]
    print(table(header, rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("store", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    main(args.store, args.repeats)
