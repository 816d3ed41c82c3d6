"""Cost before a sweep: time and memory per unit, store size and totals per analysis (docs/cluster.md)."""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ckpt_analysis.config import JobSpec
from ckpt_analysis.errors import StoreError
from ckpt_analysis.plan import Plan, make_plan
from ckpt_analysis.registry import Unit, get_analysis
from ckpt_analysis.store import done_flags, read_sidecar, require_store, store_meta

log = logging.getLogger(__name__)

CALIBRATION_UNITS = 4
"""Most units one analysis's calibration may run to reach each unit it times (that unit and the
inputs it needs)."""


@dataclass(frozen=True)
class Estimate:
    """One analysis's predicted cost on this device (docs/cluster.md, "Know the cost before
    submitting").

    ``seconds`` and the peaks are per unit, from ``source``: units finished in the store (their
    sidecars), a calibration run, or nothing (``None``). A calibration times the analysis's second
    unit, after a first one has paid the one-time costs (CUDA start-up, first kernels, targets a
    worker computes once and keeps); ``startup_seconds`` is how much longer the first one took, a
    cost each worker pays once. ``load_seconds`` is the part of ``seconds`` spent loading the
    checkpoint and moving it to the device (0 where an earlier unit on the same checkpoint had
    loaded it).
    """

    analysis: str
    units: int
    store_bytes: int
    seconds: float | None
    peak_rss_mb: float | None
    gpu_peak_mb: float | None
    source: str
    load_seconds: float | None = None
    startup_seconds: float | None = None

    @property
    def total_seconds(self) -> float | None:
        """Every unit's time, without the one-time costs."""
        return None if self.seconds is None else self.seconds * self.units


def sweep_seconds(estimates: Sequence[Estimate], workers: int) -> float:
    """docs/cluster.md, "Know the cost before submitting": wall seconds of the measured analyses'
    units on ``workers`` parallel workers, each paying the one-time costs once."""
    once = sum(e.startup_seconds or 0.0 for e in estimates)
    return sum(e.total_seconds or 0.0 for e in estimates) / workers + once


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


class Calibration(NamedTuple):
    """The units an analysis's calibration runs (``chain``, in a runnable order) and the ones of
    them it times (``timed``: its first unit, then the warm one); with ``placeholders`` the timed
    units run alone, on the fill values of inputs never computed."""

    chain: list[Unit]
    timed: list[Unit]
    placeholders: bool = False


def calibration_units(units: Sequence[Unit]) -> dict[str, Calibration]:
    """Per analysis, the units to run to time its units: its first two per-checkpoint units (else
    its first two, else its only one), each with the inputs it needs; a unit whose inputs number
    more than :data:`CALIBRATION_UNITS` is left out (a 16-link Hessian-basis chain is not run),
    and an analysis left with none too, unless its time does not depend on its inputs' values
    (``times_without_inputs``): then its two units run alone, on placeholder inputs."""
    ordered = sorted(units, key=lambda u: u.checkpoint is None)  # stable: per-checkpoint first
    chosen: dict[str, list[Unit]] = {}
    for unit in ordered:
        if len(chosen.setdefault(unit.analysis, [])) < 2:
            chosen[unit.analysis].append(unit)
    plans: dict[str, Calibration] = {}
    for analysis, candidates in chosen.items():
        closures = {u.id: _closure(units, u) for u in candidates}
        timed = [u for u in candidates if len(closures[u.id]) <= CALIBRATION_UNITS]
        if timed:
            chain = {v.id: v for u in timed for v in closures[u.id]}
            plans[analysis] = Calibration(list(chain.values()), timed)
        elif get_analysis(analysis).times_without_inputs:
            plans[analysis] = Calibration(candidates, candidates, placeholders=True)
    return plans


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
    calibrated, when ``calibrate``, by running their first two units (and their few inputs) in
    this process into a temporary store, on the job's device, and timing the second. Nothing is
    written to ``job.output``.
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
        if finished[analysis]:
            records, startup = finished[analysis], None
            source = f"{len(records)} finished units"
        else:
            placeholders = analysis in todo and todo[analysis].placeholders
            records, startup, source = _timed(calibrated.get(analysis, []), placeholders=placeholders)
        out.append(
            Estimate(
                analysis,
                len(ids),
                sizes.get(analysis, 0),
                _summary(records, "wall_s", statistics.median),
                _summary(records, "peak_rss_mb", max),
                _summary(records, "gpu_peak_mb", max),
                source,
                _summary(records, "load_s", statistics.median),
                startup,
            )
        )
    return out


def _timed(
    runs: list[dict[str, Any]], *, placeholders: bool
) -> tuple[list[dict[str, Any]], float | None, str]:
    """The sidecar to time by, the one-time cost and the source, from a calibration's ``runs``
    of an analysis's units in order: the last, warm, and how much longer the first took;
    ``placeholders``: they ran on placeholder inputs, and the source says so."""
    on = " on placeholder inputs" if placeholders else ""
    if not runs:
        return [], None, "not measured: its inputs are a long chain"
    if len(runs) == 1:
        return runs, None, f"calibration run (one unit: start-up included){on}"
    startup = max(0.0, float(runs[0]["wall_s"]) - float(runs[-1]["wall_s"]))
    return runs[-1:], startup, f"calibration run (second unit){on}"


def _finished(job: JobSpec, ids: list[str]) -> list[dict[str, Any]]:
    try:
        require_store(job.output)
    except StoreError:
        return []
    return _measured(Path(job.output), ids)


def _calibrate(job: JobSpec, chains: dict[str, Calibration]) -> dict[str, list[dict[str, Any]]]:
    """Run each chain in-process into a temporary store; the sidecars of each analysis's timed
    units, in order."""
    from ckpt_analysis.run import run_job

    wanted = {u.id for plan in chains.values() for u in plan.chain}
    placeholders = {u.id for plan in chains.values() if plan.placeholders for u in plan.chain}
    with tempfile.TemporaryDirectory(prefix="ckpt-analysis-estimate-") as tmp:
        trial = dataclasses.replace(job, output=str(Path(tmp) / "calibration.zarr"))
        log.info("calibrating %s on %d units", ", ".join(chains), len(wanted))
        run_job(trial, executor="inprocess", only=wanted, placeholders=placeholders)
        return {a: _measured(Path(trial.output), [u.id for u in plan.timed]) for a, plan in chains.items()}
