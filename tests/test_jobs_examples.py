"""The example job files in jobs/ are valid specs naming registered analyses."""

from pathlib import Path

import pytest

from ckpt_analysis.config import load_job
from ckpt_analysis.registry import build_analyses

JOBS = sorted((Path(__file__).parent.parent / "jobs").glob("*.toml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_example_job_parses_and_builds_its_analyses(path: Path) -> None:
    job = load_job(path)
    assert build_analyses(job)
    assert Path(job.output).is_absolute()


def test_there_are_example_jobs_for_hub_and_local_runs() -> None:
    sources = {load_job(p).checkpoints.source for p in JOBS}
    assert {"hub", "local"} <= sources
