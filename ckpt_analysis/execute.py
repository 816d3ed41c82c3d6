"""Executors: run a dependency graph of opaque tasks in-process, on a Dask LocalCluster or on SLURM.

An executor knows nothing about analyses or stores: it calls ``fn(index)`` for each task once
the task's dependencies succeeded, and reports each :class:`Outcome` as it arrives.
"""

from __future__ import annotations

import logging
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ckpt_analysis.config import SlurmSpec
from ckpt_analysis.types import ExecutorKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """A node of the graph: its index (passed to ``fn``), display name and dependency indices."""

    index: int
    name: str
    deps: tuple[int, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What became of one task."""

    index: int
    name: str
    status: Literal["done", "skipped", "failed"]
    error: str | None = None
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "failed"


TaskFn = Callable[[int], Outcome]
OnDone = Callable[[Outcome], None]


def _blocked(task: Task, failed: Sequence[Outcome]) -> Outcome:
    names = ", ".join(o.name for o in failed)
    return Outcome(task.index, task.name, "failed", f"dependency failed: {names}")


class Executor(ABC):
    """Runs tasks (given in dependency order) and returns their outcomes in task order."""

    @abstractmethod
    def run(self, tasks: Sequence[Task], fn: TaskFn, on_done: OnDone) -> list[Outcome]:
        """Run every task whose dependencies succeeded; ``fn`` must not raise."""


class InProcessExecutor(Executor):
    """Runs tasks one after another in this process (debugging, SLURM array shards)."""

    def run(self, tasks: Sequence[Task], fn: TaskFn, on_done: OnDone) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        for task in tasks:
            failed = [outcomes[d] for d in task.deps if d in outcomes and not outcomes[d].ok]
            outcome = _blocked(task, failed) if failed else fn(task.index)
            outcomes[task.index] = outcome
            on_done(outcome)
        return [outcomes[t.index] for t in tasks]


_TRIM_KEY = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
"""The nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in workers by default: glibc then hands freed
activation buffers back to the OS and re-faults them on the next batch, which made torch units
1.6× slower (3.4 s vs 2.1 s per covariance unit, benchmarks/sweep.py). None unsets it."""


def _after_deps(fn: TaskFn, task: Task, *deps: Outcome) -> Outcome:
    failed = [d for d in deps if not d.ok]
    return _blocked(task, failed) if failed else fn(task.index)


class DaskExecutor(Executor):
    """Runs tasks on a ``dask.distributed.LocalCluster`` of worker processes.

    Each worker process runs ``threads_per_worker`` tasks at once; tasks set torch's own thread
    count themselves (the Dask nanny sets ``OMP_NUM_THREADS=1``). Workers start without the
    nanny's ``MALLOC_TRIM_THRESHOLD_`` (see ``_TRIM_KEY``). With ``gpus`` (device ids), worker i
    sees only ``gpus[i % len(gpus)]`` through its own ``CUDA_VISIBLE_DEVICES``, so each worker's
    ``cuda`` is its own card; more workers than cards share them round-robin.
    """

    def __init__(self, *, workers: int, threads_per_worker: int, gpus: Sequence[str] = ()) -> None:
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.gpus = tuple(gpus)

    def cluster(self) -> Any:
        """A started cluster (a context manager) that the tasks' client connects to."""
        from dask.distributed import LocalCluster

        if self.gpus:
            return self._pinned_cluster()
        return LocalCluster(
            n_workers=self.workers,
            threads_per_worker=self.threads_per_worker,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.WARNING,
        )

    def _pinned_cluster(self) -> Any:
        """A local cluster of nanny-started workers, each with its own ``CUDA_VISIBLE_DEVICES``."""
        from dask.distributed import Nanny, Scheduler, SpecCluster

        if self.workers > len(self.gpus):
            log.warning("%d workers share %d GPUs round-robin", self.workers, len(self.gpus))
        workers = {
            i: {
                "cls": Nanny,
                "options": {
                    "nthreads": self.threads_per_worker,
                    "env": {"CUDA_VISIBLE_DEVICES": self.gpus[i % len(self.gpus)]},
                    "silence_logs": logging.WARNING,
                },
            }
            for i in range(self.workers)
        }
        scheduler = {"cls": Scheduler, "options": {"dashboard": False, "dashboard_address": ":0"}}
        return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING)

    def run(self, tasks: Sequence[Task], fn: TaskFn, on_done: OnDone) -> list[Outcome]:
        import dask
        from dask.distributed import Client, as_completed

        with dask.config.set({_TRIM_KEY: None}), self.cluster() as cluster, Client(cluster) as client:
            futures: dict[int, Any] = {}
            for task in tasks:
                deps = [futures[d] for d in task.deps if d in futures]
                futures[task.index] = client.submit(
                    _after_deps, fn, task, *deps, pure=False, key=f"unit-{task.index}-{task.name}"
                )
            outcomes: dict[int, Outcome] = {}
            for future in as_completed(list(futures.values())):
                outcome = future.result()
                outcomes[outcome.index] = outcome
                on_done(outcome)
        return [outcomes[t.index] for t in tasks]


