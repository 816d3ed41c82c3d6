"""The command line: every docs/jobs.md bad input gets one clear error and leaves no store; help; demo."""

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from builders import CLI, build_hub_dataset, build_local_run, cli, save_checkpoint, tiny_model, write_job

from ckpt_analysis.config import to_toml
from ckpt_analysis.store import open_results


def _nan_run(root: Path) -> Path:
    model = tiny_model()
    with torch.no_grad():
        model.gpt_neox.embed_in.weight[3, 3] = float("nan")
    save_checkpoint(model, root / "checkpoint-0")
    return root


def _mismatch_run(root: Path) -> Path:
    save_checkpoint(tiny_model(), root / "checkpoint-0")
    save_checkpoint(tiny_model(hidden_size=16), root / "checkpoint-1")
    return root


def _corrupt_run(root: Path) -> Path:
    build_local_run(root, [0, 1])
    (root / "checkpoint-1" / "model.safetensors").write_bytes(b"\x00garbage")
    return root


def _data_file(tmp: Path, text: str) -> str:
    (tmp / "d.jsonl").write_text(text)
    return str(tmp / "d.jsonl")


BAD_INPUTS: dict[str, tuple[Callable[[Path, Path], dict[str, Any]], str]] = {
    "missing revision": (
        lambda t, run: {
            "checkpoints": {"source": "hub", "repo": "org/none", "revisions": ["step7"], "cache_dir": str(t)}
        },
        "revision 'step7' of org/none is not in the cache",
    ),
    "unknown revision": (
        lambda t, run: {"checkpoints": {"select": ["checkpoint-99"]}},
        "checkpoint 'checkpoint-99' is not among the available",
    ),
    "corrupt weights": (
        lambda t, run: {"checkpoints": {"path": str(_corrupt_run(t / "c"))}},
        "checkpoint checkpoint-1: weights file model.safetensors is corrupt",
    ),
    "architecture mismatch": (
        lambda t, run: {"checkpoints": {"path": str(_mismatch_run(t / "m"))}},
        "checkpoint checkpoint-1 has hidden_size = 16, where checkpoint-0",
    ),
    "empty data": (lambda t, run: {"data": {"source": "dataset", "path": _data_file(t, "")}}, "is empty"),
    "too-short data": (
        lambda t, run: {"data": {"source": "dataset", "path": _data_file(t, '{"text": "1"}\n')}},
        "no scored tokens",
    ),
    "beyond context": (
        lambda t, run: {
            "data": {
                "source": "dataset",
                "seq_len": 40,
                "path": _data_file(t, '{"text": "' + "1+" * 30 + '"}\n'),
            }
        },
        "sequences of 40 tokens exceed the model context of 32 positions; set data.seq_len",
    ),
    "another source's key": (
        lambda t, run: {"checkpoints": {"repo": "org/none"}},
        "checkpoints.repo belongs to source = 'hub', not 'local'; source = 'local' takes:",
    ),
    "unknown job key": (
        lambda t, run: {"compute": {"gpus": 1}},
        "unknown key(s) 'gpus' in [compute]; valid keys: executor, workers",
    ),
    "unknown analysis": (
        lambda t, run: {"analyses": {"covariance": {}, "magic": {}}},
        "unknown analysis 'magic'; valid analyses: clusters, corpus_stats, covariance",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_clear_error_and_no_store(case: str, run_dir: Path, tmp_path: Path) -> None:
    overrides, message = BAD_INPUTS[case]
    job = write_job(tmp_path / "job.toml", run_dir, tmp_path / "out.zarr", **overrides(tmp_path, run_dir))
    result = cli("run", job)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.zarr").exists()


def test_nan_weights_fail_their_unit_and_write_nothing_for_it(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.toml", _nan_run(tmp_path / "run"), tmp_path / "out.zarr")
    result = cli("run", job)
    assert result.returncode == 1
    assert "parameter 'gpt_neox.embed_in.weight' has NaN/inf values" in result.stdout
    counts = "0 done, 0 damaged, 1 failed, 0 running, 0 interrupted, 0 missing"
    assert cli("status", tmp_path / "out.zarr").stdout.endswith(counts)
    assert np.isnan(open_results(tmp_path / "out.zarr").act_cov.values).all()


def test_output_of_another_job_is_refused(run_dir: Path, tmp_path: Path) -> None:
    first = write_job(tmp_path / "a.toml", run_dir, tmp_path / "out.zarr", checkpoints={"select": [0]})
    assert cli("run", first).returncode == 0
    second = write_job(tmp_path / "b.toml", run_dir, tmp_path / "out.zarr", checkpoints={"select": [10]})
    result = cli("run", second)
    assert result.returncode == 2 and "holds results of a different job spec" in result.stderr
    assert cli("run", second, "--force").returncode == 0


def test_help_teaches_every_command() -> None:
    result = cli("--help")
    for command in (
        "run",
        "plan",
        "status",
        "show",
        "clusters",
        "alignment",
        "train-onehot",
        "prefetch",
        "demo",
    ):
        assert command in result.stdout
    assert "--shard" in cli("run", "--help").stdout


def test_show_describes_a_store(run_dir: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.toml", run_dir, tmp_path / "out.zarr", checkpoints={"select": "0:20"})
    assert cli("run", job).returncode == 0
    result = cli("show", tmp_path / "out.zarr")
    assert "act_cov" in result.stdout and "step=3" in result.stdout and "3 done" in result.stdout


def test_prefetch_offline_reports_missing_revisions(hub_cache: Path, tmp_path: Path) -> None:
    job = {
        "name": "p",
        "output": str(tmp_path / "o.zarr"),
        "analyses": {"covariance": {}},
        "checkpoints": {
            "source": "hub",
            "repo": "tiny-org/tiny-neox",
            "revisions": ["step0", "step9"],
            "cache_dir": str(hub_cache),
        },
        "data": {"source": "addition"},
    }
    (tmp_path / "job.toml").write_text(to_toml(job))
    result = cli("prefetch", tmp_path / "job.toml")
    assert result.returncode == 1 and "1 revisions cached, 1 missing (offline)" in result.stdout
    assert "missing: step9" in result.stdout


def test_prefetch_and_run_read_a_hub_dataset_by_name_from_its_cache(run_dir: Path, tmp_path: Path) -> None:
    cache = build_hub_dataset(
        tmp_path / "datasets", "acme/sums", {"default": ["12+34=46", "1+1=2", "5+5=10"]}
    )
    data = {"source": "dataset", "path": "acme/sums", "cache_dir": "datasets", "seq_len": 12}
    job = write_job(
        tmp_path / "job.toml", run_dir, tmp_path / "o.zarr", checkpoints={"select": [0]}, data=data
    )
    (tmp_path / "absent.toml").write_text(job.read_text().replace("acme/sums", "acme/absent"))

    fetched = cli("prefetch", job)
    assert fetched.returncode == 0 and f"dataset acme/sums cached in {cache}" in fetched.stdout, (
        fetched.stdout
    )
    absent = cli("prefetch", tmp_path / "absent.toml")
    assert absent.returncode == 1 and "missing: acme/absent" in absent.stdout
    ran = cli("run", job)
    assert ran.returncode == 0, ran.stderr
    assert open_results(tmp_path / "o.zarr").sizes["token"] == 7 + 4 + 5  # every target after the first


def test_demo_trains_sweeps_and_summarises(tmp_path: Path) -> None:
    result = cli("demo", "--workdir", tmp_path, "--steps", "40", "--save-every", "10")
    assert result.returncode == 0, result.stderr
    for text in (
        "participation ratio",
        "clusters vs the carry label",
        "exact_loss",
        "fisher",
        "final answer-digit accuracy",
        "each second-order variant explains",
        "simpson",
        "one-hot attention model",
        "W_qk_T",
    ):
        assert text in result.stdout
    runs = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert runs == [*(f"checkpoint-{s}" for s in (0, 10, 20, 30, 40)), "training.json"]
    for store in ("covariance.zarr", "polca.zarr", "leading_terms_lr0.1.zarr", "leading_terms_lr1.0.zarr"):
        status = cli("status", tmp_path / store).stdout
        assert status.endswith("0 damaged, 0 failed, 0 running, 0 interrupted, 0 missing"), status
    assert all(p.suffix == ".png" for p in (tmp_path / "plots").iterdir())
    shown = cli("clusters", tmp_path / "polca.zarr", "--trajectory", "exact_loss", "--nearest", "2")
    assert shown.returncode == 0 and "vector 0 cluster 0" in shown.stdout and "⟨" in shown.stdout
    missing = cli("clusters", tmp_path / "covariance.zarr")
    assert missing.returncode == 2 and "has no 'polca' clusters" in missing.stderr


def _shrunken_example(name: str, replacements: dict[str, str], path: Path) -> Path:
    """An example job from jobs/ with each ``old → new`` replaced (every ``old`` must be there)."""
    example = (Path(__file__).parent.parent / "jobs" / name).read_text()
    for old, new in replacements.items():
        assert old in example, old
        example = example.replace(old, new)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(example)
    return path


def test_the_small_step_subtraction_job_trains_runs_and_scores_borrows(tmp_path: Path) -> None:
    small = {
        "../small_steps/": "small_steps/",
        "steps = [500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 4500, 5000, 5500, 6000]": "steps = [10, 20]",
        "axis = 50": "axis = 4",
        "num_examples = 250": "num_examples = 24",
        "lag = 100": "lag = 10",
    }
    job = _shrunken_example("polca_small_steps_subtraction.toml", small, tmp_path / "sub.toml")
    trained = cli("train-arithmetic", job, "--steps", "30", "--save-every", "10", "--paper-optimiser")
    assert trained.returncode == 0, trained.stderr
    assert "answer-digit accuracy" in trained.stdout
    run = tmp_path / "small_steps" / "subtraction_run"
    assert sorted(p.name for p in run.iterdir()) == [
        *(f"checkpoint-{s}" for s in (0, 10, 20, 30)),
        "training.json",
    ]
    assert cli("run", job).returncode == 0
    ds = open_results(tmp_path / "small_steps" / "subtraction.zarr")
    assert set(np.unique(ds.label_borrow.values)) == {0, 1}
    assert "label_carry" not in ds and ds.cluster_label.sizes["trajectory"] == 6
    shown = cli("validity", tmp_path / "small_steps" / "subtraction.zarr")
    assert shown.returncode == 0 and "hessian" in shown.stdout and "axis" in shown.stdout


def test_train_arithmetic_refuses_a_job_without_an_arithmetic_task(tmp_path: Path) -> None:
    job = {
        "output": str(tmp_path / "o.zarr"),
        "checkpoints": {"source": "local", "path": str(tmp_path / "run")},
        "data": {"source": "topics"},
        "analyses": {"covariance": {}},
    }
    (tmp_path / "job.toml").write_text(to_toml(job))
    result = cli("train-arithmetic", tmp_path / "job.toml", "--steps", "2")
    assert result.returncode == 2 and "train-arithmetic trains 'addition' or 'subtraction'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_toy_leading_terms_job_trains_runs_and_reads_back(tmp_path: Path) -> None:
    example = (Path(__file__).parent.parent / "jobs" / "leading_terms_toy.toml").read_text()
    job = tmp_path / "toy.toml"
    job.write_text(example.replace("../runs/", "runs/"))
    trained = cli("train-onehot", job, "--steps", "4", "--save-every", "2", "--layers", "2")
    assert trained.returncode == 0, trained.stderr
    assert sorted(p.name for p in (tmp_path / "runs" / "onehot_toy").iterdir()) == [
        f"checkpoint-{s}" for s in (0, 2, 4)
    ]
    assert cli("run", job).returncode == 0
    shown = cli("alignment", tmp_path / "runs" / "leading_terms_toy.zarr", "--plot", tmp_path / "a.png")
    assert shown.returncode == 0 and "P_delta" in shown.stdout and (tmp_path / "a.png").is_file()
    assert shown.stdout.count("WO_bigram") == 2  # one row per layer


def test_train_onehot_needs_a_topics_job(run_dir: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.toml", run_dir, tmp_path / "out.zarr")
    result = cli("train-onehot", job)
    assert result.returncode == 2 and "data.source = 'topics'" in result.stderr


def test_trace_parity_example_is_watched_while_it_trains_and_draws_every_view(tmp_path: Path) -> None:
    small = {
        "num_examples = 256": "num_examples = 24",
        "seq_len = 32": "seq_len = 16",
        "sample_tokens = 3000": "sample_tokens = 200",
        "sample_tokens = 2000": "sample_tokens = 100",
        "sample_sequences = 32": "sample_sequences = 8",
        "trace_probes = 20": "trace_probes = 4",
    }
    job = _shrunken_example("trace_parity.toml", small, tmp_path / "jobs" / "trace.toml")
    args = ["--steps", "8", "--save-every", "4", "--vocab-size", "60", "--train-sequences", "64"]
    trainer = subprocess.Popen(
        [*CLI, "train-grammar", str(job), *args, "--hidden-size", "32", "--batch-size", "16"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watched = cli("watch", job, "--until-step", "8", "--interval", "0.2", "--settle", "0.5")
    assert trainer.wait(timeout=300) == 0, trainer.stderr.read() if trainer.stderr else ""
    assert watched.returncode == 0, watched.stderr
    run = tmp_path / "trace_parity" / "run"
    assert sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*")) == [0, 1, 2, 4, 8]
    assert (run / "training.json").is_file()
    resumed = cli("run", job)  # training over: the same job finds the watched store complete
    assert resumed.returncode == 0 and "0 computed" in resumed.stdout, resumed.stdout
    store = tmp_path / "trace_parity" / "trace_parity.zarr"
    ds = open_results(store)
    assert ds.probe_label.values.tolist() == ["pos", "role"] and np.isfinite(ds.probe_accuracy).all()
    drawn = cli("plot", store, "--out", tmp_path / "figs")
    assert drawn.returncode == 0, drawn.stderr
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    views = ["hessian", "geometry", "diagnostics_pos", "diagnostics_role", "probes_pos", "probes_role"]
    assert {f"{v}.png" for v in views} <= names


def test_train_grammar_refuses_a_job_without_the_grammar(tmp_path: Path) -> None:
    job = {
        "output": str(tmp_path / "o.zarr"),
        "checkpoints": {"source": "local", "path": str(tmp_path / "run")},
        "data": {"source": "addition"},
        "analyses": {"covariance": {}},
    }
    (tmp_path / "job.toml").write_text(to_toml(job))
    result = cli("train-grammar", tmp_path / "job.toml", "--steps", "2")
    assert result.returncode == 2 and "train-grammar trains 'grammar'" in result.stderr
    assert not (tmp_path / "run").exists()
