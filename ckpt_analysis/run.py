"""Running a job: the unit protocol (skip, compute, write, mark done last) and the job driver."""

from __future__ import annotations

import functools
import json
import logging
import time
import traceback
from collections.abc import Collection
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_analysis.checkpoints import Checkpoint, CheckpointSource
from ckpt_analysis.config import JobSpec, job_from_dict
from ckpt_analysis.data import EvalData
from ckpt_analysis.device import visible_gpus
from ckpt_analysis.errors import StoreError, one_line
from ckpt_analysis.execute import Outcome, Task, make_executor
from ckpt_analysis.owners import heartbeat, owner
from ckpt_analysis.plan import check_job_output, prepare_store, stored_units, unit_stages, versions
from ckpt_analysis.progress import progress
from ckpt_analysis.registry import Unit, UnitContext, get_analysis
from ckpt_analysis.staging import StagedWrites
from ckpt_analysis.store import (
    check_writable,
    done_flags,
    lock_file,
    read_array,
    read_sidecar,
    require_store,
    reset_chunks,
    set_done,
    store_meta,
    sweep_temp_files,
    unit_lock,
    unit_states,
    write_sidecar,
)
from ckpt_analysis.types import ExecutorKind

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass
class _ModelCache:
    """Loads checkpoints by index, keeping only the most recent model in memory; ``load_s`` sums
    the seconds spent loading (read, build, move to the device) so far."""

    source: CheckpointSource[Any]
    checkpoints: list[Checkpoint]
    index: int | None = None
    model: PreTrainedModel | None = None
    load_s: float = 0.0

    def __call__(self, index: int) -> PreTrainedModel:
        if self.index != index or self.model is None:
            import torch

            start = time.time()
            self.model = None  # free the previous model before loading the next
            self.model = self.source.load(self.checkpoints[index])
            self.index = index
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # the copy to the device is part of the load
            self.load_s += time.time() - start
        return self.model


@dataclass
class _Worker:
    """Per-process state for one store: the job, its units, and the analyses' unit context."""

    job: JobSpec
    units: list[Unit]
    context: UnitContext
    models: _ModelCache

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """Unit id → position in ``units`` (and in the store's ``done`` array)."""
        return {u.id: i for i, u in enumerate(self.units)}


@cache
def _worker(store: str, job_json: str) -> _Worker:
    """The worker state of ``store`` for the job given now (its paths, not those stored at creation).

    The store's units and token set come from the store; the checkpoints are listed afresh from
    the job, so a moved project folder still finds them, and must match the stored steps.
    """
    job = job_from_dict(json.loads(job_json), base=Path("/"))
    meta = store_meta(store)
    source = CheckpointSource.from_spec(job.checkpoints)
    ckpts = source.checkpoints()
    stored = read_array(store, "step").tolist()
    if [c.step for c in ckpts] != stored:
        raise StoreError(
            f"{store} was planned for steps {stored}, but the job now selects {[c.step for c in ckpts]}"
        )
    data = EvalData(
        read_array(store, "input_ids"),
        read_array(store, "attention_mask"),
        read_array(store, "score_mask").astype(bool),
    )
    units = stored_units(meta)
    models = _ModelCache(source, ckpts)
    read = functools.partial(read_array, store)
    context = UnitContext(job, ckpts, meta["model_config"], data, models, read, _sample(store, job))
    return _Worker(job, units, context, models)


def _sample(store: str, job: JobSpec) -> EvalData | None:
    """The stored ``[sample]`` set (docs/hessian.md), if the job has one."""
    if job.sample is None:
        return None
    names = ("sample_input_ids", "sample_attention_mask", "sample_score_mask")
    ids, mask, score = (read_array(store, n) for n in names)
    return EvalData(ids, mask, score.astype(bool))


def _memory() -> dict[str, float]:
    """Peak memory so far: the process's resident set (its lifetime peak, so an upper bound for
    the unit) and, on CUDA, the unit's own peak of allocated GPU memory (reset at its start)."""
    import resource

    import torch

    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def failure_reason(exc: BaseException, job: JobSpec) -> str:
    """One line for a failed unit; running out of memory names the knobs that bound it."""
    import torch

    error = one_line(exc)
    if _out_of_memory(exc):
        where = "GPU" if isinstance(exc, torch.OutOfMemoryError) or "CUDA" in str(exc) else "host"
        c = job.compute
        error = (
            f"out of {where} memory ({error}); lower compute.batch_size (now {c.batch_size}) or "
            f"compute.vectors_per_pass (now {c.vectors_per_pass}), or the analysis's sample size"
        )
    return error


