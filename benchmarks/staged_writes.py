"""What staging a unit's chunks costs (docs/benchmarks.md, "Staged writes").

Two stores of one covariance job (a random GPTNeoX, hidden 256, 4 layers, 4 sites; 6 checkpoints;
8.4 MB of results per unit) side by side, interleaved in one run: one written as the toolkit
writes it (every chunk staged in ``_units/<unit>.staging/``, then renamed into place), one
written straight into its chunks as before staging (the unit protocol with ``StagedWrites``
swapped for a direct writer here). Reported: the median covariance unit wall time over 5 forced
reruns of each store (bar: ≤ 1.03×), and, less noisy, the write phase alone: one unit's three
blocks written (and renamed) 30 times each way, interleaved, its added median as a share of
the median unit.
Run: ``python benchmarks/staged_writes.py [WORKDIR]`` (about two minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import zarr
from common import build_run, covariance_job, machine, table, unit_times

import ckpt_analysis.run as run_module
from ckpt_analysis.config import JobSpec, job_from_dict
from ckpt_analysis.plan import prepare_store
from ckpt_analysis.registry import Unit, Write, get_analysis
from ckpt_analysis.run import run_job
from ckpt_analysis.staging import StagedWrites
from ckpt_analysis.store import chunk_files

STEPS = 6


class _DirectWrites:
    """The protocol before staging: each block written straight into its chunk files."""

    def __init__(self, path: str | Path, unit_id: str) -> None:
        self.root = str(path)
        self.files: list[str] = []

    def write(self, write: Write) -> None:
        self.files += chunk_files(self.root, write)
        array = zarr.open_array(self.root, path=write.name, mode="r+")
        array.with_config({"write_empty_chunks": True})[write.index] = write.values

    def commit(self) -> None:
        pass

    def discard(self) -> None:
        pass


def _write_phase(
    store: str, unit: Unit, writes: list[Write], writer: type[_DirectWrites] | type[StagedWrites]
) -> float:
    start = time.perf_counter()
    staged = writer(store, unit.id)
    for write in writes:
        staged.write(write)
    staged.commit()
    return time.perf_counter() - start


def _write_phases(job: JobSpec) -> dict[str, float]:
    """Median seconds to write one unit's blocks directly and staged, interleaved."""
    worker = run_module._worker(job.output, json.dumps(job.to_dict()))
    unit = worker.units[0]
    writes = list(
        get_analysis(unit.analysis).from_spec(job.analyses[unit.analysis]).compute(unit, worker.context)
    )
    times: dict[str, list[float]] = {"direct": [], "staged": []}
    for _ in range(30):
        times["direct"].append(_write_phase(job.output, unit, writes, _DirectWrites))
        times["staged"].append(_write_phase(job.output, unit, writes, StagedWrites))
    return {k: statistics.median(v) for k, v in times.items()}


def main(workdir: Path) -> None:
    torch.manual_seed(0)
    run = build_run(workdir / "run", STEPS)
    writers = {"direct": _DirectWrites, "staged": StagedWrites}
    jobs = {k: job_from_dict(covariance_job(run, workdir / f"{k}.zarr"), base=workdir) for k in writers}
    for job in jobs.values():
        prepare_store(job, force=True)
    units: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(5):
        for kind, job in jobs.items():
            run_module.StagedWrites = writers[kind]  # type: ignore[misc]
            assert all(o.ok for o in run_job(job, force=True))
            units[kind] += unit_times(Path(job.output))
    run_module.StagedWrites = StagedWrites  # type: ignore[misc]
    unit = {k: statistics.median(v) for k, v in units.items()}
    ratio = unit["staged"] / unit["direct"]
    phase = _write_phases(jobs["staged"])
    added = (phase["staged"] - phase["direct"]) / unit["direct"]
    rows = [
        ["covariance unit (s)", f"{unit['direct']:.3f}", f"{unit['staged']:.3f}", f"{ratio:.3f}×", "≤ 1.03×"],
        [
            "its write phase (ms)",
            f"{phase['direct'] * 1e3:.1f}",
            f"{phase['staged'] * 1e3:.1f}",
            f"+{added * 100:.1f} % of a unit",
            "≤ 3 %",
        ],
    ]
    print(machine(), "\n")
    print(table(["what", "direct writes", "staged + renamed", "ratio", "bar"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", nargs="?", default="staging_out", type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    main(args.workdir.resolve())
