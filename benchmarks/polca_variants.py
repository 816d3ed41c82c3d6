"""Which second-order variant conserves the loss change, over training seeds and checkpoint spacings?

For each spacing and seed: train the demo's addition model (600 steps at lr 3e-3, the seed sets
initialisation and training problems), run POLCA on its checkpoints with an Algorithm-1 Hessian
basis (k = 1, the demo's basis spacing) and ``measure_all_variants = true``, and read per variant

- ``explained``: the fraction of the aggregate loss change Σ_t Σ_b POLCA explains (1 is perfect);
- ``interval error``: the median over intervals of |predicted − exact| / |exact| for the change of
  the mean token loss (docs/polca.md, "Per-interval validity").

Prints mean ± sd over seeds per spacing and variant, how often each variant conserves best, and the
raw table. Run: ``python benchmarks/polca_variants.py [WORKDIR] [--seeds 5] [--spacings 20 50]``
(about 30 minutes on 2 cores at the defaults; finished runs in WORKDIR are reused).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
from common import machine, table
from transformers.utils import logging as hf_logging

from ckpt_analysis.analyses.polca import VARIANTS
from ckpt_analysis.config import job_from_dict
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results
from ckpt_analysis.zoo.demo import basis_every, train_or_reuse
from ckpt_analysis.zoo.train import TrainConfig

STEPS, PROBLEMS = 600, 250


def polca_store(folder: Path, train: TrainConfig) -> Path:
    """Run the all-variants POLCA job on ``folder/run`` unless its store is complete."""
    every = basis_every(train)  # as the demo's job
    basis = {"k": 1, "every": every, "random": False, "axis": 0, "sample_sequences": 128}
    raw = {
        "name": "polca-variants",
        "output": "variants.zarr",
        "checkpoints": {"source": "local", "path": "run"},
        "data": {"source": "addition", "num_examples": PROBLEMS, "seed": 4321},
        "analyses": {
            "hessian_basis": basis,
            "token_loss": {},
            "polca": {"measure_all_variants": True},
        },
        "compute": {"executor": "local", "workers": 2, "batch_size": PROBLEMS},
    }
    run_job(job_from_dict(raw, base=folder))
    return folder / "variants.zarr"


def measures(store: Path) -> dict[str, tuple[float, float]]:
    """Per variant: (explained fraction, median per-interval relative error)."""
    ds = open_results(store)
    exact = ds.polca_interval_change.values[:-1]
    out = {}
    for variant in VARIANTS:
        predicted = ds.polca_interval_predicted.sel(variant=variant).values[:-1]
        error = float(np.median(np.abs(predicted - exact) / np.abs(exact)))
        out[variant] = (float(ds.polca_explained.sel(variant=variant)), error)
    return out


def summary(runs: dict[tuple[int, int], dict[str, tuple[float, float]]], spacing: int) -> list[list[str]]:
    """Rows of mean ± sd over seeds at one spacing, and how often each variant is best."""
    here = [m for (s, _), m in runs.items() if s == spacing]
    best = [min(VARIANTS, key=lambda v: abs(m[v][0] - 1)) for m in here]
    rows = []
    for v in VARIANTS:
        explained = [m[v][0] for m in here]
        gap = [abs(x - 1) for x in explained]
        error = [m[v][1] for m in here]
        rows.append(
            [
                str(spacing),
                v,
                f"{statistics.mean(explained):.3f} ± {statistics.stdev(explained):.3f}",
                f"{statistics.mean(gap):.3f} ± {statistics.stdev(gap):.3f}",
                f"{statistics.mean(error):.2f} ± {statistics.stdev(error):.2f}",
                f"{best.count(v)}/{len(here)}",
            ]
        )
    return rows


def main(workdir: Path, seeds: int, spacings: list[int]) -> None:
    hf_logging.disable_progress_bar()
    runs = {}
    for spacing in spacings:
        for seed in range(seeds):
            folder = workdir / f"every{spacing}_seed{seed}"
            train = TrainConfig(steps=STEPS, save_every=spacing, seed=seed)
            train_or_reuse(folder / "run", train)
            runs[spacing, seed] = measures(polca_store(folder, train))
    print(machine(), "\n")
    header = ["spacing", "variant", "explained", "|explained − 1|", "median interval error", "best"]
    print(table(header, [r for s in spacings for r in summary(runs, s)]))
    raw = [
        [str(s), str(seed), *(f"{m[v][0]:.3f}" for v in VARIANTS)] for (s, seed), m in sorted(runs.items())
    ]
    print("\nexplained per run\n")
    print(table(["spacing", "seed", *VARIANTS], raw))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", nargs="?", default="polca_variants_out", type=Path)
    parser.add_argument("--seeds", type=int, default=5, help="training seeds per spacing (at least 2)")
    parser.add_argument("--spacings", type=int, nargs="+", default=[20, 50], help="checkpoint spacings")
    args = parser.parse_args()
    main(args.workdir, args.seeds, args.spacings)
