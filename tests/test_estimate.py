"""Cost estimates: store sizes from the plan, times and memory from a calibration run or sidecars."""

from pathlib import Path

import pytest
from builders import job_dict, write_job

from ckpt_analysis.config import job_from_dict
from ckpt_analysis.estimate import Estimate, calibration_units, estimate, sweep_seconds
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
    analyses = {**ANALYSES, "corpus_stats": {"vocab_size": 10}}  # one unit for the whole job
    job = job_from_dict(
        job_dict(run_dir, tmp_path / "e.zarr", analyses=analyses, data={"num_examples": 16}), base=tmp_path
    )
    before = {e.analysis: e for e in estimate(job)}
    once = before["corpus_stats"]
    assert once.source == "calibration run (one unit: start-up included)" and once.startup_seconds is None
    assert not (tmp_path / "e.zarr").exists()
    for name in ("covariance", "hessian_basis", "token_loss"):
        e = before[name]
        assert e.seconds is not None and e.seconds > 0, e
        assert e.peak_rss_mb is not None and e.peak_rss_mb > 50 and e.gpu_peak_mb is None
    for name in ("covariance", "token_loss"):  # per checkpoint: the second unit timed, warm
        e = before[name]
        assert e.source == "calibration run (second unit)" and e.startup_seconds is not None, e
        assert e.load_seconds is not None and 0 < e.load_seconds < (e.seconds or 0), e
    polca = before["polca"]  # behind the basis chain, timed on placeholder inputs
    assert polca.source == "calibration run (second unit) on placeholder inputs" and polca.seconds, polca
    assert before["covariance"].units == len(make_plan(job).checkpoints)
    run_job(job)
    after = {e.analysis: e for e in estimate(job, calibrate=False)}
    assert after["polca"].source == f"{after['polca'].units} finished units" and after["polca"].seconds
    plan = make_plan(job)
    covariance = next(a for a in plan.analyses if a.name == "covariance")
    names = [v.name for v in covariance.variables(plan.context)]
    written = _bytes_on_disk(tmp_path / "e.zarr", names)
    assert after["covariance"].store_bytes == pytest.approx(written, rel=0.01)


def test_calibration_times_input_independent_analyses_on_placeholders_and_skips_the_rest_behind_a_long_chain(
    run_dir: Path, tmp_path: Path
) -> None:
    analyses = {**ANALYSES, "clusters": {"lag": 10}}
    job = job_from_dict(job_dict(run_dir, tmp_path / "c.zarr", analyses=analyses), base=tmp_path)
    units = make_plan(job).units
    chains = calibration_units(units)
    assert set(chains) == {"covariance", "hessian_basis", "token_loss", "polca"}  # not clusters
    polca = [u for u in units if u.analysis == "polca"][:2]
    assert chains["polca"] == (polca, polca, True) and [u.checkpoint for u in polca] == [0, 1]
    for name in ("covariance", "token_loss"):  # the first two checkpoints' units, the warm one last
        first_two = [u for u in units if u.analysis == name][:2]
        assert chains[name].timed == chains[name].chain == first_two
        assert [u.checkpoint for u in first_two] == [0, 1]
    assert [u.key for u in chains["hessian_basis"].timed] == ["step=0", "step=10"]  # a chain's first links


def test_each_sidecar_says_how_long_its_unit_spent_loading_the_checkpoint(
    run_dir: Path, tmp_path: Path
) -> None:
    import json

    raw = job_dict(run_dir, tmp_path / "l.zarr", analyses={"covariance": {"sites": ["resid_post"]}})
    assert all(o.ok for o in run_job(job_from_dict(raw, base=tmp_path), executor="inprocess"))
    sidecars = [json.loads(p.read_text()) for p in (tmp_path / "l.zarr" / "_units").glob("*.json")]
    assert len(sidecars) == len(make_plan(job_from_dict(raw, base=tmp_path)).checkpoints)
    assert all(0 < s["load_s"] < s["wall_s"] for s in sidecars)


def test_a_sweep_pays_the_one_time_costs_once_per_worker() -> None:
    def row(seconds: float, units: int, once: float | None) -> Estimate:
        return Estimate("a", units, 0, seconds, None, None, "calibration run", 0.0, once)

    rows = [row(2.0, 10, 5.0), row(1.0, 4, None)]
    assert sweep_seconds(rows, workers=2) == pytest.approx((20 + 4) / 2 + 5)


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
    assert "once per worker" in printed and "of which load" in printed
    assert not (tmp_path / "j.zarr").exists()
