"""Sweep scaling on 8 checkpoints: 2 Dask workers vs 1 vs a plain Python loop (docs/benchmarks.md).

Run: ``python benchmarks/sweep.py`` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import build_run, machine, table, write_ids
from transformers import AutoModelForCausalLM

from ckpt_analysis.analyses.covariance import CovarianceAccumulator
from ckpt_analysis.config import job_from_dict
from ckpt_analysis.plan import prepare_store
from ckpt_analysis.run import run_job
from ckpt_analysis.sites import SITES, capture

CHECKPOINTS, SEQUENCES, LENGTH, BATCH, REPEATS = 8, 256, 64, 32, 3


def plain_loop(run: Path, ids: np.ndarray, out: Path) -> None:
    """The same covariances with nothing but transformers, torch and numpy."""
    torch.set_num_threads(1)
    for step in range(CHECKPOINTS):
        model = AutoModelForCausalLM.from_pretrained(run / f"checkpoint-{step}").eval()
        d, layers = model.config.hidden_size, model.config.num_hidden_layers
        accs = {(s, i): CovarianceAccumulator(d) for s in SITES for i in range(layers)}
        with (
            torch.inference_mode(),
            capture(model, SITES, lambda s, i, a, acc=accs: acc[(s, i)].update(a.flatten(0, 1))),
        ):
            for start in range(0, len(ids), BATCH):
                batch = torch.from_numpy(ids[start : start + BATCH])
                model.base_model(input_ids=batch, attention_mask=torch.ones_like(batch))
        np.save(out / f"cov_{step}.npy", np.stack([a.statistics()[1].numpy() for a in accs.values()]))


def _unit_seconds(store: Path) -> float:
    return sum(json.loads(p.read_text())["wall_s"] for p in (store / "_units").glob("*.json"))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run = build_run(tmp / "run", CHECKPOINTS)
        data = write_ids(tmp / "ids.jsonl", sequences=SEQUENCES, length=LENGTH, vocab=16)
        ids = np.array([json.loads(line)["ids"] for line in data.read_text().splitlines()])
        raw = {
            "name": "sweep",
            "output": str(tmp / "s.zarr"),
            "analyses": {"covariance": {"positions": "all"}},
            "checkpoints": {"source": "local", "path": str(run)},
            "data": {"source": "dataset", "path": str(data), "ids_column": "ids", "seq_len": LENGTH},
            "compute": {"batch_size": BATCH, "torch_threads": 1, "threads_per_worker": 1},
        }
        prepare_store(job_from_dict(raw, base=tmp), force=False)
        wall: dict[str, list[float]] = {"plain loop": [], "1 Dask worker": [], "2 Dask workers": []}
        units: dict[str, list[float]] = {k: [] for k in wall}
        for _ in range(REPEATS):
            start = time.perf_counter()
            plain_loop(run, ids, tmp)
            wall["plain loop"].append(time.perf_counter() - start)
            units["plain loop"].append(wall["plain loop"][-1])
            for workers, name in ((1, "1 Dask worker"), (2, "2 Dask workers")):
                job = job_from_dict({**raw, "compute": {**raw["compute"], "workers": workers}}, base=tmp)
                start = time.perf_counter()
                run_job(job, force=True, executor="local")
                wall[name].append(time.perf_counter() - start)
                units[name].append(_unit_seconds(tmp / "s.zarr"))
        med = {k: float(np.median(v)) for k, v in wall.items()}
        work = {k: float(np.median(v)) for k, v in units.items()}
        print(machine(), "\n")
        print(
            f"{CHECKPOINTS} checkpoints, {SEQUENCES}×{LENGTH} tokens, 4 sites × 4 layers, hidden 256, "
            f"torch threads 1; medians of {REPEATS}. Wall includes starting the LocalCluster and "
            "importing torch/transformers in each worker.\n"
        )
        print(
            table(
                ["executor", "wall s", "sum of unit times s"],
                [[k, f"{med[k]:.2f}", f"{work[k]:.2f}"] for k in med],
            )
        )
        print(
            f"\n2 workers vs 1 (wall): {med['1 Dask worker'] / med['2 Dask workers']:.2f}× faster "
            "(bar ≥ 1.6×)"
        )
        print(f"1 worker vs plain loop (wall): {med['1 Dask worker'] / med['plain loop']:.2f}× (bar ≤ 1.10×)")
        print(f"1 worker vs plain loop (unit time): {work['1 Dask worker'] / work['plain loop']:.2f}×")


if __name__ == "__main__":
    main()
