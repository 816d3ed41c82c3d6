"""Investigation (issue 5): does a longer run or a bigger model let POLCA separate carry tokens?

Trains the demo's addition task in two scaled-up settings and runs the demo's own POLCA job on
each (Hessian basis with the random and axis ablations, projections, clusters, baselines), with
the basis spacing and breakthrough lag derived from the run length exactly as the demo does:

- ``long``: the demo model (hidden 64, 2 layers), 3× the steps (1800, checkpoints every 20);
- ``big``: hidden 128, 3 layers, 4 heads (≈ 4× the parameters), 1200 steps every 20;
- ``small`` (issue 15): the demo model in a regime of small steps, as the paper trains — AdamW
  betas (0.9, 0.95), weight decay 0.1, 100 warm-up steps, batch 64 — at lr 3e-4 (10× below the
  demo's) for 6000 steps (10× more), checkpoints every 50;
- ``paper`` (only with ``--paper``; a CUDA machine for the whole run, any machine for a
  ``--steps`` prefix): the POLCA paper's own protocol, setting by setting (docs/polca.md, "The
  paper's protocol"): a GPT-2-style model (learned positions, sequential residual; the paper used
  TransformerLens) of 3 layers, width 512, 4 heads, MLP 2048 (9.5M parameters); AdamW lr 1e-5,
  weight decay 0.1, betas (0.9, 0.95), 100 warm-up steps, batch 64, 10,000 steps, a checkpoint
  every 20; 1250 problems (5000 answer tokens) analysed; the Hessian on a separate 1250-problem
  training sample; one vector every 200 steps (50); the paper's second-order term; HDBSCAN
  min_cluster_size 150 of 5000; the random and shuffled-checkpoint bases as its ablations;
- ``paper_cpu`` (only with ``--paper-cpu``; about an hour on 2 cores): the same protocol and
  analysis job on a CPU-sized twin, with only the model width, the step count and the learning
  rate scaled (:data:`PAPER_CPU`), so that at least 80 % of its checkpoints come after τ as in the
  paper's run. It also prints τ, the share of checkpoints after it, per window and trajectory the
  carry scores beside the base rate, and writes the (place, carry) loss figure ``groups.png``.

Prints each setting's carry table next to the demo's (when ``WORKDIR/polca.zarr`` exists).
Run: ``python benchmarks/polca_scale_up.py demo_out [--paper] [--only small]`` (about 25 minutes on
2 cores for ``long`` and ``big``, about 20 for ``small``; finished settings are reused). Each setting also
writes its per-interval validity figure to ``WORKDIR/<setting>/validity.png``. ``--steps N`` trains
only the first N steps of each chosen setting (same spacing), a timed prefix: the wall time of the
training and of the analysis job, and each analysis's measured seconds per unit (the sidecars' median)
are printed, for extrapolating a setting too long to run here (docs/polca.md, "Cost").
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from common import CARRY_HEADER, SCORE_HEADER, carry_rows, score_rows, table
from polca_after_tau import group_losses, plot_groups
from transformers.utils import logging as hf_logging

from ckpt_analysis.config import load_job
from ckpt_analysis.estimate import estimate
from ckpt_analysis.plots import plot_validity
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results
from ckpt_analysis.zoo.demo import polca_job, train_or_reuse
from ckpt_analysis.zoo.train import TrainConfig, with_paper_optimiser

SETTINGS = {
    "long": TrainConfig(steps=1800, save_every=20),
    "big": TrainConfig(steps=1200, save_every=20, hidden_size=128, num_layers=3),
    "small": with_paper_optimiser(TrainConfig(steps=6000, save_every=50, batch_size=64, lr=3e-4)),
}
PAPER = with_paper_optimiser(
    TrainConfig(
        steps=10_000,
        save_every=20,
        batch_size=64,
        lr=1e-5,
        hidden_size=512,
        num_layers=3,
        num_heads=4,
        architecture="gpt2",
    )
)
PAPER_CPU = replace(PAPER, hidden_size=64, steps=5000, save_every=50, lr=3e-3)
"""The CPU twin: width 64 (MLP 256) and 5000 steps, a checkpoint every 50 (101); the basis
spacing and the lag keep the paper's ratio to the checkpoint spacing (a vector every 10
checkpoints, 10 per basis; lag 5 checkpoints). The learning rate is raised with the width so that
the run learns in 5000 steps and τ falls within its first fifth (a pilot of four rates and widths,
docs/polca.md, "A CPU-sized twin")."""
PAPER_JOB = """name = "polca-paper-protocol"
output = "polca.zarr"

