"""Shared benchmark helpers: a mid-sized random GPTNeoX run on disk, timing medians, machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import xarray
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from ckpt_analysis.tasks.arithmetic import build_tokenizer

BENCH_MODEL = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "intermediate_size": 1024,
}


def build_run(root: Path, steps: int, *, vocab: int = 512, max_positions: int = 128) -> Path:
    """``steps`` checkpoints of a random GPTNeoX (hidden 256, 4 layers) as a local run."""
    config = GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=max_positions, **BENCH_MODEL)
    tokenizer = build_tokenizer()
    for step in range(steps):
        folder = root / f"checkpoint-{step}"
        if not folder.is_dir():
            torch.manual_seed(step)
            GPTNeoXForCausalLM(config).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    return root


def bare_forwards(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]
) -> None:
    """The decoder stack alone (``model.base_model``, no hooks) over ``(ids, attention mask)``
    batches, waiting for the device at the end: the floor the analyses' ratios divide by."""
    base = model.base_model
    with torch.inference_mode():
        for ids, attn in batches:
            base(input_ids=ids, attention_mask=attn)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()


def write_ids(path: Path, *, sequences: int, length: int, vocab: int = 512, seed: int = 0) -> Path:
    """A pre-tokenized jsonl data file of random ids."""
    import json

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sequences, length), generator=gen).tolist()
    path.write_text("\n".join(json.dumps({"ids": row}) for row in ids) + "\n")
    return path


def covariance_job(run: Path, output: Path) -> dict[str, object]:
    """The store-cost benchmarks' job: every site of a covariance sweep, in-process, one thread."""
    return {
        "name": "store-bench",
        "output": str(output),
        "checkpoints": {"source": "local", "path": str(run)},
        "data": {"source": "addition", "num_examples": 256},
        "analyses": {"covariance": {"sites": ["resid_pre", "attn_out", "mlp_out", "resid_post"]}},
        "compute": {"executor": "inprocess", "batch_size": 64, "torch_threads": 1},
    }


def unit_times(store: Path) -> list[float]:
    """Every unit's wall time from its sidecar."""
    from ckpt_analysis.store import read_sidecar, store_meta

    return [float((read_sidecar(store, u["id"]) or {})["wall_s"]) for u in store_meta(store)["units"]]


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def machine() -> str:
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "zarr", "dask"))
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}; {versions}"


CARRY_HEADER = [
    "trajectory",
    "window",
    "clusters",
    "carry homogeneity (top 3)",
    "F1",
    "carry AUC",
    "POLCA explains",
]


SCORE_HEADER = [
    "window",
    "trajectory",
    "clusters",
    "carry homogeneity (top 3)",
    "F1",
    "carry AUC",
    "base rate",
    "≥ 0.8",
]


def score_rows(ds: xarray.Dataset) -> list[list[str]]:
    """Per window and trajectory: clusters, best scored carry homogeneity, F1, AUC, base rate."""
    from ckpt_analysis.report import cluster_table

    allowed = np.isin(ds.label_place.values, [1, 2])
    base = float((ds.label_carry.values[allowed] == 1).mean())
    rows = []
    for r in cluster_table(ds):
        top = ", ".join("—" if np.isnan(h) else f"{h:.3f}" for h in r.top_homogeneity)
        found = "yes" if np.nanmax([*r.top_homogeneity, -1]) >= 0.8 else "no"
        cells = [str(r.clusters), top, f"{r.f1:.3f}", f"{r.label_auc:.3f}", f"{base:.3f}", found]
        rows.append([r.window, r.trajectory, *cells])
    return rows


def carry_rows(store: Path, *lead: str) -> list[list[str]]:
    """A POLCA store's carry table (``report.cluster_table``), each row led by ``lead``."""
    from ckpt_analysis.report import cluster_table
    from ckpt_analysis.store import open_results

    ds = open_results(store)
    explained = f"{float(ds.polca_explained.sel(variant='none')):.2f}"
    rows = []
    for r in cluster_table(ds):
        top = ", ".join("—" if np.isnan(h) else f"{h:.3f}" for h in r.top_homogeneity)
        scores = [f"{r.f1:.3f}", f"{r.label_auc:.3f}", explained]
        rows.append([*lead, r.trajectory, r.window, str(r.clusters), top, *scores])
    return rows
