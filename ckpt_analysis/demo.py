"""The built-in offline demo: train the tiny addition model, sweep covariances, summarise."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_analysis.analyses.covariance import participation_ratio
from ckpt_analysis.config import load_job
from ckpt_analysis.execute import Outcome
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results
from ckpt_analysis.train import TrainConfig, train_addition

log = logging.getLogger(__name__)

JOB_TOML = """\
# Written by `ckpt-analysis demo`; run it again with `ckpt-analysis run {job}`.
name = "demo-addition-covariance"
output = "results.zarr"

[checkpoints]
source = "local"
path = "run"

[data]
source = "addition"
num_examples = 256

[analyses.covariance]
sites = ["resid_pre", "attn_out", "mlp_out", "resid_post"]

[compute]
executor = "local"
workers = 2
"""


@dataclass(frozen=True)
class DemoResult:
    """What the demo made: paths, the model's accuracy, and per-step covariance summaries."""

    store: Path
    accuracy: float
    outcomes: list[Outcome]
    steps: np.ndarray
    total_variance: np.ndarray
    participation: np.ndarray
    """``(step, layer)`` at ``resid_post``: trace of the covariance and its participation ratio."""


def run_demo(workdir: Path, *, train: TrainConfig | None = None, force: bool = False) -> DemoResult:
    """Train (unless a run exists), write ``demo.toml``, run it, and summarise the store."""
    train = train or TrainConfig()
    run_dir = workdir / "run"
    if force or not (run_dir / f"checkpoint-{train.steps - train.steps % train.save_every}").is_dir():
        log.info("training the tiny addition model into %s", run_dir)
        accuracy = train_addition(run_dir, train)
    else:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from ckpt_analysis.tasks.addition import build_tokenizer
        from ckpt_analysis.train import answer_accuracy

        hf_logging.disable_progress_bar()
        last = max(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        accuracy = answer_accuracy(AutoModelForCausalLM.from_pretrained(last), build_tokenizer())
    job_path = workdir / "demo.toml"
    job_path.write_text(JOB_TOML.format(job=job_path))
    job = load_job(job_path)
    outcomes = run_job(job, force=force)
    ds = open_results(job.output)
    cov = ds.act_cov.sel(site="resid_post").values.astype(np.float64)
    return DemoResult(
        store=Path(job.output),
        accuracy=accuracy,
        outcomes=outcomes,
        steps=ds.step.values,
        total_variance=np.trace(cov, axis1=-2, axis2=-1),
        participation=participation_ratio(cov),
    )
