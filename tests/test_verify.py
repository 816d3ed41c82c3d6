"""Integrity: checksummed chunks, `verify` and `--repair`, failed writes that leave nothing visible."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from builders import cli, job_dict, write_job

from ckpt_analysis.config import job_from_dict
from ckpt_analysis.errors import StoreError
from ckpt_analysis.run import run_job
from ckpt_analysis.store import UNITS_DIR, done_flags, open_results, read, read_sidecar, unit_states
from ckpt_analysis.verify import repair, verify_store

CHUNK = "act_cov/c/1/3/1/0/0"
"""act_cov at step 10 (index 1), resid_post (site 3), layer 1."""
UNIT = "covariance/step=10"


@pytest.fixture
def done_store(run_dir: Path, tmp_path: Path) -> Path:
    job = job_from_dict(job_dict(run_dir, tmp_path / "s.zarr"), base=tmp_path)
    assert all(o.ok for o in run_job(job))
    return Path(job.output)


def _damage(store: Path, file: str = CHUNK) -> np.ndarray:
    """Overwrite ``file`` with random bytes of the same size; returns what read gave before."""
    before = read(store, "act_cov", step=10, site="resid_post", layer=1)
    path = store / file
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    return before


def test_every_data_array_is_written_with_a_crc32c_checksum(done_store: Path) -> None:
    import json

    for name in ("act_cov", "unit_done", "input_ids", "step"):
        codecs = [c["name"] for c in json.loads((done_store / name / "zarr.json").read_text())["codecs"]]
        assert codecs[-1] == "crc32c", (name, codecs)
    assert CHUNK in read_sidecar(done_store, UNIT)["chunks"]  # type: ignore[index]


def test_a_clean_store_verifies_clean(done_store: Path) -> None:
    report = verify_store(done_store)
    assert report.clean and report.files > 0 and report.bytes > 0
    assert not report.unchecked_arrays and report.unrecorded_units == 0


def test_a_same_size_damaged_chunk_raises_on_every_reader(done_store: Path) -> None:
    _damage(done_store)
    with pytest.raises(StoreError, match=f"{CHUNK} fails its checksum.*verify {done_store} --repair"):
        read(done_store, "act_cov", step=10, site="resid_post", layer=1)
    with pytest.raises(ValueError, match="checksum"):
        np.asarray(open_results(done_store).act_cov.sel(step=10, site="resid_post", layer=1))
    with pytest.raises(ValueError, match="checksum"):
        np.asarray(xr.open_zarr(done_store).act_cov.sel(step=10, site="resid_post", layer=1))
    read(done_store, "act_cov", step=20, site="resid_post", layer=1)  # other chunks still read


def test_a_removed_chunk_of_a_done_unit_is_an_error_on_read(done_store: Path) -> None:
    (done_store / CHUNK).unlink()
    with pytest.raises(StoreError, match="is missing but its unit is done"):
        read(done_store, "act_cov", step=10, site="resid_post", layer=1)
    with pytest.raises(StoreError, match=f"1 done unit.*{UNIT}: {CHUNK}.*verify {done_store} --repair"):
        open_results(done_store)
    rest = open_results(done_store, check=False).act_cov
    assert np.isnan(rest.sel(step=10, site="resid_post", layer=1)).all()
    assert np.isfinite(rest.sel(step=20).values).all()


def test_status_counts_a_done_unit_that_lost_a_chunk_as_damaged(done_store: Path) -> None:
    (done_store / CHUNK).unlink()
    states = {s.unit_id: s for s in unit_states(done_store)}
    assert states[UNIT].state == "damaged"
    assert CHUNK in states[UNIT].detail and f"verify {done_store} --repair" in states[UNIT].detail
    assert sum(s.state == "done" for s in states.values()) == len(states) - 1
    shown = cli("status", done_store)
    assert shown.returncode == 1 and "1 damaged" in shown.stdout, shown.stdout
    assert cli("verify", done_store, "--repair").returncode == 0
    assert {s.state for s in unit_states(done_store)} == {"done", "failed"}


def test_an_unwritten_unit_still_reads_as_fill(run_dir: Path, tmp_path: Path) -> None:
    job = job_from_dict(job_dict(run_dir, tmp_path / "s.zarr"), base=tmp_path)
    run_job(job, only=[UNIT])
    assert np.isnan(read(job.output, "act_cov", step=20, site="resid_post", layer=1)).all()
    assert np.isnan(open_results(job.output).act_cov.sel(step=20).values).all()


def test_verify_names_each_damaged_unit_with_its_files(done_store: Path) -> None:
    _damage(done_store)
    (done_store / "act_cov/c/2/0/0/0/0").unlink()
    report = verify_store(done_store)
    found = {(d.unit, d.file, d.problem) for d in report.damage}
    assert found == {
        (UNIT, CHUNK, "checksum"),
        ("covariance/step=20", "act_cov/c/2/0/0/0/0", "missing"),
    }


def test_repair_resets_exactly_the_damaged_units_and_run_recomputes_them(
    done_store: Path, run_dir: Path, tmp_path: Path
) -> None:
    good = _damage(done_store)
    assert repair(done_store, verify_store(done_store)) == [UNIT]
    states = {s.unit_id: s for s in unit_states(done_store)}
    assert states[UNIT].state == "failed" and "verify --repair" in states[UNIT].detail
    assert sum(s.state == "done" for s in states.values()) == len(states) - 1
    assert np.isnan(read(done_store, "act_cov", step=10, site="resid_post", layer=1)).all()
    job = job_from_dict(job_dict(run_dir, done_store), base=tmp_path)
    outcomes = run_job(job)
    assert [o.name for o in outcomes if o.status == "done"] == [UNIT]
    np.testing.assert_array_equal(read(done_store, "act_cov", step=10, site="resid_post", layer=1), good)
    assert verify_store(done_store).clean


def test_verify_cli_exits_1_on_damage_and_0_once_repaired(done_store: Path) -> None:
    assert cli("verify", done_store).returncode == 0
    _damage(done_store)
    damaged = cli("verify", done_store)
    assert damaged.returncode == 1 and f"damaged {UNIT}: {CHUNK} (checksum)" in damaged.stdout
    status = cli("status", done_store, "--verify")
    assert status.returncode == 1 and f"damaged {UNIT}" in status.stdout
    repaired = cli("verify", done_store, "--repair")
    assert repaired.returncode == 0 and "reset 1 unit(s)" in repaired.stdout
    assert cli("verify", done_store).returncode == 0


def test_a_store_without_checksums_still_opens_and_verify_says_so(done_store: Path) -> None:
    """A store made before checksums: zarr v3 arrays with the plain bytes codec, and no chunk records."""
    import json

    meta = done_store / "act_cov" / "zarr.json"
    raw = json.loads(meta.read_text())
    raw["codecs"] = raw["codecs"][:1]
    meta.write_text(json.dumps(raw))
    for file in (done_store / "act_cov" / "c").rglob("*"):
        if file.is_file():
            file.write_bytes(file.read_bytes()[:-4])
    value = read(done_store, "act_cov", step=10, site="resid_post", layer=1)
    assert np.isfinite(value).all()
    report = verify_store(done_store)
    assert report.clean and report.unchecked_arrays == ["act_cov"]


@pytest.mark.parametrize("where", ["staging", "renaming"])
def test_a_write_that_fails_mid_unit_leaves_no_values_and_a_failed_reason(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A full disk after some of a unit's blocks, injected at the third staged block or at the
    second rename into place (a real full disk: test_full_disk.py)."""
    from ckpt_analysis import staging

    calls = {"n": 0}
    real = staging.StagedWrites.write if where == "staging" else os.replace

    def full_disk(*args: object) -> None:
        counted = where == "staging" or ".staging" in str(args[0])  # only renames out of staging
        calls["n"] += counted
        if counted and calls["n"] == (3 if where == "staging" else 2):
            raise OSError(28, "No space left on device")
        real(*args)  # type: ignore[arg-type]

    if where == "staging":
        monkeypatch.setattr(staging.StagedWrites, "write", full_disk)
    else:
        monkeypatch.setattr(os, "replace", full_disk)
    job = job_from_dict(job_dict(run_dir, tmp_path / "s.zarr"), base=tmp_path)
    outcomes = run_job(job)
    monkeypatch.undo()
    failed = [o for o in outcomes if not o.ok]
    assert len(failed) == 1 and "No space left on device" in str(failed[0].error)
    state = {s.unit_id: s for s in unit_states(job.output)}[failed[0].name]
    assert state.state == "failed" and "No space left on device" in state.detail
    step = open_results(job.output).step.values[failed[0].index]
    assert np.isnan(open_results(job.output).act_cov.sel(step=step).values).all()  # nothing visible
    assert not list((Path(job.output) / UNITS_DIR).glob("*.tmp-*"))
    assert not list((Path(job.output) / UNITS_DIR).glob("*.staging"))
    assert [o.name for o in run_job(job) if o.status == "done"] == [failed[0].name]
    assert done_flags(job.output).all() and verify_store(job.output).clean