class SlurmDaskExecutor(DaskExecutor):
    """Runs tasks on Dask workers that are SLURM jobs (dask-jobqueue ``SLURMCluster``), one per worker.

    Each worker job asks for ``slurm``'s time, memory, CPUs, partition, account and ``gres`` and
    runs its ``setup`` lines first; the scheduler runs in this process, so it must stay up until
    the tasks finish, and workers must reach it over ``slurm.interface``. Worker logs go to
    ``log_directory``. Unlike LocalCluster workers, these keep the nanny's default
    ``MALLOC_TRIM_THRESHOLD_`` (see ``_TRIM_KEY``).
    """

    def __init__(
        self, *, workers: int, threads_per_worker: int, slurm: SlurmSpec, log_directory: str
    ) -> None:
        super().__init__(workers=workers, threads_per_worker=threads_per_worker)
        self.slurm = slurm
        self.log_directory = log_directory

    def job_cluster(self) -> Any:
        """The unscaled ``SLURMCluster``: its ``job_script()`` is what each worker job runs."""
        from dask_jobqueue.slurm import SLURMCluster

        spec = self.slurm
        gres = [] if spec.gres is None else [f"--gres={spec.gres}"]
        return SLURMCluster(
            cores=self.threads_per_worker,
            processes=1,
            memory=spec.mem,
            walltime=spec.time,
            queue=spec.partition,
            account=spec.account,
            job_cpu=spec.cpus_per_task,
            job_mem=spec.mem,
            job_extra_directives=[*gres, *spec.sbatch_args],
            job_script_prologue=spec.setup,
            interface=spec.interface,
            log_directory=self.log_directory,
            python=sys.executable,
            scheduler_options={"dashboard_address": None},
        )

    def cluster(self) -> Any:
        cluster = self.job_cluster()
        cluster.scale(jobs=self.workers)
        return cluster


def make_executor(
    kind: ExecutorKind,
    *,
    workers: int,
    threads_per_worker: int,
    slurm: SlurmSpec | None = None,
    log_directory: str = ".",
    gpus: Sequence[str] = (),
) -> Executor:
    """The executor named by ``compute.executor`` (``slurm`` takes its resources from ``slurm``;
    a local cluster pins one of ``gpus`` to each worker)."""
    if kind == "inprocess":
        return InProcessExecutor()
    if kind == "slurm":
        spec = slurm or SlurmSpec()
        return SlurmDaskExecutor(
            workers=workers, threads_per_worker=threads_per_worker, slurm=spec, log_directory=log_directory
        )
    return DaskExecutor(workers=workers, threads_per_worker=threads_per_worker, gpus=gpus)
