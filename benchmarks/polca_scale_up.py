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
import os
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

from common import CARRY_HEADER, SCORE_HEADER, carry_rows, score_rows, table
from polca_after_tau import group_losses, plot_groups
from transformers.utils import logging as hf_logging

from ckpt_analysis.config import load_job
from ckpt_analysis.device import resolve_device
from ckpt_analysis.estimate import Estimate, device_name, estimate, sweep_seconds
from ckpt_analysis.plots import plot_validity
from ckpt_analysis.run import run_job
from ckpt_analysis.store import open_results
from ckpt_analysis.zoo.demo import polca_job, train_or_reuse
from ckpt_analysis.zoo.train import TrainConfig, skeleton_run, train_arithmetic, with_paper_optimiser

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
PAPER_TINY = replace(
    PAPER_CPU, hidden_size=16, num_layers=1, num_heads=2, steps=200, save_every=10, batch_size=32
)
"""A twin small enough for a test (seconds): width 16, one layer, 200 steps, 64 problems."""
PAPER_JOB = """name = "polca-paper-protocol"
output = "polca.zarr"

[checkpoints]
source = "local"
path = "run"
select = "{select}"

[data]
source = "addition"
num_examples = {problems}
seed = 4321

[sample]
source = "addition"
num_examples = {problems}
seed = 2025

[analyses.hessian_basis]
k = 1
steps = {basis_steps}
sample_sequences = {problems}
random = true
axis = 0
shuffled = true
rayleigh = true

[analyses.token_loss]

[analyses.polca]
bases = ["hessian", "random", "shuffled"]
second_order = "paper"
tf32 = {tf32}

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
torch_threads = {threads}
batch_size = {problems}
"""
PROBLEMS = 1250
"""The paper's analysed problems (5,000 answer tokens) and, separately drawn, its Hessian sample."""


def paper_job(
    train: TrainConfig, *, analyse_every: int = 1, problems: int = PROBLEMS, tf32: bool = False
) -> str:
    """The paper protocol's analysis job for ``train``: as the paper, a basis vector every 10
    checkpoints (every 200 steps at its spacing of 20) and a lag of 5 (100 steps). With
    ``analyse_every`` = r > 1, the budget's reduction: only every r-th saved checkpoint is
    analysed (the basis steps, multiples of 10 saves, stay among them for r dividing 10).
    ``tf32``: the projections in TF32 on CUDA, conservation checked in fp32 (docs/polca.md, "TF32")."""
    every = 10 * train.save_every
    select = "all" if analyse_every == 1 else f"every={analyse_every * train.save_every}"
    return PAPER_JOB.format(
        basis_steps=list(range(every, train.steps + 1, every)),
        lag=5 * train.save_every,
        select=select,
        problems=problems,
        threads=os.cpu_count() or 1,  # the clusters units' fits, a thread per core
        tf32=str(tf32).lower(),
    )


PROTOCOLS = {"paper": (PAPER, PROBLEMS), "paper_cpu": (PAPER_CPU, PROBLEMS), "paper_tiny": (PAPER_TINY, 64)}
"""The protocol settings and their analysed problems."""


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


def protocol_report(folder: Path) -> str:
    """τ, the share of checkpoints after it, the carry scores beside the base rate (printed and
    returned); the group figure written to ``folder/groups.png``."""
    ds = open_results(folder / "polca.zarr")
    tau = float(ds.cluster_tau.isel(window=0, trajectory=0))
    after = float((ds.step.values > tau).mean())
    text = f"{folder.name}: τ = {tau:.0f}, {after:.0%} of the {ds.sizes['step']} checkpoints after it\n\n"
    text += table(SCORE_HEADER, score_rows(ds))
    print(text)
    plot_groups(ds, group_losses(ds), folder / "groups.png", f"{folder.name} protocol run")
    return text


REDUCTIONS = (1, 2, 5, 10)
"""``--budget``'s documented reductions (docs/polca.md, "One budgeted command"): analyse every
r-th saved checkpoint; r divides the basis spacing of 10 saves, so the basis is the paper's."""


def training_seconds(folder: Path, train: TrainConfig) -> float:
    """The run's training time, extrapolated from two timed prefixes trained into ``folder``, of
    one and two checkpoint spacings: their difference is one spacing's steps and save, without
    the start-up both pay (first kernels, the first save)."""
    times = []
    for spacings in (1, 2):
        start = time.perf_counter()
        train_arithmetic(folder / str(spacings), replace(train, steps=spacings * train.save_every))
        times.append(time.perf_counter() - start)
    return max(times[1] - times[0], 0.0) / train.save_every * train.steps


Choice = tuple[int, bool]
"""A run ``--budget`` may choose: (analyse 1 in r checkpoints, TF32 projections)."""


def choices(cuda: bool) -> list[Choice]:
    """docs/polca.md, "One budgeted command": the full protocol in fp32, then on CUDA in TF32,
    then 1 in r checkpoints for each documented r (in TF32 on CUDA), nearest first."""
    tf32 = [(1, True)] if cuda else []
    return [(1, False), *tf32, *((r, cuda) for r in REDUCTIONS[1:])]


def choice_name(choice: Choice) -> str:
    r, tf32 = choice
    return ("full protocol" if r == 1 else f"1 in {r} checkpoints") + (", TF32" if tf32 else "")


