"""Follow a local run while it trains: analyse each checkpoint once its files are complete, growing
one store (docs/jobs.md, "Watching a run")."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from ckpt_analysis.checkpoints import CheckpointSource
from ckpt_analysis.config import JobSpec
from ckpt_analysis.errors import CheckpointError, JobSpecError
from ckpt_analysis.execute import Outcome
from ckpt_analysis.plan import extend_store, make_plan, planned_steps, require_per_checkpoint
from ckpt_analysis.run import run_job
from ckpt_analysis.store import creation_lock

log = logging.getLogger(__name__)


def safetensors_complete(path: Path) -> bool:
    """Whether a ``.safetensors`` file holds every byte its header promises: 8 bytes of header
    length n, n bytes of JSON header, then the data up to the largest tensor end offset."""
    try:
        with path.open("rb") as handle:
            size = path.stat().st_size
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 + length:
                return False
            header = json.loads(handle.read(length))
    except (OSError, ValueError):
        return False
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    return size == 8 + length + max(ends, default=0)


def checkpoint_complete(folder: Path, *, settle: float) -> bool:
    """Whether a ``save_pretrained`` folder is finished: a readable ``config.json``; every
    safetensors file (and every shard its index names) complete, else a ``pytorch_model.bin``;
    and no file changed in the last ``settle`` seconds (a trainer may still be adding files)."""
    files = [f for f in folder.iterdir() if f.is_file()] if folder.is_dir() else []
    try:
        json.loads((folder / "config.json").read_text())
        newest = max(f.stat().st_mtime for f in files)
    except (OSError, ValueError):
        return False
    index = folder / "model.safetensors.index.json"
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else set()
    except (OSError, ValueError, KeyError):
        return False
    weights = {f.name for f in files if f.suffix == ".safetensors"} | shards
    if weights:
        complete = all(safetensors_complete(folder / name) for name in weights)
    else:
        complete = (folder / "pytorch_model.bin").is_file()
    return complete and time.time() - newest >= settle


def ready_steps(job: JobSpec, *, settle: float) -> list[int]:
    """The job's selected checkpoints whose folders are complete, in step order (none yet: [])."""
    source = CheckpointSource.from_spec(job.checkpoints)
    try:
        ckpts = source.checkpoints()
    except CheckpointError:  # no folder or no checkpoint yet
        return []
    return [c.step for c in ckpts if checkpoint_complete(source.files_dir(c), settle=settle)]


def with_steps(job: JobSpec, steps: list[int]) -> JobSpec:
    """``job`` restricted to ``steps`` (an explicit selection, which hashes as the same checkpoints)."""
    return dataclasses.replace(job, checkpoints=dataclasses.replace(job.checkpoints, select=steps))


def watch(
    job: JobSpec,
    *,
    interval: float = 10.0,
    settle: float = 5.0,
    until_step: int | None = None,
    idle_timeout: float | None = None,
) -> list[Outcome]:
    """Analyse ``job``'s local run as it trains, until a checkpoint at or past ``until_step`` is
    analysed, or no new checkpoint came for ``idle_timeout`` seconds (or Ctrl-C).

    Every ``interval`` seconds the run folder is listed; when complete checkpoints beyond the
    stored ones appear, the store grows to them (:func:`~ckpt_analysis.plan.extend_store`) and
    the job runs on the new units (and on any unfinished ones: a rerun after a kill resumes).
    Only per-checkpoint analyses can be watched. Returns the outcomes of every unit run.

    Concurrency: one ``watch`` per store; nothing else may write the store while it runs.
    """
    if job.checkpoints.source != "local":
        raise JobSpecError("watch follows a local run folder: checkpoints.source must be 'local'")
    outcomes: list[Outcome] = []
    analysed, resumed = planned_steps(job.output), False
    last_new = time.monotonic()
    while True:
        steps = ready_steps(job, settle=settle)
        if steps and (steps != analysed or not resumed):  # the first pass also finishes a killed run
            if steps != analysed:
                last_new = time.monotonic()
            outcomes += _analyse(with_steps(job, steps), grow=bool(analysed))
            analysed, resumed = steps, True
        if until_step is not None and analysed and analysed[-1] >= until_step:
            return outcomes
        if idle_timeout is not None and time.monotonic() - last_new > idle_timeout:
            log.info("no new checkpoint for %.0f s; stopping", idle_timeout)
            return outcomes
        time.sleep(interval)


def _analyse(job: JobSpec, *, grow: bool) -> list[Outcome]:
    """Grow the store to ``job``'s checkpoints (or create it), then run every unit not done."""
    if grow:
        with creation_lock(job.output):
            added = extend_store(job)
        log.info(
            "%s: %d new checkpoint(s), now steps up to %s", job.output, added, job.checkpoints.select[-1]
        )
    else:
        require_per_checkpoint(make_plan(job))
    return run_job(job)
