"""Cost before a sweep: time and memory per unit, store size and totals per analysis (docs/cluster.md)."""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ckpt_analysis.config import JobSpec
from ckpt_analysis.errors import StoreError
from ckpt_analysis.plan import Plan, make_plan
from ckpt_analysis.registry import Unit
from ckpt_analysis.store import done_flags, read_sidecar, require_store, store_meta

log = logging.getLogger(__name__)

CALIBRATION_UNITS = 4
"""Most units one analysis's calibration may run (its first unit and the inputs it needs)."""


@dataclass(frozen=True)
class Estimate:
    """One analysis's predicted cost on this device.

    ``seconds`` and the peaks are per unit, from ``source``: units finished in the store (their
    sidecars), a calibration run of the analysis's first unit, or nothing (``None``).
    """

    analysis: str
    units: int
    store_bytes: int
    seconds: float | None
    peak_rss_mb: float | None
    gpu_peak_mb: float | None
    source: str

    @property
    def total_seconds(self) -> float | None:
        return None if self.seconds is None else self.seconds * self.units


def device_name(device: str) -> str:
    """The card or CPU that ``device`` (``checkpoints.device``) resolves to here, in words."""
    import os

    import torch

    from ckpt_analysis.device import resolve_device

    if resolve_device(device).startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {os.cpu_count()} cores"


def store_bytes(plan: Plan) -> dict[str, int]:
    """Bytes each analysis's variables take once written (the store is uncompressed)."""
    sizes: dict[str, int] = {}
    for analysis in plan.analyses:
        declared = analysis.variables(plan.context)
        sizes[analysis.name] = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in declared)
    return sizes


def _closure(units: Sequence[Unit], first: Unit) -> list[Unit]:
    """``first`` and every unit it needs, transitively, in a runnable order."""
    by_id = {u.id: u for u in units}
    needed: dict[str, Unit] = {}

    def visit(unit: Unit) -> None:
        for dep in unit.deps:
            visit(by_id[dep])
        needed.setdefault(unit.id, unit)

    visit(first)
    return list(needed.values())


def calibration_units(units: Sequence[Unit]) -> dict[str, list[Unit]]:
    """Per analysis, the units to run to time one of its units: its first per-checkpoint unit
    (else its first), with the inputs it needs, when they number at most
    :data:`CALIBRATION_UNITS` (a 16-link Hessian-basis chain is not run)."""
    firsts: dict[str, Unit] = {}
    for unit in units:
        held = firsts.get(unit.analysis)
        if held is None or (held.checkpoint is None and unit.checkpoint is not None):
            firsts[unit.analysis] = unit
    chains = {a: _closure(units, first) for a, first in firsts.items()}
    return {a: chain for a, chain in chains.items() if len(chain) <= CALIBRATION_UNITS}


def _measured(store: Path, ids: Sequence[str]) -> list[dict[str, Any]]:
    """The sidecars of those units of ``store`` that are done."""
    flags = done_flags(store)
    index = {u["id"]: i for i, u in enumerate(store_meta(store)["units"])}
    records = [read_sidecar(store, unit) for unit in ids if unit in index and flags[index[unit]]]
    return [r for r in records if r is not None and r.get("status") == "done"]


def _summary(records: list[dict[str, Any]], key: str, how: Callable[[list[float]], float]) -> float | None:
    """``how`` (median, max) of ``key`` over the records that have it; ``None`` if none does."""
    values = [float(r[key]) for r in records if key in r]
    return how(values) if values else None


def estimate(job: JobSpec, *, calibrate: bool = True) -> list[Estimate]:
    """Per analysis of ``job``: units, store bytes, and time and memory per unit.

    Finished units of ``job.output`` (if it exists) are read first; analyses with none are
    calibrated, when ``calibrate``, by running their first unit (and its few inputs) in this
    process into a temporary store, on the job's device. Nothing is written to ``job.output``.
    """
    plan = make_plan(job)
    sizes = store_bytes(plan)
    by_analysis: dict[str, list[str]] = {}
    for unit in plan.units:
        by_analysis.setdefault(unit.analysis, []).append(unit.id)
    finished = {a: _finished(job, ids) for a, ids in by_analysis.items()}
    todo = {a: chain for a, chain in calibration_units(plan.units).items() if not finished[a]}
    calibrated = _calibrate(job, todo) if calibrate and todo else {}
    out = []
    for analysis, ids in by_analysis.items():
        records, source = finished[analysis], f"{len(finished[analysis])} finished units"
        if not records:
            records = calibrated.get(analysis, [])
            source = "calibration run" if records else "not measured: its inputs are a long chain"
        out.append(
            Estimate(
                analysis,
                len(ids),
                sizes.get(analysis, 0),
                _summary(records, "wall_s", statistics.median),
                _summary(records, "peak_rss_mb", max),
                _summary(records, "gpu_peak_mb", max),
                source,
            )
        )
    return out


def _finished(job: JobSpec, ids: list[str]) -> list[dict[str, Any]]:
    try:
        require_store(job.output)
    except StoreError:
        return []
    return _measured(Path(job.output), ids)


def _calibrate(job: JobSpec, chains: dict[str, list[Unit]]) -> dict[str, list[dict[str, Any]]]:
    """Run each chain in-process into a temporary store; the sidecars of each analysis's unit."""
    from ckpt_analysis.run import run_job

    wanted = {u.id for chain in chains.values() for u in chain}
    with tempfile.TemporaryDirectory(prefix="ckpt-analysis-estimate-") as tmp:
        trial = dataclasses.replace(job, output=str(Path(tmp) / "calibration.zarr"))
        log.info("calibrating %s on %d units", ", ".join(chains), len(wanted))
        run_job(trial, executor="inprocess", only=wanted)
        return {a: _measured(Path(trial.output), [chain[-1].id]) for a, chain in chains.items()}
