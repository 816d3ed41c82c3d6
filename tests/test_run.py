"""Execution: Dask and in-process runs agree, failures are isolated, reruns resume, kills recover."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from builders import (
    assert_same_results,
    build_fake_hub,
    build_local_run,
    job_dict,
    run_and_kill,
    save_checkpoint,
    tiny_model,
    write_job,
)

from ckpt_analysis.config import job_from_dict, load_job
from ckpt_analysis.errors import CheckpointError, DataError
from ckpt_analysis.execute import InProcessExecutor, Outcome, Task
from ckpt_analysis.plan import prepare_store
from ckpt_analysis.registry import Analysis, PlanContext, Unit, UnitContext, Variable, Write, register
from ckpt_analysis.run import failure_reason, run_job
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
    record = read_sidecar(job.output, "covariance/step=0") or {}
    assert record["pid"] != os.getpid() and record["peak_rss_mb"] > 50  # torch alone is more


def test_running_out_of_memory_names_the_knobs_that_bound_it(run_dir: Path, tmp_path: Path) -> None:
    compute = {"batch_size": 7, "vectors_per_pass": 3}
    job = job_from_dict(job_dict(run_dir, tmp_path / "m.zarr", compute=compute), base=tmp_path)
    reason = failure_reason(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), job)
    assert reason.startswith("out of GPU memory (OutOfMemoryError: CUDA out of memory.")
    assert "compute.batch_size (now 7)" in reason and "compute.vectors_per_pass (now 3)" in reason
    assert failure_reason(MemoryError(), job).startswith("out of host memory")
    assert failure_reason(ValueError("bad"), job) == "ValueError: bad"


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


def _computed(stdout: str) -> int:
    """How many units a `run` says it computed ("… N computed, M already done, F failed")."""
    return int(stdout.rsplit(": ", 1)[1].split(" computed")[0])


def test_two_concurrent_runs_share_the_units_without_computing_any_twice(
    run_dir: Path, tmp_path: Path
) -> None:
    path = write_job(tmp_path / "j.toml", run_dir, tmp_path / "c.zarr")
    runs = [subprocess.Popen([*CLI, "run", str(path)], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    assert sum(_computed(o) for o in outputs) == 6, outputs  # six units, each computed once
    assert done_flags(tmp_path / "c.zarr").all()
    assert not list(tmp_path.glob(".c.zarr.tmp-*"))


def test_a_failed_forced_recompute_keeps_the_earlier_result(tmp_path: Path) -> None:
    import hashlib

    run = build_local_run(tmp_path / "run", [0, 1])
    weights = run / "checkpoint-1" / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    (run / "checkpoint-1" / "model.safetensors.sha256").write_text(digest)
    job = job_from_dict(job_dict(run, tmp_path / "f.zarr"), base=tmp_path)
    run_job(job)
    before = open_results(job.output).act_cov.values.copy()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))  # the sidecar digest (and so the spec hash) is unchanged
    outcomes = run_job(job, force=True)
    assert [o.status for o in outcomes] == ["done", "failed"]
    assert "checkpoint-1: model.safetensors is corrupt" in str(outcomes[1].error)
    assert done_flags(job.output).all()
    np.testing.assert_array_equal(open_results(job.output).act_cov.values[1], before[1])
    record = read_sidecar(job.output, "covariance/step=1") or {}
    assert record["status"] == "done" and "corrupt" in record["forced_recompute"]["error"]


def test_a_moved_project_folder_resumes_its_store(tmp_path: Path) -> None:
    project = tmp_path / "project"
    build_local_run(project / "run", [0, 1])
    path = write_job(project / "j.toml", Path("run"), Path("out.zarr"))
    first = subprocess.run([*CLI, "run", str(path)], capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    (tmp_path / "project").rename(tmp_path / "moved")
    again = subprocess.run(
        [*CLI, "run", str(tmp_path / "moved" / "j.toml")], capture_output=True, text=True, check=False
    )
    assert again.returncode == 0, again.stderr
    assert "0 computed, 2 already done" in again.stdout


def test_a_device_change_resumes_rather_than_refusing(run_dir: Path, tmp_path: Path) -> None:
    job = job_from_dict(job_dict(run_dir, tmp_path / "d.zarr", checkpoints={"device": "cpu"}), base=tmp_path)
    run_job(job)
    auto = job_from_dict(
        job_dict(run_dir, tmp_path / "d.zarr", checkpoints={"device": "auto"}), base=tmp_path
    )
    assert {o.status for o in run_job(auto)} == {"skipped"}


def test_changed_data_content_is_a_different_spec(tmp_path: Path) -> None:
    from ckpt_analysis.digests import content_digests, spec_hash

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "1+2=3"}\n')
    job = job_from_dict(
        job_dict(tmp_path, tmp_path / "o.zarr", data={"source": "dataset", "path": str(corpus)}),
        base=tmp_path,
    )
    build_local_run(tmp_path, [0])
    before = spec_hash(job, content_digests(job))
    corpus.write_text('{"text": "1+3=4"}\n')
    assert spec_hash(job, content_digests(job)) != before


def test_a_store_removed_mid_run_is_not_recreated(run_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from ckpt_analysis.run import run_unit

    job = job_from_dict(job_dict(run_dir, tmp_path / "gone.zarr"), base=tmp_path)
    prepare_store(job, force=False)
    shutil.rmtree(job.output)
    outcome = run_unit(job.output, json.dumps(job.to_dict()), 0, torch_threads=1, force=False)
    assert outcome.status == "failed" and "does not exist" in str(outcome.error)
    assert not Path(job.output).exists()


def test_writes_refuse_a_store_removed_after_its_unit_started(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    from ckpt_analysis.errors import StoreError
    from ckpt_analysis.registry import Write
    from ckpt_analysis.staging import StagedWrites

    job = job_from_dict(job_dict(run_dir, tmp_path / "gone.zarr"), base=tmp_path)
    prepare_store(job, force=False)
    staged = StagedWrites(job.output, "covariance/step=0")
    shutil.rmtree(job.output)
    with pytest.raises(StoreError, match="was removed during the run"):
        staged.write(Write("act_count", (0,), np.zeros((4, 2))))
    with pytest.raises(StoreError, match="was removed during the run"):
        staged.commit()
    assert not Path(job.output).exists()


def test_a_planner_killed_mid_create_leaves_no_temporary_folder_behind(run_dir: Path, tmp_path: Path) -> None:
    stale = tmp_path / ".s.zarr.tmp-deadbeef"
    (stale / "act_cov").mkdir(parents=True)
    prepare_store(job_from_dict(job_dict(run_dir, tmp_path / "s.zarr"), base=tmp_path), force=False)
    assert not stale.exists() and (tmp_path / "s.zarr" / "zarr.json").is_file()


@pytest.mark.parametrize("what", ["job file", "missing", "plain folder"])
def test_status_on_something_that_is_not_a_store_is_one_line(tmp_path: Path, what: str) -> None:
    target = {"job file": tmp_path / "j.toml", "missing": tmp_path / "nope.zarr", "plain folder": tmp_path}[
        what
    ]
    if what == "job file":
        target.write_text('name = "x"\n')
    for command in ("status", "show"):
        result = subprocess.run([*CLI, command, str(target)], capture_output=True, text=True, check=False)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


def _immutable(path: Path, on: bool) -> bool:
    """``chattr ±i``: even root cannot write into an immutable folder (False where unsupported)."""
    flag = "+i" if on else "-i"
    return subprocess.run(["chattr", flag, str(path)], capture_output=True, check=False).returncode == 0


def test_a_read_only_store_or_output_folder_is_one_line_and_exit_2(run_dir: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path / "j.toml", run_dir, tmp_path / "s.zarr")
    subprocess.run([*CLI, "plan", str(job)], check=True, capture_output=True)
    (tmp_path / "out").mkdir()
    other = write_job(tmp_path / "k.toml", run_dir, tmp_path / "out" / "new.zarr")
    if not _immutable(tmp_path / "s.zarr", True):
        pytest.skip("chattr +i is not supported here (not root, or the filesystem lacks it)")
    _immutable(tmp_path / "out", True)
    try:
        for path, expected in ((job, "cannot write to the store"), (other, "cannot create the store")):
            result = subprocess.run([*CLI, "run", str(path)], capture_output=True, text=True, check=False)
            assert result.returncode == 2, result.stderr
            assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    finally:
        _immutable(tmp_path / "s.zarr", False)
        _immutable(tmp_path / "out", False)
    assert not (tmp_path / "out" / "new.zarr").exists()


@dataclass(frozen=True)
class _StreamParams:
    """``[analyses.test_stream]`` takes no options."""


@register
class _Stream(Analysis[_StreamParams]):
    """A streaming analysis for these tests: yields three blocks per checkpoint, and raises before
    the second when ``CKPT_TEST_STREAM_FAIL`` is set."""

    name = "test_stream"

    def variables(self, ctx: PlanContext) -> list[Variable]:
        return [Variable.of("stream_block", {"step": len(ctx.checkpoints), "block": 3}, unit_axes=2)]

    def compute(self, unit: Unit, ctx: UnitContext) -> Iterator[Write]:
        assert unit.checkpoint is not None
        for block in range(3):
            if block == 1 and os.environ.get("CKPT_TEST_STREAM_FAIL"):
                raise RuntimeError("the stream broke")
            yield Write("stream_block", (unit.checkpoint, block), np.array(block + 1.0))


def test_a_streaming_unit_stages_as_it_goes_and_a_failure_leaves_nothing_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = build_local_run(tmp_path / "run", [0, 1])
    raw = job_dict(run, tmp_path / "s.zarr")
    raw["analyses"] = {"test_stream": {}}
    job = job_from_dict(raw, base=tmp_path)
    monkeypatch.setenv("CKPT_TEST_STREAM_FAIL", "1")
    assert {o.error for o in run_job(job)} == {"RuntimeError: the stream broke"}
    assert not done_flags(job.output).any()
    assert np.isnan(open_results(job.output).stream_block.values).all()  # the first block never landed
    assert not list(Path(job.output).glob("stream_block/c/*/*"))  # not even as a chunk file
    monkeypatch.delenv("CKPT_TEST_STREAM_FAIL")
    assert all(o.ok for o in run_job(job))
    np.testing.assert_array_equal(open_results(job.output).stream_block.values, [[1, 2, 3], [1, 2, 3]])
    monkeypatch.setenv("CKPT_TEST_STREAM_FAIL", "1")
    assert not any(o.ok for o in run_job(job, force=True))
    assert done_flags(job.output).all()  # as for a list-returning unit, the earlier result is kept
    np.testing.assert_array_equal(open_results(job.output).stream_block.values, [[1, 2, 3], [1, 2, 3]])
    record = read_sidecar(job.output, "test_stream/step=0") or {}
    assert record["status"] == "done" and record["forced_recompute"]["status"] == "failed"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json")


def _strip_tokenizer(folder: Path) -> None:
    """Remove every tokenizer file below ``folder`` (plain model saves, custom trainers)."""
    for file in list(folder.rglob("*")):
        if file.name in TOKENIZER_FILES:
            file.unlink()


def _ids_job(run: Path, tmp_path: Path, rows: list[list[int]], **data: object) -> dict[str, Any]:
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"ids": r}) + "\n" for r in rows))
    ids = {"source": "dataset", "path": str(tmp_path / "ids.jsonl"), "ids_column": "ids"}
    raw = job_dict(run, tmp_path / "s.zarr", data={**ids, "token_text": False, "seq_len": 8, **data})
    return raw


IDS = [[(3 * i + j) % 12 + 1 for j in range(8)] for i in range(8)]
"""Eight pre-tokenized sequences of 8 ids inside the tiny model's vocabulary, no padding needed."""


