"""The built-in offline demo: covariances and POLCA on a tiny addition model, then leading-term alignment."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

import numpy as np
import xarray as xr

from ckpt_analysis.analyses.covariance import participation_ratio
from ckpt_analysis.analyses.leading_terms import onehot_training_corpus
from ckpt_analysis.config import load_job
from ckpt_analysis.execute import Outcome
from ckpt_analysis.plots import plot_alignment, plot_clusters, plot_validity
from ckpt_analysis.progress import quiet_transformers_bars
from ckpt_analysis.report import (
    AlignmentRow,
    TrajectoryScores,
    alignment_table,
    cluster_table,
    conservation,
)
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results
from ckpt_analysis.tasks import arithmetic
from ckpt_analysis.zoo import ONEHOT_DEMO_STEPS
from ckpt_analysis.zoo.onehot import GDConfig, train_onehot
from ckpt_analysis.zoo.train import TrainConfig, answer_accuracy, train_arithmetic

log = logging.getLogger(__name__)


def job_text(template: str, **values: object) -> str:
    """A demo job file from ``ckpt_analysis/zoo/templates/<template>.toml``, ``${name}`` filled in."""
    text = resources.files("ckpt_analysis.zoo").joinpath(f"templates/{template}.toml").read_text()
    return Template(text).substitute(values)


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
    explained: dict[str, dict[str, float]]
    """Per basis and second-order variant, the fraction of the loss change POLCA explains."""
    plots: list[Path]
    alignment: dict[float, list[AlignmentRow]]
    """Leading-term alignment of the one-hot model per step size η."""


def train_or_reuse(run_dir: Path, train: TrainConfig, *, force: bool = False) -> float:
    """Train the addition model into ``run_dir`` unless its last checkpoint exists; its accuracy."""
    last = run_dir / f"checkpoint-{train.steps - train.steps % train.save_every}"
    if force or not last.is_dir():
        log.info("training the tiny addition model into %s", run_dir)
        return train_arithmetic(run_dir, train)
    from transformers import AutoModelForCausalLM

    quiet_transformers_bars()
    model = AutoModelForCausalLM.from_pretrained(last)
    return answer_accuracy(model, arithmetic.build_tokenizer(), train.task)


BASIS_LINKS = 16
"""The demo's basis takes a vector about this many times over the run."""


def basis_every(train: TrainConfig) -> int:
    """The demo's basis spacing: a multiple of the checkpoint spacing, about
    :data:`BASIS_LINKS` links over the run (every checkpoint for the default 600 steps)."""
    return train.save_every * max(1, train.steps // (BASIS_LINKS * train.save_every))


def polca_job(train: TrainConfig) -> str:
    """The demo's POLCA job for a run trained with ``train``: :func:`basis_every` (31 vectors at
    the defaults) and a breakthrough lag of an eighth of the run, at most 100 steps."""
    spacing = train.save_every
    lag = spacing * max(1, min(100, train.steps // 8) // spacing)
    label = arithmetic.LABEL[train.task]
    return job_text("demo_polca", basis_every=basis_every(train), lag=lag, task=train.task, label=label)


def run_demo(workdir: Path, *, train: TrainConfig | None = None, force: bool = False) -> DemoResult:
    """Train (unless the run exists), write and run both demo jobs, and summarise their stores."""
    train = train or TrainConfig()
    accuracy = train_or_reuse(workdir / "run", train, force=force)
    coarse = train.save_every * max(1, 100 // train.save_every)
    (workdir / "covariance.toml").write_text(
        job_text("demo_covariance", job=workdir / "covariance.toml", coarse=coarse)
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
        scores=_demo_scores(polca_ds),
        explained=conservation(polca_ds),
        plots=[
            *plot_clusters(polca_ds, workdir / "plots"),
            plot_validity(polca_ds, workdir / "plots" / "polca_validity.png"),
            lt_plot,
        ],
        alignment={lr: alignment_table(ds) for lr, ds in lt_runs.items()},
    )


def _demo_scores(ds: xr.Dataset) -> list[TrajectoryScores]:
    """Every trajectory over the whole run, and POLCA on both bases from τ (docs/polca.md, "Windows")."""
    whole = str(ds.window.values[0])
    return [r for r in cluster_table(ds) if r.window == whole or r.trajectory in ("polca", "polca_random")]


def _leading_terms(workdir: Path, lr: float, force: bool, outcomes: list[Outcome]) -> xr.Dataset:
    """Train the one-hot model at step size ``lr`` (unless done) and run its alignment job."""
    job_path = workdir / f"leading_terms_lr{lr}.toml"
    job_path.write_text(job_text("demo_leading_terms", lr=lr))
    job = load_job(job_path)
    run_dir = Path(job.checkpoints.location)
    gd = GDConfig(lr=lr, steps=ONEHOT_DEMO_STEPS, save_every=5)
    if force or not (run_dir / f"checkpoint-{gd.steps}").is_dir():
        train_onehot(*onehot_training_corpus(job), run_dir, gd)
    outcomes += run_job(job, force=force)
    return open_results(job.output)
