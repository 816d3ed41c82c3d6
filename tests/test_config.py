"""Job spec parsing: strict keys, literal choices, path resolution, spec hashes."""

from pathlib import Path

import pytest
from builders import job_dict, write_job

from ckpt_analysis.config import job_from_dict, load_job
from ckpt_analysis.errors import JobSpecError


def test_unknown_top_level_key_lists_valid_keys(tmp_path: Path) -> None:
    raw = job_dict(tmp_path, tmp_path / "out.zarr", colour="blue")
    with pytest.raises(JobSpecError, match=r"unknown key\(s\) 'colour' in \[job\]; valid keys: name, output"):
        job_from_dict(raw, base=tmp_path)


def test_unknown_nested_key_names_its_table(tmp_path: Path) -> None:
    raw = job_dict(tmp_path, tmp_path / "out.zarr", data={"sequence_length": 5})
    with pytest.raises(JobSpecError, match=r"'sequence_length' in \[data\]; valid keys: source, .*seq_len"):
        job_from_dict(raw, base=tmp_path)


def test_bad_literal_lists_choices(tmp_path: Path) -> None:
    raw = job_dict(tmp_path, tmp_path / "out.zarr", checkpoints={"dtype": "float8"})
    with pytest.raises(
        JobSpecError, match=r"checkpoints\.dtype = 'float8' is not valid; choose one of: 'float32'"
    ):
        job_from_dict(raw, base=tmp_path)


def test_wrong_type_is_reported(tmp_path: Path) -> None:
    raw = job_dict(tmp_path, tmp_path / "out.zarr", compute={"workers": "two"})
    with pytest.raises(JobSpecError, match=r"compute\.workers = 'two' must be int"):
        job_from_dict(raw, base=tmp_path)


@pytest.mark.parametrize("key", ["workers", "batch_size", "vectors_per_pass"])
def test_non_positive_compute_sizes_are_rejected(tmp_path: Path, key: str) -> None:
    raw = job_dict(tmp_path, tmp_path / "out.zarr", compute={key: 0})
    with pytest.raises(JobSpecError, match=rf"compute\.{key} = 0 must be at least 1"):
        job_from_dict(raw, base=tmp_path)


def test_job_without_analyses_is_rejected(tmp_path: Path) -> None:
    raw = job_dict(tmp_path, tmp_path / "out.zarr")
    raw["analyses"] = {}
    with pytest.raises(JobSpecError, match="names no analyses"):
        job_from_dict(raw, base=tmp_path)


def test_relative_paths_resolve_against_the_job_file(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    path = write_job(tmp_path / "jobs" / "j.toml", Path("../run"), Path("out.zarr"))
    job = load_job(path)
    assert job.output == str(tmp_path / "jobs" / "out.zarr")
    assert job.checkpoints.path == str(tmp_path / "run")


def test_spec_hash_ignores_compute_but_not_analysis_settings(tmp_path: Path) -> None:
    base = job_from_dict(job_dict(tmp_path, tmp_path / "o.zarr"), base=tmp_path)
    faster = job_from_dict(job_dict(tmp_path, tmp_path / "o.zarr", compute={"workers": 8}), base=tmp_path)
    other = job_from_dict(
        job_dict(tmp_path, tmp_path / "o.zarr", analyses={"covariance": {"positions": "all"}}), base=tmp_path
    )
    assert base.spec_hash() == faster.spec_hash()
    assert base.spec_hash() != other.spec_hash()


def test_missing_job_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match=r"nope\.toml' does not exist"):
        load_job(tmp_path / "nope.toml")
