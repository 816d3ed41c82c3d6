"""Running or interrupted: a unit's owner, its heartbeat, and what status says once it is gone."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import build_local_run, needs_slurm, stop_mid_unit, write_job

from ckpt_analysis.config import load_job
from ckpt_analysis.owners import Liveness, heartbeat, owner, slurm_running
from ckpt_analysis.plan import prepare_store
from ckpt_analysis.run import run_job
from ckpt_analysis.store import lock_file, store_meta, unit_states, write_sidecar

CLI = [sys.executable, "-m", "ckpt_analysis"]
SLOW = {"hessian": {"k": 4, "sample_sequences": 32, "trace_probes": 60}}
"""A few seconds per unit on the tiny model, so a test can catch one in flight."""


def _slow_job(tmp_path: Path, name: str = "slow") -> Path:
    run = build_local_run(tmp_path / "run", [0, 10, 20, 30], seed=3)
    return write_job(tmp_path / f"{name}.toml", run, tmp_path / f"{name}.zarr", analyses=SLOW)


def test_a_live_owner_stays_running_and_a_killed_one_is_interrupted(tmp_path: Path) -> None:
    job = _slow_job(tmp_path)
    store = tmp_path / "slow.zarr"
    proc = subprocess.Popen([*CLI, "run", str(job)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    caught = stop_mid_unit(store)
    try:  # stopped, so no heartbeat either: the live process on this host decides
        states = {s.unit_id: s for s in unit_states(store, stale_after=0.0)}
        assert {states[u].state for u in caught} == {"running"}
        assert set(caught.values()) == {proc.pid}
        assert all(f"pid {proc.pid}" in states[u].detail for u in caught)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    states = {s.unit_id: s for s in unit_states(store)}
    assert {states[u].state for u in caught} == {"interrupted"}
    assert not [s for s in states.values() if s.state == "running"]
    detail = states[next(iter(caught))].detail
    assert "is gone" in detail and f"resubmit {store}" in detail and "ckpt-analysis run" in detail
    shown = subprocess.run([*CLI, "status", str(store)], capture_output=True, text=True, check=False)
    assert " 0 running" in shown.stdout and f"{len(caught)} interrupted" in shown.stdout, shown.stdout
    assert all(o.ok for o in run_job(load_job(job)))
    assert {s.state for s in unit_states(store)} == {"done"}


def _record(store: Path, unit: str, **fields: object) -> None:
    """A running unit's sidecar as another process would leave it."""
    write_sidecar(store, unit, {"unit": unit, "status": "running", "started": time.time(), **fields})


def test_an_owner_on_another_host_is_running_until_its_heartbeat_is_stale(tmp_path: Path) -> None:
    job = load_job(_slow_job(tmp_path))
    prepare_store(job, force=False)
    store, unit = Path(job.output), store_meta(job.output)["units"][0]["id"]
    _record(store, unit, host="node-elsewhere", pid=1, started=time.time() - 3600)
    lock_file(store, unit).touch()  # a heartbeat just now
    state = unit_states(store, stale_after=60)[0]
    assert state.state == "running" and "node-elsewhere" in state.detail, state
    old = time.time() - 120
    os.utime(lock_file(store, unit), (old, old))
    state = unit_states(store, stale_after=60)[0]
    assert state.state == "interrupted" and "no heartbeat from host node-elsewhere" in state.detail


def test_a_live_pid_that_no_longer_holds_the_units_lock_is_interrupted(tmp_path: Path) -> None:
    """This very process, alive, named as the owner of a unit whose lock nobody holds (its
    failure record could not be written, say)."""
    job = load_job(_slow_job(tmp_path))
    prepare_store(job, force=False)
    store, unit = Path(job.output), store_meta(job.output)["units"][0]["id"]
    _record(store, unit, **owner())
    state = unit_states(store)[0]
    assert state.state == "interrupted" and "no longer holds the unit's lock" in state.detail


def test_a_reused_pid_is_not_the_owner(tmp_path: Path) -> None:
    job = load_job(_slow_job(tmp_path))
    prepare_store(job, force=False)
    store, unit = Path(job.output), store_meta(job.output)["units"][0]["id"]
    _record(store, unit, **{**owner(), "pid_start": 1})  # our pid, but a process started at boot
    assert unit_states(store)[0].state == "interrupted"


def test_the_heartbeat_refreshes_the_file_while_the_block_runs(tmp_path: Path) -> None:
    beat = tmp_path / "unit.lock"
    beat.touch()
    old = time.time() - 100
    os.utime(beat, (old, old))
    with heartbeat(beat, every=0.05):
        time.sleep(0.2)
        first = beat.stat().st_mtime
        time.sleep(0.2)
        assert beat.stat().st_mtime > first > old + 50
    ended = beat.stat().st_mtime
    time.sleep(0.15)
    assert beat.stat().st_mtime == ended  # stopped with the block


def _squeue_state(job: str) -> str:
    result = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return result.stdout.strip()


@needs_slurm()
def test_a_cancelled_slurm_job_on_another_node_is_interrupted(tmp_path: Path) -> None:
    submitted = subprocess.run(
        ["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 120"],
        capture_output=True,
        text=True,
        check=True,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        for _ in range(300):
            if _squeue_state(job_id) == "RUNNING":
                break
            time.sleep(0.1)
        assert slurm_running([job_id, "999999"]) == {job_id}
        record = {"host": "node-elsewhere", "pid": 1, "started": time.time(), "SLURM_JOB_ID": job_id}
        beat = time.time() - 10_000  # no heartbeat for hours: SLURM, asked, still decides
        assert Liveness([record], stale_after=1.0).gone(record, beat, held=lambda: False) is None
    finally:
        subprocess.run(["scancel", job_id], check=True)
    for _ in range(300):
        if _squeue_state(job_id) not in ("RUNNING", "COMPLETING"):
            break
        time.sleep(0.1)
    gone = Liveness([record]).gone(record, time.time(), held=lambda: True)
    assert gone == f"SLURM job {job_id} is no longer running"


def test_the_owner_names_this_host_and_process() -> None:
    me = owner()
    assert me["host"] == socket.gethostname() and me["pid"] == os.getpid()
    assert sys.platform != "linux" or isinstance(me["pid_start"], int)


@pytest.mark.parametrize("state", ["PENDING", "gone"])
def test_squeue_not_listing_a_job_as_running_means_it_is_not(
    state: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in ``squeue`` on PATH prints a requeued (pending) task, or nothing with the error
    squeue gives for ids it no longer knows."""
    fake = tmp_path / "squeue"
    invalid = 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1'
    fake.write_text("#!/bin/sh\n" + ('echo "42 PENDING"' if state == "PENDING" else invalid) + "\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert slurm_running(["42"]) == set()
