"""Query speed: one (step, layer) matrix from a 100-step store vs a lone .npy file (docs/benchmarks.md).

Run: ``python benchmarks/query.py`` (under a minute).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import zarr
from common import machine, median_time, table

from ckpt_analysis.registry import Variable, Write
from ckpt_analysis.staging import StagedWrites
from ckpt_analysis.store import create_store, open_results, read

STEPS, LAYERS, D = 100, 4, 256


def main() -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        store = tmp / "q.zarr"
        sizes = {"step": STEPS, "site": 1, "layer": LAYERS, "dim": D, "dim_b": D}
        var = Variable.of("act_cov", sizes, "float32", unit_axes=3)
        coords = {
            "step": (("step",), np.arange(STEPS) * 1000),
            "layer": (("layer",), np.arange(LAYERS)),
            "site": (("site",), np.array(["resid_post"], dtype=object)),
        }
        create_store(store, variables=[var], coords=coords, tables={}, meta={"units": []}, replace=False)
        block = rng.normal(size=(1, LAYERS, D, D)).astype(np.float32)
        for s in range(STEPS):
            staged = StagedWrites(store, f"covariance/step={s}")
            staged.write(Write("act_cov", (s,), block))
            staged.commit()
        np.save(tmp / "one.npy", block[0, 2])
        picks = rng.integers(0, STEPS, 200)
        it = iter(np.tile(picks, 100))
        ds = open_results(store)
        dask_ds = open_results(store, chunks={})
        arr = zarr.open_array(str(store), path="act_cov", mode="r")
        cases = {
            "lone .npy (np.load)": lambda: np.load(tmp / "one.npy"),
            "ckpt_analysis.read (labelled, chunk file)": lambda: read(
                store, "act_cov", step=next(it) * 1000, site="resid_post", layer=2
            ),
            "zarr array, open once": lambda: arr[next(it), 0, 2],
            "open_results once, then .sel": lambda: ds.act_cov.sel(step=next(it) * 1000, layer=2).values,
            "open_results + .sel each time": lambda: (
                open_results(store).act_cov.sel(step=next(it) * 1000, layer=2).values
            ),
            "open_results(chunks={}) (dask), .sel": lambda: (
                dask_ds.act_cov.sel(step=next(it) * 1000, layer=2).values
            ),
        }
        times = {name: median_time(fn, 200) for name, fn in cases.items()}
        base = times["lone .npy (np.load)"]
        print(machine(), "\n")
        print(
            f"store: act_cov ({STEPS}, 1, {LAYERS}, {D}, {D}) float32, one chunk per matrix, uncompressed;"
            " medians of 200 reads of random steps\n"
        )
        rows = [[name, f"{v * 1e3:.2f}", f"{v / base:.2f}×", "≤ 2×"] for name, v in times.items()]
        print(table(["read", "median ms", "vs .npy", "bar"], rows))


if __name__ == "__main__":
    main()
