"""SLURM submission: stages, rendered sbatch scripts (golden files), and a real single-node SLURM run."""

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from builders import (
    assert_same_results,
    build_fake_hub,
    build_local_run,
    job_dict,
    needs_slurm,
    stop_mid_unit,
    write_job,
)

from ckpt_analysis.config import SlurmSpec, job_from_dict, load_job
from ckpt_analysis.errors import SubmitError
from ckpt_analysis.plan import prepare_store, unit_stages
from ckpt_analysis.registry import Unit
from ckpt_analysis.run import run_job
from ckpt_analysis.store import done_flags, read_array, read_sidecar, unit_states
from ckpt_analysis.submit import Stage, render_stage, resubmit, submit

GOLDEN = Path(__file__).parent / "golden"
CLI = [sys.executable, "-m", "ckpt_analysis"]
SMALL: dict[str, Any] = {"hidden_size": 8, "num_layers": 1, "num_heads": 2}
ANALYSES = {
    "covariance": {"sites": ["resid_post"]},
    "hessian_basis": {"k": 1, "every": 10, "sample_sequences": 8, "random": False},
    "token_loss": {},
    "polca": {},
}


def _staged_job(tmp_path: Path, name: str, **slurm: object) -> Path:
    """A three-checkpoint job whose units span five stages (basis chain → POLCA → finalize)."""
    run = tmp_path / "run"
    if not run.exists():
        build_local_run(run, [0, 10, 20], seed=4, **SMALL)
    overrides = {"analyses": ANALYSES, "data": {"num_examples": 16}, "slurm": {"shards": 2, **slurm}}
    return write_job(tmp_path / f"{name}.toml", run, tmp_path / f"{name}.zarr", name=name, **overrides)


def test_stages_follow_the_longest_dependency_chain() -> None:
    units = [
        Unit("a", "0", 0),
        Unit("b", "0", 0, ("a/0",)),
        Unit("a", "1", 1),
        Unit("c", "x", None, ("b/0", "a/1")),
    ]
    assert unit_stages(units) == [0, 1, 0, 2]


def test_rendered_script_matches_the_golden_file() -> None:
    spec = SlurmSpec(
        partition="gpu",
        account="interp",
        time="02:00:00",
        mem="32G",
        gres="gpu:1",
        max_parallel=4,
        setup=["module load cuda", "source /opt/venv/bin/activate"],
        sbatch_args=["--qos=short"],
    )
    stage = Stage(2, 154, 154, ("polca",), 16)
    text = render_stage(
        stage,
        name="pythia-polca",
        last_stage=3,
        spec=spec,
        cpus=4,
        job=Path("/home/me/jobs/polca.toml"),
        store=Path("/scratch/me/polca.zarr"),
        python="/opt/venv/bin/python",
    )
    assert text == (GOLDEN / "stage2.sbatch").read_text()


def test_default_script_asks_for_no_partition_account_or_gpu() -> None:
    text = render_stage(
        Stage(0, 3, 3, ("covariance", "token_loss"), 2),
        name="j",
        last_stage=0,
        spec=SlurmSpec(),
        cpus=1,
        job=Path("/j.toml"),
        store=Path("/s.zarr"),
        python="python",
    )
    assert "--array=0-1\n" in text and "--cpus-per-task=1\n" in text
    assert not any(key in text for key in ("--partition", "--account", "--gres"))


def test_dry_run_writes_one_script_per_pending_stage(tmp_path: Path) -> None:
    path = _staged_job(tmp_path, "dry")
    stages = submit(load_job(path), path, dry_run=True)
    assert [s.number for s in stages] == [0, 1, 2, 3, 4]
    assert [s.analyses for s in stages][:2] == [
        ("covariance", "hessian_basis", "token_loss"),
        ("hessian_basis",),
    ]
    assert all(s.script is not None and s.script.is_file() and s.job_id is None for s in stages)
    run_job(load_job(path), stage=0, shard=0, num_shards=1)
    again = submit(load_job(path), path, dry_run=True)
    assert [s.number for s in again] == [1, 2, 3, 4]


