"""Cost estimates: store sizes from the plan, times and memory from a calibration run or sidecars."""

from pathlib import Path

import pytest
from builders import job_dict, write_job

from ckpt_analysis.config import job_from_dict
from ckpt_analysis.estimate import calibration_units, estimate
from ckpt_analysis.plan import make_plan
from ckpt_analysis.run import run_job

ANALYSES = {
    "covariance": {"sites": ["resid_post"]},
    "hessian_basis": {"k": 1, "every": 10, "sample_sequences": 8, "random": False, "axis": 0},
    "token_loss": {},
    "polca": {},
}


def _bytes_on_disk(store: Path, names: list[str]) -> int:
    return sum(
        f.stat().st_size
        for n in names
        for f in (store / n).rglob("*")
        if f.is_file() and f.name != "zarr.json"
    )


def test_estimate_calibrates_without_touching_the_output_then_reads_finished_units(
    run_dir: Path, tmp_path: Path
) -> None:
    job = job_from_dict(
        job_dict(run_dir, tmp_path / "e.zarr", analyses=ANALYSES, data={"num_examples": 16}), base=tmp_path
    )
    before = {e.analysis: e for e in estimate(job)}
    assert not (tmp_path / "e.zarr").exists()
    for name in ("covariance", "hessian_basis", "token_loss"):
        e = before[name]
        assert e.source == "calibration run" and e.seconds is not None and e.seconds > 0, e
        assert e.peak_rss_mb is not None and e.peak_rss_mb > 50 and e.gpu_peak_mb is None
    assert before["polca"].seconds is None and "long chain" in before["polca"].source
    assert before["covariance"].units == len(make_plan(job).checkpoints)
    run_job(job)
    after = {e.analysis: e for e in estimate(job, calibrate=False)}
    assert after["polca"].source == f"{after['polca'].units} finished units" and after["polca"].seconds
    plan = make_plan(job)
    covariance = next(a for a in plan.analyses if a.name == "covariance")
    names = [v.name for v in covariance.variables(plan.context)]
    written = _bytes_on_disk(tmp_path / "e.zarr", names)
    assert after["covariance"].store_bytes == pytest.approx(written, rel=0.01)


def test_calibration_skips_analyses_behind_a_long_chain(run_dir: Path, tmp_path: Path) -> None:
    job = job_from_dict(job_dict(run_dir, tmp_path / "c.zarr", analyses=ANALYSES), base=tmp_path)
    chains = calibration_units(make_plan(job).units)
    assert set(chains) == {"covariance", "hessian_basis", "token_loss"}
    assert all(len(chain) == 1 for chain in chains.values())


def test_plan_estimate_prints_per_analysis_costs_and_creates_nothing(run_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    path = write_job(tmp_path / "j.toml", run_dir, tmp_path / "j.zarr", analyses={"covariance": {}})
    shown = subprocess.run(
        [sys.executable, "-m", "ckpt_analysis", "plan", str(path), "--estimate"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    printed = " ".join(shown.stdout.split())
    assert "covariance" in printed and "calibration run" in printed and "unit-hours" in printed
    assert "sweep:" in printed and "on 2 local workers" in printed and "cpu:" in printed
    assert not (tmp_path / "j.zarr").exists()