_ALLOCATOR_FAILURES = ("can't allocate memory", "out of memory")
"""How torch's allocators word a failed allocation inside a plain ``RuntimeError`` (the CPU's
``DefaultCPUAllocator`` never raises ``MemoryError``)."""


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _ALLOCATOR_FAILURES)


def run_unit(
    store: str,
    job_json: str,
    index: int,
    *,
    torch_threads: int,
    force: bool,
    placeholders: frozenset[str] = frozenset(),
) -> Outcome:
    """Compute one unit into ``store``; never raises (failures come back as an Outcome).

    The unit's lock (:func:`~ckpt_analysis.store.unit_lock`) is held throughout, so a concurrent
    run waits, then skips it; its sidecar names this process as the owner and a heartbeat runs
    (docs/results.md, "Running or interrupted"). The unit's blocks are staged in temporary files
    (:class:`~ckpt_analysis.staging.StagedWrites`; a streaming unit, whose ``compute`` yields,
    stages each block as it comes); only when all are written is the done marker cleared, the
    files renamed into place and the marker set last. So a unit killed or failing before the
    renames, a full disk included, leaves none of its blocks visible, and a ``--force`` recompute
    that fails keeps the earlier result; one failing during the renames has its chunks reset to
    the fill value. A failed unit ends ``failed`` with its reason (docs/results.md, "Integrity").
    """
    try:
        worker = _worker(store, job_json)
        unit = worker.units[index]
    except Exception as exc:
        return Outcome(index, f"unit {index}", "failed", one_line(exc))
    try:
        with unit_lock(store, unit.id), heartbeat(lock_file(store, unit.id)):
            placeholder = unit.id in placeholders  # run on fill values (run_job's ``placeholders``)
            return _run_locked(
                store, worker, unit, index, torch_threads=torch_threads, force=force, placeholder=placeholder
            )
    except Exception as exc:  # the store itself failed: removed, unwritable, full disk
        log.warning("unit %s failed: %s", unit.id, one_line(exc))
        return Outcome(index, unit.id, "failed", one_line(exc))


def _run_locked(
    store: str, worker: _Worker, unit: Unit, index: int, *, torch_threads: int, force: bool, placeholder: bool
) -> Outcome:
    import torch

    flags = done_flags(store)
    if not force and flags[index]:
        return Outcome(index, unit.id, "skipped")
    missing = [] if placeholder else [d for d in unit.deps if not flags[worker.index[d]]]
    if missing:  # a shard of a later SLURM stage whose inputs failed or never ran: no data written
        error = f"dependency not done: {', '.join(missing)}"
        write_sidecar(store, unit.id, {"unit": unit.id, "status": "failed", "error": error, **owner()})
        return Outcome(index, unit.id, "failed", error)
    torch.set_num_threads(torch_threads)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    start, loaded = time.time(), worker.models.load_s
    earlier = read_sidecar(store, unit.id) if flags[index] else None
    record: dict[str, Any] = {"unit": unit.id, "status": "running", "started": start, **owner()}
    staged = StagedWrites(store, unit.id)
    cleared = False  # the done marker was cleared: an earlier result is no longer whole
    try:
        if earlier is None:
            write_sidecar(store, unit.id, record)
        analysis = get_analysis(unit.analysis).from_spec(worker.job.analyses[unit.analysis])
        for write in analysis.compute(unit, worker.context):
            staged.write(write)
        set_done(store, index, False)
        cleared = True
        staged.commit()
        set_done(store, index, True)
    except Exception as exc:
        staged.discard()
        kept = None if cleared else earlier
        return _failed(store, worker.job, unit, index, exc, record, kept, staged.files if cleared else [])
    wall = time.time() - start
    load = worker.models.load_s - loaded  # 0 when the model was already loaded by an earlier unit
    done = {**record, "status": "done", "wall_s": wall, "load_s": load, **_memory(), "versions": versions()}
    write_sidecar(store, unit.id, {**done, "chunks": staged.files})
    return Outcome(index, unit.id, "done", None, wall)


