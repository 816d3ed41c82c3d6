"""SLURM submission: one sbatch array per dependency stage, chained by ``--dependency`` (slurm/README.md)."""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from string import Template

from ckpt_analysis.config import JobSpec, SlurmSpec, job_from_dict, to_toml
from ckpt_analysis.errors import SubmitError
from ckpt_analysis.plan import prepare_store, stored_units, unit_stages
from ckpt_analysis.registry import Unit
from ckpt_analysis.store import UnitState, done_flags, store_meta, unit_states

log = logging.getLogger(__name__)

SCRIPTS_DIR = "slurm"
"""Folder inside the store for the rendered sbatch scripts, with their logs under ``logs/``."""


@dataclass(frozen=True)
class Stage:
    """One sbatch array: the units of one stage, sharded over ``tasks`` array tasks."""

    number: int
    units: int
    pending: int
    analyses: tuple[str, ...]
    tasks: int
    script: Path | None = None
    job_id: str | None = None


def stages(units: list[Unit], done: list[bool], *, shards: int) -> list[Stage]:
    """Group units by :func:`~ckpt_analysis.plan.unit_stages`, with their pending counts.

    A stage gets at most ``shards`` array tasks and no more than it has pending units: task i runs
    the stage's units j with j % tasks == i, skipping those already done.
    """
    numbers = unit_stages(units)
    out = []
    for number in range(max(numbers, default=-1) + 1):
        members = [i for i, s in enumerate(numbers) if s == number]
        analyses = tuple(dict.fromkeys(units[i].analysis for i in members))
        pending = sum(not done[i] for i in members)
        out.append(Stage(number, len(members), pending, analyses, min(shards, max(1, pending))))
    return out


