"""Investigation (issue 21): do carry clusters appear after the loss flattens, as in the paper's run?

The paper's run spends about 90 % of its checkpoints after τ; the demo's ends at τ (480 of 600).
This continues the demo's addition run (same model, seed, problems and optimiser) to 3000 steps
(6 × the demo's τ; at 1800 steps answer accuracy was only 0.91), a checkpoint every 20 steps, with
a Hessian and a random basis of one vector every 100 steps (≈ τ/5; 31 each), and clusters POLCA, POLCA on the
random basis and the exact loss under the paper's carry protocol in four windows (docs/polca.md,
"Windows"): the whole run, from the run's own τ, from the demo's τ (480), and from the last
checkpoint before the 10s-place carry tokens' mean loss has made half of its fall (while those
carries are still unlearned). It prints, per (place, carry) group, the mean loss at each window's
start and end; per window and trajectory, the best scored cluster's carry homogeneity, the base
rate and the carry AUC; and writes the group-loss figure to ``WORKDIR/after_tau/groups.png``.

Run: ``python benchmarks/polca_after_tau.py [WORKDIR]`` (about 30 minutes on 2 cores; a finished
training run or store is reused).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import xarray as xr
from common import SCORE_HEADER, score_rows, table
from transformers.utils import logging as hf_logging

from ckpt_analysis.config import load_job
from ckpt_analysis.plots import plot_clusters, pyplot
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results
from ckpt_analysis.zoo.demo import train_or_reuse
from ckpt_analysis.zoo.train import TrainConfig

TRAIN = TrainConfig(steps=3000, save_every=20)
DEMO_TAU = 480
BASIS_EVERY = 100
JOB = """name = "polca-after-tau"
output = "{output}"

[checkpoints]
source = "local"
path = "run"

[data]
source = "addition"
num_examples = 250
seed = 4321

{basis}
[analyses.token_loss]
{polca}
[compute]
workers = 2
batch_size = 250
"""
BASIS = f"""
[analyses.hessian_basis]
k = 1
every = {BASIS_EVERY}
sample_sequences = 128
random = true
"""
POLCA = """
[analyses.polca]
bases = ["hessian", "random"]

[analyses.clusters]
trajectories = ["polca", "polca_random", "exact_loss"]
label = "carry"
restrict = "place"
restrict_values = [1, 2]
lag = 100
window = {windows}
"""
GROUPS = [(place, carry) for place in (3, 2, 1, 0) for carry in (0, 1) if not (place == 0 and carry)]
PLACE = {3: "1000s", 2: "100s", 1: "10s", 0: "1s"}


def group_losses(ds: xr.Dataset) -> dict[tuple[int, int], np.ndarray]:
    """Mean token loss per checkpoint of each (place, carry) group of answer digits."""
    loss, place, carry = ds.token_loss.values, ds.label_place.values, ds.label_carry.values
    return {g: loss[:, (place == g[0]) & (carry == g[1])].mean(axis=1) for g in GROUPS}


def unlearned_step(steps: np.ndarray, tens_carry: np.ndarray) -> int:
    """The last checkpoint before the 10s-place carry tokens' mean loss has made half of its fall."""
    half = tens_carry[0] - 0.5 * (tens_carry[0] - tens_carry[-1])
    reached = int(np.nonzero(tens_carry <= half)[0][0])
    return int(steps[max(reached - 1, 0)])


def loss_rows(ds: xr.Dataset, groups: dict[tuple[int, int], np.ndarray]) -> list[list[str]]:
    """Per window and group: the mean loss at the window's first and last checkpoint."""
    steps = ds.step.values.tolist()
    rows = []
    for window in ds.window.values.tolist():
        part = ds.sel(window=window, trajectory="polca")
        first, last = (steps.index(int(part[v])) for v in ("cluster_window_start", "cluster_window_end"))
        cells = [f"{groups[g][first]:.3f} → {groups[g][last]:.3f}" for g in GROUPS]
        rows.append([f"{window} ({steps[first]}–{steps[last]})", *cells])
    return rows


def plot_groups(ds: xr.Dataset, groups: dict[tuple[int, int], np.ndarray], path: Path, run: str) -> None:
    """Each group's mean loss against the step, with every window's start marked."""
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(8, 4.2))
    for (place, carry), curve in groups.items():
        style = "-" if carry else "--"
        axis.plot(ds.step.values, curve, style, label=f"{PLACE[place]} place, carry {carry}")
    for window in ds.window.values.tolist():
        start = float(ds.sel(window=window, trajectory="polca").cluster_window_start)
        axis.axvline(start, color="grey", linestyle=":", linewidth=1)
        axis.annotate(f"from {window.split('-')[0]}", (start, axis.get_ylim()[1]), fontsize=7, rotation=90)
    axis.set_yscale("log")
    axis.set_xlabel("training step")
    axis.set_ylabel("mean answer-digit loss (nats, log)")
    axis.set_title(f"{run}: mean loss per (place, carry) group; dotted: window starts")
    axis.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(workdir: Path) -> None:
    hf_logging.disable_progress_bar()
    folder = workdir / "after_tau"
    accuracy = train_or_reuse(folder / "run", TRAIN)
    print(f"trained {TRAIN.steps} steps, answer accuracy {accuracy:.3f}")
    (folder / "losses.toml").write_text(JOB.format(output="losses.zarr", basis="", polca=""))
    run_job(load_job(folder / "losses.toml"))
    losses = open_results(folder / "losses.zarr")
    steps = losses.step.values
    start = unlearned_step(steps, group_losses(losses)[(1, 1)])
    starts = sorted({DEMO_TAU, start} - {int(steps[0])})
    polca = POLCA.format(
        windows='[["start", "end"], ["tau", "end"], ' + ", ".join(f'[{s}, "end"]' for s in starts) + "]"
    )
    (folder / "polca.toml").write_text(JOB.format(output="polca.zarr", basis=BASIS, polca=polca))
    run_job(load_job(folder / "polca.toml"))
    ds = open_results(folder / "polca.zarr")
    groups = group_losses(ds)
    tau = float(ds.cluster_tau.isel(window=0, trajectory=0))
    print(f"τ of this run: {tau:.0f}; 10s carries unlearned until step {start}")
    header = ["window", *(f"{PLACE[p]}, carry {c}" for p, c in GROUPS)]
    print(table(header, loss_rows(ds, groups)))
    print(table(SCORE_HEADER, score_rows(ds)))
    plot_groups(ds, groups, folder / "groups.png", "addition run continued past τ")
    for i, window in enumerate(ds.window.values.tolist()):
        for path in plot_clusters(ds, folder / f"clusters_{window}", window=i, vectors=2):
            print(f"figure: {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", nargs="?", default="bench_out", type=Path)
    main(parser.parse_args().workdir)
