"""Executors: the dask-jobqueue SLURM executor's worker script (golden file) and a real SLURM run."""

import os
import re
from pathlib import Path

import pytest
from builders import assert_same_results, build_local_run, job_dict, needs_slurm

from ckpt_analysis.config import SlurmSpec, job_from_dict
from ckpt_analysis.device import visible_gpus
from ckpt_analysis.execute import DaskExecutor, Outcome, SlurmDaskExecutor, Task
from ckpt_analysis.run import run_job
from ckpt_analysis.store import done_flags, read_sidecar

GOLDEN = Path(__file__).parent / "golden"


def test_slurm_worker_job_script_matches_the_golden_file(tmp_path: Path) -> None:
    spec = SlurmSpec(
        partition="gpu",
        account="interp",
        time="02:00:00",
        mem="16G",
        cpus_per_task=4,
        gres="gpu:1",
        setup=["module load cuda"],
        sbatch_args=["--qos=short"],
        interface="lo",
    )
    logs = str(tmp_path / "logs")
    executor = SlurmDaskExecutor(workers=2, threads_per_worker=2, slurm=spec, log_directory=logs)
    with executor.job_cluster() as cluster:
        script = cluster.job_script().replace(logs, "LOGS")
    script = re.sub(r"tcp://[\d.]+:\d+", "tcp://SCHEDULER", script)
    script = re.sub(r"\S*python\S* -m distributed", "PYTHON -m distributed", script)
    assert script == (GOLDEN / "dask-worker.sbatch").read_text()


@needs_slurm()
def test_dask_workers_as_slurm_jobs_give_the_same_store_as_in_process(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", [0, 10, 20], seed=6, hidden_size=8, num_layers=1, num_heads=2)
    analyses = {"covariance": {"sites": ["resid_post"]}, "token_loss": {}}
    reference = job_from_dict(job_dict(run, tmp_path / "ref.zarr", analyses=analyses), base=tmp_path)
    run_job(reference)
    raw = job_dict(run, tmp_path / "s.zarr", analyses=analyses, compute={"executor": "slurm", "workers": 2})
    raw["slurm"] = {"mem": "2G", "interface": "lo", "time": "00:10:00"}
    outcomes = run_job(job_from_dict(raw, base=tmp_path))
    assert {o.status for o in outcomes} == {"done"}
    assert done_flags(tmp_path / "s.zarr").all()
    assert_same_results(tmp_path / "s.zarr", reference.output)
    record = read_sidecar(tmp_path / "s.zarr", "covariance/step=0")
    assert record is not None and record.get("SLURM_JOB_ID")


def test_worker_scripts_keep_every_sbatch_line_with_quotes_and_substitutions_in_options(
    tmp_path: Path,
) -> None:
    import subprocess

    spec = SlurmSpec(
        partition="gpu", sbatch_args=["--comment=$(touch /tmp/x)", "--comment='q'"], interface="lo"
    )
    executor = SlurmDaskExecutor(workers=1, threads_per_worker=1, slurm=spec, log_directory=str(tmp_path))
    with executor.job_cluster() as cluster:
        script = cluster.job_script()
    (tmp_path / "w.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "w.sbatch")], check=False).returncode == 0
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    first_command = next(
        i for i, line in enumerate(script.splitlines()[1:], 1) if line and not line.startswith("#")
    )
    assert all(script.splitlines().index(line) < first_command for line in header)
    assert {"#SBATCH --comment=$(touch /tmp/x)", "#SBATCH -p gpu"} <= set(header)


def _own_gpu() -> str:
    return os.environ["CUDA_VISIBLE_DEVICES"]


def test_each_local_worker_sees_only_its_own_gpu() -> None:
    from dask.distributed import Client

    executor = DaskExecutor(workers=3, threads_per_worker=1, gpus=("0", "GPU-b"))
    with executor.cluster() as cluster, Client(cluster) as client:
        seen = client.run(_own_gpu)
        outcomes = executor.run(
            [Task(0, "a"), Task(1, "b", (0,))], lambda i: Outcome(i, "x", "done"), lambda o: None
        )
    assert sorted(seen.values()) == ["0", "0", "GPU-b"]  # round-robin, one card per worker
    assert [o.status for o in outcomes] == ["done", "done"]


def test_a_cpu_job_spreads_over_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert visible_gpus("cpu") == []