def test_pre_tokenized_ids_run_without_any_tokenizer_files(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", [0, 10, 20])
    _strip_tokenizer(run)
    raw = _ids_job(run, tmp_path, IDS)
    raw["analyses"] = {
        "covariance": {},
        "hessian": {"k": 2, "trace_probes": 4, "sample_sequences": 4},
        "hessian_basis": {"k": 1, "every": 10, "sample_sequences": 4, "axis": 4},
        "token_loss": {},
        "polca": {},
    }
    job = job_from_dict(raw, base=tmp_path)
    assert all(o.ok for o in run_job(job)), [o.error for o in run_job(job) if not o.ok]
    ds = open_results(job.output)
    np.testing.assert_array_equal(ds.input_ids.values, IDS)
    assert np.isfinite(ds.hessian_eigval.values).all() and np.isfinite(ds.token_loss.values).all()


def test_a_hub_repo_without_tokenizer_files_runs_on_pre_tokenized_ids(tmp_path: Path) -> None:
    cache = build_fake_hub(tmp_path / "hub", "org/no-tokenizer", ["step0", "step1"])
    _strip_tokenizer(cache)
    raw = _ids_job(tmp_path, tmp_path, IDS)
    raw["checkpoints"] = {"source": "hub", "repo": "org/no-tokenizer", "revisions": ["step0", "step1"]}
    raw["checkpoints"]["cache_dir"] = str(cache)
    job = job_from_dict(raw, base=tmp_path)
    assert all(o.ok for o in run_job(job))
    assert np.isfinite(open_results(job.output).act_cov.values).all()


def test_unequal_ids_without_a_tokenizer_need_a_pad_id(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", [0])
    _strip_tokenizer(run)
    rows = [r[: 5 + i % 3] for i, r in enumerate(IDS)]
    with pytest.raises(DataError, match=r"5 to 7 tokens .*set data\.pad_id, or .*data\.seq_len \(now 8\)"):
        run_job(job_from_dict(_ids_job(run, tmp_path, rows), base=tmp_path))
    assert not (tmp_path / "s.zarr").exists()
    job = job_from_dict(_ids_job(run, tmp_path, rows, pad_id=0), base=tmp_path)
    assert all(o.ok for o in run_job(job))
    assert open_results(job.output).attention_mask.values.sum() == sum(len(r) for r in rows)


def test_text_data_still_refuses_a_checkpoint_without_a_tokenizer(tmp_path: Path) -> None:
    run = build_local_run(tmp_path / "run", [0])
    _strip_tokenizer(run)
    raw = _ids_job(run, tmp_path, IDS, token_text=True)
    with pytest.raises((DataError, CheckpointError), match="tokenizer"):
        run_job(job_from_dict(raw, base=tmp_path))