def test_sidecar_temp_files_left_by_a_killed_write_are_swept_on_the_next_run(
    done_store: Path, run_dir: Path, tmp_path: Path
) -> None:
    litter = done_store / UNITS_DIR / "covariance__step=10.tmp-deadbeef"
    litter.write_text("")
    run_job(job_from_dict(job_dict(run_dir, done_store), base=tmp_path))
    assert not litter.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"analyses": {"covariance": {"sites": ["resid_post"]}}}, "the job's analysis settings changed"),
        ({"data": {"num_examples": 32}}, "the job's analysis settings changed"),
    ],
)
def test_a_refused_resume_names_what_changed(
    done_store: Path, run_dir: Path, tmp_path: Path, change: dict[str, object], message: str
) -> None:
    job = write_job(tmp_path / "job.toml", run_dir, done_store, **change)
    result = cli("run", job)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_a_refused_resume_says_the_data_content_changed(run_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"ids": [1, 2, 3, 4, 5, 6]}\n{"ids": [6, 5, 4, 3, 2, 1]}\n')
    ids = {"source": "dataset", "path": str(data), "ids_column": "ids", "token_text": False, "seq_len": 6}
    job = write_job(tmp_path / "job.toml", run_dir, tmp_path / "s.zarr", data=ids)
    assert cli("run", job).returncode == 0
    data.write_text('{"ids": [1, 2, 3, 4, 5, 7]}\n{"ids": [6, 5, 4, 3, 2, 1]}\n')
    result = cli("run", job)
    assert result.returncode == 2 and "the data content" in result.stderr, result.stderr
    assert "analysis settings" not in result.stderr and "checkpoints" not in result.stderr