[checkpoints]
source = "local"
path = "run"

[data]
source = "addition"
num_examples = 1250
seed = 4321

[sample]
source = "addition"
num_examples = 1250
seed = 2025

[analyses.hessian_basis]
k = 1
steps = {basis_steps}
sample_sequences = 1250
random = true
axis = 0
shuffled = true
rayleigh = true

[analyses.token_loss]

[analyses.polca]
bases = ["hessian", "random", "shuffled"]
second_order = "paper"

[analyses.clusters]
trajectories = ["polca", "polca_random", "polca_shuffled", "exact_loss", "fisher"]
min_cluster_fraction = 0.03
label = "carry"
restrict = "place"
restrict_values = [1, 2]
restrict_fraction = 0.85
lag = {lag}
window = [["start", "end"], ["tau", "end"]]

[compute]
workers = 1
batch_size = 1250
"""


def paper_job(train: TrainConfig) -> str:
    """The paper protocol's analysis job for ``train``: as the paper, a basis vector every 10
    checkpoints (every 200 steps at its spacing of 20) and a lag of 5 (100 steps)."""
    every = 10 * train.save_every
    return PAPER_JOB.format(basis_steps=list(range(every, train.steps + 1, every)), lag=5 * train.save_every)


def run_setting(
    workdir: Path, name: str, train: TrainConfig, job_text: Callable[[TrainConfig], str]
) -> list[list[str]]:
    """Train (unless done) and run the setting's POLCA job on ``workdir/name``; print the cost."""
    folder = workdir / name
    start = time.perf_counter()
    accuracy = train_or_reuse(folder / "run", train)
    trained = time.perf_counter()
    (folder / "polca.toml").write_text(job_text(train))
    job = load_job(folder / "polca.toml")
    run_job(job)
    analysed = time.perf_counter()
    took = f"trained in {trained - start:.1f} s, analysed in {analysed - trained:.1f} s"
    print(f"{name}: {train.steps} steps {took}")
    costs = [
        [
            e.analysis,
            str(e.units),
            f"{e.seconds:.2f}" if e.seconds else "—",
            f"{(e.gpu_peak_mb or 0) / 1024:.2f}",
        ]
        for e in estimate(job, calibrate=False)
    ]
    print(table(["analysis", "units", "s / unit (median)", "peak GPU GiB"], costs))
    plot_validity(open_results(folder / "polca.zarr"), folder / "validity.png")
    return carry_rows(folder / "polca.zarr", name, f"{accuracy:.2f}")


def protocol_report(folder: Path) -> None:
    """τ, the share of checkpoints after it, the carry scores beside the base rate, the group figure."""
    ds = open_results(folder / "polca.zarr")
    tau = float(ds.cluster_tau.isel(window=0, trajectory=0))
    after = float((ds.step.values > tau).mean())
    print(f"{folder.name}: τ = {tau:.0f}, {after:.0%} of the {ds.sizes['step']} checkpoints after it")
    print(table(SCORE_HEADER, score_rows(ds)))
    plot_groups(ds, group_losses(ds), folder / "groups.png", f"{folder.name} protocol run")


def main(workdir: Path, *, papers: list[str], only: list[str], steps: int | None) -> None:
    hf_logging.disable_progress_bar()
    rows = carry_rows(workdir / "polca.zarr", "demo", "—") if (workdir / "polca.zarr").is_dir() else []
    settings = {name: (train, polca_job) for name, train in SETTINGS.items()}  # the demo's job, scaled
    protocols = {"paper": (PAPER, paper_job), "paper_cpu": (PAPER_CPU, paper_job)}
    settings |= {name: protocols[name] for name in papers}
    for name, (train, job_text) in settings.items():
        if not only or name in only:
            rows += run_setting(workdir, name, replace(train, steps=steps) if steps else train, job_text)
            if name in protocols:
                protocol_report(workdir / name)
    header = ["setting", "accuracy", *CARRY_HEADER]
    print(table(header, rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", nargs="?", default="demo_out")
    parser.add_argument("--paper", action="store_true", help="also the 9.5M-parameter setting (CUDA)")
    parser.add_argument("--paper-cpu", action="store_true", help="also the paper protocol's CPU-sized twin")
    parser.add_argument("--only", nargs="+", default=[], help="run only these settings")
    parser.add_argument("--steps", type=int, help="train only this prefix of each setting (a cost timing)")
    args = parser.parse_args()
    papers = [name for name, chosen in (("paper", args.paper), ("paper_cpu", args.paper_cpu)) if chosen]
    main(Path(args.workdir), papers=papers, only=args.only, steps=args.steps)
