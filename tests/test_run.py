"""Execution: Dask and in-process runs agree, failures are isolated, reruns resume, kills recover."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import (
    assert_same_results,
    build_local_run,
    job_dict,
    run_and_kill,
    save_checkpoint,
    tiny_model,
    write_job,
)

from ckpt_analysis.config import job_from_dict, load_job
from ckpt_analysis.execute import InProcessExecutor, Outcome, Task
from ckpt_analysis.plan import prepare_store
from ckpt_analysis.run import run_job
from ckpt_analysis.store import done_flags, open_results, read_sidecar, unit_states

CLI = [sys.executable, "-m", "ckpt_analysis"]


@pytest.fixture(scope="module")
def reference(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An uninterrupted in-process run of the default test job."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run_job(job_from_dict(job_dict(run_dir, out), base=out.parent))
    return str(out)


def test_dask_local_cluster_gives_the_same_store_as_in_process(
    run_dir: Path, tmp_path: Path, reference: str
) -> None:
    job = job_from_dict(
        job_dict(run_dir, tmp_path / "d.zarr", compute={"executor": "local", "workers": 2}), base=tmp_path
    )
    outcomes = run_job(job)
    assert [o.status for o in outcomes] == ["done"] * 6
    assert_same_results(job.output, reference)
    assert read_sidecar(job.output, "covariance/step=0")["pid"] != os.getpid()


def test_rerun_skips_done_units_and_force_recomputes(run_dir: Path, tmp_path: Path) -> None:
    job = job_from_dict(job_dict(run_dir, tmp_path / "r.zarr"), base=tmp_path)
    run_job(job)
    assert {o.status for o in run_job(job)} == {"skipped"}
    assert {o.status for o in run_job(job, force=True)} == {"done"}


def test_one_failing_checkpoint_does_not_stop_the_others(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", [0, 1, 2])
    bad = tiny_model()
    with torch.no_grad():
        bad.lm_head.weight.fill_(float("inf"))
    save_checkpoint(bad, run / "checkpoint-1")
    job_path = write_job(tmp_path / "job.toml", run, tmp_path / "r.zarr")
    result = subprocess.run([*CLI, "run", str(job_path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert (
        "failed covariance/step=1: CheckpointError: checkpoint checkpoint-1: parameter 'lm_head.weight'"
        in " ".join(result.stdout.split())
    )
    states = {s.unit_id: s for s in unit_states(tmp_path / "r.zarr")}
    assert [states[f"covariance/step={i}"].state for i in range(3)] == ["done", "failed", "done"]
    assert "NaN/inf" in states["covariance/step=1"].detail
    assert np.isnan(open_results(tmp_path / "r.zarr").act_cov.sel(step=1).values).all()
    status = subprocess.run([*CLI, "status", str(tmp_path / "r.zarr")], capture_output=True, text=True)
    assert status.returncode == 1 and "1 failed" in status.stdout


def test_failed_dependency_blocks_its_dependents_only() -> None:
    def fn(index: int) -> Outcome:
        return Outcome(index, f"t{index}", "failed" if index == 0 else "done", "boom" if index == 0 else None)

    tasks = [Task(0, "t0"), Task(1, "t1", (0,)), Task(2, "t2")]
    seen: list[str] = []
    outcomes = InProcessExecutor().run(tasks, fn, lambda o: seen.append(o.name))
    assert [o.status for o in outcomes] == ["failed", "failed", "done"]
    assert outcomes[1].error == "dependency failed: t0"
    assert seen == ["t0", "t1", "t2"]


def test_sigkill_mid_sweep_then_rerun_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    steps = list(range(0, 120, 10))
    run = build_local_run(tmp_path / "run", steps, seed=5)
    data = {"num_examples": 1024}
    ref_job = job_from_dict(job_dict(run, tmp_path / "ref.zarr", data=data), base=tmp_path)
    run_job(ref_job)
    job_path = write_job(tmp_path / "job.toml", run, tmp_path / "k.zarr", data=data)
    done_at_kill = run_and_kill(job_path, tmp_path / "k.zarr", after_done=3)
    assert 3 <= done_at_kill < len(steps), "the kill must land mid-sweep"
    outcomes = run_job(load_job(job_path))
    assert sum(o.status == "skipped" for o in outcomes) == done_at_kill
    assert_same_results(str(tmp_path / "k.zarr"), ref_job.output)


def test_eight_concurrent_writer_processes_lose_nothing(tmp_path: Path) -> None:
    steps = list(range(16))
    run = build_local_run(tmp_path / "run", steps, seed=9)
    ref_job = job_from_dict(job_dict(run, tmp_path / "ref.zarr"), base=tmp_path)
    run_job(ref_job)
    job_path = write_job(tmp_path / "job.toml", run, tmp_path / "c.zarr")
    prepare_store(load_job(job_path), force=False)
    procs = [
        subprocess.Popen(
            [*CLI, "run", str(job_path), "--shard", str(i), "--num-shards", "8"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(8)
    ]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, errors
    assert done_flags(tmp_path / "c.zarr").all()
    assert_same_results(str(tmp_path / "c.zarr"), ref_job.output)