def max_array_size() -> int | None:
    """The cluster's ``MaxArraySize`` (array indices run 0 … MaxArraySize − 1), if ``scontrol`` says."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    shown = subprocess.run([scontrol, "show", "config"], capture_output=True, text=True, check=False)
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", shown.stdout, flags=re.MULTILINE)
    return int(found.group(1)) if found else None


def render_stage(
    stage: Stage,
    *,
    name: str,
    last_stage: int,
    spec: SlurmSpec,
    cpus: int,
    job: Path,
    store: Path,
    python: str,
) -> str:
    """The sbatch script of one stage, from ``ckpt_analysis/templates/array.sbatch``.

    Each array task runs ``ckpt-analysis run JOB --stage N --shard $SLURM_ARRAY_TASK_ID
    --num-shards T``; ``spec`` supplies time, memory, CPUs, partition, account, GPUs and extras.
    """
    options = [
        f"--{key}={value}"
        for key, value in (("partition", spec.partition), ("account", spec.account), ("gres", spec.gres))
        if value is not None
    ]
    text = resources.files("ckpt_analysis").joinpath("templates/array.sbatch").read_text()
    script = Template(text).substitute(
        name=name,
        stage=stage.number,
        last_stage=last_stage,
        units=stage.units,
        analyses=", ".join(stage.analyses),
        tasks=stage.tasks,
        last_task=stage.tasks - 1,
        throttle="" if spec.max_parallel is None else f"%{spec.max_parallel}",
        time=spec.time,
        mem=spec.mem,
        cpus=spec.cpus_per_task or cpus,
        logs=shlex.quote(str(store / SCRIPTS_DIR / "logs")),
        options="\n".join(f"#SBATCH {o}" for o in [*options, *spec.sbatch_args]),
        setup="\n".join(spec.setup),
        python=shlex.quote(python),
        job=shlex.quote(str(job)),
        store=shlex.quote(str(store)),
    )
    return "".join(line for line in script.splitlines(keepends=True) if line.strip())  # no empty options


def submit(job: JobSpec, job_path: Path, *, dry_run: bool = False, wait: bool = False) -> list[Stage]:
    """Create (or resume) the store, write one script per stage with pending units, and sbatch them.

    Each stage after the first waits for the previous with ``--dependency=afterany``, so one failed
    unit never stops the others; units whose inputs failed report that in their own sidecars.
    With ``dry_run`` the scripts are written but not submitted; with ``wait`` the call returns
    when the last stage has finished. Stages whose units are all done are skipped.
    """
    sbatch = shutil.which("sbatch")
    if sbatch is None and not dry_run:
        raise SubmitError("sbatch is not on PATH; use --dry-run to write the scripts only")
    prepare_store(job, force=False)
    store = Path(job.output)
    units = stored_units(store_meta(store))
    shards = min(job.slurm.shards, max_array_size() or job.slurm.shards)
    if shards < job.slurm.shards:
        log.info("slurm.shards = %d exceeds the cluster's MaxArraySize; using %d", job.slurm.shards, shards)
    plan = stages(units, [bool(d) for d in done_flags(store)], shards=shards)
    todo = [s for s in plan if s.pending]
    (store / SCRIPTS_DIR / "logs").mkdir(parents=True, exist_ok=True)
    out: list[Stage] = []
    for stage in todo:
        script = _write_script(job, job_path, stage, last_stage=len(plan) - 1)
        stage = replace(stage, script=script)
        if sbatch is not None and not dry_run:
            previous = out[-1].job_id if out else None
            last = stage.number == todo[-1].number
            try:
                job_id = _sbatch(sbatch, script, after=previous, wait=wait and last)
            except SubmitError as exc:
                done = ", ".join(f"stage {s.number} = job {s.job_id}" for s in out) or "none"
                raise SubmitError(f"{exc} (already submitted: {done})") from exc
            stage = replace(stage, job_id=job_id)
        out.append(stage)
    return out


def resubmit(
    store: Path, *, dry_run: bool = False, wait: bool = False
) -> tuple[list[UnitState], list[Stage], list[str]]:
    """Submit again the units of ``store`` that are not done: failed, missing and interrupted.

    The job is the one the store was created with (its root attributes), written to
    ``STORE/slurm/job.toml`` for the array tasks; returns the units not done (with their reasons
    from :func:`~ckpt_analysis.store.unit_states`), the stages submitted, and the done units
    that lost chunk files (damaged: ``verify --repair`` resets them, then a resubmit recomputes
    them). A unit still running under an earlier submission is waited for by its lock, then
    skipped.
    """
    store = Path(store).resolve()
    job = job_from_dict({**store_meta(store)["job_spec"], "output": str(store)}, base=store.parent)
    job_path = store / SCRIPTS_DIR / "job.toml"
    job_path.parent.mkdir(exist_ok=True)
    job_path.write_text(to_toml(job.to_dict()))
    states = unit_states(store)
    pending = [s for s in states if s.state not in ("done", "damaged")]
    damaged = [s.unit_id for s in states if s.state == "damaged"]
    return pending, (submit(job, job_path, dry_run=dry_run, wait=wait) if pending else []), damaged


def _write_script(job: JobSpec, job_path: Path, stage: Stage, *, last_stage: int) -> Path:
    """Render one stage's script into ``STORE/slurm/stage<N>.sbatch``."""
    store = Path(job.output).resolve()
    script = store / SCRIPTS_DIR / f"stage{stage.number}.sbatch"
    script.write_text(
        render_stage(
            stage,
            name=job.name,
            last_stage=last_stage,
            spec=job.slurm,
            cpus=job.compute.torch_threads,
            job=job_path.resolve(),
            store=store,
            python=sys.executable,
        )
    )
    return script


def _sbatch(sbatch: str, script: Path, *, after: str | None, wait: bool) -> str:
    """Submit one script; returns the job id (with ``wait``, after the job has finished)."""
    cmd = [sbatch, "--parsable"]
    if after is not None:
        cmd.append(f"--dependency=afterany:{after}")
    if wait:
        cmd.append("--wait")
    result = subprocess.run([*cmd, str(script)], capture_output=True, text=True, check=False)
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        said = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise SubmitError(f"sbatch refused {script}: {'; '.join(said)}")
    log.info("submitted %s as job %s", script.name, job_id)
    return job_id
