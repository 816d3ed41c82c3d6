"""The toy-model commands, a sub-app that ``ckpt_analysis.cli`` mounts: ``train-onehot``,
``train-arithmetic``, ``train-grammar`` (each trains into a job's local ``checkpoints.path``) and
``demo``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ckpt_analysis.cli_support import ForceOpt, JobArg, out, reports_errors
from ckpt_analysis.config import JobSpec
from ckpt_analysis.errors import CkptAnalysisError
from ckpt_analysis.zoo import ONEHOT_DEMO_STEPS

app = typer.Typer()


@app.command("train-onehot")
@reports_errors
def train_onehot(
    job: JobArg,
    lr: Annotated[float, typer.Option(help="Step size η of full-batch gradient descent.")] = 0.1,
    steps: Annotated[int, typer.Option(help="Gradient steps from zero initialisation.")] = ONEHOT_DEMO_STEPS,
    save_every: Annotated[int, typer.Option(help="Checkpoint interval (steps).")] = 5,
    layers: Annotated[int, typer.Option(help="Attention layers.")] = 1,
) -> None:
    """Train the leading-term paper's attention-only one-hot model (its Def. 3.1) on a job's
    topics corpus, writing checkpoint-<step> folders into the job's checkpoints.path.

    The vocabulary is the job's analyses.corpus_stats.vocab_size. Small η keeps the weights
    on their leading terms (cosines ≥ 0.99); larger η shows the drift. Then `ckpt-analysis run`."""
    from ckpt_analysis.analyses.leading_terms import onehot_training_corpus
    from ckpt_analysis.config import load_job
    from ckpt_analysis.zoo.onehot import GDConfig
    from ckpt_analysis.zoo.onehot import train_onehot as train

    spec = load_job(job)
    ids, vocab = onehot_training_corpus(spec)
    config = GDConfig(lr=lr, steps=steps, save_every=save_every, num_layers=layers)
    train(ids, vocab, Path(spec.checkpoints.location), config)
    out.print(f"checkpoints in {spec.checkpoints.location}; next: ckpt-analysis run {job}", highlight=False)


def _run_folder(spec: JobSpec, job: Path) -> Path:
    """Where a trainer writes a job's checkpoints: its local ``checkpoints.path``."""
    if spec.checkpoints.source != "local":
        raise CkptAnalysisError(f"{job}: checkpoints.source must be 'local' to train into checkpoints.path")
    return Path(spec.checkpoints.location)


@app.command("train-arithmetic")
@reports_errors
def train_arithmetic(
    job: JobArg,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 600,
    save_every: Annotated[int, typer.Option(help="Checkpoint interval (steps).")] = 20,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (the POLCA paper: 1e-5).")] = 3e-3,
    batch_size: Annotated[int, typer.Option(help="Fresh problems per step (the paper: 64).")] = 128,
    paper_optimiser: Annotated[
        bool,
        typer.Option(help="The POLCA paper's AdamW: betas (0.9, 0.95), weight decay 0.1, 100 warm-up steps."),
    ] = False,
    hidden_size: Annotated[int, typer.Option(help="Model width (the paper: 512).")] = 64,
    layers: Annotated[int, typer.Option(help="Transformer layers (the paper: 3).")] = 2,
    heads: Annotated[int, typer.Option(help="Attention heads (the paper: 8).")] = 4,
    seed: Annotated[int, typer.Option(help="Initialisation and training-problem seed.")] = 0,
) -> None:
    """Train a small GPTNeoX on a job's arithmetic task (data.source = "addition" or
    "subtraction"), writing checkpoint-<step> folders into the job's checkpoints.path.

    Every step draws fresh problems; the answer digits are the loss. The defaults are the demo's
    run; jobs/polca_small_steps.toml gives the small-step settings. Then `ckpt-analysis run`."""
    from ckpt_analysis.config import load_job
    from ckpt_analysis.zoo.train import TrainConfig, with_paper_optimiser
    from ckpt_analysis.zoo.train import train_arithmetic as train

    spec = load_job(job)
    task = spec.data.source
    if task != "addition" and task != "subtraction":
        raise CkptAnalysisError(
            f"{job}: data.source = {task!r}; train-arithmetic trains 'addition' or 'subtraction'"
        )
    config = TrainConfig(
        task=task,
        steps=steps,
        save_every=save_every,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        hidden_size=hidden_size,
        num_layers=layers,
        num_heads=heads,
        device=spec.checkpoints.device,
    )
    if paper_optimiser:
        config = with_paper_optimiser(config)
    accuracy = train(_run_folder(spec, job), config)
    out.print(
        f"answer-digit accuracy {accuracy:.3f}; checkpoints in {spec.checkpoints.location}; "
        f"next: ckpt-analysis run {job}",
        highlight=False,
    )


