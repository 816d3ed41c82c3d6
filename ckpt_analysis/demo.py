"""The built-in offline demo: covariances and POLCA on a tiny addition model, then leading-term alignment."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from ckpt_analysis.analyses.covariance import participation_ratio
from ckpt_analysis.config import load_job
from ckpt_analysis.execute import Outcome
from ckpt_analysis.onehot import GDConfig, train_onehot, training_corpus
from ckpt_analysis.report import (
    AlignmentRow,
    TrajectoryScores,
    alignment_table,
    cluster_table,
    plot_alignment,
    plot_clusters,
)
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results
from ckpt_analysis.train import TrainConfig, answer_accuracy, train_addition

log = logging.getLogger(__name__)

COVARIANCE_JOB = """\
# Written by `ckpt-analysis demo`; run it again with `ckpt-analysis run {job}`.
name = "demo-addition-covariance"
output = "covariance.zarr"

[checkpoints]
source = "local"
path = "run"
select = "every={coarse}"

[data]
source = "addition"
num_examples = 256

[analyses.covariance]
sites = ["resid_pre", "attn_out", "mlp_out", "resid_post"]

[compute]
workers = 2
"""

POLCA_JOB = """\
# Written by `ckpt-analysis demo`: the POLCA arithmetic experiment, scaled to 2 CPU cores.
name = "demo-addition-polca"
output = "polca.zarr"

[checkpoints]
source = "local"
path = "run"

[data]
source = "addition"
num_examples = 250          # 1000 scored answer digits
seed = 4321

[analyses.hessian_basis]
k = 1                       # one vector per basis checkpoint (paper: k = 1)
every = {basis_every}       # basis checkpoints
sample_sequences = 128
random = true               # ablation: a random orthonormal basis of the same size
axis = 50                   # LCA: unit vectors on the 50 largest |θ| at the final checkpoint

[analyses.token_loss]

[analyses.polca]
bases = ["hessian", "random", "axis"]
second_order = "none"       # best-conserving on this demo (docs/polca.md)

[analyses.clusters]
trajectories = ["polca", "polca_random", "polca_axis", "exact_loss", "loss_change", "fisher"]
label = "carry"
restrict = "place"          # the paper's carry score: > 85 % of a cluster's carry tokens
restrict_values = [1, 2]    # in the 10s or 100s place (the 1000s-place carry is trivial)
lag = {lag}

[compute]
workers = 2
batch_size = 250
"""


LEADING_TERMS_JOB = """\
# Written by `ckpt-analysis demo`: the leading-term paper's one-hot model, GD at η = {lr}.
name = "demo-leading-terms-lr{lr}"
output = "leading_terms_lr{lr}.zarr"

[checkpoints]
source = "local"
path = "onehot_lr{lr}"

[data]
source = "topics"
num_examples = 256
seq_len = 17
seed = 0

[analyses.corpus_stats]
vocab_size = 16

[analyses.lt_alignment]

[compute]
executor = "inprocess"
"""
LEADING_TERMS_RATES = (0.1, 1.0)
"""Small η keeps the weights on their leading terms; large η shows the drift."""


@dataclass(frozen=True)
class DemoResult:
    """What the demo made: stores, the model's accuracy, covariance summaries and cluster scores."""

    covariance_store: Path
    polca_store: Path
    accuracy: float
    outcomes: list[Outcome]
    steps: np.ndarray
    total_variance: np.ndarray
    participation: np.ndarray
    """``(step, layer)`` at ``resid_post``: trace of the covariance and its participation ratio."""
    scores: list[TrajectoryScores]
    explained: float
    plots: list[Path]
    alignment: dict[float, list[AlignmentRow]]
    """Leading-term alignment of the one-hot model per step size η."""


def train_or_reuse(run_dir: Path, train: TrainConfig, *, force: bool = False) -> float:
    """Train the addition model into ``run_dir`` unless its last checkpoint exists; its accuracy."""
    last = run_dir / f"checkpoint-{train.steps - train.steps % train.save_every}"
    if force or not last.is_dir():
        log.info("training the tiny addition model into %s", run_dir)
        return train_addition(run_dir, train)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ckpt_analysis.tasks.addition import build_tokenizer

    hf_logging.disable_progress_bar()
    return answer_accuracy(AutoModelForCausalLM.from_pretrained(last), build_tokenizer())


def polca_job(train: TrainConfig) -> str:
    """The demo's POLCA job for a run trained with ``train``: about 16 basis links over the run
    (31 vectors at the defaults) and a breakthrough lag of an eighth of it, at most 100 steps."""
    spacing = train.save_every
    basis_every = spacing * max(1, train.steps // (16 * spacing))
    lag = spacing * max(1, min(100, train.steps // 8) // spacing)
    return POLCA_JOB.format(basis_every=basis_every, lag=lag)


def run_demo(workdir: Path, *, train: TrainConfig | None = None, force: bool = False) -> DemoResult:
    """Train (unless the run exists), write and run both demo jobs, and summarise their stores."""
    train = train or TrainConfig()
    accuracy = train_or_reuse(workdir / "run", train, force=force)
    coarse = train.save_every * max(1, 100 // train.save_every)
    (workdir / "covariance.toml").write_text(
        COVARIANCE_JOB.format(job=workdir / "covariance.toml", coarse=coarse)
    )
    (workdir / "polca.toml").write_text(polca_job(train))
    outcomes = []
    for name in ("covariance", "polca"):
        outcomes += run_job(load_job(workdir / f"{name}.toml"), force=force)
    cov_ds = open_results(workdir / "covariance.zarr")
    cov = cov_ds.act_cov.sel(site="resid_post").values.astype(np.float64)
    polca_ds = open_results(workdir / "polca.zarr")
    lt_runs = {lr: _leading_terms(workdir, lr, force, outcomes) for lr in LEADING_TERMS_RATES}
    lt_plot = plot_alignment(
        {f"η = {lr}": ds for lr, ds in lt_runs.items()}, workdir / "plots" / "leading_terms.png"
    )
    return DemoResult(
        covariance_store=workdir / "covariance.zarr",
        polca_store=workdir / "polca.zarr",
        accuracy=accuracy,
        outcomes=outcomes,
        steps=cov_ds.step.values,
        total_variance=np.trace(cov, axis1=-2, axis2=-1),
        participation=participation_ratio(cov),
        scores=cluster_table(polca_ds),
        explained=float(polca_ds.polca_explained.sel(variant="none")),
        plots=[*plot_clusters(polca_ds, workdir / "plots"), lt_plot],
        alignment={lr: alignment_table(ds) for lr, ds in lt_runs.items()},
    )


def _leading_terms(workdir: Path, lr: float, force: bool, outcomes: list[Outcome]) -> xr.Dataset:
    """Train the one-hot model at step size ``lr`` (unless done) and run its alignment job."""
    job_path = workdir / f"leading_terms_lr{lr}.toml"
    job_path.write_text(LEADING_TERMS_JOB.format(lr=lr))
    job = load_job(job_path)
    run_dir = Path(str(job.checkpoints.path))
    gd = GDConfig(lr=lr, steps=100, save_every=5)
    if force or not (run_dir / f"checkpoint-{gd.steps}").is_dir():
        train_onehot(*training_corpus(job), run_dir, gd)
    outcomes += run_job(job, force=force)
    return open_results(job.output)
