"""A real full disk (a small tmpfs, mounted as root): a unit's chunks land all or nothing, and a
creation that fails leaves no lock, folder or store behind."""

import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from builders import assert_same_results, build_local_run, job_dict

import ckpt_analysis.plan as plan_module
from ckpt_analysis.config import job_from_dict
from ckpt_analysis.errors import StoreError
from ckpt_analysis.plan import prepare_store
from ckpt_analysis.run import run_job
from ckpt_analysis.store import UNITS_DIR, done_flags, read_sidecar, unit_states

PAGE = 4096
DISK_MB = 4


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A ``DISK_MB`` MB tmpfs of its own (root only; CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _free(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _fill(disk: Path, *, leave: int) -> Path:
    """A filler file that leaves ``leave`` bytes (rounded to pages) free on ``disk``."""
    filler = disk / "filler"
    size = max(_free(disk) - leave, 0)
    with filler.open("wb") as handle:
        while size > 0:  # tmpfs counts pages written, not a sparse size
            size -= handle.write(b"\0" * min(size, 1 << 20))
    return filler


def _unit_pages(store: Path, unit: str) -> int:
    """The bytes of whole pages one done unit's chunk files take."""
    chunks = (read_sidecar(store, unit) or {})["chunks"]
    return sum(math.ceil(os.path.getsize(store / f) / PAGE) * PAGE for f in chunks)


def _assert_nothing_visible_but_done_units(store: Path) -> None:
    """Plain xarray (no package checks) reads every unit that is not done as the fill value."""
    done = done_flags(store)
    ds = xr.open_zarr(store, consolidated=True)
    for i in np.flatnonzero(~done):
        assert np.isnan(ds.act_cov.isel(step=i).values).all(), f"step {i} holds act_cov values"
        assert np.isnan(ds.act_mean.isel(step=i).values).all(), f"step {i} holds act_mean values"
    assert not list((store / UNITS_DIR).glob("*.staging")), "a staging folder was left"
    assert "running" not in {s.state for s in unit_states(store)}


def test_a_disk_filling_mid_unit_leaves_no_block_of_a_unit_that_is_not_done(
    disk: Path, tmp_path: Path
) -> None:
    run = build_local_run(tmp_path / "run", [0, 10, 20, 30], seed=2)
    reference = job_from_dict(job_dict(run, tmp_path / "ref.zarr"), base=tmp_path)
    run_job(reference)
    unit = _unit_pages(Path(reference.output), "covariance/step=0")
    faults = partial = 0
    for i, spare in enumerate(np.linspace(0.05, 2.5, 14) * unit):  # the disk fills in every unit phase
        job = job_from_dict(job_dict(run, disk / f"s{i}.zarr"), base=tmp_path)
        prepare_store(job, force=False)
        filler = _fill(disk, leave=int(spare))
        outcomes = run_job(job)
        failed = [o for o in outcomes if not o.ok]
        faults += bool(failed)
        partial += bool(failed) and len(failed) < len(outcomes)
        assert all("No space left on device" in str(o.error) for o in failed), failed
        _assert_nothing_visible_but_done_units(Path(job.output))
        filler.unlink()
        assert all(o.ok for o in run_job(job))  # the rerun completes, equal to a clean run
        assert done_flags(job.output).all()
        assert_same_results(job.output, reference.output)
        shutil.rmtree(job.output)
    assert faults >= 10 and partial >= 3, (faults, partial)  # the fault did land mid-sweep


def test_a_creation_that_fails_on_a_full_disk_leaves_no_lock_folder_or_store(
    disk: Path, tmp_path: Path
) -> None:
    run = build_local_run(tmp_path / "run", [0, 10], seed=2)
    _fill(disk, leave=0)
    job = job_from_dict(job_dict(run, disk / "new" / "s.zarr"), base=tmp_path)
    with pytest.raises(StoreError, match=r"cannot create the store .*No space left on device"):
        prepare_store(job, force=False)
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_a_creation_that_fails_after_the_lock_is_taken_leaves_no_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same without root: the creation itself fails (as on I/O) once the lock is held."""
    run = build_local_run(tmp_path / "run", [0, 10], seed=2)
    out = tmp_path / "out"

    def failing(path: object, **_: object) -> None:
        assert (out / "deeper" / ".s.zarr.lock").exists()  # the lock is held now
        raise StoreError(f"cannot create the store {path}: Input/output error")

    monkeypatch.setattr(plan_module, "create_store", failing)
    job = job_from_dict(job_dict(run, out / "deeper" / "s.zarr"), base=tmp_path)
    with pytest.raises(StoreError, match="Input/output error"):
        prepare_store(job, force=False)
    assert not out.exists()  # nor the folders made for it