IDS = {"source": "dataset", "path": "ids.jsonl", "ids_column": "ids", "token_text": False, "seq_len": 6}


@pytest.mark.parametrize(
    "change",
    [
        {"analyses": {"covariance": {"sitez": ["resid_post"]}}},  # a typo'd key
        {"analyses": {"covariance": {"sites": ["resid_middle"]}}},  # a bad choice
        {"data": {"source": "dataset", "path": "missing.jsonl"}},  # a missing data file
        {"checkpoints": {"dtype": "float8"}},  # a bad choice of dtype
        {"data": {"source": "multiplication"}},  # not a data source
        {"checkpoints": {"select": [999]}},  # a step the run lacks
        {"data": {**IDS, "ids_column": "tokens"}},  # a missing column
        {"data": {**IDS, "path": "empty.jsonl"}},  # an empty dataset
        {"data": {**IDS, "seq_len": 64}},  # longer than the model's context
    ],
)
def test_a_refused_job_writes_nothing(run_dir: Path, tmp_path: Path, change: dict[str, object]) -> None:
    (tmp_path / "ids.jsonl").write_text('{"ids": [1, 2, 3, 4, 5, 6]}\n' * 4)
    (tmp_path / "empty.jsonl").write_text("")
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", run_dir, out / "nested" / "s.zarr", **change)
    result = cli("run", job)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))


def test_the_cpu_allocators_out_of_memory_names_the_knobs(run_dir: Path, tmp_path: Path) -> None:
    from ckpt_analysis.run import failure_reason

    job = job_from_dict(job_dict(run_dir, tmp_path / "s.zarr"), base=tmp_path)
    torch_error = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"
    )
    reason = failure_reason(torch_error, job)
    assert reason.startswith("out of host memory") and "compute.batch_size" in reason
    assert failure_reason(RuntimeError("shape mismatch"), job) == "RuntimeError: shape mismatch"


def test_plain_xarray_without_the_package_refuses_a_damaged_chunk(done_store: Path) -> None:
    _damage(done_store)
    code = "import sys, xarray as xr; xr.open_zarr(sys.argv[1]).act_cov.sel(step=10, layer=1).values"
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, str(done_store)],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert result.returncode != 0 and "checksum" in result.stderr
