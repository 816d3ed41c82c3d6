"""``polca_scale_up.py --paper`` is the POLCA paper's protocol, setting by setting (docs/polca.md)."""

import importlib
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from ckpt_analysis.config import job_from_dict
from ckpt_analysis.tasks.arithmetic import ANSWER_POSITIONS, VOCAB
from ckpt_analysis.zoo.train import tiny_gpt2

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
PAPER_PARAMETERS = 9_475_594
"""The paper's Appendix B, "Number of Parameters"."""


@pytest.fixture(scope="module")
def script() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("polca_scale_up")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_training_matches_the_papers_model_and_optimiser(script: ModuleType) -> None:
    train = script.PAPER
    assert (train.architecture, train.hidden_size, train.num_layers, train.num_heads) == ("gpt2", 512, 3, 4)
    assert (train.lr, train.weight_decay, train.betas, train.warmup_steps) == (1e-5, 0.1, (0.9, 0.95), 100)
    assert (train.batch_size, train.steps, train.save_every, train.task) == (64, 10_000, 20, "addition")
    model = tiny_gpt2(len(VOCAB), hidden_size=512, num_layers=3, num_heads=4)
    assert model.config.n_inner == 2048 and not model.config.tie_word_embeddings  # MLP 2048, own unembedding
    assert model.transformer.wpe.weight.requires_grad  # learned absolute positions
    parameters = sum(p.numel() for p in model.parameters())
    assert abs(parameters - PAPER_PARAMETERS) / PAPER_PARAMETERS < 0.01


def test_analysis_matches_the_papers_protocol(script: ModuleType, tmp_path: Path) -> None:
    job = job_from_dict(tomllib.loads(script.paper_job(script.PAPER)), base=tmp_path)
    assert job.data.source == "addition" and job.data.num_examples * len(ANSWER_POSITIONS) == 5000
    assert job.sample is not None and job.sample.num_examples == 1250 and job.sample.seed != job.data.seed
    basis = job.analyses["hessian_basis"]
    assert basis["k"] == 1 and basis["steps"] == list(range(200, 10_001, 200)) and len(basis["steps"]) == 50
    assert basis["sample_sequences"] == 1250 and basis["shuffled"] and basis["random"]
    polca = job.analyses["polca"]
    assert polca["second_order"] == "paper" and set(polca["bases"]) == {"hessian", "random", "shuffled"}
    clusters = job.analyses["clusters"]
    assert round(clusters["min_cluster_fraction"] * 5000) == 150 and clusters["lag"] == 100
    assert (clusters["label"], clusters["restrict"], clusters["restrict_values"]) == (
        "carry",
        "place",
        [1, 2],
    )
    assert clusters["restrict_fraction"] == 0.85
    assert {"polca", "polca_random", "polca_shuffled", "exact_loss", "fisher"} <= set(
        clusters["trajectories"]
    )


def test_a_prefix_takes_a_basis_vector_every_200_steps_it_trained(script: ModuleType, tmp_path: Path) -> None:
    from dataclasses import replace

    job = tomllib.loads(script.paper_job(replace(script.PAPER, steps=600)))
    assert job["analyses"]["hessian_basis"]["steps"] == [200, 400, 600]


def test_the_cpu_twin_scales_only_model_width_run_length_and_learning_rate(script: ModuleType) -> None:
    from dataclasses import asdict

    twin, paper = asdict(script.PAPER_CPU), asdict(script.PAPER)
    changed = {key for key in paper if twin[key] != paper[key]}
    assert changed == {"hidden_size", "steps", "save_every", "lr"}
    job = tomllib.loads(script.paper_job(script.PAPER_CPU))
    every = 10 * twin["save_every"]
    assert job["analyses"]["hessian_basis"]["steps"] == list(range(every, twin["steps"] + 1, every))
    assert job["analyses"]["clusters"]["lag"] == 5 * twin["save_every"]


def test_gpu_check_runs_the_budgeted_protocol_end_to_end_on_the_cpu_at_tiny_size(tmp_path: Path) -> None:
    """The step gpu_check.sh runs on a GPU, here on its tiny twin, so it works when it meets one."""
    import os
    import subprocess

    env = {
        **os.environ,
        "ONLY": "paper_budget",
        "PAPER_SETTING": "paper-tiny",
        "PAPER_BUDGET": "1",  # nothing fits: the largest reduction runs and the report says so
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    root = BENCHMARKS.parent
    subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh")], cwd=root, env=env, check=True, timeout=600)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "paper_budget: rc=0" in summary, (tmp_path / "out" / "paper_budget.log").read_text()[-3000:]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "does not fit even at the largest reduction" in report and "| 1 in 10 checkpoints |" in report
    assert "carry homogeneity" in report and "τ =" in report
    assert (tmp_path / "out" / "groups.png").is_file() and (tmp_path / "out" / "validity.png").is_file()