def _failed(
    store: str,
    job: JobSpec,
    unit: Unit,
    index: int,
    exc: Exception,
    record: dict[str, Any],
    earlier: dict[str, Any] | None,
    placed: list[str],
) -> Outcome:
    """Record a failed unit: the chunks it may have renamed into place (``placed``) reset to fill,
    so nothing half-written stays visible, and its reason in the sidecar; a failed ``--force``
    recompute that placed nothing keeps the earlier result beside the failure. Best effort on a
    broken disk: the reason is also logged."""
    wall = time.time() - record["started"]
    error = failure_reason(exc, job)
    log.warning("unit %s failed: %s", unit.id, error)
    failed = {
        **record,
        "status": "failed",
        "error": error,
        "traceback": traceback.format_exc(),
        "wall_s": wall,
    }
    if earlier is not None:
        failed = {**earlier, "forced_recompute": failed}
    try:
        reset_chunks(store, placed)
        write_sidecar(store, unit.id, failed)
    except OSError as cleanup:
        log.warning("unit %s: could not record its failure: %s", unit.id, one_line(cleanup))
    return Outcome(index, unit.id, "failed", error, wall)


def run_job(
    job: JobSpec,
    *,
    force: bool = False,
    executor: ExecutorKind | None = None,
    shard: int | None = None,
    num_shards: int = 1,
    stage: int | None = None,
    only: Collection[str] | None = None,
    placeholders: Collection[str] = (),
) -> list[Outcome]:
    """Plan (or resume) ``job``'s store, then run its units; returns one Outcome per unit run.

    With ``shard``/``num_shards`` (SLURM arrays) the store must already exist and only the
    units ``i`` with ``i % num_shards == shard`` run, in-process; with ``stage`` too, the units of
    that stage (:func:`~ckpt_analysis.plan.unit_stages`) are numbered alone and sharded so. A unit
    whose dependencies are not done fails with that reason (in its sidecar) and writes no data.
    ``only`` restricts the run to those unit ids (``plan --estimate``'s calibration); the units
    in ``placeholders`` run even though their inputs are not done, on the store's fill values
    (a calibration timing an analysis whose time does not depend on its inputs' values).
    """
    store = job.output
    if shard is None:
        prepare_store(job, force=force)
    else:  # a SLURM array task: the store exists and must be this job's
        require_store(store)
        check_job_output(job, force=False)
    check_writable(store)
    sweep_temp_files(store)
    if shard is None:
        _note_interrupted(store)
    _worker.cache_clear()  # the store may have been (re)created just now
    job_json = json.dumps(job.to_dict())
    worker = _worker(store, job_json)
    tasks = [Task(i, u.id, tuple(worker.index[d] for d in u.deps)) for i, u in enumerate(worker.units)]
    if stage is not None:
        tasks = [t for t, s in zip(tasks, unit_stages(worker.units), strict=True) if s == stage]
    if shard is not None:
        tasks = [t for position, t in enumerate(tasks) if position % num_shards == shard]
    if only is not None:
        tasks = [t for t in tasks if t.name in only]
    kind = "inprocess" if shard is not None else executor or job.compute.executor
    runner = make_executor(
        kind,
        workers=job.compute.workers,
        threads_per_worker=job.compute.threads_per_worker,
        slurm=job.slurm,
        log_directory=str(Path(store) / "slurm" / "dask-workers"),
        gpus=visible_gpus(job.checkpoints.device),
    )
    fn = functools.partial(
        _run_unit_fn, store, job_json, job.compute.torch_threads, force, frozenset(placeholders)
    )
    with progress(len(tasks), f"{job.name}") as advance:
        outcomes = runner.run(tasks, fn, lambda o: advance(o.name, o.ok))
    _worker.cache_clear()
    return outcomes


def _note_interrupted(store: str) -> None:
    """Log the units a dead owner left running, which this run recomputes (``run`` and ``watch``)."""
    interrupted = [s.unit_id for s in unit_states(store) if s.state == "interrupted"]
    if interrupted:
        names = ", ".join(interrupted[:5]) + (" …" if len(interrupted) > 5 else "")
        log.info("%s: %d interrupted unit(s) to recompute: %s", store, len(interrupted), names)


def _run_unit_fn(
    store: str, job_json: str, torch_threads: int, force: bool, placeholders: frozenset[str], index: int
) -> Outcome:
    return run_unit(
        store, job_json, index, torch_threads=torch_threads, force=force, placeholders=placeholders
    )