def test_a_shard_whose_inputs_are_not_done_fails_with_that_reason_and_writes_no_data(tmp_path: Path) -> None:
    path = _staged_job(tmp_path, "early")
    submit(load_job(path), path, dry_run=True)
    outcomes = run_job(load_job(path), stage=3, shard=0, num_shards=1)
    assert [o.status for o in outcomes] == ["failed"] * len(outcomes)
    assert all("dependency not done: hessian_basis/" in str(o.error) for o in outcomes)
    assert not done_flags(tmp_path / "early.zarr").any()
    states = {s.unit_id: s for s in unit_states(tmp_path / "early.zarr")}
    assert states[outcomes[0].name].state == "failed"
    assert states[outcomes[0].name].detail.startswith("dependency not done: hessian_basis/")
    assert np.isnan(read_array(tmp_path / "early.zarr", "proj_grad")).all()  # no data written


def test_submit_without_sbatch_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _staged_job(tmp_path, "nosbatch")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SubmitError, match="sbatch is not on PATH; use --dry-run"):
        submit(load_job(path), path)


def test_slurm_options_are_validated(tmp_path: Path) -> None:
    raw = job_dict(tmp_path, tmp_path / "o.zarr", slurm={"shards": 0})
    with pytest.raises(Exception, match=r"slurm\.shards = 0 must be at least 1"):
        job_from_dict(raw, base=tmp_path)