@app.command("train-grammar")
@reports_errors
def train_grammar(
    job: JobArg,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1500,
    save_every: Annotated[int, typer.Option(help="Checkpoint interval (steps).")] = 100,
    early_saves: Annotated[
        bool, typer.Option(help="Also save at steps 1, 2, 4, 8, … below --save-every.")
    ] = True,
    vocab_size: Annotated[int, typer.Option(help="Words in the grammar (TRACE: 7,910).")] = 1000,
    noise: Annotated[float, typer.Option(help="Chance a content word is swapped for a random one.")] = 0.0,
    train_sequences: Annotated[
        int, typer.Option(help="Packed training sequences of data.seq_len words (6000 × 32 ≈ 25K sentences).")
    ] = 6000,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (TRACE: 1e-3).")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Sequences per step (TRACE: 128).")] = 128,
    hidden_size: Annotated[int, typer.Option(help="Model width.")] = 64,
    layers: Annotated[int, typer.Option(help="Transformer layers (TRACE: 2).")] = 2,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    seed: Annotated[int, typer.Option(help="Initialisation, training corpus and batch-order seed.")] = 0,
) -> None:
    """Train a small GPTNeoX on the annotated grammar corpus (a job with data.source = "grammar"),
    writing checkpoint-<step> folders into the job's checkpoints.path.

    The training corpus is fixed and seeded (the job's data.seed draws the analysed sequences,
    which the model never trains on when it differs from --seed). Then `ckpt-analysis run`."""
    from ckpt_analysis.config import load_job
    from ckpt_analysis.zoo.train import GrammarTrainConfig
    from ckpt_analysis.zoo.train import train_grammar as train

    spec = load_job(job)
    if spec.data.source != "grammar":
        raise CkptAnalysisError(f"{job}: data.source = {spec.data.source!r}; train-grammar trains 'grammar'")
    config = GrammarTrainConfig(
        vocab_size=vocab_size,
        seq_len=spec.data.seq_len,
        noise=noise,
        train_sequences=train_sequences,
        steps=steps,
        save_every=save_every,
        early_saves=early_saves,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        hidden_size=hidden_size,
        num_layers=layers,
        num_heads=heads,
        device=spec.checkpoints.device,
    )
    try:
        loss = train(_run_folder(spec, job), config)
    except ValueError as exc:
        raise CkptAnalysisError(f"{job}: {exc}") from exc
    out.print(
        f"held-out next-token loss {loss:.3f}; checkpoints in {spec.checkpoints.location}; "
        f"next: ckpt-analysis run {job}",
        highlight=False,
    )


@app.command()
@reports_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the run, job files, stores and plots go.")] = Path(
        "demo_out"
    ),
    steps: Annotated[int, typer.Option(help="Training steps of the tiny model.")] = 600,
    save_every: Annotated[int, typer.Option(help="Checkpoint interval (steps).")] = 20,
    force: ForceOpt = False,
) -> None:
    """Offline demo: train a tiny GPTNeoX on 3-digit addition, sweep activation covariances, then run
    POLCA (Hessian basis, projections, HDBSCAN clusters) and its baselines, printing carry scores;
    last, train the leading-term paper's one-hot model at two step sizes and show how its weights
    align with the corpus-statistics predictions."""
    from ckpt_analysis.report import (
        carry_scores_table,
        chosen_second_order,
        conservation_table,
        onehot_alignment_table,
        variance_table,
    )
    from ckpt_analysis.zoo.demo import run_demo
    from ckpt_analysis.zoo.train import TrainConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run_demo(workdir, train=TrainConfig(steps=steps, save_every=save_every), force=force)
    out.print(variance_table(result.steps, result.total_variance, result.participation))
    out.print(carry_scores_table(result.scores))
    out.print(conservation_table(result.explained, chosen_second_order(result.polca_store)))
    out.print(f"final answer-digit accuracy {result.accuracy:.3f}")
    out.print(onehot_alignment_table(result.alignment))
    out.print(
        f"stores: {result.covariance_store}, {result.polca_store}; plots: "
        f"{', '.join(str(p) for p in result.plots) or 'none (no clusters found)'}",
        highlight=False,
    )
    out.print(
        f'query it: python -c "import ckpt_analysis as ca; '
        f"print(ca.open_results('{result.polca_store}').cluster_label)\"",
        highlight=False,
    )
    if any(not o.ok for o in result.outcomes):
        raise typer.Exit(1)