def choice_estimates(
    folder: Path, train: TrainConfig, problems: int, choice: Choice, *, calibrate: bool
) -> list[Estimate]:
    """``plan --estimate`` of the protocol's job for ``choice`` on a skeleton of the run
    (:func:`~ckpt_analysis.zoo.train.skeleton_run`): exact unit counts and store sizes, and with
    ``calibrate`` the time per unit, before anything is trained."""
    skeleton_run(folder / "run", train)
    r, tf32 = choice
    spec = folder / f"polca_every{r}{'_tf32' if tf32 else ''}.toml"
    spec.write_text(paper_job(train, analyse_every=r, problems=problems, tf32=tf32))
    return estimate(load_job(spec), calibrate=calibrate)


def choose(
    train_s: float,
    calibrated: dict[bool, list[Estimate]],
    counts: dict[Choice, list[Estimate]],
    budget: float,
) -> tuple[Choice, dict[Choice, float]]:
    """The nearest choice whose predicted seconds (training, then each analysis's units at the
    time per unit calibrated in its precision, one worker, plus the one-time costs) fit
    ``budget``, else the last; and every choice's prediction."""
    predicted = {}
    for choice, rows in counts.items():
        per_unit = {e.analysis: e for e in calibrated[choice[1]]}
        units = [replace(per_unit[e.analysis], units=e.units) for e in rows]
        predicted[choice] = train_s + sweep_seconds(units, workers=1)
    fitting = [c for c in counts if predicted[c] <= budget]
    return (fitting[0] if fitting else list(counts)[-1]), predicted


def run_budgeted(workdir: Path, name: str, train: TrainConfig, budget: float, problems: int) -> None:
    """docs/polca.md, "One budgeted command": estimate, choose the full protocol or the nearest
    reduction that fits ``budget`` seconds, run it, and write ``report.md`` with the choice, the
    carry table, τ and accuracy beside the figures in ``workdir/name``."""
    folder, start = workdir / name, time.perf_counter()
    cuda = resolve_device("auto").startswith("cuda")
    train_s = training_seconds(folder / "probe", train)
    skeleton = folder / "skeleton"
    calibrated = {
        tf32: choice_estimates(skeleton, train, problems, (1, tf32), calibrate=True) for tf32 in {False, cuda}
    }
    counts = {c: choice_estimates(skeleton, train, problems, c, calibrate=False) for c in choices(cuda)}
    left = budget - (time.perf_counter() - start)  # the estimate's own time counts against the budget
    chosen, predicted = choose(train_s, calibrated, counts, left)
    rows = [
        [
            choice_name(c),
            f"{predicted[c]:.0f}",
            f"{sum(e.store_bytes for e in counts[c]) / 1e9:.2f}",
            "chosen" if c == chosen else "",
        ]
        for c in counts
    ]
    unmeasured = [e.analysis for e in calibrated[False] if e.seconds is None]
    choice = table(["run", "predicted s", "store GB", ""], rows)
    fits = "fits" if predicted[chosen] <= left else "does not fit even at the largest reduction; ran that"
    timed = f"not timed: {', '.join(unmeasured)}" if unmeasured else "every analysis timed"
    head = f"budget {budget:.0f} s on {device_name('auto')}, {left:.0f} s left after the estimate; "
    head += f"training ≈ {train_s:.0f} s; {timed}"
    head += f"; the choice ({choice_name(chosen)}) {fits}"
    print(head, choice, sep="\n\n")
    began = time.perf_counter()
    r, tf32 = chosen
    carry = run_setting(
        workdir, name, train, lambda t: paper_job(t, analyse_every=r, problems=problems, tf32=tf32)
    )
    wall = time.perf_counter() - began
    report = protocol_report(folder)
    text = "\n\n".join(
        [head, choice, f"ran in {wall:.0f} s", report, table(["setting", "accuracy", *CARRY_HEADER], carry)]
    )
    (folder / "report.md").write_text(text + "\n")


def main(
    workdir: Path, *, papers: list[str], only: list[str], steps: int | None, budget: float | None
) -> None:
    hf_logging.disable_progress_bar()
    if budget is not None:
        for name in papers:
            train, problems = PROTOCOLS[name]
            run_budgeted(workdir, name, replace(train, steps=steps) if steps else train, budget, problems)
        return
    rows = carry_rows(workdir / "polca.zarr", "demo", "—") if (workdir / "polca.zarr").is_dir() else []
    settings = {name: (train, polca_job) for name, train in SETTINGS.items()}  # the demo's job, scaled
    protocols = {name: (train, partial(paper_job, problems=n)) for name, (train, n) in PROTOCOLS.items()}
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
    parser.add_argument("--paper-tiny", action="store_true", help="also a tiny twin (seconds; the tests')")
    parser.add_argument("--steps", type=int, help="train only this prefix of each setting (a cost timing)")
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds: estimate the chosen protocol settings first, run the full protocol or the "
        "nearest reduction that fits, and write WORKDIR/<setting>/report.md",
    )
    args = parser.parse_args()
    chosen = (("paper", args.paper), ("paper_cpu", args.paper_cpu), ("paper_tiny", args.paper_tiny))
    papers = [name for name, wanted in chosen if wanted]
    if args.budget is not None and not papers:
        parser.error("--budget runs a protocol setting: add --paper, --paper-cpu or --paper-tiny")
    main(Path(args.workdir), papers=papers, only=args.only, steps=args.steps, budget=args.budget)
