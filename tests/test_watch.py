"""watch: complete-checkpoint detection, a run followed while another process writes it, a killed
watch resumed, and the analyses it refuses."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from builders import assert_same_results, build_local_run, job_dict, run_and_kill, write_job

from ckpt_analysis.config import job_from_dict
from ckpt_analysis.errors import JobSpecError, StoreError
from ckpt_analysis.run import run_job
from ckpt_analysis.store import done_flags, store_meta
from ckpt_analysis.watch import checkpoint_complete, watch

ANALYSES: dict[str, Any] = {
    "diagnostics": {},
    "geometry": {"sample_tokens": 40},
    "covariance": {"sites": ["resid_post"]},
}

_WRITER = """
import shutil, sys, time
from pathlib import Path
staging, run = Path(sys.argv[1]), Path(sys.argv[2])
run.mkdir()
for folder in sorted(staging.iterdir(), key=lambda p: int(p.name.split("-")[1])):
    target = run / folder.name
    target.mkdir()
    for item in sorted(folder.iterdir(), key=lambda p: p.suffix == ".safetensors"):
        if item.suffix != ".safetensors":
            shutil.copy(item, target / item.name)
            continue
        data = item.read_bytes()
        with open(target / item.name, "wb") as out:  # half the weights, a pause, then the rest
            out.write(data[: len(data) // 2])
            out.flush()
            time.sleep(1.0)
            out.write(data[len(data) // 2 :])
    time.sleep(0.5)
"""


def _age(folder: Path, seconds: float) -> None:
    for file in folder.iterdir():
        stamp = time.time() - seconds
        os.utime(file, (stamp, stamp))


def test_a_checkpoint_is_complete_only_with_its_config_all_weight_bytes_and_settled_files(
    tmp_path: Path,
) -> None:
    folder = build_local_run(tmp_path / "run", [0]) / "checkpoint-0"
    _age(folder, 60)
    assert checkpoint_complete(folder, settle=5)
    assert not checkpoint_complete(folder, settle=120)  # changed within the last two minutes
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-100])
    _age(folder, 60)
    assert not checkpoint_complete(folder, settle=5)  # fewer bytes than its header promises
    weights.write_bytes(whole)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "shard-2.safetensors"}})
    )
    _age(folder, 60)
    assert not checkpoint_complete(folder, settle=5)  # a shard the index names is missing
    (folder / "model.safetensors.index.json").unlink()
    (folder / "config.json").unlink()
    assert not checkpoint_complete(folder, settle=5)


def test_watch_follows_a_run_another_process_writes_and_equals_a_plain_run(tmp_path: Path) -> None:
    staging = build_local_run(tmp_path / "staging", [0, 10, 20])
    raw = job_dict(tmp_path / "run", tmp_path / "watched.zarr", data={"num_examples": 24})
    raw["analyses"] = ANALYSES
    job = job_from_dict(raw, base=tmp_path)
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(staging), str(tmp_path / "run")])
    try:
        outcomes = watch(job, interval=0.2, settle=0.3, until_step=20, idle_timeout=60)
    finally:
        writer.wait(timeout=60)
    assert outcomes and all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    assert done_flags(job.output).all() and sum(o.status == "done" for o in outcomes) == 3 * 3
    order = [u["id"] for u in store_meta(job.output)["units"]]
    assert order[:3] == [
        "diagnostics/step=0",
        "geometry/step=0",
        "covariance/step=0",
    ]  # grown, not planned whole
    raw["checkpoints"]["path"], raw["output"] = str(staging), str(tmp_path / "plain.zarr")
    assert all(o.ok for o in run_job(job_from_dict(raw, base=tmp_path)))
    assert_same_results(job.output, tmp_path / "plain.zarr")
    again = run_job(job)  # the finished run's own job resumes the watched store: nothing to do
    assert {o.status for o in again} == {"skipped"}


def test_a_killed_watch_rerun_completes_the_store(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", [0, 10, 20])
    for folder in run.iterdir():
        _age(folder, 60)
    job_path = write_job(tmp_path / "job.toml", run, tmp_path / "w.zarr", data={"num_examples": 24})
    text = job_path.read_text().replace("[analyses.covariance]\n", "[analyses.diagnostics]\n")
    job_path.write_text(text)
    command = ("watch", "--until-step", "20", "--interval", "0.2", "--settle", "1")
    assert run_and_kill(job_path, tmp_path / "w.zarr", after_done=1, command=command) < 3
    resumed = subprocess.run(
        [sys.executable, "-m", "ckpt_analysis", *command, str(job_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert done_flags(tmp_path / "w.zarr").all()
    plain = job_from_dict(
        {**job_dict(run, tmp_path / "p.zarr", data={"num_examples": 24}), "analyses": {"diagnostics": {}}},
        base=tmp_path,
    )
    assert all(o.ok for o in run_job(plain))
    assert_same_results(tmp_path / "w.zarr", tmp_path / "p.zarr")


def test_watch_refuses_analyses_spanning_checkpoints_by_name(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", [0, 10])
    for folder in run.iterdir():
        _age(folder, 60)
    raw = job_dict(run, tmp_path / "x.zarr")
    raw["analyses"] = {
        "diagnostics": {},
        "hessian_basis": {"k": 1, "every": 10, "axis": 0},
        "token_loss": {},
        "polca": {"bases": ["hessian"]},
    }
    with pytest.raises(JobSpecError, match="hessian_basis, polca span checkpoints"):
        watch(job_from_dict(raw, base=tmp_path), interval=0.1, settle=0.1, until_step=10)
    assert not (tmp_path / "x.zarr").exists()


def test_watch_refuses_a_store_of_another_job(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", [0, 10])
    for folder in run.iterdir():
        _age(folder, 60)
    raw = job_dict(run, tmp_path / "x.zarr", data={"num_examples": 24})
    raw["analyses"] = {"diagnostics": {}}
    assert all(o.ok for o in run_job(job_from_dict(raw, base=tmp_path)))
    raw["analyses"] = {"geometry": {"sample_tokens": 20}}
    with pytest.raises(StoreError, match="does not hold this job's results for its first 2 checkpoints"):
        watch(job_from_dict(raw, base=tmp_path), interval=0.1, settle=0.1, until_step=10)