@needs_slurm()
def test_a_real_slurm_array_run_equals_the_local_run(tmp_path: Path) -> None:
    path = _staged_job(tmp_path, "cluster")
    reference = job_from_dict(
        job_dict(tmp_path / "run", tmp_path / "ref.zarr", analyses=ANALYSES, data={"num_examples": 16}),
        base=tmp_path,
    )
    run_job(reference)
    done = subprocess.run([*CLI, "submit", str(path), "--wait"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    store = tmp_path / "cluster.zarr"
    assert done_flags(store).all()
    assert_same_results(store, reference.output)
    records = [read_sidecar(store, u) for u in ("covariance/step=0", "polca/finalize")]
    assert all(r is not None and r.get("SLURM_ARRAY_JOB_ID") for r in records)
    logs = list((store / "slurm" / "logs").iterdir())
    assert len(logs) == 2 + 1 + 1 + 2 + 1  # array tasks of stages 0 … 4 (shards = 2)


@needs_slurm()
def test_sbatch_refusing_a_stage_is_one_clear_error(tmp_path: Path) -> None:
    path = _staged_job(tmp_path, "badpart", partition="no-such-partition")
    with pytest.raises(
        SubmitError, match=r"sbatch refused .*stage0\.sbatch: .*(?i:partition).*already submitted: none"
    ):
        submit(load_job(path), path)


_FUZZ = [
    "--comment=$(touch /tmp/pwned)",
    "--comment=`id`",
    "--comment='quoted'",
    '--comment="dq"',
    "--comment=a;b",
]


def _sbatch_block(text: str) -> list[str]:
    """The ``#SBATCH`` lines sbatch reads: those before the first command line."""
    block = []
    for line in text.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            block.append(line)
        elif line and not line.startswith("#"):
            break
    return block


@pytest.mark.parametrize("arg", _FUZZ)
def test_rendered_scripts_keep_every_sbatch_line_and_parse_as_bash(tmp_path: Path, arg: str) -> None:
    spec = SlurmSpec(partition="gpu", gres="gpu:1", sbatch_args=[arg], setup=["echo ready"])
    text = render_stage(
        Stage(1, 4, 4, ("polca",), 2),
        name="fuzz",
        last_stage=2,
        spec=spec,
        cpus=1,
        job=tmp_path / "we ird$(x)" / "job.toml",
        store=tmp_path / "st`o`re.zarr",
        python=sys.executable,
    )
    script = tmp_path / "stage.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    block = _sbatch_block(text)
    for option in ("--array=0-1", "--time=", "--mem=", "--partition=gpu", "--gres=gpu:1", arg):
        assert any(option in line for line in block), option
    words = shlex.split(text[text.index("exec ") :].replace("\\\n", " "))
    assert words[words.index("run") + 1] == str(tmp_path / "we ird$(x)" / "job.toml")
    assert words[words.index("--output") + 1] == str(tmp_path / "st`o`re.zarr")


def test_a_newline_in_the_job_name_never_reaches_a_script(tmp_path: Path) -> None:
    path = _staged_job(tmp_path, "ok")
    path.write_text(path.read_text().replace('name = "ok"', 'name = "sweep\\ntouch /tmp/X\\n"'))
    result = subprocess.run([*CLI, "submit", str(path), "--dry-run"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "name = 'sweep\\ntouch /tmp/X\\n' holds a control character" in result.stderr
    assert not (tmp_path / "ok.zarr").exists()


def test_resubmit_dry_run_lists_what_is_not_done_and_only_its_stages(tmp_path: Path) -> None:
    path = _staged_job(tmp_path, "again")
    prepare_store(load_job(path), force=False)
    run_job(load_job(path), stage=0, shard=0, num_shards=1)
    run_job(load_job(path), stage=3, shard=0, num_shards=1)  # fails: its inputs are not done
    pending, stages, _ = resubmit(tmp_path / "again.zarr", dry_run=True)
    assert {s.state for s in pending} == {"failed", "missing"}
    assert [s.number for s in stages] == [1, 2, 3, 4]
    assert all(s.tasks == min(2, s.pending) for s in stages)
    written = load_job(tmp_path / "again.zarr" / "slurm" / "job.toml")
    assert written == load_job(path, output=str((tmp_path / "again.zarr").resolve()))


def _hub_job(tmp_path: Path, name: str) -> Path:
    cache = build_fake_hub(tmp_path / "hub", "org/neox", ["step0", "step1", "step2"])
    checkpoints = {"source": "hub", "repo": "org/neox", "revisions": ["step0", "step1", "step2"]}
    overrides = {
        "checkpoints": {**checkpoints, "cache_dir": str(cache)},
        "analyses": {"covariance": {"sites": ["resid_post"]}, "token_loss": {}},
        "data": {"num_examples": 16},
        "slurm": {"shards": 4},
    }
    return write_job(tmp_path / f"{name}.toml", tmp_path, tmp_path / f"{name}.zarr", name=name, **overrides)


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600, env=env)


@needs_slurm()
def test_resubmit_after_repairing_a_corrupted_checkpoint_recomputes_only_its_units(tmp_path: Path) -> None:
    path = _hub_job(tmp_path, "hub")
    store = tmp_path / "hub.zarr"
    repo = tmp_path / "hub" / "models--org--neox"
    commit = (repo / "refs" / "step1").read_text().strip()
    weights = (repo / "snapshots" / commit / "model.safetensors").resolve()  # the blob
    good = weights.read_bytes()
    weights.write_bytes(good[:-64] + bytes(64))
    first = _cli("submit", path, "--wait")
    assert first.returncode == 1 and "2 failed" in first.stdout, first.stdout + first.stderr
    failed = [s for s in unit_states(store) if s.state == "failed"]
    assert failed and all("is corrupt" in s.detail for s in failed), failed
    assert sum(done_flags(store)) == len(done_flags(store)) - len(failed)
    kept = {s.unit_id: read_sidecar(store, s.unit_id) for s in unit_states(store) if s.state == "done"}
    weights.write_bytes(good)  # the repair
    again = _cli("resubmit", store, "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    assert all(s.unit_id in again.stdout for s in failed)
    assert done_flags(store).all()
    for unit, record in kept.items():  # done units were not recomputed
        assert read_sidecar(store, unit) == record, unit
    reference = load_job(path, output=str(tmp_path / "ref.zarr"))
    run_job(reference)
    assert_same_results(store, reference.output)


@needs_slurm()
def test_scancel_mid_run_then_resubmit_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    path = _staged_job(tmp_path, "cancelled")
    store = tmp_path / "cancelled.zarr"
    started = _cli("submit", path)
    assert started.returncode == 0, started.stdout + started.stderr
    caught = stop_mid_unit(store)  # frozen mid-unit, so the cancel lands on a unit in flight
    names = [f"cancelled-stage{i}" for i in range(5)]
    for name in reversed(names):  # later stages first: cancelling one releases its dependants
        subprocess.run(["scancel", "-n", name], check=True)
    for _ in range(300):
        queue = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True, check=False)
        if not set(queue.stdout.split()) & set(names):
            break
        time.sleep(0.2)
    assert not done_flags(store).all()  # interrupted part-way
    states = {s.unit_id: s.state for s in unit_states(store)}
    assert "running" not in states.values() and {states[u] for u in caught} == {"interrupted"}
    # A task of the array may start its unit after the freeze and before the cancel: it is cut too.
    interrupted = sum(state == "interrupted" for state in states.values())
    shown = _cli("status", store)
    assert " 0 running" in shown.stdout and f"{interrupted} interrupted" in shown.stdout, shown.stdout
    again = _cli("resubmit", store, "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    assert done_flags(store).all()
    reference = job_from_dict(
        job_dict(tmp_path / "run", tmp_path / "ref.zarr", analyses=ANALYSES, data={"num_examples": 16}),
        base=tmp_path,
    )
    run_job(reference)
    assert_same_results(store, reference.output)
